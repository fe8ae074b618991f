"""Decode benchmark (GPU, bf16): greedy tokens/s per level with CUDA-graph decoding
(matmamba.cuda_graphs.DecodeGraphs) against mamba-ssm's MambaLMHeadModel generation with its
own CUDA graphs (``cg=True``) at the same size, plus eager decoding and prefill throughput.

Models are randomly initialised (speed does not depend on the weights' values) at mamba-ssm's
mamba2-130m, -1.3b and -2.7b shapes (d_model 768 x 24 layers, 2048 x 48 and 2560 x 64, vocab 50280).
Tokens/s is the decode rate alone: two generations of different lengths from the same prompt, timed back to
back, give batch * (n2 - n1) / (t2 - t1), so the prompt pass cancels out. On the lent GPU one configuration's
rate moved by up to ~30% between runs, more than the differences between configurations, so the rates of
one batch size are measured in interleaved rounds (every level and kernel mode, and mamba-ssm, once a round):
a drift of the device hits them all alike. Each figure is the median over rounds with its range; a level's
speed-up over level 1 is the median of the per-round ratios.
Floors per level: bytes a step must move (weights at that width, the head, the recurrent
states read and written) over the copy bandwidth measured in the same run.

    python -m bench.decode_bench --out runs/decode_bench.json     # on the device: bash bench/gpu_suite.sh decode
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.block_bench import finish, start
from matmamba import MatMamba2Config, MatMambaLM, MatMambaLMConfig
from matmamba.cuda_graphs import DecodeGraphs
from matmamba.flops import count_params
from matmamba.kernels import decode_gemv, import_mamba_ssm
from matmamba.nesting import nested_dims

log = logging.getLogger("decode_bench")

LEVELS = (1, 2, 4, 8)
BATCHES = (1, 32)
PROMPT_LEN = 16
N_SHORT, N_LONG = 16, 144  # new tokens in the two timed generations
EAGER_N_SHORT, EAGER_N_LONG = 8, 40
REPS = 5  # eager decoding and prefill: medians of this many
ROUNDS = 5  # interleaved rounds of the graph and mamba-ssm rates
PREFILL = (8, 2048)  # batch, length of the prefill measurement
VOCAB = 50280
HEADDIM, D_STATE = 64, 128
DTYPE = torch.bfloat16
# At batch 1 the graph decode is also timed with the step's kernels forced (matmamba.kernels.decode_gemv), in the
# same rounds as the default ("fused": the norms and the conv step inside the projections' Triton GEMVs):
# "unfused" (the same GEMVs, the norms and the conv in kernels of their own), cuBLAS only, and the Triton GEMV
# wherever it runs (unfused).
DEFAULT_MODE = "fused"
GEMV_MODES = ("unfused", "cublas", "triton")
MODE_COLUMNS = {"unfused": "graph, unfused", "cublas": "graph, cuBLAS GEMV", "triton": "graph, Triton GEMV"}


def lm_config(d_model: int, n_layer: int) -> MatMambaLMConfig:
    return MatMambaLMConfig(n_layer=n_layer, vocab_size=VOCAB, pad_vocab_size_multiple=16,
                            block=MatMamba2Config(d_model=d_model, d_state=D_STATE, headdim=HEADDIM))


def mamba_ssm_lm(d_model: int, n_layer: int) -> torch.nn.Module:
    """mamba-ssm's MambaLMHeadModel of the same shape (Mamba2 layers, no MLP, tied head)."""
    sys.modules.setdefault("selective_scan_cuda", type(sys)("selective_scan_cuda"))  # Mamba-1 extension, unused
    mixer = import_mamba_ssm("models.mixer_seq_simple")
    config = import_mamba_ssm("models.config_mamba").MambaConfig(
        d_model=d_model, d_intermediate=0, n_layer=n_layer, vocab_size=VOCAB, pad_vocab_size_multiple=16,
        ssm_cfg={"layer": "Mamba2", "headdim": HEADDIM, "d_state": D_STATE, "use_mem_eff_path": False},
        rms_norm=True, residual_in_fp32=True, fused_add_norm=True, tie_embeddings=True)
    return mixer.MambaLMHeadModel(config, device="cuda", dtype=DTYPE).eval()


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def loop_rate(batch: int, n_short: int, n_long: int, short_s: float, long_s: float) -> float:
    """Tokens/s of the decode loop alone, from the times of an n_short and an n_long generation."""
    return batch * (n_long - n_short) / max(long_s - short_s, 1e-9)


def decode_rate(generate, batch: int, n_short: int, n_long: int) -> float:
    """Tokens/s of the decode loop alone: generate(n) runs a full generation of n new tokens."""
    generate(n_long)  # warm-up (graph capture, autotuning)
    short = statistics.median(timed(lambda: generate(n_short)) for _ in range(REPS))
    long = statistics.median(timed(lambda: generate(n_long)) for _ in range(REPS))
    return loop_rate(batch, n_short, n_long, short, long)


