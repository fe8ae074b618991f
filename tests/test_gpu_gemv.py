"""GPU: the decode-step Triton GEMV against cuBLAS, inside a model's step and under CUDA-graph decoding.

Run on the device with `pytest -m gpu tests/test_gpu_gemv.py`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from matmamba import kernels
from matmamba.cuda_graphs import DecodeGraphs

from .conftest import small_lm

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
# (N, K) of in_proj and out_proj at the decode benchmark's shapes (d768 / d2048, levels 1 and 8)
SHAPES = [(643, 768), (768, 192), (3352, 768), (1288, 2048), (2048, 512), (8512, 2048), (2048, 4096)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemv_triton_equals_cublas(n: int, k: int, batch: int, dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(n + k)
    x = torch.randn(batch, k, device=CUDA).to(dtype)
    weight = (torch.randn(n, k, device=CUDA) / k**0.5).to(dtype)
    bias = torch.randn(n, device=CUDA).to(dtype)
    out = kernels.gemv_triton(x, weight, bias)
    torch.testing.assert_close(out.float(), F.linear(x, weight, bias).float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("mode,reference", [("triton", "cublas"), ("fused", "unfused")])  # fused: norms, conv inside
@pytest.mark.parametrize("level", [1, 8])
@torch.inference_mode()
def test_step_with_triton_gemv_equals_cublas_step(level: int, mode: str, reference: str) -> None:
    model = small_lm(n_layer=3, d_model=128, headdim=8, d_state=32).to(CUDA, torch.bfloat16)
    token = torch.tensor([5, 17], device=CUDA)
    logits = {}
    for m in (reference, mode):
        cache = model.allocate_cache(2, level)
        with kernels.decode_gemv(m):
            logits[m] = torch.stack([model.step(token, cache) for _ in range(4)]).float()
    torch.testing.assert_close(logits[mode], logits[reference], atol=5e-2, rtol=5e-2)


def test_decode_linear_picks_triton_below_the_row_limit() -> None:
    x = torch.randn(1, 2048, device=CUDA, dtype=torch.bfloat16)
    narrow = torch.randn(1288, 2048, device=CUDA, dtype=torch.bfloat16)
    wide = torch.randn(8512, 2048, device=CUDA, dtype=torch.bfloat16)
    assert kernels.use_triton_gemv(x, narrow)
    assert not kernels.use_triton_gemv(x, wide)
    assert not kernels.use_triton_gemv(torch.randn(32, 2048, device=CUDA, dtype=torch.bfloat16), narrow)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert not kernels.use_triton_gemv(x, narrow)
    with kernels.decode_gemv("fused"):
        z = torch.randn(1, 2048, device=CUDA, dtype=torch.bfloat16)
        assert kernels.use_gated_gemv(x, z, narrow, 1, False) and not kernels.use_gated_gemv(x, z, narrow, 2, False)
        assert kernels.use_add_rmsnorm_gemv(x, None, narrow) and kernels.use_add_rmsnorm_gemv(x, x.float(), narrow)
        assert not kernels.use_add_rmsnorm_gemv(x, None, wide)


@pytest.mark.parametrize("mode", ["triton", "fused"])
@pytest.mark.parametrize("level", [1, 8])
def test_graph_greedy_with_triton_gemv_equals_cublas_eager(level: int, mode: str) -> None:
    """fp32 (no bf16 rounding to break a near tie): the captured Triton-GEMV step gives cuBLAS's greedy tokens."""
    model = small_lm(n_layer=3, d_model=128, headdim=8, d_state=32).to(CUDA)
    prompt = torch.randint(0, 97, (1, 7), device=CUDA)
    with kernels.decode_gemv("cublas"):
        eager = model.generate(prompt, 40, mrl_level=level, temperature=0)
    with kernels.decode_gemv(mode):
        graphs = DecodeGraphs(model)
        assert torch.equal(graphs.generate(prompt, 40, mrl_level=level, temperature=0), eager)

