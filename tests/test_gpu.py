"""GPU: the Triton path equals the CPU path (forward and backward), and decoding equals forward.

Run on the device with `pytest -m gpu`.
"""

from __future__ import annotations

import copy

import pytest
import torch

from .conftest import small_lm
from .test_block import make_block

pytestmark = pytest.mark.gpu

LEVELS = (1, 2, 4, 8)
# Relative error allowed per dtype: fp32 differs only by summation order; bf16 carries
# 8 mantissa bits, so a few units of its epsilon (2**-8) after a dozen fused ops.
REL_TOL = {torch.float32: 2e-3, torch.bfloat16: 5e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("level", LEVELS)
def test_triton_forward_backward_equal_cpu(level: int, dtype: torch.dtype) -> None:
    cpu = make_block(d_model=256, d_state=64, headdim=16, chunk_size=64).train()
    gpu = copy.deepcopy(cpu).cuda().to(dtype)
    u = torch.randn(4, 200, 256)
    u_cpu, u_gpu = u.clone().requires_grad_(), u.cuda().to(dtype).requires_grad_()
    y_cpu = cpu(u_cpu.to(torch.float32), mrl_level=level)
    y_gpu = gpu(u_gpu, mrl_level=level)
    assert rel_err(y_gpu.cpu(), y_cpu) < REL_TOL[dtype]
    grad = torch.randn_like(y_cpu)
    y_cpu.backward(grad)
    y_gpu.backward(grad.cuda().to(dtype))
    assert rel_err(u_gpu.grad.cpu(), u_cpu.grad) < REL_TOL[dtype]
    for (name, p_cpu), (_, p_gpu) in zip(cpu.named_parameters(), gpu.named_parameters()):
        if p_cpu.grad is not None and p_cpu.grad.abs().sum() > 0:
            assert rel_err(p_gpu.grad.cpu(), p_cpu.grad) < REL_TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("level", LEVELS)
def test_gpu_decoding_equals_forward(level: int, dtype: torch.dtype) -> None:
    model = small_lm(n_layer=2, d_model=128, headdim=8, d_state=32).cuda().to(dtype)
    ids = torch.randint(0, 97, (3, 40), device="cuda")
    with torch.no_grad():
        full = model(ids, mrl_level=level)
        cache = model.allocate_cache(3, level)
        logits = [model(ids[:, :9], cache=cache)]
        logits += [model.step(ids[:, t], cache)[:, None] for t in range(9, 40)]
    assert rel_err(torch.cat(logits, dim=1), full) < REL_TOL[dtype]


def test_gpu_generation_matches_cpu_greedy() -> None:
    model = small_lm(n_layer=2)
    prompt = torch.randint(0, 97, (2, 5))
    cpu_out = model.generate(prompt, 12, temperature=0, mrl_level=2)
    gpu_out = model.cuda().generate(prompt.cuda(), 12, temperature=0, mrl_level=2)
    assert torch.equal(gpu_out.cpu(), cpu_out)
