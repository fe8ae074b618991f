"""Checkpoints: `config.json` + `model.safetensors` (+ tokenizer files), a sha256 fingerprint,
and partial loading that reads only the tensor slices a nested width needs.

Only safetensors weights are ever read: a pickle file can run code when loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig, config_from_dict
from .nesting import nested_ranges, take

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
# Block parameter keys look like "backbone.layers.3.mixer.in_proj.weight".
MIXER_KEY = re.compile(r"^backbone\.layers\.\d+\.mixer\.(.+)$")
HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class LoadReport:
    """What `from_pretrained` did."""

    path: str
    width: int  # widest width the loaded model can run
    bytes_read: int  # tensor bytes read from model.safetensors
    file_bytes: int  # size of model.safetensors
    fingerprint: str  # sha256 hex of the checkpoint
    verified: bool  # True when the file was hashed and matched the recorded fingerprint
    seconds: float


def checkpoint_fingerprint(weights_path: str | Path, config: dict[str, Any]) -> str:
    """sha256 over the canonical config (without its fingerprint) and the weights file bytes."""
    digest = hashlib.sha256()
    canon = {k: v for k, v in config.items() if k != "fingerprint"}
    digest.update(json.dumps(canon, sort_keys=True).encode())
    digest.update(b"\0")
    with open(weights_path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} is missing: a checkpoint holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_file} is not valid JSON: {err}") from None


class PretrainedMixin:
    """save_pretrained / from_pretrained for MatMambaLM and MatMambaVision."""

    config_class: type[ModelConfig]
    fingerprint: str | None = None
    load_report: LoadReport | None = None
    tokenizer: Any = None

    def save_pretrained(self, path: str | Path, tokenizer: Any = None) -> str:
        """Write the checkpoint to `path`; returns its fingerprint."""
        widest = self.backbone.layers[0].mixer.max_width
        if widest != self.config.d_model:
            raise ValueError(f"this model was partially loaded (width {widest}); save the full model instead")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if getattr(self.config, "tie_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        config = self.config.to_dict()
        fingerprint = checkpoint_fingerprint(path / WEIGHTS_FILE, config)
        config["fingerprint"] = fingerprint
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is not None:
            tokenizer.save(path)
        self.fingerprint = fingerprint
        return fingerprint

    @classmethod
    def from_pretrained(cls, path: str | Path, *, width: int | None = None, mrl_level: int | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        verify: bool = True):
        """Load a checkpoint. `width` (or `mrl_level`) loads only what that nested width needs.

        verify=True hashes the weights file and refuses it if it differs from the recorded
        fingerprint (a changed or truncated file).
        """
        start = time.perf_counter()
        path = Path(path)
        raw = read_config(path)
        config = config_from_dict(raw)
        if not isinstance(config, cls.config_class):
            raise ValueError(f"{path} holds a {config.model_type} checkpoint, not {cls.config_class.model_type}; "
                             "use matmamba.load_model to load either kind")
        weights = _weights_file(path)
        recorded = raw.get("fingerprint")
        fingerprint = recorded
        if verify or recorded is None:
            fingerprint = checkpoint_fingerprint(weights, raw)
            if recorded is not None and fingerprint != recorded:
                raise ValueError(f"{weights} does not match the fingerprint in {path / CONFIG_FILE} "
                                 f"(recorded {recorded[:12]}..., file hashes to {fingerprint[:12]}...): "
                                 "the weights were changed or truncated; re-download or re-save the checkpoint")
        if width is not None and mrl_level is not None:
            raise ValueError("give width or mrl_level, not both")
        widest = config.block.width_for_level(mrl_level) if mrl_level else config.block.check_width(
            width if width is not None else config.d_model)
        model = cls(config, max_width=widest)
        bytes_read = _load_tensors(model, weights, config, widest)
        if dtype is not None:
            model.to(dtype)
        model.to(device)
        model.eval()
        model.fingerprint = fingerprint
        model.load_report = LoadReport(str(path), widest, bytes_read, weights.stat().st_size, fingerprint,
                                       verify and recorded is not None, time.perf_counter() - start)
        model.tokenizer = _maybe_tokenizer(path)
        return model


def _weights_file(path: Path) -> Path:
    weights = path / WEIGHTS_FILE
    if weights.exists():
        return weights
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = (f" Found {pickles}: pickle files are never loaded (they can run code); convert them to "
            f"{WEIGHTS_FILE} with safetensors.torch.save_file in a trusted environment.") if pickles else ""
    raise FileNotFoundError(f"{weights} is missing.{hint}")


def _load_tensors(model: torch.nn.Module, weights: Path, config: ModelConfig, widest: int) -> int:
    """Copy the checkpoint's tensors (sliced to `widest` for block parameters) into `model`."""
    expected = model.state_dict()
    tied = getattr(config, "tie_embeddings", False)
    bytes_read = 0
    try:
        handle = safe_open(str(weights), framework="pt")
    except Exception as err:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{weights} is not a readable safetensors file ({err}); re-save the checkpoint") from None
    with handle as f:
        keys = set(f.keys())
        needed = set(expected) - ({"lm_head.weight"} if tied else set())
        missing, unknown = needed - keys, keys - set(expected)
        if missing or unknown:
            raise ValueError(f"{weights} does not fit the config: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unknown)[:5]}")
        with torch.no_grad():
            for name in sorted(needed):
                tensor = _read_tensor(f, name, config, widest)
                if tensor.shape != expected[name].shape:
                    raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)} in {weights}, "
                                     f"the config needs {tuple(expected[name].shape)}")
                expected[name].copy_(tensor)
                bytes_read += tensor.numel() * tensor.element_size()
    return bytes_read


def _read_tensor(f: Any, name: str, config: ModelConfig, widest: int) -> torch.Tensor:
    match = MIXER_KEY.match(name)
    if match is None or widest == config.d_model:
        return f.get_tensor(name)
    ranges = nested_ranges(config.block, widest, config.d_model).get(match.group(1))
    lazy = f.get_slice(name)
    if ranges is None:
        return lazy[:]
    return take(lazy, *ranges)


def _maybe_tokenizer(path: Path) -> Any:
    from .data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except FileNotFoundError:
        return None


def load_model(path: str | Path, **kwargs):
    """Load either model kind from its config.json's model_type. kwargs as from_pretrained."""
    from .lm import MatMambaLM
    from .vision import MatMambaVision

    config = config_from_dict(read_config(path))
    cls = MatMambaLM if config.model_type == MatMambaLM.config_class.model_type else MatMambaVision
    return cls.from_pretrained(path, **kwargs)
