"""Where a verification round's cloud time goes, against a cloud-only decode step (GPU, one process, no RPC).

    python -m bench.verify_profile --out runs/verify_profile.json   # on the device: gpu_suite.sh spec-profile

The shipped LM checkpoint in a ``cloud.runner.ModelRunner`` on CUDA, warmed up as ``python -m cloud``
warms it (decode graphs, verification graphs), at ``--precision fp32`` as bench/spec_bench.py runs it.
Measured side by side, medians over repetitions:

- **cloud-only**: the wall time per token of ``runner.generate`` (greedy, what a Generate stream costs
  the cloud per token), and the GPU time of one replay of the decode-step graph (CUDA events);
- **a verification round** of k drafts, k = 1, 2, 4, 8, drafts all accepted (the model's own greedy
  continuation: nothing to roll back) and all rejected (random ids: roll back to the pending token):
  the wall time of ``Verifier.verify`` with the whole round in one graph (greedy rounds, the default)
  and with acceptance and rollback on the host after the forward graph (as sampling rounds run), and
  the GPU time of one replay of the whole-round graph;
- **the kernels of a round**: per kernel, launches and GPU microseconds per replay of the decode-step graph
  and of the round graph at each k (torch.profiler over replays), where the growth with k comes from;
- **cloud GPU time per generated token, per edge level** (``--levels``): ``--prompts`` prompts x ``TOKENS``
  greedy tokens, cloud-only (``runner.generate``) and speculative (an in-process loop: drafts from a CPU copy of
  the same checkpoint at the level's width, k adaptive up to ``--draft-tokens`` by the router's own rule,
  ``router.draft_length.DraftLength``, each round one ``Verifier.verify``), side by side. The cloud's GPU time
  is the sum of the CUDA kernels' and copies' durations that torch.profiler (CUPTI) records while the cloud
  works, graph replays included; drafting on the CPU keeps the edge's work out of it. Also the span between
  CUDA events around each call (an upper bound: it includes the GPU's idle gaps while the host launches).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.block_bench import cuda_kernels, environment, finish, replay_ms
from bench.spec_bench import PROMPTS
from bench.speculate import level_row
from cloud.runner import ModelRunner
from cloud.speculative import Verifier
from matmamba import load_model
from proto.validate import GenerateInputs

log = logging.getLogger("verify_profile")

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "matmamba-lm-austen"
PROMPT = "It is a truth universally acknowledged"
DRAFTS = (1, 2, 4, 8)
REPS = 50  # timed rounds (or replays) per configuration
TOKENS = 64  # tokens per timed cloud-only generation


def graph_kernels(replay, reps: int = REPS) -> dict[str, dict[str, float]]:
    """Per CUDA kernel (or copy) name: launches and GPU microseconds per ``replay()``, from CUPTI over ``reps``
    replays."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            replay()
        torch.cuda.synchronize()
    kernels = cuda_kernels(prof)
    if not kernels:
        raise RuntimeError("the profiler recorded no CUDA activity (CUPTI unavailable?)")
    return {name: {"launches": launches / reps, "us": micros / reps} for name, (launches, micros) in kernels.items()}


def cloud_only(runner: ModelRunner, prompt: np.ndarray) -> dict[str, Any]:
    inputs = GenerateInputs(prompt, TOKENS, 0.0, 0, 1.0, None, runner.config.d_model, "profile")
    walls, tokens = [], []
    for _ in range(5):
        start = time.perf_counter()
        runner.generate(inputs, threading.Event(), lambda token, logprob: tokens.append(token))
        walls.append((time.perf_counter() - start) * 1e3 / TOKENS)
    slot = runner._decode_graphs.acquire(runner.model.backbone.resolve_widths(), 1)
    try:
        step = replay_ms(slot.graph.replay, REPS)
        kernels = graph_kernels(slot.graph.replay)
    finally:
        runner._decode_graphs.release(slot)
    return {"wall_ms_per_token": statistics.median(walls), "gpu_ms_per_step": step, "kernels": kernels,
            "greedy": tokens[:TOKENS]}


