"""Block benchmark (GPU, bf16): the nested MatMamba2 block at levels 1, 2, 4, 8 against

- a standalone mamba-ssm ``Mamba2`` of the same width: d_model in and out, inner width
  expand * d_model / level, same headdim, d_state, ngroups (mamba-ssm cannot take a fractional
  ``expand``, so it is built at d_model = width and its in_proj / out_proj are replaced by
  d_model-wide ones: the same module a standalone model of that width would hold);
- the original MatMamba code's approach: the sliced weights re-concatenated on every call
  (our block with its slice cache bypassed).

Forward (inference) and forward+backward, medians of ``triton.testing.do_bench``, all in one
run so the ratios compare like with like. Each level's floor is max(FLOPs / measured bf16
matmul rate, bytes / measured copy bandwidth) (docs/BENCHMARKS.md, "GPU floors").

    python -m bench.block_bench --out runs/block_bench.json      # on the device: bash bench/gpu_suite.sh block
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from matmamba import MatMamba2Config
from matmamba.block import MatMamba2
from matmamba.config import ModelConfig
from matmamba.flops import block_flops_per_token
from matmamba.kernels import causal_conv1d_ops, import_mamba_ssm
from matmamba.nesting import nested_dims

log = logging.getLogger("block_bench")

LEVELS = (1, 2, 4, 8)
# (d_model, batch, length): about 65k and 32k tokens, enough to fill an H100 with each block
SIZES = ((768, 32, 2048), (2048, 16, 2048))
HEADDIM, D_STATE = 64, 128
DTYPE = torch.bfloat16
BWD_FLOPS_FACTOR = 3  # forward + backward = 3 forward passes of matmul work
COPY_BYTES = 1 << 30
MATMUL_N = 8192


def environment() -> dict[str, str]:
    import triton

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "mamba_ssm": version("mamba_ssm"), "causal_conv1d": "present" if causal_conv1d_ops() else "absent",
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn (CUDA events; L2 flushed between runs by do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def replay_ms(replay, reps: int) -> float:
    """Median milliseconds of ``replay()`` (a CUDA-graph replay, say) between two CUDA events, ``reps`` times,
    each waited for: the latency of one call on an otherwise idle GPU, L2 left warm."""
    import statistics

    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        begin.record()
        replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def graph_calls_us(call, calls: int, replays: int) -> float:
    """Microseconds per call: call(0), call(1) run on a side stream to warm up, then call(0) .. call(calls - 1)
    captured in one CUDA graph, replayed ``replays`` times (`replay_ms`), the median divided by the calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(2, calls)):
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(i)
    graph.replay()
    return replay_ms(graph.replay, replays) * 1e3 / calls


def cuda_kernels(prof) -> dict[str, tuple[int, float]]:
    """Per CUDA kernel (or copy) name in a finished torch.profiler run: (launches, device microseconds)."""
    out: dict[str, tuple[int, float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            launches, micros = out.get(event.name, (0, 0.0))
            out[event.name] = (launches + 1, micros + event.device_time)
    return out


def measure_ceilings() -> dict[str, float]:
    """Measured device-to-device copy bandwidth (read + write bytes) and bf16 matmul rate, random data."""
    src = torch.randint(0, 255, (COPY_BYTES,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))
    a = torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=DTYPE)
    b = torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=DTYPE)
    mm_ms = bench_ms(lambda: a @ b)
    out = {"copy_bytes_per_s": 2 * COPY_BYTES / (copy_ms * 1e-3),
           "bf16_flops_per_s": 2 * MATMUL_N**3 / (mm_ms * 1e-3)}
    log.info("ceilings: copy %.2f TB/s, bf16 matmul %.0f TFLOP/s", out["copy_bytes_per_s"] / 1e12,
             out["bf16_flops_per_s"] / 1e12)
    return out


def standalone_mamba2(d_model: int, width: int) -> torch.nn.Module:
    """mamba-ssm's Mamba2 with inner width 2 * width, reading and writing d_model channels."""
    mamba2 = import_mamba_ssm("modules.mamba2").Mamba2
    m = mamba2(d_model=width, d_state=D_STATE, headdim=HEADDIM, expand=2, use_mem_eff_path=False)
    m.in_proj = torch.nn.Linear(d_model, m.in_proj.out_features, bias=False)
    m.out_proj = torch.nn.Linear(m.d_inner, d_model, bias=False)
    m.d_model = d_model
    return m


def nested_block(d_model: int) -> MatMamba2:
    return MatMamba2(config=MatMamba2Config(d_model=d_model, d_state=D_STATE, headdim=HEADDIM))


def reconcatenating(block: MatMamba2) -> MatMamba2:
    """The same block, but slicing and concatenating its weights on every call (no slice cache)."""
    block.slices = block._build_slices
    return block


