"""The decode-step GEMVs (`kernels.gemv_triton`, and with the norms inside, `add_rmsnorm_gemv_triton`, also with
the conv step, and `gated_gemv_triton`) against their PyTorch twins under Triton's CPU interpreter (in a child
pytest: see tests/conftest.py), and the dispatch rule that decides where they run.
"""

from __future__ import annotations

import pytest
import torch

from matmamba import kernels

from .conftest import interpreted, run_interpreted, small_lm


def test_interpreted_cases() -> None:
    run_interpreted(__file__)


@interpreted
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", [(1, 64), (37, 100), (300, 257), (129, 768)])
@pytest.mark.parametrize("bias", [True, False])
def test_gemv_triton_equals_torch(n: int, k: int, batch: int, dtype: torch.dtype, tol: float,
                                  bias: bool) -> None:
    torch.manual_seed(n + k + batch)
    x = torch.randn(batch, k).to(dtype)
    weight = torch.randn(n, k).to(dtype) / k**0.5
    b = torch.randn(n).to(dtype) if bias else None
    out = kernels.gemv_triton(x, weight, b)
    assert out.shape == (batch, n) and out.dtype == dtype
    torch.testing.assert_close(out.float(), kernels.gemv_torch(x, weight, b).float(), atol=tol, rtol=tol)


@interpreted
@pytest.mark.parametrize("block_n,block_k", [(1, 64), (8, 128), (16, 512)])
def test_gemv_triton_any_tiling_on_strided_operands(block_n: int, block_k: int) -> None:
    """A column slice of the weight (out_proj at a nested width) and a strided input row, under other tilings."""
    torch.manual_seed(0)
    full = torch.randn(50, 300)
    weight = full[:, :200]  # rows of stride 300
    x = torch.randn(3, 250)[:, 20:220]
    out = kernels.gemv_triton(x, weight, None, block_n=block_n, block_k=block_k)
    torch.testing.assert_close(out, kernels.gemv_torch(x, weight, None), atol=1e-5, rtol=1e-5)


@interpreted
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n,k", [(37, 100), (256, 512), (64, 2560)])
@pytest.mark.parametrize("bias", [True, False])
def test_gated_gemv_triton_equals_norm_then_gemv(n: int, k: int, batch: int, dtype: torch.dtype,
                                                 tol: float, bias: bool) -> None:
    """The fused gated RMSNorm + out_proj against the gated norm followed by the GEMV; z a strided column slice
    of the projection's output, as in a decode step; K = 2560 walks K in several steps."""
    torch.manual_seed(n + k + batch)
    y = torch.randn(batch, k).to(dtype)
    z = torch.randn(batch, 2 * k + 8)[:, 3:3 + k].to(dtype)
    norm_weight = (1 + 0.1 * torch.randn(k)).to(dtype)
    weight = (torch.randn(n, k) / k**0.5).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    out = kernels.gated_gemv_triton(y, z, norm_weight, 1e-5, weight, b)
    assert out.shape == (batch, n) and out.dtype == dtype
    expected = kernels.gated_gemv_torch(y, z, norm_weight, 1e-5, weight, b)
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)
    ungated = kernels.gemv_torch(kernels.gated_rmsnorm(y, torch.zeros_like(y), norm_weight, 1e-5, 1, False), weight, b)
    assert not torch.allclose(out.float(), ungated.float(), atol=tol, rtol=tol)  # the gate is applied


@interpreted
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n,k", [(37, 100), (300, 2560)])
@pytest.mark.parametrize("first,residual_in_fp32", [(True, True), (False, True), (False, False)])
def test_add_rmsnorm_gemv_triton_equals_add_norm_then_gemv(n: int, k: int, batch: int,
                                                           dtype: torch.dtype, tol: float, first: bool,
                                                           residual_in_fp32: bool) -> None:
    """The fused residual add + RMSNorm + in_proj against its twin: the projection and the new residual stream,
    for the first layer (no residual yet) and later ones; K = 2560 walks K in several steps."""
    torch.manual_seed(n + k + batch)
    x = torch.randn(batch, k).to(dtype)
    residual = None if first else torch.randn(batch, k).to(torch.float32 if residual_in_fp32 else dtype)
    norm_weight = (1 + 0.1 * torch.randn(k)).to(dtype)
    weight = (torch.randn(n, k) / k**0.5).to(dtype)
    out, res = kernels.add_rmsnorm_gemv_triton(x, residual, norm_weight, 1e-5, residual_in_fp32, weight, None)
    ref_out, ref_res = kernels.add_rmsnorm_gemv_torch(x, residual, norm_weight, 1e-5, residual_in_fp32, weight, None)
    assert out.dtype == dtype and res.dtype == (torch.float32 if residual_in_fp32 else dtype)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(res, ref_res, atol=tol, rtol=tol)
    if not first:  # the residual is added before the norm
        alone, _ = kernels.add_rmsnorm_gemv_torch(x, None, norm_weight, 1e-5, residual_in_fp32, weight, None)
        assert not torch.allclose(out.float(), alone.float(), atol=tol, rtol=tol)