def rounds(runner: ModelRunner, prompt: np.ndarray, k: int, drafts: np.ndarray, on_device: bool) -> tuple[float, int]:
    """Median wall ms of Verifier.verify, each round ``drafts`` from the state after the prompt; drafts accepted."""
    graphs, runner.round_graphs = runner.round_graphs, runner.round_graphs if on_device else None
    try:
        verifier = Verifier(runner)
        inputs = GenerateInputs(prompt, (REPS + 1) * (k + 1), 0.0, 0, 1.0, None, runner.config.d_model, "profile")
        session, _ = verifier.open(inputs)
        opened = session.cache.clone()
        walls = []
        for _ in range(REPS):
            session.cache.copy_(opened)  # the same round again, from the state after the prompt
            session.pending = int(prompt[-1])
            start = time.perf_counter()
            verdict = verifier.verify(session, drafts, None)
            walls.append((time.perf_counter() - start) * 1e3)
        return statistics.median(walls), verdict.accepted
    finally:
        runner.round_graphs = graphs


class CloudGpuTime:
    """The cloud's GPU time over the calls made inside ``measure``: CUPTI's kernel and copy durations (profiler)
    and the CUDA-event span around each call."""

    def __init__(self) -> None:
        self.ms = {"kernel": 0.0, "span": 0.0}

    def measure(self, fn, *args):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            begin.record()
            result = fn(*args)
            end.record()
            end.synchronize()
        self.ms["span"] += begin.elapsed_time(end)
        device = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]  # kernels, copies
        if not device:
            raise RuntimeError("the profiler recorded no CUDA activity (CUPTI unavailable?)")
        self.ms["kernel"] += sum(e.self_device_time_total for e in device) / 1e3
        return result


def round_graph(runner: ModelRunner, k: int) -> tuple[float, dict[str, dict[str, float]]]:
    """The round graph of k drafts: median GPU ms of a replay, and its kernels (`graph_kernels`)."""
    slot = runner.round_graphs._slot(runner.model.backbone.resolve_widths(), 1, k + 1)
    return replay_ms(slot.graph.replay, REPS), graph_kernels(slot.graph.replay)


@torch.inference_mode()
def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda")
    runner = ModelRunner(load_model(args.checkpoint, device=device), device, precision="fp32")
    runner.warmup()
    prompt = np.asarray(runner.tokenizer.encode(PROMPT), dtype=np.int64)
    base = cloud_only(runner, prompt)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"environment": environment(), "checkpoint": str(args.checkpoint), "precision": "fp32",
                           "cloud_only": {k: v for k, v in base.items() if k not in ("greedy", "kernels")},
                           "rounds": [], "kernels": {"step": base["kernels"]}}
    for k in DRAFTS:
        accepted = np.asarray(base["greedy"][:k], dtype=np.int64)
        rejected = rng.integers(0, runner.config.vocab_size, k)
        rejected[0] = (accepted[0] + 1) % runner.config.vocab_size  # the first draft is wrong: nothing kept
        row = {"k": k}
        row["round_gpu_ms"], out["kernels"][f"k{k}"] = round_graph(runner, k)
        for name, drafts in (("accepted", accepted), ("rejected", rejected)):
            row[f"device_round_ms_{name}"], row[f"kept_{name}"] = rounds(runner, prompt, k, drafts, on_device=True)
            row[f"host_round_ms_{name}"], host_kept = rounds(runner, prompt, k, drafts, on_device=False)
            assert host_kept == row[f"kept_{name}"], "the two round paths disagree"
        out["rounds"].append(row)
        log.info("k %d: %s", k, row)
    drafter = load_model(args.checkpoint).eval()  # the edge's submodels: the same weights, on the CPU
    prompts = [np.asarray(runner.tokenizer.encode(t), dtype=np.int64) for t in PROMPTS[:args.prompts]]
    out["levels"] = []
    for level in args.levels:
        row = level_row(runner, drafter, prompts, level, args.draft_tokens, TOKENS, CloudGpuTime)
        out["levels"].append(row)
        log.info("level %d: %s", level, row)
    out["draft_tokens"], out["prompts"] = args.draft_tokens, len(prompts)
    return out