def floor_ms(cfg: MatMamba2Config, width: int, tokens: int, ceilings: dict[str, float], backward: bool) -> dict:
    flops = block_flops_per_token(ModelConfig(block=cfg), width) * tokens
    d = nested_dims(cfg, width)
    params = cfg.d_model * d.in_proj_dim + d.d_inner * cfg.d_model + d.conv_dim * (cfg.d_conv + 1) + 4 * d.nheads
    nbytes = 2 * (2 * tokens * cfg.d_model + params)  # bf16: input read, output written, weights read once
    if backward:  # read the output gradient, write the input gradient, write the weight gradients
        flops *= BWD_FLOPS_FACTOR
        nbytes *= 2
    compute_ms = flops / ceilings["bf16_flops_per_s"] * 1e3
    memory_ms = nbytes / ceilings["copy_bytes_per_s"] * 1e3
    return {"flops": flops, "bytes": nbytes, "floor_ms": max(compute_ms, memory_ms),
            "bound": "compute" if compute_ms >= memory_ms else "memory"}


def forward_backward(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, **kwargs) -> None:
    module(x, **kwargs).backward(grad)


def run_size(d_model: int, batch: int, length: int, ceilings: dict[str, float]) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    nested = nested_block(d_model).cuda().to(DTYPE)
    concat = reconcatenating(nested_block(d_model).cuda().to(DTYPE))
    concat.load_state_dict(nested.state_dict())
    cfg = nested.config
    u = torch.randn(batch, length, d_model, device="cuda", dtype=DTYPE)
    grad = torch.randn_like(u)
    rows = []
    for level in LEVELS:
        width = d_model // level
        alone = standalone_mamba2(d_model, width).cuda().to(DTYPE)
        row: dict[str, Any] = {"d_model": d_model, "batch": batch, "length": length, "level": level, "width": width}
        with torch.inference_mode():
            row["fwd_ms"] = {
                "nested": bench_ms(functools.partial(nested, u, width=width)),
                "standalone": bench_ms(functools.partial(alone, u)),
                "reconcat": bench_ms(functools.partial(concat, u, width=width)),
            }
        x = u.detach().clone().requires_grad_()
        row["fwd_bwd_ms"] = {
            "nested": bench_ms(functools.partial(forward_backward, nested, x, grad, width=width)),
            "standalone": bench_ms(functools.partial(forward_backward, alone, x, grad)),
            "reconcat": bench_ms(functools.partial(forward_backward, concat, x, grad, width=width)),
        }
        for mode in ("fwd_ms", "fwd_bwd_ms"):
            t = row[mode]
            row[mode.replace("_ms", "_ratio")] = {"nested_vs_standalone": t["nested"] / t["standalone"],
                                                  "nested_vs_reconcat": t["nested"] / t["reconcat"]}
        row["floor_fwd"] = floor_ms(cfg, width, batch * length, ceilings, backward=False)
        row["floor_fwd_bwd"] = floor_ms(cfg, width, batch * length, ceilings, backward=True)
        row["fwd_of_floor"] = row["floor_fwd"]["floor_ms"] / row["fwd_ms"]["nested"]
        row["fwd_bwd_of_floor"] = row["floor_fwd_bwd"]["floor_ms"] / row["fwd_bwd_ms"]["nested"]
        log.info("d_model %d level %d: fwd nested %.3f standalone %.3f reconcat %.3f ms", d_model, level,
                 row["fwd_ms"]["nested"], row["fwd_ms"]["standalone"], row["fwd_ms"]["reconcat"])
        rows.append(row)
    return rows


def table(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"block bench on {env['device']} (torch {env['torch']}, triton {env['triton']}, mamba-ssm "
             f"{env['mamba_ssm']}, causal-conv1d {env['causal_conv1d']}), bf16, medians in ms",
             "| d_model | B x L | level | fwd nested | fwd Mamba2 | fwd reconcat | nested/Mamba2 | nested/reconcat "
             "| fwd % of floor | f+b nested | f+b Mamba2 | f+b nested/Mamba2 | f+b % of floor |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        f, fb = r["fwd_ms"], r["fwd_bwd_ms"]
        lines.append(
            f"| {r['d_model']} | {r['batch']}x{r['length']} | {r['level']} | {f['nested']:.3f} | {f['standalone']:.3f} "
            f"| {f['reconcat']:.3f} | {r['fwd_ratio']['nested_vs_standalone']:.3f} "
            f"| {r['fwd_ratio']['nested_vs_reconcat']:.3f} | {100 * r['fwd_of_floor']:.0f}% "
            f"| {fb['nested']:.3f} | {fb['standalone']:.3f} | {r['fwd_bwd_ratio']['nested_vs_standalone']:.3f} "
            f"| {100 * r['fwd_bwd_of_floor']:.0f}% |")
    c = result["ceilings"]
    lines.append(f"ceilings measured in this run: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
                 f"bf16 matmul {c['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    p.add_argument("--sizes", default=",".join(f"{d}x{b}x{n}" for d, b, n in SIZES),
                   help="d_model x batch x length, comma-separated (default %(default)s)")
    args = p.parse_args(argv)
    result = start(p, "block")
    result["rows"] = []
    for d_model, batch, length in [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]:
        result["rows"] += run_size(d_model, batch, length, result["ceilings"])
    return finish(result, args.out, table)


def start(parser: argparse.ArgumentParser, phase: str) -> dict[str, Any]:
    """Logging on, CUDA required; the result dict with the environment and the measured ceilings."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        parser.error(f"needs CUDA: run it on the device (bash bench/gpu_suite.sh {phase})")
    return {"environment": environment(), "ceilings": measure_ceilings()}


def finish(result: dict[str, Any], out: Path | None, table_fn) -> int:
    """Write the JSON (when asked) and print the table last."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(table_fn(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
