"""Kernel dispatch: the one module that decides which implementation runs.

CUDA tensors go to mamba-ssm's Triton kernels (SSD chunk scan, selective state update,
gated RMSNorm) and to causal-conv1d's CUDA kernels when that extension imports;
CPU tensors go to the pure-PyTorch functions below, which tests hold equal to
mamba-ssm's own reference functions.

mamba-ssm's package `__init__` imports its Mamba-1 CUDA extension (`selective_scan_cuda`)
and the Mamba-3 modules, which a `MAMBA_SKIP_CUDA_BUILD=TRUE` install lacks and which
cost ~3.6 s. `import_mamba_ssm` registers a bare `mamba_ssm` package module (its real
path, none of its `__init__`) so that only the Triton submodules we name get imported.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import sys
import types
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

# causal-conv1d's channel-last kernels need channel strides that are multiples of 8.
CAUSAL_CONV1D_CHANNEL_ALIGN = 8


def import_mamba_ssm(submodule: str) -> ModuleType:
    """Import `mamba_ssm.<submodule>` without running mamba_ssm/__init__.py."""
    if "mamba_ssm" not in sys.modules:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError(
                "mamba-ssm is not installed; run `make setup` (it installs mamba-ssm==2.3.2.post1 "
                "with MAMBA_SKIP_CUDA_BUILD=TRUE)"
            )
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(spec.submodule_search_locations)
        package.__file__ = spec.origin
        sys.modules["mamba_ssm"] = package
    return importlib.import_module(f"mamba_ssm.{submodule}")


@functools.cache
def _triton() -> types.SimpleNamespace:
    ssd = import_mamba_ssm("ops.triton.ssd_combined")
    ssu = import_mamba_ssm("ops.triton.selective_state_update")
    norm = import_mamba_ssm("ops.triton.layernorm_gated")
    add_norm = import_mamba_ssm("ops.triton.layer_norm")
    return types.SimpleNamespace(
        add_rmsnorm=add_norm.rms_norm_fn,
        chunk_scan=ssd.mamba_chunk_scan_combined,
        split_conv1d_scan=ssd.mamba_split_conv1d_scan_combined,
        state_update=ssu.selective_state_update,
        rmsnorm=norm.rmsnorm_fn,
    )


@functools.cache
def causal_conv1d_ops() -> types.SimpleNamespace | None:
    """causal-conv1d's CUDA functions, or None when its extension does not import."""
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except ImportError as err:
        log.info("causal-conv1d CUDA extension unavailable (%s); using the PyTorch conv", err)
        return None
    return types.SimpleNamespace(fn=causal_conv1d_fn, update=causal_conv1d_update)


def _use_causal_conv1d(x: torch.Tensor) -> bool:
    return x.is_cuda and x.shape[-1] % CAUSAL_CONV1D_CHANNEL_ALIGN == 0 and causal_conv1d_ops() is not None


def fused_path_available(x: torch.Tensor, conv_dim: int) -> bool:
    """True when the fully fused conv+scan+norm+out_proj kernel can run on `x`."""
    return x.is_cuda and conv_dim % CAUSAL_CONV1D_CHANNEL_ALIGN == 0 and causal_conv1d_ops() is not None


def fused_block(zxbcdt: torch.Tensor, **kwargs) -> torch.Tensor:
    """mamba-ssm's fused split/conv/scan/norm/out_proj path (CUDA + causal-conv1d only)."""
    return _triton().split_conv1d_scan(zxbcdt, **kwargs)


# ---------------------------------------------------------------- causal conv


