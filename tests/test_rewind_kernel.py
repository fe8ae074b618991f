"""The verification graph's rollback kernel (`kernels.ssd_rewind_triton`) against `kernels.ssd_state_after`,
on the CPU through Triton's interpreter (in a child pytest: see tests/conftest.py) and on the GPU."""

from __future__ import annotations

import pytest
import torch

from matmamba import kernels

from .conftest import interpreted, run_interpreted


def test_interpreted_cases() -> None:
    run_interpreted(__file__)


def _chunk(batch: int, length: int, heads: int, rows: int, groups: int, d_state: int, seed: int) -> dict:
    """A traced chunk's scan inputs as the forward pass holds them: x and B are views into one
    channel-strided (batch, length, channels) tensor, dt a view into the projection's output."""
    g = torch.Generator().manual_seed(seed)
    channels = heads * rows + 2 * groups * d_state
    xbc = torch.randn(batch, channels, length, generator=g).transpose(1, 2)  # (b, l, c), last stride = l
    x = xbc[..., :heads * rows].unflatten(-1, (heads, rows))
    B = xbc[..., heads * rows:heads * rows + groups * d_state].unflatten(-1, (groups, d_state))
    dt = torch.randn(batch, length, 3 * heads, generator=g)[..., heads:2 * heads]
    return dict(x=x, dt=dt, A=-4 * torch.rand(heads, generator=g), B=B, dt_bias=torch.randn(heads, generator=g),
                initial_states=torch.randn(batch, heads, rows, d_state, generator=g))


@interpreted
@pytest.mark.parametrize("shape", [(1, 9, 4, 16, 1, 64), (2, 6, 8, 24, 2, 48), (1, 17, 2, 40, 1, 16)])
def test_rewind_kernel_equals_the_closed_form(shape: tuple[int, ...]) -> None:
    chunk = _chunk(*shape, seed=sum(shape))
    length = shape[1]
    for keep in sorted({1, 2, length // 2, length - 1}):
        final = torch.randn_like(chunk["initial_states"])
        state = final.clone()
        kernels.ssd_rewind_triton(state, chunk["initial_states"], chunk["x"], chunk["dt"], chunk["A"], chunk["B"],
                                  chunk["dt_bias"], torch.tensor(keep))
        torch.testing.assert_close(state, kernels.ssd_state_after(keep=keep, **chunk), atol=1e-5, rtol=1e-5)
        assert not torch.equal(state, final)


@interpreted
def test_rewind_kernel_keeps_the_final_state_when_every_position_is_kept() -> None:
    chunk = _chunk(1, 5, 4, 16, 1, 32, seed=0)
    final = torch.randn_like(chunk["initial_states"])
    state = final.clone()
    kernels.ssd_rewind_triton(state, chunk["initial_states"], chunk["x"], chunk["dt"], chunk["A"], chunk["B"],
                              chunk["dt_bias"], torch.tensor(5))
    assert torch.equal(state, final)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 9, 4, 16, 1, 64), (2, 17, 32, 64, 1, 128)])
def test_cuda_rewind_kernel_equals_the_closed_form(shape: tuple[int, ...]) -> None:
    chunk = {k: v.cuda() for k, v in _chunk(*shape, seed=1).items()}
    length = shape[1]
    for keep in (1, length // 2, length - 1, length):
        final = torch.randn_like(chunk["initial_states"])
        state = final.clone()
        kernels.ssd_rewind_triton(state, chunk["initial_states"], chunk["x"], chunk["dt"], chunk["A"], chunk["B"],
                                  chunk["dt_bias"], torch.tensor(keep, device="cuda"))
        expected = final if keep == length else kernels.ssd_state_after(keep=keep, **chunk)
        torch.testing.assert_close(state, expected, atol=1e-4, rtol=1e-4)
