"""Evaluate a checkpoint at every trained level and over a Mix'n'Match sweep.

    python -m matmamba.eval --checkpoint checkpoints/matmamba-vision-fmnist --out runs/eval-vision
    python -m matmamba.eval --checkpoint runs/baseline-32 --width 32 --out runs/eval-baseline-32

Writes `eval.json`, `eval.md` (a table) and `pareto.png` (parameters vs accuracy or loss:
the trained levels as a line, Mix'n'Match specs as points). Vision uses the 10k test set, or
the shipped 2k sample when the Debian package is absent (the table says which).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import tasks
from .data import has_full_fashion_mnist, load_fashion_mnist, load_prose
from .flops import count_flops, count_params, vision_tokens
from .lm import MatMambaLM
from .pretrained import load_model

# Mix'n'Match specs mix the trained widths per layer, as the paper's sweeps do.
DEFAULT_MIXNMATCH = 24


def interpolated_specs(model) -> list[tuple[int, ...]]:
    """Uniform specs at widths between the trained ones (never trained themselves), one per gap midpoint."""
    cfg = model.config
    trained = sorted({cfg.block.width_for_level(k) for k in cfg.block.levels})
    q = cfg.block.width_quantum
    mids = {(lo + hi) // 2 // q * q for lo, hi in zip(trained, trained[1:])}
    return [(w,) * cfg.n_layer for w in sorted(mids - set(trained)) if w >= q]


def mixnmatch_specs(model, count: int, seed: int = 0) -> list[tuple[int, ...]]:
    """`count` distinct per-layer width specs drawn from the trained widths (uniform specs excluded)."""
    cfg = model.config
    widths = sorted({cfg.block.width_for_level(k) for k in cfg.block.levels})
    rng = random.Random(seed)
    specs: list[tuple[int, ...]] = []
    limit = len(widths) ** cfg.n_layer - len(widths)
    while len(specs) < min(count, limit):
        spec = tuple(rng.choice(widths) for _ in range(cfg.n_layer))
        if len(set(spec)) > 1 and spec not in specs:
            specs.append(spec)
    return specs


class Evaluator:
    """Scores one width spec on the task's held-out split."""

    def __init__(self, model, device: torch.device, split: str, max_windows: int | None) -> None:
        self.model, self.device = model, device
        self.is_lm = isinstance(model, MatMambaLM)
        if self.is_lm:
            self.stream = tasks.TokenStream.from_text(load_prose(split), model.tokenizer)
            self.data = f"Jane Austen, {split} split ({self.stream.ids.numel()} tokens)"
            self.max_windows = max_windows
        else:
            if split == "test" and not has_full_fashion_mnist():
                split = "test-sample"
            self.images, self.labels = load_fashion_mnist(split)
            self.data = f"Fashion-MNIST {split} ({self.labels.numel()} images)"

    def __call__(self, spec: tuple[int, ...]) -> dict[str, float]:
        cfg = self.model.config
        row: dict[str, Any] = {"widths": list(spec), "params": count_params(cfg, spec)}
        if self.is_lm:
            row.update(tasks.lm_eval(self.model, self.stream, spec, self.device, max_windows=self.max_windows))
            row["flops_per_token"] = count_flops(cfg, spec, 1)
        else:
            row["accuracy"] = tasks.vision_accuracy(self.model, self.images, self.labels, spec, self.device)
            row["flops_per_image"] = count_flops(cfg, spec, vision_tokens(cfg))
        return row


def evaluate(checkpoint: Path, device: torch.device, split: str, n_mixnmatch: int, width: int | None,
             max_windows: int | None = None) -> dict[str, Any]:
    model = load_model(checkpoint, device=device)
    cfg = model.config
    run = Evaluator(model, device, split, max_windows)
    if width is not None:
        anchors = [(width,) * cfg.n_layer]
    else:
        anchors = [(cfg.block.width_for_level(k),) * cfg.n_layer for k in sorted(cfg.block.levels)]
    sweep = [] if width is not None else mixnmatch_specs(model, n_mixnmatch)
    between = [] if width is not None else interpolated_specs(model)
    rows = []
    for kind, specs in (("level", anchors), ("interpolated", between), ("mixnmatch", sweep)):
        for spec in tqdm(specs, desc=f"eval {kind}", unit="spec"):
            rows.append({"kind": kind, **run(spec)})
    return {"checkpoint": str(checkpoint), "fingerprint": model.fingerprint, "data": run.data,
            "task": cfg.model_type, "device": str(device), "rows": rows}


def markdown_table(result: dict[str, Any]) -> str:
    lm = result["task"] == "matmamba-lm"
    metric_cols = ["loss", "bits_per_byte"] if lm else ["accuracy"]
    head = ["kind", "widths", "params", *metric_cols]
    lines = [f"Checkpoint `{result['checkpoint']}` on {result['data']} ({result['device']})", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in sorted(result["rows"], key=lambda r: r["params"]):
        widths = row["widths"]
        shown = str(widths[0]) if len(set(widths)) == 1 else ",".join(map(str, widths))
        cells = [row["kind"], shown, f"{row['params']:,}"] + [f"{row[c]:.4f}" for c in metric_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pareto_plot(result: dict[str, Any], path: Path, baselines: dict[int, float] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "loss" if result["task"] == "matmamba-lm" else "accuracy"
    levels = sorted((r for r in result["rows"] if r["kind"] == "level"), key=lambda r: r["params"])
    mix = [r for r in result["rows"] if r["kind"] == "mixnmatch"]
    between = [r for r in result["rows"] if r["kind"] == "interpolated"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot([r["params"] for r in levels], [r[metric] for r in levels], "o-", label="trained levels (uniform)")
    ax.scatter([r["params"] for r in mix], [r[metric] for r in mix], s=18, c="tab:orange",
               label="Mix'n'Match (random per-layer)")
    if between:
        ax.scatter([r["params"] for r in between], [r[metric] for r in between], marker="D", s=36, c="tab:green",
                   label="untrained uniform widths")
    if baselines:
        ax.scatter(list(baselines), list(baselines.values()), marker="x", s=60, c="k",
                   label="independent baselines")
    ax.set_xlabel("parameters used")
    ax.set_ylabel("held-out loss (nats/token)" if metric == "loss" else "test accuracy")
    ax.set_title(f"{result['task']}: nested submodels")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m matmamba.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--split", default="test")
    p.add_argument("--mixnmatch", type=int, default=DEFAULT_MIXNMATCH, help="number of Mix'n'Match specs")
    p.add_argument("--width", type=int, default=None, help="evaluate only this uniform width (baselines)")
    p.add_argument("--max-windows", type=int, default=None, help="LM: evaluate at most N windows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    result = evaluate(args.checkpoint, torch.device(args.device), args.split, args.mixnmatch, args.width,
                      args.max_windows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown_table(result)
    (args.out / "eval.md").write_text(table)
    pareto_plot(result, args.out / "pareto.png")
    print(table)


if __name__ == "__main__":
    main()