@interpreted
@pytest.mark.parametrize("dtype,state_dtype,tol", [(torch.float32, torch.float32, 1e-5),
                                                   (torch.bfloat16, torch.float32, 2e-2),
                                                   (torch.bfloat16, torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("first_row,channels,bias", [(8, 21, True), (0, 64, False)])
def test_add_rmsnorm_gemv_triton_runs_the_conv_step_on_its_rows(first_row: int, channels: int, bias: bool,
                                                                 batch: int, dtype: torch.dtype,
                                                                 state_dtype: torch.dtype, tol: float) -> None:
    """in_proj with the conv step in its epilogue (`kernels.ConvStep`) against its twin: the projection (rows
    outside the conv as projected, the conv's rows after conv + SiLU), the shifted state, the residual; the
    conv's rows start mid-tile (8, 21 channels) or at row 0, in a 4-row tiling."""
    torch.manual_seed(first_row + channels + batch)
    n, k, width = first_row + channels + 7, 96, 4
    x, residual = torch.randn(batch, k).to(dtype), torch.randn(batch, k)
    norm_weight = (1 + 0.1 * torch.randn(k)).to(dtype)
    weight = (torch.randn(n, k) / k**0.5).to(dtype)
    conv_weight = torch.randn(channels, width).to(dtype)
    conv_bias = torch.randn(channels).to(dtype) if bias else None
    state = torch.randn(batch, channels, width).to(state_dtype)
    ref_state = state.clone()
    out, res = kernels.add_rmsnorm_gemv_triton(x, residual, norm_weight, 1e-5, True, weight, None,
                                               kernels.ConvStep(state, conv_weight, conv_bias, first_row))
    ref_out, ref_res = kernels.add_rmsnorm_gemv_torch(x, residual, norm_weight, 1e-5, True, weight, None,
                                                      kernels.ConvStep(ref_state, conv_weight, conv_bias, first_row))
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(state.float(), ref_state.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(res, ref_res, atol=tol, rtol=tol)
    plain, _ = kernels.add_rmsnorm_gemv_torch(x, residual, norm_weight, 1e-5, True, weight, None)
    rows = slice(first_row, first_row + channels)
    assert not torch.allclose(out[:, rows].float(), plain[:, rows].float(), atol=tol, rtol=tol)  # the conv ran
    torch.testing.assert_close(state[:, :, -1].float(), plain[:, rows].to(state_dtype).float(), atol=tol, rtol=tol)


@interpreted
@pytest.mark.parametrize("level", [1, 4])
@torch.inference_mode()
def test_fused_decode_step_equals_the_unfused_step(monkeypatch: pytest.MonkeyPatch, level: int) -> None:
    """decode_gemv("fused") through a model's steps (the residual stream carried across layers, the first layer
    without one), on CPU tensors: the Triton GEMV's gate is opened for them, so both modes run interpreted kernels
    and differ only in the two fusions."""
    monkeypatch.setattr(kernels, "use_triton_gemv", lambda x, weight: x.dim() == 2 and x.shape[0] <= 8)
    model = small_lm(seed=3, n_layer=3, d_model=64, headdim=8, d_state=16)
    tokens = torch.tensor([[5, 17], [3, 3], [40, 1]])
    logits = {}
    for mode in ("unfused", "fused"):
        cache = model.allocate_cache(2, level)
        with kernels.decode_gemv(mode):
            logits[mode] = torch.stack([model.step(t, cache) for t in tokens])
    torch.testing.assert_close(logits["fused"], logits["unfused"], atol=1e-4, rtol=1e-4)


@interpreted
@pytest.mark.parametrize("tiling", [kernels.GemvTiling(1, 4, 64), kernels.GemvTiling(2, 2, 32),
                                    kernels.GemvTiling(16, 16, 32, 4, "ieee"),
                                    kernels.GemvTiling(16, 16, 16, 4, "tf32x3")])
def test_normed_gemv_tilings_agree(tiling: kernels.GemvTiling) -> None:
    """Both normed GEMVs over 5 rows under a given tiling equal them under the default: rows spread over programs
    (BLOCK_B < rows), and tl.dot at fp32 and 3xTF32 precision."""
    torch.manual_seed(5)
    y, z, x, residual = (torch.randn(5, 64) for _ in range(4))
    norm_weight, weight = 1 + 0.1 * torch.randn(64), torch.randn(48, 64) / 8
    torch.testing.assert_close(kernels.gated_gemv_triton(y, z, norm_weight, 1e-5, weight, None, tiling),
                               kernels.gated_gemv_triton(y, z, norm_weight, 1e-5, weight, None), atol=1e-5, rtol=1e-5)
    got = kernels.add_rmsnorm_gemv_triton(x, residual, norm_weight, 1e-5, True, weight, None, tiling=tiling)
    expected = kernels.add_rmsnorm_gemv_triton(x, residual, norm_weight, 1e-5, True, weight, None)
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_normed_gemv_tiling_shortens_the_k_step_under_a_chunks_conv() -> None:
    """The default tiling: `gemv_config`'s, except that a chunk's conv over 8+ positions takes a quarter of the
    products per program (CONV_CHUNK_TILE_ELEMS); a chunk's conv refuses rows spread over programs."""
    assert kernels.normed_gemv_tiling(9, 256) == kernels.GemvTiling(*kernels.gemv_config(9, 256))
    tiling = kernels.normed_gemv_tiling(9, 256, conv_chunk=True)
    assert tiling.block_b * tiling.block_n * tiling.block_k == kernels.CONV_CHUNK_TILE_ELEMS
    assert kernels.normed_gemv_tiling(3, 256, conv_chunk=True) == kernels.normed_gemv_tiling(3, 256)
    conv = kernels.ConvChunk(torch.zeros(1, 8, 4), torch.zeros(8, 4), None, 0, torch.zeros(1, 8, 9))
    with pytest.raises(AssertionError, match="all of its positions"):
        kernels.add_rmsnorm_gemv_triton(torch.zeros(5, 16), None, torch.ones(16), 1e-5, True, torch.zeros(24, 16), None,
                                        conv, kernels.GemvTiling(1, 4, 16))


def test_gemv_config_covers_k_in_few_steps_and_bounds_the_tile() -> None:
    assert kernels.gemv_config(1, 768) == (1, kernels.GEMV_BLOCK_N, 1024)  # one step, tail masked
    assert kernels.gemv_config(1, 4096) == (1, kernels.GEMV_BLOCK_N, 2048)  # 2048 divides K
    assert kernels.gemv_config(1, 2560) == (1, kernels.GEMV_BLOCK_N, 1024)  # no half-empty 2048 step
    for batch in (1, 3, 8):
        for k in (192, 768, 2048, 2560, 5120):
            block_b, block_n, block_k = kernels.gemv_config(batch, k)
            assert block_b >= batch and block_b * block_n * block_k <= kernels.GEMV_TILE_ELEMS


def test_decode_linear_uses_torch_on_cpu() -> None:
    x, weight = torch.randn(1, 32), torch.randn(16, 32)
    assert not kernels.use_triton_gemv(x, weight)
    with kernels.decode_gemv("triton"):
        assert not kernels.use_triton_gemv(x, weight)  # CPU tensors: the interpreter is for tests only
        torch.testing.assert_close(kernels.decode_linear(x, weight, None), torch.nn.functional.linear(x, weight, None))
    with kernels.decode_gemv("fused"):  # the fused norm is a CUDA path too
        assert not kernels.use_gated_gemv(x, x, weight, 1, False)
        assert not kernels.use_add_rmsnorm_gemv(x, None, weight)
    with pytest.raises(ValueError, match="decode_gemv mode"):
        with kernels.decode_gemv("fast"):
            pass
