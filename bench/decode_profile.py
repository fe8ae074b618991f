"""Where a decode step's time goes (GPU): the kernels one step launches per layer, and what one
CUDA-graph replay of the step costs, per level, at batch 1.

The model is the decode benchmark's (bench/decode_bench.py: random weights, bf16, mamba-ssm's shapes).
Kernel names and device times come from torch.profiler over eager steps; the graph time is the median
of replays timed with CUDA events, so launch gaps inside the graph are included.

    python -m bench.decode_profile --sizes 2048x48 --out runs/decode_profile.json
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from bench.block_bench import cuda_kernels, finish, replay_ms, start
from bench.decode_bench import DTYPE, LEVELS, lm_config
from matmamba import MatMambaLM
from matmamba.cuda_graphs import capture
from matmamba.kernels import GEMV_MODES, decode_gemv

log = logging.getLogger("decode_profile")

STEPS = 20  # eager steps profiled (kernel counts are per step)
REPLAYS = 200  # graph replays timed


def profile_eager(model: MatMambaLM, level: int) -> list[dict[str, Any]]:
    """Kernels one eager step launches: name, launches per step, device microseconds per step."""
    cache = model.allocate_cache(1, level)
    token = torch.zeros(1, dtype=torch.int64, device="cuda")
    for _ in range(3):
        model.step(token, cache)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            model.step(token, cache)
        torch.cuda.synchronize()
    rows = [{"kernel": name, "per_step": launches / STEPS, "us_per_step": micros / STEPS}
            for name, (launches, micros) in cuda_kernels(prof).items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def graph_step_us(model: MatMambaLM, level: int) -> float:
    """Median microseconds of one CUDA-graph replay of a decode step."""
    cache = model.allocate_cache(1, level)
    token = torch.zeros(1, dtype=torch.int64, device="cuda")
    graph, _ = capture(lambda: model.step(token, cache))  # as DecodeGraphs captures a step
    return replay_ms(graph.replay, REPLAYS) * 1e3


@torch.inference_mode()
def run_size(d_model: int, n_layer: int, gemv_modes: list[str]) -> dict[str, Any]:
    """Every level under each decode-projection mode (matmamba.kernels.decode_gemv), in one process."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MatMambaLM(lm_config(d_model, n_layer)).to(DTYPE).eval()
    out: dict[str, Any] = {"d_model": d_model, "n_layer": n_layer, "levels": []}
    for mode, level in ((m, lv) for m in gemv_modes for lv in LEVELS):
        with decode_gemv(mode):
            kernels = profile_eager(model, level)
            graph_us = graph_step_us(model, level)
        launches = sum(k["per_step"] for k in kernels)
        out["levels"].append({"level": level, "gemv": mode, "graph_step_us": graph_us,
                              "graph_us_per_layer": graph_us / n_layer,
                              "launches_per_step": launches, "launches_per_layer": launches / n_layer,
                              "kernel_us_per_step": sum(k["us_per_step"] for k in kernels), "kernels": kernels})
        log.info("d_model %d level %d gemv %s: graph step %.1f us (%.2f us/layer), %.1f launches/layer", d_model,
                 level, mode, graph_us, graph_us / n_layer, launches / n_layer)
    return out


def table(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"decode step profile on {env['device']} (torch {env['torch']}), bf16, batch 1"]
    for size in result["sizes"]:
        n_layer = size["n_layer"]
        for lv in size["levels"]:
            lines.append(f"d{size['d_model']} x {n_layer} level {lv['level']} gemv {lv['gemv']}: "
                         f"graph step {lv['graph_step_us']:.1f} us "
                         f"({lv['graph_us_per_layer']:.2f} us/layer), kernels {lv['kernel_us_per_step']:.1f} us/step, "
                         f"{lv['launches_per_layer']:.2f} launches/layer")
            for k in lv["kernels"]:
                lines.append(f"    {k['per_step'] / n_layer:6.2f}/layer {k['us_per_step'] / n_layer:7.2f} us/layer  "
                             f"{k['kernel'][:110]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    p.add_argument("--sizes", default="2048x48", help="d_model x n_layer, comma-separated (default %(default)s)")
    p.add_argument("--gemv-modes", default="fused",
                   help="decode step's kernels (matmamba.kernels.decode_gemv), comma-separated: "
                        f"{', '.join(GEMV_MODES)} (default %(default)s)")
    args = p.parse_args(argv)
    result = start(p, "decode_profile")
    modes = args.gemv_modes.split(",")
    result["sizes"] = [run_size(*(int(v) for v in size.split("x")), modes) for size in args.sizes.split(",")]
    return finish(result, args.out, table)


if __name__ == "__main__":
    sys.exit(main())