def interleaved_rates(generators: dict[Any, Callable[[int], Any]], batch: int,
                      rounds: int = ROUNDS) -> dict[Any, list[float]]:
    """Per configuration, one decode rate per round: each round times every generator once (a short and a long
    generation back to back), so slow drifts of the device spread over all of them."""
    for generate in generators.values():
        generate(N_LONG)  # warm-up (graph capture, autotuning)
    rates: dict[Any, list[float]] = {name: [] for name in generators}
    for _ in range(rounds):
        for name, generate in generators.items():
            short, long = timed(functools.partial(generate, N_SHORT)), timed(functools.partial(generate, N_LONG))
            rates[name].append(loop_rate(batch, N_SHORT, N_LONG, short, long))
    return rates


def under_mode(mode: str, generate: Callable[[int], Any]) -> Callable[[int], Any]:
    """generate(n) with the decode projections' kernel forced (the graphs keep the mode they were captured in)."""
    def run(n: int) -> Any:
        with decode_gemv(mode):
            return generate(n)
    return run


def summary(rates: list[float]) -> dict[str, float]:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def step_floor(cfg: MatMambaLMConfig, level: int, batch: int, bandwidth: float) -> dict[str, float]:
    """Fewest bytes one decode step moves at this level, and the tokens/s that allows."""
    width = cfg.block.width_for_level(level)
    d = nested_dims(cfg.block, width)
    weights = 2 * count_params(cfg, [width] * cfg.n_layer)  # bf16, embedding = tied head counted once
    states = cfg.n_layer * batch * (2 * 4 * d.nheads * d.headdim * d.d_state + 2 * 2 * d.conv_dim * d.d_conv)
    nbytes = weights + states
    return {"bytes": nbytes, "floor_tokens_per_s": batch / (nbytes / bandwidth)}


def prefill_rate(model: MatMambaLM, level: int) -> float:
    """Prompt tokens/s of the parallel forward into a cache (head on the last position only)."""
    batch, length = PREFILL
    ids = torch.randint(0, VOCAB, (batch, length), device="cuda")
    spec = model.backbone.resolve_widths(level)

    def prefill() -> None:
        cache = model.backbone.allocate_cache(batch, spec, ids.device)
        h = model.backbone(model.backbone.embedding(ids), spec, cache)
        model._head(h[:, -1:])

    prefill()
    return batch * length / statistics.median(timed(prefill) for _ in range(REPS))


def greedy(decoder, prompt: torch.Tensor, level: int, n: int) -> torch.Tensor:
    """n greedy tokens from a MatMambaLM or its DecodeGraphs."""
    return decoder.generate(prompt, n, mrl_level=level, temperature=0)


