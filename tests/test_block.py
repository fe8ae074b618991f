"""The nested block against mamba-ssm's reference functions, at every level, forward and decode."""

from __future__ import annotations

import pytest
import torch

from matmamba import MatMamba2
from matmamba.kernels import import_mamba_ssm, ssd_chunked_torch

from .conftest import small_block_config
from .reference import reference_forward

TOL = 1e-4
LEVELS = (1, 2, 4, 8)


def make_block(seed: int = 0, **overrides) -> MatMamba2:
    torch.manual_seed(seed)
    block = MatMamba2(config=small_block_config(**overrides))
    with torch.no_grad():  # non-trivial values everywhere the nesting could mix channels up
        block.conv1d.bias.normal_(std=0.1)
        block.D.normal_()
        block.norm.weight.normal_(1.0, 0.2)
    return block.eval()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("length", [16, 37])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_block_matches_mamba_ssm_reference(level: int, length: int, ngroups: int) -> None:
    block = make_block(ngroups=ngroups)
    u = torch.randn(2, length, block.d_model)
    with torch.no_grad():
        ours = block(u, mrl_level=level)
        ref = reference_forward(block, u, block.d_model // level)
    assert (ours - ref).abs().max().item() <= TOL


def test_nested_level_is_a_smaller_mamba2() -> None:
    """Level k of a block equals a separate full-width block holding just the sliced weights."""
    block = make_block()
    narrow = MatMamba2(config=block.config, max_width=16)
    narrow.load_state_dict({k: v for k, v in _sliced_state(block, 16).items()})
    u = torch.randn(1, 20, block.d_model)
    with torch.no_grad():
        assert torch.allclose(block(u, mrl_level=4), narrow(u, width=16), atol=1e-6)


def _sliced_state(block: MatMamba2, width: int) -> dict[str, torch.Tensor]:
    from .reference import reference_weights

    w = reference_weights(block, width)
    return {
        "in_proj.weight": w["in_proj"], "conv1d.weight": w["conv_w"][:, None], "conv1d.bias": w["conv_b"],
        "dt_bias": w["dt_bias"], "A_log": block.A_log[: w["D"].numel()], "D": w["D"],
        "norm.weight": w["norm"], "out_proj.weight": w["out_proj"],
    }


@pytest.mark.parametrize("level", LEVELS)
def test_decode_steps_equal_parallel_forward(level: int) -> None:
    block = make_block()
    u = torch.randn(3, 21, block.d_model)
    with torch.no_grad():
        full = block(u, mrl_level=level)
        width = block.resolve_width(level)
        state = block.allocate_state(3, width)
        prefix = block(u[:, :6], width=width, state=state)
        steps = [block.step(u[:, t], state) for t in range(6, 21)]
    decoded = torch.cat([prefix, torch.stack(steps, dim=1)], dim=1)
    assert (decoded - full).abs().max().item() <= TOL


def test_chunked_ssd_matches_ssd_minimal() -> None:
    minimal = import_mamba_ssm("modules.ssd_minimal").ssd_minimal_discrete
    torch.manual_seed(1)
    b, length, h, p, n = 2, 64, 4, 8, 16
    x, B, C = torch.randn(b, length, h, p), torch.randn(b, length, h, n), torch.randn(b, length, h, n)
    dt = torch.rand(b, length, h) * 0.2
    A = -torch.rand(h) * 4
    init = torch.randn(b, h, p, n)
    ours, final = ssd_chunked_torch(x, dt, A, B, C, chunk_size=16, initial_states=init)
    ref, ref_final = minimal(x * dt[..., None], A * dt, B, C, block_len=16, initial_states=init[:, None])
    assert (ours - ref).abs().max().item() <= TOL
    assert (final - ref_final).abs().max().item() <= TOL


def test_mixnmatch_attributes_from_original_code() -> None:
    block = make_block()
    u = torch.randn(1, 8, block.d_model)
    with torch.no_grad():
        expected = block(u, width=16)
        block.mixnmatch, block.mixnmatch_dims = True, 16
        assert torch.equal(block(u), expected)
        block.mixnmatch, block.mixnmatch_dims = False, block.d_model
        assert torch.equal(block(u), block(u, mrl_level=1))


def test_inference_slices_are_cached_and_refreshed_on_weight_change() -> None:
    block = make_block()
    with torch.no_grad():
        first = block.slices(16)
        assert block.slices(16) is first
        block.in_proj.weight.add_(1.0)
        second = block.slices(16)
    assert second is not first
    assert torch.equal(second.in_proj_w[:32], block.in_proj.weight[:32])


def test_gradients_reach_only_used_channels() -> None:
    block = make_block()
    block.train()
    block(torch.randn(2, 10, block.d_model), mrl_level=4).sum().backward()
    grad = block.in_proj.weight.grad
    di = block.config.expand * 16
    assert grad[:di].abs().sum() > 0
    assert grad[di:block.config.d_inner].abs().sum() == 0  # z channels beyond the width are unused


@pytest.mark.parametrize("bad", [dict(mrl_level=3), dict(mrl_level=0), dict(width=10), dict(width=128)])
def test_bad_width_says_what_is_valid(bad: dict) -> None:
    block = make_block()
    with pytest.raises(ValueError, match=r"mrl_level|width"):
        block(torch.randn(1, 4, block.d_model), **bad)


def test_wrong_input_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected input"):
        make_block()(torch.randn(1, 4, 63))
