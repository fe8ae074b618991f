"""MatMamba-LM and MatMamba-Vision: nesting, Mix'n'Match, decoding, generation, counts."""

from __future__ import annotations

import pytest
import torch

from matmamba import MatMamba2Config, MatMambaLMConfig, MatMambaVisionConfig, count_flops, count_params

from .conftest import small_lm, small_vision

LEVELS = (1, 2, 4, 8)


@pytest.mark.parametrize("level", LEVELS)
def test_lm_decoding_equals_forward(level: int) -> None:
    model = small_lm()
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        full = model(ids, mrl_level=level)
        cache = model.allocate_cache(2, level)
        logits = [model(ids[:, :5], cache=cache)]
        logits += [model.step(ids[:, t], cache)[:, None] for t in range(5, 24)]
    assert (torch.cat(logits, dim=1) - full).abs().max().item() <= 1e-4


def test_lm_mixnmatch_decoding_equals_forward() -> None:
    model = small_lm(n_layer=3)
    spec = [64, 16, 40]
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        full = model(ids, widths=spec)
        cache = model.allocate_cache(1, widths=spec)
        logits = [model(ids[:, :1], cache=cache)] + [model.step(ids[:, t], cache)[:, None] for t in range(1, 12)]
    assert (torch.cat(logits, dim=1) - full).abs().max().item() <= 1e-4


def test_lm_mixnmatch_spec_equals_uniform_level_and_block_attributes() -> None:
    model = small_lm()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids, widths=[32, 32]), model(ids, mrl_level=2))
        assert torch.equal(model(ids, widths="32,32"), model(ids, mrl_level=2))
        for layer in model.backbone.layers:
            layer.mixer.mixnmatch, layer.mixer.mixnmatch_dims = True, 16
        assert torch.equal(model(ids), model(ids, mrl_level=4))


@pytest.mark.parametrize("spec, match", [([64], "one width per layer"), ([64, 10], "layer 1"),
                                         ("a,b", "comma-separated")])
def test_bad_mixnmatch_spec(spec, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        small_lm()(torch.zeros(1, 3, dtype=torch.long), widths=spec)


def test_lm_rejects_out_of_range_tokens() -> None:
    with pytest.raises(ValueError, match="token ids must be in 0..96"):
        small_lm()(torch.tensor([[5, 97]]))


def test_generate_greedy_matches_argmax_of_forward() -> None:
    model = small_lm()
    prompt = torch.randint(0, 97, (2, 6))
    out = model.generate(prompt, 8, mrl_level=2, temperature=0)
    assert out.shape == (2, 14) and torch.equal(out[:, :6], prompt)
    with torch.no_grad():
        for t in range(6, 14):
            assert torch.equal(model(out[:, :t], mrl_level=2)[:, -1].argmax(-1), out[:, t])


def test_generate_sampling_is_seeded_and_respects_top_k() -> None:
    model = small_lm()
    prompt = torch.randint(0, 97, (1, 4))

    def run(seed: int) -> torch.Tensor:
        return model.generate(prompt, 10, top_k=3, top_p=0.9, temperature=0.8,
                              generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    with torch.no_grad():
        out = run(2)
        for t in range(4, 14):
            top3 = model(out[:, :t])[:, -1].topk(3).indices
            assert out[0, t] in top3[0]


def test_generate_stops_at_eos() -> None:
    model = small_lm()
    prompt = torch.randint(0, 97, (1, 4))
    first = model.generate(prompt, 1, temperature=0)[0, -1].item()
    assert model.generate(prompt, 10, temperature=0, eos_id=first).shape == (1, 5)


@pytest.mark.parametrize("level", LEVELS)
def test_vision_any_divisible_size(level: int) -> None:
    model = small_vision()
    with torch.no_grad():
        assert model(torch.randn(3, 1, 28, 28), mrl_level=level).shape == (3, 10)
        assert model(torch.randn(2, 1, 16, 36), mrl_level=level).shape == (2, 10)


def test_vision_rejects_bad_images() -> None:
    model = small_vision()
    with pytest.raises(ValueError, match="multiples of patch_size 4"):
        model(torch.randn(1, 1, 30, 28))
    with pytest.raises(ValueError, match="expected images"):
        model(torch.randn(1, 3, 28, 28))


def test_param_and_flop_counts_match_the_modules() -> None:
    model = small_lm(n_layer=3)
    assert count_params(model.config, [64] * 3) == sum(p.numel() for p in model.parameters())
    counts = [count_params(model.config, [w] * 3) for w in (8, 16, 32, 64)]
    assert counts == sorted(counts) and len(set(counts)) == 4
    flops = [count_flops(model.config, [w] * 3, tokens=10) for w in (8, 16, 32, 64)]
    assert flops == sorted(flops)
    vision = small_vision()
    assert count_params(vision.config, [64, 64]) == sum(p.numel() for p in vision.parameters())


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=64, headdim=7), "headdim"),
    (dict(d_model=64, headdim=8, levels=(1, 3)), "mrl_level 3"),
    (dict(d_model=64, headdim=8, levels=(2, 4)), "must include 1"),
    (dict(d_model=0), "positive"),
])
def test_bad_block_configs(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MatMamba2Config(**kwargs)


def test_bad_model_configs() -> None:
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        MatMambaVisionConfig(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="n_layer"):
        MatMambaLMConfig(n_layer=0)


def test_default_headdim_follows_original_code() -> None:
    assert MatMamba2Config(d_model=768).headdim == 24