def reference_generate(model: torch.nn.Module, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy tokens from mamba-ssm's MambaLMHeadModel with its CUDA graphs."""
    return model.generate(prompt, prompt.shape[1] + n, cg=True, top_k=1)


@torch.inference_mode()
def run_size(d_model: int, n_layer: int, ceilings: dict[str, float], eager: bool,
             batches: tuple[int, ...] = BATCHES) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = lm_config(d_model, n_layer)
    with torch.device("cuda"):
        model = MatMambaLM(cfg).to(DTYPE).eval()
    graphs = {mode: DecodeGraphs(model) for mode in (DEFAULT_MODE, *GEMV_MODES)}  # each captures under its mode
    reference = mamba_ssm_lm(d_model, n_layer)
    out: dict[str, Any] = {"d_model": d_model, "n_layer": n_layer, "vocab": VOCAB, "rounds": ROUNDS, "rows": []}
    for batch in batches:
        prompt = torch.randint(0, VOCAB, (batch, PROMPT_LEN), device="cuda")
        modes = (DEFAULT_MODE, *GEMV_MODES) if batch == 1 else (DEFAULT_MODE,)
        generators: dict[Any, Callable[[int], Any]] = {
            "mamba-ssm": functools.partial(reference_generate, reference, prompt)}
        for level in LEVELS:
            for mode in modes:
                generators[level, mode] = under_mode(mode, functools.partial(greedy, graphs[mode], prompt, level))
        rates = interleaved_rates(generators, batch)
        ref = summary(rates["mamba-ssm"])
        for level in LEVELS:
            row: dict[str, Any] = {"batch": batch, "level": level, "width": d_model // level,
                                   "mamba_ssm_cg_tokens_per_s": ref["median"], "mamba_ssm_cg_range": ref}
            for mode in modes:
                key = "graph" if mode == DEFAULT_MODE else f"graph_{mode}_gemv"
                rate = summary(rates[level, mode])
                row[f"{key}_tokens_per_s"], row[f"{key}_range"] = rate["median"], rate
                ratios = [a / b for a, b in zip(rates[level, mode], rates[1, mode])]
                row[f"{key}_vs_level1"] = summary(ratios)
            row["speedup_vs_level1"] = row["graph_vs_level1"]["median"]
            if eager and batch == 1:
                row["eager_tokens_per_s"] = decode_rate(functools.partial(greedy, model, prompt, level),
                                                        batch, EAGER_N_SHORT, EAGER_N_LONG)
                graph_ids = graphs[DEFAULT_MODE].generate(prompt, EAGER_N_LONG, mrl_level=level, temperature=0)
                eager_ids = model.generate(prompt, EAGER_N_LONG, mrl_level=level, temperature=0)
                row["graph_tokens_equal_eager"] = bool(torch.equal(graph_ids, eager_ids))
            row["graph_vs_mamba_ssm"] = row["graph_tokens_per_s"] / ref["median"]
            row.update(step_floor(cfg, level, batch, ceilings["copy_bytes_per_s"]))
            row["of_floor"] = row["graph_tokens_per_s"] / row["floor_tokens_per_s"]
            log.info("d_model %d batch %d level %d: graph %.0f tok/s (%.2fx level 1), mamba-ssm cg %.0f tok/s",
                     d_model, batch, level, row["graph_tokens_per_s"], row["speedup_vs_level1"], ref["median"])
            out["rows"].append(row)
    out["prefill_tokens_per_s"] = {level: prefill_rate(model, level) for level in LEVELS}
    out["prefill_shape"] = PREFILL
    return out


def _cell(r: dict[str, Any], key: str, with_ratio: bool = True) -> str:
    """A rate with its range over the rounds, and (above level 1) its paired ratio to level 1 of the same mode."""
    if f"{key}_range" not in r:
        return ""
    rate, ratio = r[f"{key}_range"], r[f"{key}_vs_level1"]
    cell = f"{rate['median']:.0f} ({rate['min']:.0f}-{rate['max']:.0f})"
    if not with_ratio or r["level"] == 1:
        return cell
    return f"{cell}, {ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"


def table(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"decode bench on {env['device']} (torch {env['torch']}, mamba-ssm {env['mamba_ssm']}, causal-conv1d "
             f"{env['causal_conv1d']}), bf16, greedy, prompt {PROMPT_LEN}; tok/s: median (range) over "
             f"{ROUNDS} interleaved rounds; N.NNx: median (range) of the per-round ratio to level 1, same mode",
             "| model | batch | level | graph tok/s | vs level 1 | mamba-ssm cg tok/s | graph / mamba-ssm "
             "| eager tok/s | % of floor | " + " | ".join(MODE_COLUMNS[m] for m in GEMV_MODES) + " |",
             "| --- " * (9 + len(GEMV_MODES)) + "|"]
    for size in result["sizes"]:
        name = f"d{size['d_model']} x {size['n_layer']}"
        for r in size["rows"]:
            eager = f"{r['eager_tokens_per_s']:.0f}" if "eager_tokens_per_s" in r else ""
            ratio = r["graph_vs_level1"]
            ref = r["mamba_ssm_cg_range"]
            modes = " | ".join(_cell(r, f"graph_{m}_gemv") for m in GEMV_MODES)
            lines.append(f"| {name} | {r['batch']} | {r['level']} | {_cell(r, 'graph', with_ratio=False)} "
                         f"| {ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}) "
                         f"| {ref['median']:.0f} ({ref['min']:.0f}-{ref['max']:.0f}) "
                         f"| {r['graph_vs_mamba_ssm']:.2f} | {eager} | {100 * r['of_floor']:.0f}% | {modes} |")
        b, n = size["prefill_shape"]
        lines.append(f"prefill {name} ({b}x{n} tokens), tokens/s by level: " + ", ".join(
            f"{level}: {rate:,.0f}" for level, rate in size["prefill_tokens_per_s"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    p.add_argument("--sizes", default="768x24,2048x48,2560x64",
                   help="d_model x n_layer, comma-separated (default %(default)s: mamba2-130m, -1.3b and -2.7b "
                        "shapes)")
    p.add_argument("--no-eager", action="store_true", help="skip the (slow) eager decoding reference")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated (default %(default)s)")
    args = p.parse_args(argv)
    batches = tuple(int(v) for v in args.batches.split(","))
    result = start(p, "decode")
    result["sizes"] = []
    for i, size in enumerate(args.sizes.split(",")):  # eager decoding (slow) on the first size only
        d_model, n_layer = (int(v) for v in size.split("x"))
        result["sizes"].append(run_size(d_model, n_layer, result["ceilings"], eager=i == 0 and not args.no_eager,
                                        batches=batches))
    return finish(result, args.out, table)


if __name__ == "__main__":
    sys.exit(main())
