"""Malformed and tampered checkpoints are refused with a clear error, by the library and by both servers.

tests/test_checkpoint.py covers a changed weight, a file cut to its first 1000 bytes, and a lone
pickle file; here: wrong shapes and missing tensors behind a matching fingerprint, a changed
config, a file cut at its end, a corrupt header, a pickle lying beside the safetensors file
(never unpickled), and `python -m cloud` / the router refusing such a checkpoint at start.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cloud.__main__ import main as cloud_main
from matmamba import MatMambaVision, load_model
from matmamba.pretrained import checkpoint_fingerprint

from .conftest import small_vision

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def saved(tmp_path: Path) -> Path:
    small_vision().save_pretrained(tmp_path)
    return tmp_path


def tamper(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None], *, refingerprint: bool) -> None:
    """Apply ``edit`` to the weights; with ``refingerprint`` also record their new fingerprint in config.json
    (a tamperer who rewrites both, so that only the shape and name checks are left to catch it)."""
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    if refingerprint:
        raw = json.loads((folder / CONFIG).read_text())
        raw["fingerprint"] = checkpoint_fingerprint(folder / WEIGHTS, raw)
        (folder / CONFIG).write_text(json.dumps(raw))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"head.bias": t["head.bias"][:-1].clone()}),  # 9 classes' worth for a 10-class head
     r"tensor head.bias has shape \(9,\).*config needs \(10,\)"),
    (lambda t: t.update({"extra.weight": t.pop("head.bias")}),
     r"missing \['head.bias'\], unexpected \['extra.weight'\]"),
], ids=["wrong shape", "missing and unexpected"])
def test_wrong_tensors_behind_a_matching_fingerprint_are_refused(tmp_path: Path, edit, message: str) -> None:
    folder = saved(tmp_path)
    tamper(folder, edit, refingerprint=True)
    with pytest.raises(ValueError, match=message):
        MatMambaVision.from_pretrained(folder)


def test_a_changed_config_breaks_the_fingerprint(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    raw = json.loads((folder / CONFIG).read_text())
    raw["n_classes"] = 11
    (folder / CONFIG).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="does not match the fingerprint"):
        MatMambaVision.from_pretrained(folder)


def test_cut_tail_and_corrupt_header_are_refused_even_unverified(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[:-64])  # header intact, last tensor short
    with pytest.raises(ValueError, match="does not match the fingerprint"):
        MatMambaVision.from_pretrained(folder)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        MatMambaVision.from_pretrained(folder, verify=False)
    (folder / WEIGHTS).write_bytes((2 ** 62).to_bytes(8, "little") + data[8:])  # a header length past the file
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        MatMambaVision.from_pretrained(folder, verify=False)


class _Payload:
    """Unpickling this writes a file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle ran"))


def test_a_pickle_beside_the_weights_is_never_unpickled(tmp_path: Path) -> None:
    folder = saved(tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    for name in ("pytorch_model.bin", "model.pt"):
        (folder / name).write_bytes(pickle.dumps(_Payload(marker)))
    model = load_model(folder)
    assert model.load_report.verified and not marker.exists()
    (folder / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="pickle files are never loaded"):
        load_model(folder)
    assert not marker.exists()


def test_cloud_refuses_a_tampered_checkpoint_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = saved(tmp_path)
    tamper(folder, lambda t: t["head.bias"].add_(1.0), refingerprint=False)
    with caplog.at_level(logging.ERROR, logger="cloud"):
        assert cloud_main(["--checkpoint", str(folder), "--port", "0", "--metrics-port", "-1"]) == 1
    assert "cannot serve" in caplog.text and "does not match the fingerprint" in caplog.text


@pytest.mark.slow
def test_router_refuses_a_tampered_checkpoint_at_start(ray_cluster, tmp_path: Path) -> None:
    from router.edge_pool import EdgeUnavailableError
    from router.server import RouterConfig, RouterThread

    folder = saved(tmp_path)
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight
    (folder / WEIGHTS).write_bytes(bytes(data))
    router = RouterThread(RouterConfig(checkpoint=folder, edge_level=4, cloud=(), port=0, metrics_port=None))
    with pytest.raises(EdgeUnavailableError, match="does not match the fingerprint"):
        router.start(timeout_s=120)
    router.stop()