def causal_conv(xbc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                history: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal conv + SiLU.

    xbc: (batch, length, channels); weight: (channels, d_conv); bias: (channels,)
    history: (batch, channels, d_conv - 1) inputs preceding xbc (zeros when None).
    Returns (batch, length, channels).
    """
    if history is None and _use_causal_conv1d(xbc):
        return causal_conv1d_ops().fn(xbc.transpose(1, 2), weight, bias, activation="silu").transpose(1, 2)
    x = xbc.transpose(1, 2)  # (B, C, L)
    width = weight.shape[-1]
    if history is None:
        x = F.pad(x, (width - 1, 0))
    else:
        x = torch.cat([history.to(x.dtype), x], dim=-1)
    out = F.conv1d(x, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype),
                   groups=x.shape[1])
    return F.silu(out).transpose(1, 2)


def causal_conv_step(conv_state: torch.Tensor, xbc: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """One decode step of the causal conv; updates conv_state (batch, channels, d_conv) in place.

    xbc: (batch, channels). Returns (batch, channels) after SiLU.
    """
    if _use_causal_conv1d(xbc) and conv_state.dtype == xbc.dtype:
        return causal_conv1d_ops().update(xbc, conv_state, weight, bias, "silu")
    if xbc.is_cuda:
        return conv_step_triton(conv_state, xbc, weight, bias)
    return causal_conv_step_torch(conv_state, xbc, weight, bias)


def causal_conv_step_torch(conv_state: torch.Tensor, xbc: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
    """PyTorch twin of `causal_conv_step` (the CPU path, and the reference of the Triton kernel)."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = xbc
    out = torch.einsum("bcw,cw->bc", conv_state.to(weight.dtype), weight)
    if bias is not None:
        out = out + bias
    return F.silu(out).to(xbc.dtype)


# Channels per program of the Triton conv step (a decode step has batch * channels work items).
CONV_STEP_BLOCK = 256


@functools.cache
def _conv_step_kernel():
    """One decode step of the depthwise causal conv in one kernel: shift the state, append x,
    dot with the weights, add the bias, SiLU (fp32 inside). Replaces ~6 PyTorch launches, which
    matters inside a CUDA-graph decode step where each launch costs ~2 us whatever its size."""
    import triton
    import triton.language as tl

    @triton.jit
    def conv_step_kernel(state_ptr, x_ptr, w_ptr, b_ptr, out_ptr, channels, s_b, s_c, s_w, x_b, w_c, w_w, o_b,
                         WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = c < channels
        state = state_ptr + row * s_b + c * s_c
        x = tl.load(x_ptr + row * x_b + c, mask=mask, other=0.0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(WIDTH - 1):
            v = tl.load(state + (k + 1) * s_w, mask=mask, other=0.0)
            tl.store(state + k * s_w, v, mask=mask)
            acc += v.to(tl.float32) * tl.load(w_ptr + c * w_c + k * w_w, mask=mask, other=0.0).to(tl.float32)
        x_state = x.to(state_ptr.dtype.element_ty)
        tl.store(state + (WIDTH - 1) * s_w, x_state, mask=mask)
        acc += x_state.to(tl.float32) * tl.load(w_ptr + c * w_c + (WIDTH - 1) * w_w, mask=mask,
                                                other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
        out = acc * tl.sigmoid(acc)
        tl.store(out_ptr + row * o_b + c, out.to(out_ptr.dtype.element_ty), mask=mask)

    return conv_step_kernel


def conv_step_triton(conv_state: torch.Tensor, xbc: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """`causal_conv_step` as one Triton kernel (CUDA without causal-conv1d's extension)."""
    import triton

    if xbc.stride(-1) != 1:
        xbc = xbc.contiguous()
    batch, channels = xbc.shape
    out = torch.empty_like(xbc, memory_format=torch.contiguous_format)
    grid = (batch, triton.cdiv(channels, CONV_STEP_BLOCK))
    _conv_step_kernel()[grid](
        conv_state, xbc, weight, weight if bias is None else bias, out, channels,
        *conv_state.stride(), xbc.stride(0), *weight.stride(), out.stride(0),
        WIDTH=conv_state.shape[-1], HAS_BIAS=bias is not None, BLOCK=CONV_STEP_BLOCK)
    return out


# ---------------------------------------------------------------- decode-step projections (GEMV)

# A decode step's in_proj and out_proj are GEMVs at batch 1: (batch, K) @ (N, K)^T. At narrow widths cuBLAS
# launches ~20-32 CTAs for them (d2048 level 8 on an H100: 9.2 us for both against a 2.4 us byte floor), so they
# are latency-bound. The Triton GEMV below tiles N finely instead: N / 4 programs, >= 160 at the decode shapes.
# The tiling and the rule are from bench/gemv_bench.py on an H200 (docs/results/gpu/gemv_bench.log).
GEMV_MAX_BATCH = 8  # the kernel keeps every sequence's partial sums in registers; wider batches are GEMMs
# Positions of a short chunk (speculative verification: the pending token and up to 16 drafts) that the normed
# GEMV and the chunk scan take as one tile; the GEMV's tile shortens its K step to fit (`gemv_config`).
SHORT_CHUNK_MAX = 32
GEMV_BLOCK_N = 4  # rows per program: within ~5% of the best swept tiling at every decode shape, batch 1
# K per step (batch 1): one step when K fits (the swept optimum), else 2048 when it divides K, else 1024
# (a 2048 step with a half-masked tail measured up to 25% slower at K = 2560 and 5120).
GEMV_BLOCK_K_MAX = 2048
# Products in one program's tile (BLOCK_B * BLOCK_N * BLOCK_K): 64 fp32 accumulators per thread at 4 warps.
GEMV_TILE_ELEMS = 8192
GEMV_NUM_WARPS = 4
# Weights with more rows than this stay on cuBLAS: with N >= 5416 (d2048 level-1, d2560 level-1/2 in_proj) it runs
# enough CTAs and measured 6-13% faster than the Triton GEMV; at N <= 4096 (every out_proj, narrower in_proj)
# the Triton GEMV measured 1.03-2.04x faster (N = 4384 in between: a 4% Triton lead, within the noise).
GEMV_MAX_ROWS = 4096
GEMV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

GEMV_MODES = ("fused", "unfused", "cublas", "triton")
_gemv_mode = "fused"


@contextlib.contextmanager
def decode_gemv(mode: str):
    """Force the decode step's kernels while the block is active. "fused", the default: the size rule of
    `use_triton_gemv`, and where a projection runs on the Triton GEMV the work around it runs inside it: the
    residual add + RMSNorm and the conv step in in_proj's (`add_rmsnorm_gemv_triton`), the gated RMSNorm in
    out_proj's (`gated_gemv_triton`): 3 launches a layer where both projections run on it, against 6.
    "unfused": the same size rule, the norms and the conv in kernels of their own. "cublas": always F.linear.
    "triton": the Triton GEMV wherever it can run (unfused). On an H200 "fused" decoded faster than "unfused" at
    9 of 12 levels (4 levels of 3 model sizes), within 1.5% at the other 3 (docs/BENCHMARKS.md). For
    benchmarks and tests; a CUDA graph keeps the choice made when it was captured."""
    global _gemv_mode
    if mode not in GEMV_MODES:
        raise ValueError(f"decode_gemv mode must be one of {', '.join(map(repr, GEMV_MODES))}, got {mode!r}")
    previous, _gemv_mode = _gemv_mode, mode
    try:
        yield
    finally:
        _gemv_mode = previous


def use_triton_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `decode_linear` runs the Triton GEMV on these operands (see the GEMV_* constants)."""
    if _gemv_mode == "cublas" or not x.is_cuda or x.dim() != 2 or x.shape[0] > GEMV_MAX_BATCH:
        return False
    if x.dtype != weight.dtype or x.dtype not in GEMV_DTYPES or weight.stride(-1) != 1:
        return False
    if torch.is_autocast_enabled() or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return False
    return _gemv_mode == "triton" or weight.shape[0] <= GEMV_MAX_ROWS


def use_short_chunk(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a short chunk x (L, K) of one sequence runs a decode step's kernels over its positions against this
    projection weight (`MatMamba2.chunk_prenorm`): "fused" mode, L <= SHORT_CHUNK_MAX, operands the Triton GEMV
    takes (any number of weight rows: one launch for the chunk either way)."""
    if _gemv_mode != "fused" or not x.is_cuda or x.dim() != 2 or not 1 <= x.shape[0] <= SHORT_CHUNK_MAX:
        return False
    if x.dtype != weight.dtype or x.dtype not in GEMV_DTYPES or weight.stride(-1) != 1 or x.stride(-1) != 1:
        return False
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return not torch.is_autocast_enabled() and not grad


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear for a decode step: the Triton GEMV where `use_triton_gemv` says it is faster, else cuBLAS."""
    if use_triton_gemv(x, weight):
        return gemv_triton(x, weight, bias)
    return F.linear(x, weight, bias)


def gemv_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """PyTorch twin of `gemv_triton` (its reference): x (batch, K) @ weight (N, K)^T + bias, fp32 inside."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def gemv_config(batch: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_N, BLOCK_K) for a (batch, k) input: GEMV_BLOCK_N rows per program, the K step of
    GEMV_BLOCK_K_MAX's comment, shortened so that a program's tile stays within GEMV_TILE_ELEMS products."""
    block_b = _next_pow2(batch)
    if k <= GEMV_BLOCK_K_MAX:
        block_k = _next_pow2(k)
    else:
        block_k = GEMV_BLOCK_K_MAX if k % GEMV_BLOCK_K_MAX == 0 else GEMV_BLOCK_K_MAX // 2
    return block_b, GEMV_BLOCK_N, min(block_k, GEMV_TILE_ELEMS // (block_b * GEMV_BLOCK_N))


@functools.cache
def _gemv_kernel():
    """out[b, n] = sum_k x[b, k] w[n, k] (+ bias[n]): each program owns BLOCK_N rows of w for every sequence,
    walks K in BLOCK_K steps with fp32 partial products, and reduces and stores once. No split over K:
    the decode shapes have N >= d_model rows, enough programs without a second launch or atomics."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["batch", "n", "o_b"])  # masks only: one compile for every N and batch
    def gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, batch, n, k, x_b, w_n, o_b,
                    HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        seqs = tl.arange(0, BLOCK_B)
        cols = tl.arange(0, BLOCK_K)
        row_mask = rows < n
        seq_mask = seqs < batch
        acc = tl.zeros([BLOCK_B, BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            col_mask = k0 + cols < k
            w = tl.load(w_ptr + rows[:, None] * w_n + (k0 + cols)[None, :],
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
            x = tl.load(x_ptr + seqs[:, None] * x_b + (k0 + cols)[None, :],
                        mask=seq_mask[:, None] & col_mask[None, :], other=0.0)  # (BLOCK_B, BLOCK_K)
            acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        out = tl.sum(acc, axis=2)  # (BLOCK_B, BLOCK_N)
        if HAS_BIAS:
            out += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + seqs[:, None] * o_b + rows[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=seq_mask[:, None] & row_mask[None, :])

    return gemv_kernel


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                block_n: int | None = None, block_k: int | None = None,
                num_warps: int = GEMV_NUM_WARPS) -> torch.Tensor:
    """x (batch <= GEMV_MAX_BATCH, K) @ weight (N, K)^T + bias (N,) as one Triton kernel, fp32 accumulation.

    weight's rows may be strided (a column slice) but each row must be contiguous. block_n / block_k override
    `gemv_config`'s tiling (the micro-benchmark sweeps them). CUDA-graph capturable: one launch, no host sync.
    """
    batch, k = x.shape
    n = weight.shape[0]
    assert batch <= GEMV_MAX_BATCH and weight.shape[1] == k and weight.stride(-1) == 1
    if x.stride(-1) != 1:
        x = x.contiguous()
    block_b, auto_n, auto_k = gemv_config(batch, k)
    block_n, block_k = block_n or auto_n, block_k or auto_k
    out = torch.empty(batch, n, device=x.device, dtype=x.dtype)
    grid = (-(-n // block_n),)
    _gemv_kernel()[grid](
        x, weight, weight if bias is None else bias, out, batch, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return out


def use_gated_gemv(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, ngroups: int,
                   norm_before_gate: bool) -> bool:
    """Whether a decode step's gated RMSNorm and out_proj run as one `gated_gemv_triton` ("fused" mode only):
    one norm group, the gate applied before the norm, and operands the Triton GEMV takes."""
    return (_gemv_mode == "fused" and ngroups == 1 and not norm_before_gate and z.dtype == y.dtype
            and z.stride(-1) == 1 and use_triton_gemv(y, weight))


def use_add_rmsnorm_gemv(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """Whether a decode step's residual add + RMSNorm, in_proj and conv step run as one `add_rmsnorm_gemv_triton`
    ("fused" mode only, where in_proj runs on the Triton GEMV)."""
    if _gemv_mode != "fused" or not use_triton_gemv(x, weight):
        return False
    return residual is None or (residual.device == x.device and residual.dim() == 2 and residual.stride(-1) == 1)


def gated_gemv_torch(y: torch.Tensor, z: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """PyTorch twin of `gated_gemv_triton`: `gated_rmsnorm` (one group, gate before the norm), then `gemv_torch`."""
    return gemv_torch(gated_rmsnorm(y, z, norm_weight, eps, 1, False), weight, bias)


def add_rmsnorm_gemv_torch(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                           residual_in_fp32: bool, weight: torch.Tensor, bias: torch.Tensor | None,
                           conv: ConvStep | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch twin of `add_rmsnorm_gemv_triton`, with mamba-ssm's add + RMSNorm arithmetic (the CUDA path of
    `add_rmsnorm`): r = residual + x in fp32, the norm of r in fp32 rounded to x's dtype, then `gemv_torch`,
    then `causal_conv_step_torch` on the conv's rows. Returns (the projection, r in fp32 when
    ``residual_in_fp32`` else in x's dtype)."""
    r = x.float() if residual is None else residual.float() + x.float()
    normed = (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()).to(x.dtype)
    out = gemv_torch(normed, weight, bias)
    if conv is not None:
        rows = slice(conv.first_row, conv.first_row + conv.weight.shape[0])
        out[:, rows] = causal_conv_step_torch(conv.state, out[:, rows], conv.weight, conv.bias)
    return out, r if residual_in_fp32 else r.to(x.dtype)


class GemvTiling(NamedTuple):
    """How `_normed_gemv_kernel` tiles (batch, K) @ (N, K)^T: BLOCK_B rows of the input (sequences, or a chunk's
    positions; fewer than the batch spreads them over programs, not with a chunk's conv) and BLOCK_N weight rows
    per program, K in BLOCK_K steps; ``dot`` "" multiplies as a broadcast product
    in registers (BLOCK_B x BLOCK_N x BLOCK_K partial sums), else with tl.dot at that input precision ("ieee":
    fp32 FMAs; "tf32x3": tensor cores, three TF32 products), which needs BLOCK_B, BLOCK_N, BLOCK_K >= 16."""
    block_b: int
    block_n: int
    block_k: int
    num_warps: int = GEMV_NUM_WARPS
    dot: str = ""


# Products per program where a chunk's conv runs in the epilogue (in_proj of a verification round) over 8 or more
# positions: on an H200 a quarter of GEMV_TILE_ELEMS measured 1.16x / 1.32x / 1.10x faster at L = 5 / 9 / 17 and
# the full tile was the fastest at L <= 3 and without the conv (bench/chunk_kernels.py).
CONV_CHUNK_TILE_ELEMS = 2048


# Positions per program of a short chunk's GEMV without a conv (out_proj of a verification round), 3+ positions:
# spread over programs 2 by 2, measured 1.07x / 1.37x / 1.77x / 1.94x faster than all in one at L = 3 / 5 / 9 / 17
# on an H200 (bench/chunk_kernels.py; 1 or 4 a program within 10% of 2).
CHUNK_ROWS_PER_PROGRAM = 2


def normed_gemv_tiling(batch: int, k: int, conv_chunk: bool = False, positions: bool = False) -> GemvTiling:
    """The tiling `_normed_gemv` uses by default: `gemv_config`'s, with the K step cut to CONV_CHUNK_TILE_ELEMS
    products where ``conv_chunk`` (a `ConvChunk` epilogue) and 8 or more rows, and with the rows spread over
    programs CHUNK_ROWS_PER_PROGRAM at a time where they are a chunk's ``positions`` (no conv) and 3 or more."""
    if positions and not conv_chunk and batch >= 3:
        return GemvTiling(*gemv_config(CHUNK_ROWS_PER_PROGRAM, k))
    block_b, block_n, block_k = gemv_config(batch, k)
    if conv_chunk and block_b >= 8:
        block_k = min(block_k, CONV_CHUNK_TILE_ELEMS // (block_b * block_n))
    return GemvTiling(block_b, block_n, block_k)


@functools.cache
def _normed_gemv_kernel():
    """out[b, n] = sum_k h[b, k] w[n, k] (+ bias[n]) with h = rmsnorm(v) * norm_weight, where v is a * silu(b)
    (GATED: the gated norm before out_proj; b required) or a + b (the residual add before in_proj; b optional;
    program 0 also stores v). One pass over K: the norm's scale is one number per sequence, so each program
    accumulates sum_k v nw w and the mean square of v side by side and scales its sums by rsqrt(mean + eps) at
    the end (h is not rounded to a's dtype as the unfused norm stores it: within that rounding of the unfused
    result). The first version read v twice (a mean-square pass, then `_gemv_kernel`'s loop): on an H200 its
    steps were slower than the unfused ones at d2048 levels 1-2 and d2560 level 4
    (docs/results/gpu/decode_profile_two_pass_norm.log). With CONV_WIDTH > 0 (in_proj), the programs that own
    the conv's channels (rows conv_lo .. conv_lo + channels) also run the conv step on them in the epilogue, as
    `_conv_step_kernel` would in a launch of its own: shift the state, append the projection rounded as stored,
    dot with the weights, bias, SiLU; each channel has one owner, so no two programs touch a state row. With
    CONV_CHUNK the rows of the tile are the positions of one sequence's short chunk (`ConvChunk`): the owners run
    the causal conv along them from the state before the chunk, write the window and leave the state after it."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["batch", "n", "o_b"])
    def normed_gemv_kernel(a_ptr, b_ptr, nw_ptr, w_ptr, bias_ptr, out_ptr, v_out_ptr, batch, n, k, a_b, b_b, w_n,
                           o_b, vo_b, eps, cs_ptr, cw_ptr, cb_ptr, conv_lo, channels, cs_b, cs_c, cs_w, cw_c, cw_w,
                           win_ptr, win_c, GATED: tl.constexpr, HAS_B: tl.constexpr, HAS_BIAS: tl.constexpr,
                           CONV_WIDTH: tl.constexpr, CONV_CHUNK: tl.constexpr, HAS_CONV_BIAS: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                           PRECISION: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        seqs = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.arange(0, BLOCK_K)
        row_mask = rows < n
        seq_mask = seqs < batch
        squares = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
        if DOT:
            acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_B, BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            col_mask = k0 + cols < k
            mask = seq_mask[:, None] & col_mask[None, :]
            v = tl.load(a_ptr + seqs[:, None] * a_b + (k0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                b = tl.load(b_ptr + seqs[:, None] * b_b + (k0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
                if GATED:
                    v = v * b * tl.sigmoid(b)
                else:
                    v = v + b
            if not GATED:
                if tl.program_id(0) == 0:
                    tl.store(v_out_ptr + seqs[:, None] * vo_b + (k0 + cols)[None, :],
                             v.to(v_out_ptr.dtype.element_ty), mask=mask)
            squares += v * v
            nw = tl.load(nw_ptr + k0 + cols, mask=col_mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * w_n + (k0 + cols)[None, :],
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
            if DOT:
                acc += tl.dot(v * nw[None, :], tl.trans(w.to(tl.float32)), input_precision=PRECISION)
            else:
                acc += (v * nw[None, :])[:, None, :] * w.to(tl.float32)[None, :, :]
        rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=1) / k + eps)  # (BLOCK_B,)
        if DOT:
            out = acc * rstd[:, None]  # (BLOCK_B, BLOCK_N)
        else:
            out = tl.sum(acc, axis=2) * rstd[:, None]
        if HAS_BIAS:
            out += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        if CONV_WIDTH > 0:  # rows conv_lo.. are the conv's channels
            ch = rows - conv_lo
            is_conv = row_mask & (ch >= 0) & (ch < channels)
            cmask = seq_mask[:, None] & is_conv[None, :]
            if CONV_CHUNK:  # the tile's sequences are the positions of one sequence's chunk: `ConvChunk`
                raw = tl.where(cmask, out.to(out_ptr.dtype.element_ty).to(cs_ptr.dtype.element_ty), 0.0)  # as stored
                # position t reads inputs t - CONV_WIDTH + 1 .. t: input s of the chunk with tap s - t + CONV_WIDTH - 1
                tap = seqs[None, :] - seqs[:, None] + CONV_WIDTH - 1  # (t, s)
                taps = (tap >= 0) & (tap < CONV_WIDTH)
                tap_w = tl.load(cw_ptr + ch[None, None, :] * cw_c + tap[:, :, None] * cw_w,
                                mask=taps[:, :, None] & is_conv[None, None, :], other=0.0)  # (t, s, BLOCK_N)
                conv = tl.sum(tap_w.to(tl.float32) * raw.to(tl.float32)[None, :, :], axis=1)  # (BLOCK_B, BLOCK_N)
                window = win_ptr + ch * win_c  # (BLOCK_N,)
                for j in tl.static_range(CONV_WIDTH):  # the state's column j holds position j - CONV_WIDTH
                    old = tl.load(cs_ptr + ch * cs_c + j * cs_w, mask=is_conv, other=0.0)  # (BLOCK_N,)
                    tl.store(window + j, old, mask=is_conv)
                    tap_j = j - seqs - 1  # (BLOCK_B,)
                    w_j = tl.load(cw_ptr + ch[None, :] * cw_c + tap_j[:, None] * cw_w,
                                  mask=(tap_j >= 0)[:, None] & is_conv[None, :], other=0.0)
                    conv += w_j.to(tl.float32) * old.to(tl.float32)[None, :]
                tl.store(window[None, :] + (CONV_WIDTH + seqs)[:, None], raw, mask=cmask)
                tl.debug_barrier()  # the window is whole: the new state is its last CONV_WIDTH columns
                for j in tl.static_range(CONV_WIDTH):
                    tl.store(cs_ptr + ch * cs_c + j * cs_w, tl.load(window + batch + j, mask=is_conv), mask=is_conv)
            else:  # one decode step per sequence: `_conv_step_kernel` on the channels, in the epilogue
                state = cs_ptr + seqs[:, None] * cs_b + ch[None, :] * cs_c
                conv = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
                for j in tl.static_range(CONV_WIDTH - 1):
                    v = tl.load(state + (j + 1) * cs_w, mask=cmask, other=0.0)
                    tl.store(state + j * cs_w, v, mask=cmask)
                    conv += v.to(tl.float32) * tl.load(cw_ptr + ch * cw_c + j * cw_w, mask=is_conv,
                                                       other=0.0).to(tl.float32)[None, :]
                x_state = out.to(out_ptr.dtype.element_ty).to(cs_ptr.dtype.element_ty)  # as stored, then the state
                tl.store(state + (CONV_WIDTH - 1) * cs_w, x_state, mask=cmask)
                conv += x_state.to(tl.float32) * tl.load(cw_ptr + ch * cw_c + (CONV_WIDTH - 1) * cw_w, mask=is_conv,
                                                         other=0.0).to(tl.float32)[None, :]
            if HAS_CONV_BIAS:
                conv += tl.load(cb_ptr + ch, mask=is_conv, other=0.0).to(tl.float32)[None, :]
            out = tl.where(is_conv[None, :], conv * tl.sigmoid(conv), out)
        tl.store(out_ptr + seqs[:, None] * o_b + rows[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=seq_mask[:, None] & row_mask[None, :])

    return normed_gemv_kernel


@dataclass(frozen=True)
class ConvStep:
    """A decode step's depthwise causal conv, for `add_rmsnorm_gemv_triton` to run on in_proj's rows
    ``first_row ..`` (the conv's channels): state (batch, channels, width), updated in place; weight
    (channels, width); bias (channels,) or None. The projection's output then holds those rows after the conv
    and SiLU, as `causal_conv_step` returns them."""
    state: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    first_row: int


@dataclass(frozen=True)
class ConvChunk:
    """The depthwise causal conv over a short chunk of one sequence, for `add_rmsnorm_gemv_triton` to run on
    in_proj's rows ``first_row ..`` when the projection's rows (its "batch") are the chunk's L positions: state
    (1, channels, width), the conv state before the chunk, left as the state after it; weight (channels, width);
    bias (channels,) or None; window (1, channels, width + L), written: the state before, then the chunk's inputs
    (what `BlockState.rewind` cuts the conv state from, as the chunked path's `StateTrace.conv_window`)."""
    state: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    first_row: int
    window: torch.Tensor


def _normed_gemv(a: torch.Tensor, b: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                 bias: torch.Tensor | None, gated: bool, v_out: torch.Tensor | None,
                 conv: ConvStep | ConvChunk | None = None, tiling: GemvTiling | None = None) -> torch.Tensor:
    batch, k = a.shape
    n = weight.shape[0]
    assert batch <= SHORT_CHUNK_MAX and weight.shape[1] == k and norm_weight.shape == (k,)
    assert a.stride(-1) == 1 and weight.stride(-1) == 1 and (b is None or (b.shape == a.shape and b.stride(-1) == 1))
    chunk = isinstance(conv, ConvChunk)
    block_b, block_n, block_k, num_warps, dot = tiling or normed_gemv_tiling(batch, k, chunk)
    assert not dot or min(block_b, block_n, block_k) >= 16, "tl.dot needs tiles of >= 16"
    out = torch.empty(batch, n, device=a.device, dtype=a.dtype)
    conv_args: tuple = (out, out, out, 0, 0, 0, 0, 0, 0, 0, out, 0)
    if conv is not None:
        channels, width = conv.weight.shape
        rows = 1 if chunk else batch
        assert conv.state.shape == (rows, channels, width) and conv.first_row + channels <= n
        window = (out, 0)
        if chunk:
            assert block_b >= batch, "a chunk's conv needs all of its positions in one program"
            assert conv.window.shape == (1, channels, width + batch) and conv.window.stride(-1) == 1
            assert conv.window.dtype == conv.state.dtype
            window = (conv.window, conv.window.stride(1))
        conv_args = (conv.state, conv.weight, conv.weight if conv.bias is None else conv.bias, conv.first_row,
                     channels, *conv.state.stride(), *conv.weight.stride(), *window)
    _normed_gemv_kernel()[(-(-n // block_n), -(-batch // block_b))](
        a, a if b is None else b, norm_weight, weight, weight if bias is None else bias, out,
        out if v_out is None else v_out, batch, n, k, a.stride(0), 0 if b is None else b.stride(0), weight.stride(0),
        out.stride(0), 0 if v_out is None else v_out.stride(0), eps, *conv_args, GATED=gated, HAS_B=b is not None,
        HAS_BIAS=bias is not None, CONV_WIDTH=0 if conv is None else conv.weight.shape[1], CONV_CHUNK=chunk,
        HAS_CONV_BIAS=conv is not None and conv.bias is not None, BLOCK_B=block_b, BLOCK_N=block_n,
        BLOCK_K=block_k, DOT=bool(dot), PRECISION=dot or "ieee", num_warps=num_warps)
    return out


def gated_gemv_triton(y: torch.Tensor, z: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                      bias: torch.Tensor | None, tiling: GemvTiling | None = None) -> torch.Tensor:
    """`gated_gemv_torch` as one Triton kernel: y, z (batch <= GEMV_MAX_BATCH, K; or a short chunk's positions,
    <= SHORT_CHUNK_MAX) with contiguous rows; norm_weight (K,); weight (N, K) with contiguous rows. Tiled as
    `normed_gemv_tiling` says unless ``tiling`` is given. CUDA-graph capturable."""
    return _normed_gemv(y, z, norm_weight, eps, weight, bias, True, None, tiling=tiling)


def add_rmsnorm_gemv_triton(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                            residual_in_fp32: bool, weight: torch.Tensor, bias: torch.Tensor | None,
                            conv: ConvStep | ConvChunk | None = None,
                            tiling: GemvTiling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rmsnorm_gemv_torch` as one Triton kernel: x (batch <= GEMV_MAX_BATCH, K; or a short chunk's
    positions, <= SHORT_CHUNK_MAX) and residual (or None, the first layer) with contiguous rows; weight (N, K) with
    contiguous rows; the conv step (`ConvStep`) or a chunk's conv (`ConvChunk`, x's rows then being one sequence's
    positions) in its epilogue when given. Tiled as `gated_gemv_triton`. CUDA-graph capturable. Returns (the
    projection (batch, N) in x's dtype, the new residual (batch, K))."""
    residual_out = torch.empty(x.shape, device=x.device, dtype=torch.float32 if residual_in_fp32 else x.dtype)
    out = _normed_gemv(x, residual, norm_weight, eps, weight, bias, False, residual_out, conv, tiling)
    return out, residual_out


# ---------------------------------------------------------------- SSD scan


def ssd_chunked_torch(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      chunk_size: int, D: torch.Tensor | None = None,
                      initial_states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD in PyTorch (fp32 inside), the CPU twin of mamba_chunk_scan_combined.

    x: (b, l, h, p); dt: (b, l, h) after softplus; A: (h,) negative; B, C: (b, l, g, n)
    D: (h,) skip; initial_states: (b, h, p, n). Returns y (b, l, h, p), final state (b, h, p, n).
    Heads are handled as (g, h/g) so B and C are never copied per head.
    """
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    out_dtype = x.dtype
    x, dt, B, C = (t.float() for t in (x, dt, B, C))
    q = min(chunk_size, length)
    pad = (-length) % q
    if pad:  # dt = 0 on padding: no decay and no input, so the final state is unchanged
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    nc = x.shape[1] // q
    x = x.reshape(b, nc, q, g, h // g, p)  # (b, c, q, g, k, p) with k heads per group
    dt = dt.reshape(b, nc, q, g, h // g)
    B, C = B.reshape(b, nc, q, g, n), C.reshape(b, nc, q, g, n)
    # 1. log-decay accumulated inside each chunk
    a_cum = torch.cumsum(dt * A.float().reshape(g, h // g), dim=2)  # (b, c, q, g, k)
    # 2. outputs from inputs of the same chunk: y[t] = sum_{s<=t} (C_t.B_s) e^{a_t - a_s} dt_s x_s
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    a_t = a_cum.permute(0, 1, 3, 4, 2)  # (b, c, g, k, q)
    seg = (a_t.unsqueeze(-1) - a_t.unsqueeze(-2)).masked_fill(~causal, float("-inf"))  # (b, c, g, k, t, s)
    scores = torch.einsum("bctgn,bcsgn->bcgts", C, B).unsqueeze(3) * seg.exp()
    y = torch.einsum("bcgkts,bcsgkp->bctgkp", scores, dt.unsqueeze(-1) * x)
    # 3. each chunk's own contribution to the state at its end
    to_end = (a_cum[:, :, -1:] - a_cum).exp() * dt  # (b, c, q, g, k)
    chunk_states = torch.einsum("bcsgk,bcsgn,bcsgkp->bcgkpn", to_end, B, x)
    # 4. carry the state across chunks (a short loop: length / chunk_size steps)
    state = x.new_zeros(b, h, p, n) if initial_states is None else initial_states.float()
    state = state.reshape(b, g, h // g, p, n)
    chunk_decay = a_cum[:, :, -1].exp()  # (b, c, g, k)
    entering = []
    for c in range(nc):
        entering.append(state)
        state = state * chunk_decay[:, c, :, :, None, None] + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)  # (b, c, g, k, p, n)
    # 5. outputs from the state entering each chunk
    y = y + torch.einsum("bctgn,bcgkpn->bctgkp", C, entering) * a_cum.exp().unsqueeze(-1)
    y = y.reshape(b, nc * q, h, p)[:, :length]
    if D is not None:
        y = y + x.reshape(b, nc * q, h, p)[:, :length] * D.float()[:, None]
    return y.to(out_dtype), state.reshape(b, h, p, n)


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: torch.Tensor, dt_bias: torch.Tensor, chunk_size: int,
             initial_states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD over a sequence. dt is raw (before `+ dt_bias` and softplus).

    Shapes as in `ssd_chunked_torch`. Returns y and the final state (fp32).
    """
    if x.is_cuda:
        y, final = _triton().chunk_scan(
            x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True,
            initial_states=initial_states, return_final_states=True,
        )
        return y, final
    dt = F.softplus(dt.float() + dt_bias.float())
    return ssd_chunked_torch(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_states)


def ssd_state_after(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, dt_bias: torch.Tensor,
                    initial_states: torch.Tensor, keep: int | torch.Tensor) -> torch.Tensor:
    """The SSM state after the first ``keep`` positions of a chunk read from ``initial_states``.

    x: (b, l, h, p); dt: (b, l, h) raw; A, dt_bias: (h,); B: (b, l, g, n); initial_states: (b, h, p, n).
    Returns (b, h, p, n) fp32: the recurrence of `ssd_step` in closed form,
    S_t = e^{a_t} S_0 + sum_{s<=t} e^{a_t - a_s} dt_s x_s B_s^T with a_t = sum_{r<=t} dt_r A, for t = keep - 1.
    Costs one pass over the kept positions: speculative verification calls it once, for the accepted prefix.
    ``keep`` may be a 0-dim int64 tensor on x's device (inside a CUDA graph, where it is known only on the
    device): the positions from ``keep`` on then get dt = 0, which neither decays nor adds to the state, so
    the same static-shape arithmetic serves every ``keep`` without reading it back to the host.
    """
    h = x.shape[2]
    dt = F.softplus(dt.float() + dt_bias.float())  # (b, l, h)
    if isinstance(keep, torch.Tensor):
        kept = torch.arange(x.shape[1], device=x.device) < keep  # (l,)
        dt = dt * kept[:, None]
    else:
        x, B, dt = x[:, :keep], B[:, :keep], dt[:, :keep]
    x, B = x.float(), B.float().repeat_interleave(h // B.shape[2], dim=2)  # (b, t, h, p|n)
    a_cum = torch.cumsum(dt * A.float(), dim=1)  # (b, t, h)
    weight = (a_cum[:, -1:] - a_cum).exp() * dt  # (b, t, h): e^{a_last - a_s} dt_s
    inputs = torch.einsum("bsh,bshp,bshn->bhpn", weight, x, B)
    return inputs + a_cum[:, -1].exp()[..., None, None] * initial_states.float()


# Threshold above which softplus(x) is x in fp32 (as torch's F.softplus and mamba-ssm's state update use).
SOFTPLUS_LINEAR_ABOVE = 20.0
# Rows of the state (headdim) per program of the rewind kernel: a program holds ROWS x d_state fp32 values.
REWIND_ROWS = 16


@functools.cache
def _rewind_kernel():
    """The SSM state after the first ``keep`` positions of a traced chunk, ``keep`` read on the device: one
    program per (sequence, head, block of rows) replays the recurrence of `ssd_step` from the state before
    the chunk over the kept positions and overwrites the state; with every position kept it writes nothing
    (the scan's final state stays). One launch per layer for what is ~20 PyTorch kernels in
    `ssd_state_after`, inside the verification graph where each launch costs microseconds whatever its size."""
    import triton
    import triton.language as tl

    @triton.jit
    def ssd_rewind_kernel(state_ptr, before_ptr, x_ptr, dt_ptr, b_ptr, a_ptr, dt_bias_ptr, keep_ptr, length, rows,
                          d_state, s_b, s_h, s_p, s_n, o_b, o_h, o_p, o_n, x_b, x_l, x_h, x_p, dt_b, dt_l, dt_h, b_b,
                          b_l, b_g, b_n, HEADS_PER_GROUP: tl.constexpr, ROWS: tl.constexpr, STATE: tl.constexpr,
                          SOFTPLUS_ABOVE: tl.constexpr):
        seq, head, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        keep = tl.load(keep_ptr)
        if keep < length:
            p = block * ROWS + tl.arange(0, ROWS)
            n = tl.arange(0, STATE)
            mask = (p[:, None] < rows) & (n[None, :] < d_state)
            before = before_ptr + seq * o_b + head * o_h + p[:, None] * o_p + n[None, :] * o_n
            state = tl.load(before, mask=mask, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + head).to(tl.float32)
            dt_bias = tl.load(dt_bias_ptr + head).to(tl.float32)
            group = head // HEADS_PER_GROUP
            for t in range(0, keep):
                dt = tl.load(dt_ptr + seq * dt_b + t * dt_l + head * dt_h).to(tl.float32) + dt_bias
                dt = tl.where(dt <= SOFTPLUS_ABOVE, tl.log(1.0 + tl.exp(dt)), dt)
                x = tl.load(x_ptr + seq * x_b + t * x_l + head * x_h + p * x_p, mask=p < rows, other=0.0)
                bt = tl.load(b_ptr + seq * b_b + t * b_l + group * b_g + n * b_n, mask=n < d_state, other=0.0)
                state = state * tl.exp(dt * a) + (dt * x.to(tl.float32))[:, None] * bt.to(tl.float32)[None, :]
            tl.store(state_ptr + seq * s_b + head * s_h + p[:, None] * s_p + n[None, :] * s_n, state, mask=mask)

    return ssd_rewind_kernel


def ssd_rewind_triton(state: torch.Tensor, initial_states: torch.Tensor, x: torch.Tensor, dt: torch.Tensor,
                      A: torch.Tensor, B: torch.Tensor, dt_bias: torch.Tensor, keep: torch.Tensor) -> None:
    """Overwrite ``state`` (b, h, p, n) fp32 with the state after the first ``keep`` positions of the chunk
    (shapes as `ssd_state_after`; ``keep`` a 0-dim int64 CUDA tensor in 1..L); leaves it as it is when
    keep == L. The CUDA twin of ``state.copy_(ssd_state_after(...))``, one kernel and no host sync."""
    import triton

    batch, length, heads, rows = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    grid = (batch, heads, triton.cdiv(rows, REWIND_ROWS))
    _rewind_kernel()[grid](
        state, initial_states, x, dt, B, A, dt_bias, keep, length, rows, d_state,
        *state.stride(), *initial_states.stride(), *x.stride(), *dt.stride(), *B.stride(),
        HEADS_PER_GROUP=heads // groups, ROWS=REWIND_ROWS, STATE=triton.next_power_of_2(d_state),
        SOFTPLUS_ABOVE=SOFTPLUS_LINEAR_ABOVE)


@functools.cache
def _chunk_scan_kernel():
    """`ssd_step` over the positions of one sequence's short chunk in one launch, recording the state after every
    position: one program per (head, block of rows) holds its ROWS x d_state slice of the state in registers and
    steps through the positions (the same arithmetic, in the same order, as mamba-ssm's selective state update),
    storing y and the state after each position, then the final state over the initial one. The steps are
    unrolled for the chunk's exact length (one compile per length), and each position's operands are loaded two
    steps ahead of its own, before the stores of the steps in between, so the loads' latency overlaps the
    recurrence instead of following each step's stores. Earlier versions: operand tiles loaded up
    front with a reduction per operand to pick each step's row (round graphs grew ~1.7 us a step on an H200),
    then each step's loads right before it, over the chunk's length rounded up to a power of two."""
    import triton
    import triton.language as tl

    @triton.jit
    def chunk_scan_kernel(state_ptr, states_ptr, xbc_ptr, dt_ptr, y_ptr, a_ptr, d_ptr, dt_bias_ptr, rows, d_state,
                          b_col, c_col, xbc_t, dt_t, y_t, st_t, HEADS_PER_GROUP: tl.constexpr, ROWS: tl.constexpr,
                          STATE: tl.constexpr, LENGTH: tl.constexpr, SOFTPLUS_ABOVE: tl.constexpr):
        head, block = tl.program_id(0), tl.program_id(1)
        p = block * ROWS + tl.arange(0, ROWS)
        n = tl.arange(0, STATE)
        p_mask, n_mask = p < rows, n < d_state
        group = head // HEADS_PER_GROUP
        a = tl.load(a_ptr + head).to(tl.float32)
        skip = tl.load(d_ptr + head).to(tl.float32)
        dt_bias = tl.load(dt_bias_ptr + head).to(tl.float32)
        pn = p[:, None] * d_state + n[None, :]  # offsets in a (rows, d_state) head of a contiguous state
        mask = p_mask[:, None] & n_mask[None, :]
        head_off = head * rows * d_state
        state = tl.load(state_ptr + head_off + pn, mask=mask, other=0.0)
        # the operands of the next step (_a) and of the one after it (_b): (x, B, C, raw dt)
        x_a, dt_a = tl.zeros([ROWS], dtype=tl.float32), tl.zeros([ROWS], dtype=tl.float32)
        b_a, c_a = tl.zeros([STATE], dtype=tl.float32), tl.zeros([STATE], dtype=tl.float32)
        x_b, dt_b, b_b, c_b = x_a, dt_a, b_a, c_a
        for i in tl.static_range(LENGTH + 2):
            if i >= 2:  # the step of position i - 2, with the operands loaded two iterations ago
                dt_i = dt_a + dt_bias
                dt_i = tl.where(dt_i <= SOFTPLUS_ABOVE, tl.log(1.0 + tl.exp(dt_i)), dt_i)
                state = state * tl.exp(a * dt_i)[:, None] + b_a[None, :] * dt_i[:, None] * x_a[:, None]
                y_i = tl.sum(state * c_a[None, :], axis=1) + x_a * skip
                tl.store(y_ptr + (i - 2) * y_t + head * rows + p, y_i.to(y_ptr.dtype.element_ty), mask=p_mask)
                tl.store(states_ptr + (i - 2) * st_t + head_off + pn, state, mask=mask)
            x_a, b_a, c_a, dt_a = x_b, b_b, c_b, dt_b
            if i < LENGTH:
                row = xbc_ptr + i * xbc_t
                x_b = tl.load(row + head * rows + p, mask=p_mask, other=0.0).to(tl.float32)  # (ROWS,)
                b_b = tl.load(row + b_col + group * d_state + n, mask=n_mask, other=0.0).to(tl.float32)  # (STATE,)
                c_b = tl.load(row + c_col + group * d_state + n, mask=n_mask, other=0.0).to(tl.float32)
                dt_b = tl.load(dt_ptr + i * dt_t + head + p * 0, mask=p_mask, other=0.0).to(tl.float32)
        tl.store(state_ptr + head_off + pn, state, mask=mask)

    return chunk_scan_kernel


# (rows of the state per program, warps) of `ssd_chunk_triton`: (4, 4) measured 4-8% faster than (16, 4) at 5-17
# positions on an H200 (bench/chunk_kernels.py).
CHUNK_SCAN_TILING = (4, 4)


def ssd_chunk_triton(state: torch.Tensor, xbc: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
                     dt_bias: torch.Tensor, ngroups: int, states: torch.Tensor,
                     tiling: tuple[int, int] | None = None) -> torch.Tensor:
    """`ssd_step` over each of a short chunk's positions (one sequence), as one Triton kernel.

    state (1, h, p, n) fp32, contiguous: the state before the chunk, left as the state after it; xbc (L, d_inner +
    2 * ngroups * n) after the conv, with contiguous rows (x, then B, then C); dt (L, h) raw, contiguous rows;
    A, D, dt_bias (h,); states (L, 1, h, p, n) fp32 contiguous, written: the state after every position (what
    `BlockState.rewind` returns to). Returns y (L, h * p) in xbc's dtype. ``tiling``: (rows, warps) per program,
    CHUNK_SCAN_TILING by default. CUDA-graph capturable."""
    import triton

    length = xbc.shape[0]
    _, heads, rows, d_state = state.shape
    assert length <= SHORT_CHUNK_MAX and state.is_contiguous() and states.is_contiguous()
    assert states.shape == (length, *state.shape) and xbc.stride(-1) == 1 and dt.stride(-1) == 1
    assert xbc.shape[1] == heads * rows + 2 * ngroups * d_state and dt.shape == (length, heads)
    y = torch.empty(length, heads * rows, device=xbc.device, dtype=xbc.dtype)
    b_col = heads * rows
    block_rows, num_warps = tiling or CHUNK_SCAN_TILING
    _chunk_scan_kernel()[(heads, triton.cdiv(rows, block_rows))](
        state, states, xbc, dt, y, A, D, dt_bias, rows, d_state, b_col, b_col + ngroups * d_state,
        xbc.stride(0), dt.stride(0), y.stride(0), states.stride(0), HEADS_PER_GROUP=heads // ngroups, ROWS=block_rows,
        STATE=triton.next_power_of_2(d_state), LENGTH=length, SOFTPLUS_ABOVE=SOFTPLUS_LINEAR_ABOVE,
        num_warps=num_warps)
    return y


# Elements per program of `rewind_select_triton`.
SELECT_BLOCK = 1024


@functools.cache
def _rewind_select_kernel():
    """`BlockState.rewind` to position ``keep`` of a chunk whose every state was recorded (`ssd_chunk_triton`),
    ``keep`` read on the device: the SSM state is a copy of the recorded state after position keep - 1, the conv
    state the window's columns keep .. keep + width. One launch for both, and for every layer at once where the
    layers' tensors lie at one stride apart (program axis 1: the layer)."""
    import triton
    import triton.language as tl

    @triton.jit
    def rewind_select_kernel(ssm_ptr, states_ptr, conv_ptr, window_ptr, keep_ptr, ssm_numel, conv_numel, st_t,
                             width, win_c, conv_c, ssm_l, st_l, conv_l, win_l, BLOCK: tl.constexpr):
        keep = tl.load(keep_ptr)
        layer = tl.program_id(1)
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ssm_mask = i < ssm_numel
        src = states_ptr + layer * st_l + (keep - 1) * st_t + i
        tl.store(ssm_ptr + layer * ssm_l + i, tl.load(src, mask=ssm_mask), mask=ssm_mask)
        conv_mask = i < conv_numel
        c, j = i // width, i % width
        src = window_ptr + layer * win_l + c * win_c + keep + j
        tl.store(conv_ptr + layer * conv_l + c * conv_c + j, tl.load(src, mask=conv_mask), mask=conv_mask)

    return rewind_select_kernel


def layer_stride(tensors: list[torch.Tensor]) -> int | None:
    """The element stride between equally shaped tensors that lie at one stride apart in one allocation (views
    of a stacked tensor, in order), else None."""
    first = tensors[0]
    if any(t.shape != first.shape or t.dtype != first.dtype or t.stride() != first.stride() for t in tensors):
        return None
    if len(tensors) == 1:
        return 0
    size = first.element_size()
    step = tensors[1].data_ptr() - first.data_ptr()
    if step <= 0 or step % size:
        return None
    if any(t.data_ptr() - first.data_ptr() != i * step for i, t in enumerate(tensors)):
        return None
    return step // size


def rewind_select_triton(ssm: list[torch.Tensor], states: list[torch.Tensor], conv: list[torch.Tensor],
                         window: list[torch.Tensor], keep: torch.Tensor) -> None:
    """Per layer i: ssm[i] (1, h, p, n) = states[i][keep - 1]; conv[i] (1, channels, width) =
    window[i][:, :, keep:keep + width]; ``keep`` a 0-dim int64 tensor on their device in 1..L. The tensors'
    rows contiguous. One launch where each list's tensors lie at one stride apart (`layer_stride`), else one per
    layer. CUDA-graph capturable."""
    import triton

    strides = [layer_stride(group) for group in (ssm, states, conv, window)]
    if len(ssm) > 1 and None in strides:
        for args in zip(ssm, states, conv, window):
            rewind_select_triton(*([t] for t in args), keep)
        return
    first_ssm, first_states, first_conv, first_window = ssm[0], states[0], conv[0], window[0]
    assert first_ssm.is_contiguous() and first_states.is_contiguous() and first_states.shape[1:] == first_ssm.shape
    assert first_conv.shape[0] == first_window.shape[0] == 1 and first_window.stride(-1) == 1
    assert first_conv.stride(-1) == 1
    numel = max(first_ssm.numel(), first_conv.numel())
    _rewind_select_kernel()[(triton.cdiv(numel, SELECT_BLOCK), len(ssm))](
        first_ssm, first_states, first_conv, first_window, keep, first_ssm.numel(), first_conv.numel(),
        first_states.stride(0), first_conv.shape[-1], first_window.stride(1), first_conv.stride(1), *strides,
        BLOCK=SELECT_BLOCK)


# (vocabulary columns per step of the online softmax, warps) of `greedy_accept_triton`.
# (2048, 8): 1.7-2.3x faster than (512, 4) at 2-17 rows on an H200 (bench/chunk_kernels.py).
ACCEPT_TILING = (2048, 8)


@functools.cache
def _greedy_accept_kernel():
    """A greedy verification round's decision in one program: per row of the chunk's logits the argmax (first
    of equal maxima, as torch.argmax) and the log-probability of it (an online log-sum-exp over the vocabulary
    in blocks), then the drafts equal to the argmax up to the first mismatch."""
    import triton
    import triton.language as tl

    @triton.jit
    def greedy_accept_kernel(logits_ptr, ids_ptr, out_ptr, keep_ptr, length, vocab, l_t, BLOCK_T: tl.constexpr,
                             BLOCK_V: tl.constexpr):
        t = tl.arange(0, BLOCK_T)
        t_mask = t < length
        best = tl.full([BLOCK_T], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_T], dtype=tl.float32)
        arg = tl.zeros([BLOCK_T], dtype=tl.int32)
        for v0 in range(0, vocab, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(logits_ptr + t[:, None] * l_t + v[None, :], mask=t_mask[:, None] & (v < vocab)[None, :],
                        other=float("-inf")).to(tl.float32)
            x = tl.where(t_mask[:, None], x, 0.0)
            block_best = tl.max(x, axis=1)
            block_arg = tl.argmax(x, axis=1).to(tl.int32) + v0
            new_best = tl.maximum(best, block_best)
            total = total * tl.exp(best - new_best) + tl.sum(tl.exp(x - new_best[:, None]), axis=1)
            arg = tl.where(block_best > best, block_arg, arg)
            best = new_best
        draft = tl.load(ids_ptr + 1 + t, mask=t < length - 1, other=-1)
        match = (arg.to(tl.int64) == draft) & (t < length - 1)
        accepted = tl.min(tl.where(match, BLOCK_T, t), axis=0)  # leading matches
        token = tl.sum(tl.where(t == accepted, arg, 0), axis=0)
        tl.store(out_ptr, accepted.to(tl.float64))
        tl.store(out_ptr + 1, token.to(tl.float64))
        tl.store(out_ptr + 2 + t, (-tl.log(total)).to(tl.float64), mask=t_mask)
        tl.store(keep_ptr, accepted.to(tl.int64) + 1)

    return greedy_accept_kernel


def use_greedy_accept(logits: torch.Tensor) -> bool:
    """Whether `greedy_accept_triton` takes a round's logits (L, V): "fused" mode, fp32 CUDA, L <= SHORT_CHUNK_MAX."""
    return (_gemv_mode == "fused" and logits.is_cuda and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.shape[0] <= SHORT_CHUNK_MAX and logits.stride(-1) == 1)


def greedy_accept_triton(logits: torch.Tensor, ids: torch.Tensor,
                         tiling: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (L, V) fp32 with contiguous rows, row i the full model's logits after ids[i]; ids (L,) int64 =
    [pending, d_1 .. d_{L-1}]. Returns (out (L + 2,) float64 = [n, next token, log-probability of each row's argmax]
    with n the drafts equal to the argmax before the first mismatch, keep (0-dim int64) = n + 1). Row i < n's
    argmax is d_{i+1} and row n's is the next token: the first n + 1 log-probabilities are those of the emitted
    tokens. ``tiling``: (BLOCK_V, warps), ACCEPT_TILING by default. One launch, CUDA-graph capturable; the twin of
    ``cloud.speculative.accept_drafts`` for greedy params."""
    import triton

    length, vocab = logits.shape
    assert length <= SHORT_CHUNK_MAX and logits.stride(-1) == 1 and ids.shape == (length,)
    out = torch.empty(length + 2, device=logits.device, dtype=torch.float64)
    keep = torch.empty((), device=logits.device, dtype=torch.int64)
    block_v, num_warps = tiling or ACCEPT_TILING
    _greedy_accept_kernel()[(1,)](logits, ids, out, keep, length, vocab, logits.stride(0),
                                  BLOCK_T=triton.next_power_of_2(length), BLOCK_V=block_v, num_warps=num_warps)
    return out, keep


def ssd_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """One recurrent step; updates state (b, h, p, n) in place.

    x: (b, h, p); dt: (b, h) raw; A, D, dt_bias: (h,); B, C: (b, g, n). Returns y (b, h, p).
    """
    if x.is_cuda:
        p, n = x.shape[-1], B.shape[-1]
        return _triton().state_update(
            state, x, dt.unsqueeze(-1).expand(-1, -1, p), A[:, None, None].expand(-1, p, n).float(),
            B, C, D[:, None].expand(-1, p), dt_bias=dt_bias[:, None].expand(-1, p), dt_softplus=True,
        )
    h = x.shape[1]
    B = B.float().repeat_interleave(h // B.shape[1], dim=1)  # (b, h, n)
    C = C.float().repeat_interleave(h // C.shape[1], dim=1)
    xf = x.float()
    dt = F.softplus(dt.float() + dt_bias.float())  # (b, h)
    decay = (dt * A.float()).exp()
    state.copy_(state * decay[..., None, None] + (dt[..., None] * xf)[..., None] * B[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", state.float(), C) + xf * D.float()[:, None]
    return y.to(x.dtype)


# ---------------------------------------------------------------- residual add + RMSNorm


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, norm: nn.RMSNorm,
                residual_in_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block's input: (norm(residual + x), residual + x); residual None = the first block.

    The residual stream is kept in fp32 when ``residual_in_fp32``. On CUDA one kernel (mamba-ssm's
    fused add + RMSNorm) replaces four (cast, add, cast, norm): a batch-1 decode step is launch-bound.
    """
    if x.is_cuda:
        return _triton().add_rmsnorm(x, norm.weight, None, residual=residual, eps=norm.eps, prenorm=True,
                                     residual_in_fp32=residual_in_fp32)
    if residual is None:
        residual = x.float() if residual_in_fp32 else x
    else:
        residual = residual + x.to(residual.dtype)
    return norm(residual.to(norm.weight.dtype)), residual


# ---------------------------------------------------------------- gated RMSNorm


def gated_rmsnorm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, ngroups: int,
                  norm_before_gate: bool) -> torch.Tensor:
    """RMSNorm over each of `ngroups` channel groups, gated by silu(z).

    y, z: (..., d); weight: (d,). Returns (..., d) in y's dtype.
    """
    group_size = y.shape[-1] // ngroups
    if y.is_cuda:
        return _triton().rmsnorm(y, weight, None, z=z, eps=eps, group_size=group_size,
                                 norm_before_gate=norm_before_gate)
    out_dtype = y.dtype
    yf, zf = y.float(), z.float()
    if not norm_before_gate:
        yf = yf * F.silu(zf)
    grouped = yf.unflatten(-1, (ngroups, group_size))
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    out = grouped.flatten(-2) * weight.float()
    if norm_before_gate:
        out = out * F.silu(zf)
    return out.to(out_dtype)
