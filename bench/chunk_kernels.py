"""The kernels of a verification round, one by one, under each tiling (GPU): what a round of L positions costs
per kernel against L = 1, at the shipped LM's shapes (full width, fp32, as the cloud verifies).

    python -m bench.chunk_kernels --out runs/chunk_kernels.json     # on the device: gpu_suite.sh chunk

Kernels (matmamba/kernels.py): in_proj's normed GEMV with the chunk's causal conv in its epilogue
(``add_rmsnorm_gemv_triton`` + ``ConvChunk``), out_proj's gated normed GEMV (``gated_gemv_triton``), the chunk
scan (``ssd_chunk_triton``) and the greedy acceptance (``greedy_accept_triton``). Each timing is one CUDA graph
of ``CALLS`` calls replayed, median over replays, divided by the calls: launch gaps inside the graph included,
weights L2-resident as the 12 MB model's are in a round. Each tiling's output is compared with the default
tiling's (max abs difference), so a faster tiling that computes something else shows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from bench.block_bench import environment, finish, graph_calls_us
from matmamba import kernels
from matmamba.config import config_from_dict
from matmamba.kernels import GemvTiling
from matmamba.nesting import nested_dims

log = logging.getLogger("chunk_kernels")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "checkpoints" / "matmamba-lm-austen" / "config.json"
LENGTHS = (1, 2, 3, 5, 9, 17)  # the pending token + k drafts: k = 0 (a decode step's shape), 1, 2, 4, 8, 16
CALLS = 20
REPLAYS = 50
# Tilings tried for the GEMVs at L >= 2 (L = 1 keeps the decode step's): broadcast products with fewer partial
# sums, positions spread over programs (out_proj: no conv along them), and tl.dot (fp32 FMAs, or three TF32
# tensor-core products).
BROADCAST = [(4, 8192), (4, 4096), (4, 2048), (2, 2048), (1, 1024)]  # (BLOCK_N, products per program)
DOT = [(16, 32, "ieee"), (16, 64, "tf32x3")]  # (BLOCK_N, BLOCK_K, precision): 1.5-10x slower in a wider sweep
# (rows, warps) of the scan and (BLOCK_V, warps) of the acceptance tried besides the defaults; a wider sweep on an
# H200 (rows 4-16 x warps 1-4; BLOCK_V 512 / 2048 x warps 4-16) had these within 3% of the best at every L.
SCAN = [(16, 4), (4, 4)]
ACCEPT = [(512, 4), (2048, 8), (512, 16)]


def gemv_tilings(length: int, k: int, split: bool) -> list[GemvTiling]:
    """The default tiling, then the others tried; ``split``: also positions spread over programs (1, 2, 4 each)."""
    default = kernels.normed_gemv_tiling(length, k, conv_chunk=not split, positions=split)
    if length == 1:
        return [default]
    block_b = kernels._next_pow2(length)
    out = [default, GemvTiling(*kernels.gemv_config(length, k))]
    if split:
        out += [GemvTiling(*kernels.gemv_config(b, k)) for b in (1, 2, 4) if b < block_b]
    for block_n, products in BROADCAST:
        block_k = min(kernels._next_pow2(k), products // (block_b * block_n))
        tiling = GemvTiling(block_b, block_n, block_k)
        if block_k >= 16:
            out.append(tiling)
    out += [GemvTiling(max(16, block_b), bn, bk, 4, precision) for bn, bk, precision in DOT]
    return list(dict.fromkeys(out))  # each tiling once, the default first


def with_default(default: tuple[int, int], others: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [default, *(t for t in others if t != default)]


def name(tiling) -> str:
    if isinstance(tiling, GemvTiling):
        kind = f"dot {tiling.dot}" if tiling.dot else "broadcast"
        return f"{kind} B{tiling.block_b} N{tiling.block_n} K{tiling.block_k} w{tiling.num_warps}"
    return " ".join(map(str, tiling))


def sweep(label: str, length: int, tilings: list, call) -> list[dict[str, Any]]:
    """Time call(tiling) for each tiling; the first is the default, the others are checked against its output."""
    rows, reference = [], None
    for tiling in tilings:
        out = call(tiling)
        reference = out if reference is None else reference
        rows.append({"kernel": label, "length": length, "tiling": name(tiling),
                     "default": tiling is tilings[0], "us": graph_calls_us(lambda i, t=tiling: call(t), CALLS, REPLAYS),
                     "max_abs_diff": float((out.float() - reference.float()).abs().max())})
        log.info("%s", rows[-1])
    return rows


class Shapes:
    """The shipped LM's full-width shapes and random weights, fp32 on CUDA."""

    def __init__(self) -> None:
        config = config_from_dict(json.loads(CONFIG.read_text()))
        d = self.dims = nested_dims(config.block, config.d_model)
        self.d_model, self.vocab = config.d_model, config.padded_vocab_size
        cuda = self.device = torch.device("cuda")
        self.in_w = torch.randn(d.in_proj_dim, self.d_model, device=cuda) / self.d_model ** 0.5
        self.out_w = torch.randn(self.d_model, d.d_inner, device=cuda) / d.d_inner ** 0.5
        self.conv_w = torch.randn(d.conv_dim, d.d_conv, device=cuda) / 2
        self.conv_b, self.norm_in, self.norm_out = (torch.randn(n, device=cuda)
                                                    for n in (d.conv_dim, self.d_model, d.d_inner))
        self.A = -torch.rand(d.nheads, device=cuda) * 8 - 1
        self.D, self.dt_bias = torch.randn(d.nheads, device=cuda), torch.randn(d.nheads, device=cuda) - 4


