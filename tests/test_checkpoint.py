"""Checkpoints: bit-exact round trip, fingerprints, partial loading, the original key layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from matmamba import MatMambaLM, MatMambaVision, load_model

from .conftest import small_lm, small_vision


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    model = small_lm()
    fingerprint = model.save_pretrained(tmp_path)
    loaded = MatMambaLM.from_pretrained(tmp_path)
    assert loaded.fingerprint == fingerprint and len(fingerprint) == 64
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight
    assert loaded.load_report.verified


def test_fingerprint_changes_with_one_weight(tmp_path: Path) -> None:
    model = small_lm()
    first = model.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        model.backbone.layers[1].mixer.D[0] += 1e-3
    assert model.save_pretrained(tmp_path / "b") != first


def test_changed_bytes_are_refused(tmp_path: Path) -> None:
    small_vision().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    tensors["head.bias"][0] += 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not match the fingerprint"):
        MatMambaVision.from_pretrained(tmp_path)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    small_vision().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="safetensors|fingerprint"):
        MatMambaVision.from_pretrained(tmp_path, verify=False)


def test_pickle_is_never_loaded(tmp_path: Path) -> None:
    small_lm().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle files are never loaded"):
        MatMambaLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("level", [2, 4, 8])
def test_partial_load_reads_less_and_matches_full_model(tmp_path: Path, level: int) -> None:
    model = small_lm(n_layer=3)
    model.save_pretrained(tmp_path)
    narrow = MatMambaLM.from_pretrained(tmp_path, mrl_level=level)
    full_bytes = MatMambaLM.from_pretrained(tmp_path).load_report.bytes_read
    assert narrow.load_report.bytes_read < full_bytes
    assert sum(p.numel() * p.element_size() for p in narrow.parameters()) == narrow.load_report.bytes_read
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert torch.equal(narrow(ids, mrl_level=level), model(ids, mrl_level=level))
        assert torch.equal(narrow(ids, widths=[narrow.config.d_model // level // 2] * 3),
                           model(ids, widths=[model.config.d_model // level // 2] * 3))
    with pytest.raises(ValueError, match="exceeds"):
        narrow(ids, mrl_level=1)


def test_partial_model_cannot_be_saved_as_full(tmp_path: Path) -> None:
    small_lm().save_pretrained(tmp_path / "full")
    narrow = MatMambaLM.from_pretrained(tmp_path / "full", mrl_level=4)
    with pytest.raises(ValueError, match="partially loaded"):
        narrow.save_pretrained(tmp_path / "narrow")


def test_load_model_picks_the_kind(tmp_path: Path) -> None:
    small_vision().save_pretrained(tmp_path / "v")
    small_lm().save_pretrained(tmp_path / "l")
    assert isinstance(load_model(tmp_path / "v"), MatMambaVision)
    assert isinstance(load_model(tmp_path / "l"), MatMambaLM)
    with pytest.raises(ValueError, match="not matmamba-lm"):
        MatMambaLM.from_pretrained(tmp_path / "v")


def test_original_matmamba_layout_loads(tmp_path: Path) -> None:
    """A mamba-ssm MambaLMHeadModel-style checkpoint: MambaConfig json, untied lm_head key present."""
    torch.manual_seed(3)
    d_model, n_layer, vocab = 64, 2, 50
    d_inner, d_state, nheads = 128, 16, 128 // (64 // 32)
    tensors = {"backbone.embedding.weight": torch.randn(56, d_model), "backbone.norm_f.weight": torch.rand(d_model)}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        tensors |= {
            p + "norm.weight": torch.rand(d_model),
            p + "mixer.in_proj.weight": torch.randn(2 * d_inner + 2 * d_state + nheads, d_model) * 0.1,
            p + "mixer.conv1d.weight": torch.randn(d_inner + 2 * d_state, 1, 4) * 0.3,
            p + "mixer.conv1d.bias": torch.randn(d_inner + 2 * d_state) * 0.1,
            p + "mixer.dt_bias": torch.randn(nheads) * 0.1 - 3,
            p + "mixer.A_log": torch.rand(nheads),
            p + "mixer.D": torch.ones(nheads),
            p + "mixer.norm.weight": torch.ones(d_inner),
            p + "mixer.out_proj.weight": torch.randn(d_model, d_inner) * 0.1,
        }
    tensors["lm_head.weight"] = tensors["backbone.embedding.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": d_model, "d_intermediate": 0, "n_layer": n_layer, "vocab_size": vocab,
        "ssm_cfg": {"layer": "Mamba2", "d_state": d_state}, "rms_norm": True, "residual_in_fp32": True,
        "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True,
    }))
    model = load_model(tmp_path)
    assert model.config.block.headdim == d_model // 32
    assert torch.equal(model.backbone.layers[1].mixer.in_proj.weight,
                       tensors["backbone.layers.1.mixer.in_proj.weight"])
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]]), mrl_level=8).shape == (1, 3, vocab)


def test_tokenizer_travels_with_lm_checkpoint(tmp_path: Path) -> None:
    from matmamba.data.tokenizer import ByteTokenizer

    small_lm(vocab_size=257).save_pretrained(tmp_path, tokenizer=ByteTokenizer())
    loaded = MatMambaLM.from_pretrained(tmp_path)
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("héllo")) == "héllo"


def test_missing_checkpoint_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    tmp_path.joinpath("x").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_model(tmp_path / "x")
