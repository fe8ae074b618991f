"""Decode-step projection micro-benchmark (GPU): cuBLAS F.linear against the Triton GEMV
(matmamba.kernels.gemv_triton) side by side, on a decode step's in_proj and out_proj at every level.

Shapes are the decode benchmark's (bench/decode_bench.py: mamba-ssm's mamba2-130m, -1.3b and -2.7b shapes,
headdim 64, d_state 128, bf16). Each timing is one CUDA-graph replay of calls over distinct weight copies
(more bytes than the L2 cache holds, as a decode step's layers are) divided by the calls: in-graph launch
gaps included, no L2 reuse. Medians over replays. The floor is the weight bytes over the copy bandwidth
measured in the same run. At batch 1 the Triton tiling is also swept, to check `gemv_config`'s choice.

    python -m bench.gemv_bench --out runs/gemv_bench.json     # on the device: bash bench/gpu_suite.sh decode
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.block_bench import finish, graph_calls_us, start
from bench.decode_bench import DTYPE, LEVELS, lm_config
from matmamba import kernels
from matmamba.nesting import nested_dims

log = logging.getLogger("gemv_bench")

SIZES = (768, 2048, 2560)
BATCHES = (1, 32)
ROTATE_BYTES = 256 * 2**20  # weight copies cycled through per replay: ~5x an H100's / H200's L2 (50 MB)
MAX_COPIES = 128
REPLAYS = 30
# (BLOCK_N, BLOCK_K, num_warps) tried at batch 1
SWEEP = [(bn, bk, w) for bn in (1, 2, 4, 8, 16) for bk in (256, 512, 1024, 2048) for w in (4, 8)
         if 2048 <= bn * bk <= 8192 and (w == 4 or bn * bk >= 4096)]


def graph_us(op, weights: list[torch.Tensor], x: torch.Tensor) -> float:
    """Microseconds per call: one CUDA graph of op(x, w) over every copy in `weights`, medians of replays."""
    return graph_calls_us(lambda i: op(x, weights[i]), len(weights), REPLAYS)


def projections(d_model: int, level: int) -> dict[str, tuple[int, int]]:
    """(N, K) of a decode step's in_proj and out_proj at this level."""
    d = nested_dims(lm_config(d_model, 1).block, d_model // level)
    return {"in_proj": (d.in_proj_dim, d_model), "out_proj": (d_model, d.d_inner)}


def measure(n: int, k: int, batch: int, bandwidth: float) -> dict[str, Any]:
    nbytes = n * k * torch.finfo(DTYPE).bits // 8
    copies = max(2, min(MAX_COPIES, ROTATE_BYTES // nbytes))
    weights = [torch.randn(n, k, device="cuda", dtype=DTYPE) for _ in range(copies)]
    x = torch.randn(batch, k, device="cuda", dtype=DTYPE)
    row: dict[str, Any] = {"n": n, "k": k, "batch": batch, "weight_bytes": nbytes,
                           "floor_us": nbytes / bandwidth * 1e6, "copies": copies,
                           "cublas_us": graph_us(lambda a, w: F.linear(a, w), weights, x)}
    row["auto_uses_triton"] = kernels.use_triton_gemv(x, weights[0])
    if batch > kernels.GEMV_MAX_BATCH:
        return row
    row["triton_config"] = kernels.gemv_config(batch, k)
    row["triton_us"] = graph_us(lambda a, w: kernels.gemv_triton(a, w, None), weights, x)
    row["triton_vs_cublas"] = row["cublas_us"] / row["triton_us"]
    if batch == 1:
        sweep = {}
        for bn, bk, warps in SWEEP:
            sweep[f"{bn}x{bk}w{warps}"] = graph_us(
                lambda a, w, bn=bn, bk=bk, warps=warps: kernels.gemv_triton(a, w, None, block_n=bn, block_k=bk,
                                                                            num_warps=warps), weights, x)
        best = min(sweep, key=sweep.get)
        row.update(sweep_us=sweep, best_config=best, best_us=sweep[best])
    del weights
    torch.cuda.empty_cache()
    return row


@torch.inference_mode()
def run(sizes: list[int], bandwidth: float) -> list[dict[str, Any]]:
    rows = []
    for d_model in sizes:
        for level in LEVELS:
            for proj, (n, k) in projections(d_model, level).items():
                for batch in BATCHES:
                    row = {"d_model": d_model, "level": level, "proj": proj, **measure(n, k, batch, bandwidth)}
                    log.info("d%d level %d %s %dx%d batch %d: cublas %.2f us, triton %s us", d_model, level, proj,
                             n, k, batch, row["cublas_us"], f"{row['triton_us']:.2f}" if "triton_us" in row else "-")
                    rows.append(row)
    return rows


def table(result: dict[str, Any]) -> str:
    env, c = result["environment"], result["ceilings"]
    copy = c["copy_bytes_per_s"] / 1e12
    lines = [f"GEMV bench on {env['device']} (torch {env['torch']}), bf16, CUDA-graph replay over "
             f"{ROTATE_BYTES >> 20} MiB of weight copies, medians of {REPLAYS}; copy {copy:.2f} TB/s",
             "| model | level | proj | N x K | batch | floor us | cuBLAS us | Triton us | cuBLAS / Triton "
             "| best swept (us) | auto |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        triton = f"{r['triton_us']:.2f}" if "triton_us" in r else ""
        ratio = f"{r['triton_vs_cublas']:.2f}x" if "triton_us" in r else ""
        best = f"{r['best_config']} ({r['best_us']:.2f})" if "best_us" in r else ""
        lines.append(f"| d{r['d_model']} | {r['level']} | {r['proj']} | {r['n']}x{r['k']} | {r['batch']} "
                     f"| {r['floor_us']:.2f} | {r['cublas_us']:.2f} | {triton} | {ratio} | {best} "
                     f"| {'triton' if r['auto_uses_triton'] else 'cublas'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="d_model values (default %(default)s)")
    args = p.parse_args(argv)
    result = start(p, "decode")
    result["rows"] = run([int(v) for v in args.sizes.split(",")], result["ceilings"]["copy_bytes_per_s"])
    return finish(result, args.out, table)


if __name__ == "__main__":
    sys.exit(main())