def length_rows(m: Shapes, length: int) -> list[dict[str, Any]]:
    """Every kernel under every tiling for a chunk of ``length`` positions."""
    d, cuda = m.dims, m.device
    x, residual = torch.randn(length, m.d_model, device=cuda), torch.randn(length, m.d_model, device=cuda)
    window = torch.empty(1, d.conv_dim, d.d_conv + length, device=cuda)
    conv_start = torch.randn(1, d.conv_dim, d.d_conv, device=cuda)
    conv = kernels.ConvChunk(conv_start.clone(), m.conv_w, m.conv_b, d.d_inner, window)

    def in_proj(tiling: GemvTiling) -> torch.Tensor:
        conv.state.copy_(conv_start)  # the conv state moves on each call
        return kernels.add_rmsnorm_gemv_triton(x, residual, m.norm_in, 1e-5, True, m.in_w, None, conv, tiling)[0]

    rows = sweep("in_proj + norm + conv", length, gemv_tilings(length, m.d_model, split=False), in_proj)
    y, z = torch.randn(length, d.d_inner, device=cuda), torch.randn(length, d.d_inner, device=cuda)
    rows += sweep("gated norm + out_proj", length, gemv_tilings(length, d.d_inner, split=True), lambda t: (
        kernels.gated_gemv_triton(y, z, m.norm_out, 1e-5, m.out_w, None, t)))
    start = torch.randn(1, d.nheads, d.headdim, d.d_state, device=cuda) / 8
    state, states = start.clone(), torch.empty(length, *start.shape, device=cuda)
    xbc, dt = torch.randn(length, d.conv_dim, device=cuda), torch.randn(length, d.nheads, device=cuda)

    def scan(tiling: tuple[int, int]) -> torch.Tensor:
        state.copy_(start)
        return kernels.ssd_chunk_triton(state, xbc, dt, m.A, m.D, m.dt_bias, d.ngroups, states, tiling)

    rows += sweep("chunk scan", length, with_default(kernels.CHUNK_SCAN_TILING, SCAN), scan)
    if length > 1:
        logits = torch.randn(length, m.vocab, device=cuda)
        ids = torch.randint(0, m.vocab, (length,), device=cuda)
        rows += sweep("greedy acceptance", length, with_default(kernels.ACCEPT_TILING, ACCEPT),
                      lambda t: kernels.greedy_accept_triton(logits, ids, t)[0])
    return rows


@torch.inference_mode()
def run() -> dict[str, Any]:
    torch.manual_seed(0)
    shapes = Shapes()
    rows = [row for length in LENGTHS for row in length_rows(shapes, length)]
    return {"environment": environment(), "config": str(CONFIG), "precision": "fp32", "calls": CALLS, "rows": rows}


def table(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"verification round kernels on {env['device']} (torch {env['torch']}, triton {env['triton']}), fp32, "
             f"GPU us per call (graph of {result['calls']} calls); * = default tiling, best per kernel and L first",
             "| kernel | L | tiling | us | vs default | max abs diff vs default |",
             "| --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in result["rows"]:
        groups.setdefault((row["kernel"], row["length"]), []).append(row)
    for (kernel, length), group in groups.items():
        default = next(r for r in group if r["default"])
        best = sorted(group, key=lambda r: r["us"])[:3]
        for r in best + ([] if default in best else [default]):
            lines.append(f"| {kernel} | {length} | {r['tiling']}{' *' if r['default'] else ''} | {r['us']:.2f} | "
                         f"{default['us'] / r['us']:.2f}x | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON result (a table goes to stdout)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        parser.error("needs CUDA: run it on the device (bash bench/gpu_suite.sh chunk)")
    return finish(run(), args.out, table)


if __name__ == "__main__":
    sys.exit(main())
