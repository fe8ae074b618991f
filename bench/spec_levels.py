"""Per edge level: how often the submodel's drafts are accepted and what that saves the cloud, per checkpoint.

    python -m bench.spec_levels --out docs/results/spec/spec_levels-cpu.json
    python -m bench.spec_levels --checkpoints checkpoints/matmamba-lm-austen runs/lm-distilled --out F.json

CPU, one process, no RPC: what a checkpoint's nesting gives speculative decoding, before transport
and serving (bench/spec_bench.py measures those; bench/verify_profile.py the cloud's GPU time).
For each checkpoint (several side by side: e.g. one before and after ``matmamba.train --distill``)
and each edge level:

- **agreement**: the share of the test split's positions where the level's top-1 next token equals
  the full width's (teacher-forced, ``tasks.lm_agreement``), with the level's held-out loss beside it
  so a gain in agreement is never read without its cost in quality;
- **the speculative loop** (``bench.speculate.level_row``): ``--prompts`` prompts x ``--tokens`` greedy
  tokens, drafts from a second copy of the checkpoint at the level's width, k adaptive up to
  ``--draft-tokens`` (the router's rule), each round one ``Verifier.verify``; against cloud-only
  ``runner.generate`` on the same prompts: output identical, drafts accepted, tokens per round, cloud
  passes per token, and the cloud's CPU ms per token (the wall time of its calls) with the ratio.

JSON to ``--out``, a table to stdout, a plot beside the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from bench.block_bench import finish
from bench.plots import pyplot
from bench.spec_bench import PROMPTS
from bench.speculate import WallTime, level_row
from cloud.runner import ModelRunner
from matmamba import MatMambaLM, load_model, tasks

log = logging.getLogger("spec_levels")

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "matmamba-lm-austen"


def checkpoint_rows(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cpu")
    model = load_model(path)
    if not isinstance(model, MatMambaLM) or model.tokenizer is None:
        raise SystemExit(f"{path}: not a language-model checkpoint with a tokenizer")
    full = (model.config.d_model,) * model.config.n_layer
    specs = {level: (model.config.block.width_for_level(level),) * model.config.n_layer for level in args.levels}
    test = tasks.prose_streams(model.tokenizer, (args.split,))[args.split]
    narrower = {level: spec for level, spec in specs.items() if spec != full}
    agreement = tasks.lm_agreement(model, test, narrower, full, device, max_windows=args.windows)
    runner = ModelRunner(model, device, precision="fp32")
    drafter = load_model(path).eval()  # the edge's copy: the same weights
    prompts = [model.tokenizer.encode(text) for text in PROMPTS[:args.prompts]]
    runner.warmup()  # as `python -m cloud` starts; then one untimed loop of each kind
    level_row(runner, drafter, prompts[:1], args.levels[-1], args.draft_tokens, 16, WallTime)
    rows = []
    for level, spec in specs.items():
        row = level_row(runner, drafter, prompts, level, args.draft_tokens, args.tokens, WallTime)
        row["agreement"] = agreement.get(level, 1.0)
        row["loss"] = tasks.lm_eval(model, test, spec, device, max_windows=args.windows)["loss"]
        rows.append(row)
        log.info("%s level %d: %s", path.name, level, row)
    return {"checkpoint": str(path), "fingerprint": model.fingerprint, "levels": rows}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    return {"machine": f"{platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}",
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "split": args.split, "windows": args.windows, "prompts": args.prompts, "tokens": args.tokens,
            "draft_tokens": args.draft_tokens,
            "checkpoints": [checkpoint_rows(path, args) for path in args.checkpoints]}


def table(result: dict[str, Any]) -> str:
    lines = [f"speculative decoding per edge level, {result['machine']}, {result['date']}: agreement on the "
             f"{result['split']} split; {result['prompts']} prompts x {result['tokens']} greedy tokens, drafts up to "
             f"{result['draft_tokens']} (k adaptive), one process",
             "| checkpoint | level | loss | top-1 agreement with full width | greedy output = cloud-only | "
             "drafts accepted | tokens / round | cloud passes / token | cloud CPU ms / token: cloud-only / "
             "speculative | cloud-only / speculative |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for ck in result["checkpoints"]:
        name = Path(ck["checkpoint"]).name
        for r in ck["levels"]:
            lines.append(f"| {name} | {r['level']} | {r['loss']:.4f} | {r['agreement']:.4f} | "
                         f"{'yes' if r['identical'] else 'NO'} | {r['drafts_accepted']:.2f} | "
                         f"{r['tokens_per_round']:.2f} | {r['passes_per_token']:.3f} | "
                         f"{r['cloud_only_wall_ms_per_token']:.2f} / {r['spec_wall_ms_per_token']:.2f} | "
                         f"{r['wall_ratio']:.2f}x |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for ck in result["checkpoints"]:
        name = Path(ck["checkpoint"]).name
        levels = [r["level"] for r in ck["levels"]]
        left.plot(levels, [r["tokens_per_round"] for r in ck["levels"]], marker="o", label=name)
        right.plot(levels, [r["wall_ratio"] for r in ck["levels"]], marker="o", label=name)
    left.set(xscale="log", xlabel="edge level (width = d_model / level)", ylabel="tokens per verification round",
             title="what one cloud pass yields")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set(xscale="log", xlabel="edge level", ylabel="cloud CPU ms per token: cloud-only / speculative",
              title="cloud compute saved (above 1: cheaper)")
    levels = [r["level"] for r in result["checkpoints"][0]["levels"]]
    for ax in (left, right):
        ax.set_xticks(levels, [str(level) for level in levels])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    fig.suptitle(f"speculative decoding per edge level ({result['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, nargs="+", default=[CHECKPOINT])
    parser.add_argument("--out", type=Path, default=None, help="JSON result (a table goes to stdout, a plot beside)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--split", default="test", choices=["val", "test"], help="split for agreement and loss")
    parser.add_argument("--windows", type=int, default=None, help="at most this many 256-token windows (default all)")
    parser.add_argument("--prompts", type=int, default=8, help=f"prompts per level, at most {len(PROMPTS)}")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--draft-tokens", type=int, default=8, help="most drafts per round (the router's default)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for path in args.checkpoints:
        if not (path / "config.json").is_file():
            parser.error(f"{path}: no checkpoint there (config.json is missing)")
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be in 1..{len(PROMPTS)}")
    result = run(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        plot(result, args.out.with_suffix(".png"))
    return finish(result, args.out, table)


if __name__ == "__main__":
    sys.exit(main())