def table(result: dict[str, Any]) -> str:
    env, base = result["environment"], result["cloud_only"]
    lines = [f"verification round vs decode step on {env['device']} (torch {env['torch']}), fp32, one process",
             f"cloud-only: {base['wall_ms_per_token']:.3f} ms wall per token, decode-step graph "
             f"{base['gpu_ms_per_step']:.3f} ms GPU",
             "| k drafts | round graph GPU ms | round wall ms, on device: all accepted / all rejected | "
             "round wall ms, host acceptance + rollback: all accepted / all rejected |",
             "| --- | --- | --- | --- |"]
    for r in result["rounds"]:
        lines.append(f"| {r['k']} | {r['round_gpu_ms']:.3f} | {r['device_round_ms_accepted']:.3f} / "
                     f"{r['device_round_ms_rejected']:.3f} | {r['host_round_ms_accepted']:.3f} / "
                     f"{r['host_round_ms_rejected']:.3f} |")
    lines.append("(drafts accepted, all-accepted rows: " + ", ".join(f"k {r['k']}: {r['kept_accepted']}"
                                                                     for r in result["rounds"]) + ")")
    lines += ["", *kernel_table(result["kernels"])]
    lines += ["", f"cloud GPU ms per generated token, {result['prompts']} prompts x {TOKENS} greedy tokens, drafts "
              f"up to {result['draft_tokens']} (k adaptive) from a CPU copy at the level's width",
              "| level | greedy output = cloud-only | drafts accepted | tokens / round | kernel ms / token: cloud-only "
              "/ speculative | cloud-only / speculative | event span ms / token: cloud-only / speculative | "
              "cloud-only / speculative |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["levels"]:
        lines.append(f"| {r['level']} | {'yes' if r['identical'] else 'NO'} | {r['drafts_accepted']:.2f} | "
                     f"{r['tokens_per_round']:.2f} | {r['cloud_only_kernel_ms_per_token']:.4f} / "
                     f"{r['spec_kernel_ms_per_token']:.4f} | {r['kernel_ratio']:.2f}x | "
                     f"{r['cloud_only_span_ms_per_token']:.4f} / {r['spec_span_ms_per_token']:.4f} | "
                     f"{r['span_ratio']:.2f}x |")
    return "\n".join(lines)


def kernel_table(kernels: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Lines of a table: per kernel, launches and GPU us per replay of each graph (the decode step, each k)."""
    graphs = list(kernels)
    names = sorted({name for graph in kernels.values() for name in graph},
                   key=lambda name: -kernels[graphs[-1]].get(name, {"us": 0.0})["us"])
    lines = ["kernels per graph replay: launches x GPU us (torch.profiler)",
             "| kernel | " + " | ".join(graphs) + " |", "| --- |" + " --- |" * len(graphs)]
    for name in names:
        cells = [f"{kernels[g][name]['launches']:g} x {kernels[g][name]['us']:.1f}" if name in kernels[g] else "-"
                 for g in graphs]
        lines.append(f"| {name[:60]} | " + " | ".join(cells) + " |")
    totals = [f"{sum(k['launches'] for k in kernels[g].values()):g} x {sum(k['us'] for k in kernels[g].values()):.1f}"
              for g in graphs]
    lines.append("| all | " + " | ".join(totals) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--out", type=Path, default=None, help="JSON result (a table goes to stdout)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8], help="edge levels (default 1 2 4 8)")
    parser.add_argument("--prompts", type=int, default=8, help=f"prompts per level, at most {len(PROMPTS)}")
    parser.add_argument("--draft-tokens", type=int, default=8, help="most drafts per round (the router's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        parser.error("needs CUDA: run it on the device (bash bench/gpu_suite.sh spec-profile)")
    return finish(run(args), args.out, table)


if __name__ == "__main__":
    sys.exit(main())
