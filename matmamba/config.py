"""Typed, validated configs for the MatMamba2 block and the two models.

Every size the code uses is derived here from the config (`expand`, `headdim`,
`ngroups`), so nothing downstream hard-codes a factor of two.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The original MatMamba code fixes the head size to d_model // 32 (so every nested
# width it trains stays a whole number of heads); `headdim=None` reproduces that.
ORIGINAL_HEADS_PER_D_MODEL = 32
# Levels trained jointly by default, as in the paper (d, d/2, d/4, d/8).
DEFAULT_LEVELS = (1, 2, 4, 8)


@dataclass
class MatMamba2Config:
    """One nested Mamba2 block. Level k means width d_model // k inside the block."""

    d_model: int = 256  # residual-stream width; never sliced
    d_state: int = 64  # SSM state size per group (B and C are always used in full)
    d_conv: int = 4  # causal depthwise conv kernel size
    expand: int = 2  # inner width = expand * width
    headdim: int | None = None  # channels per SSM head; None -> d_model // 32 (original MatMamba)
    ngroups: int = 1  # B/C groups, shared by all heads of a group
    chunk_size: int = 256  # SSD chunk length (kernel tiling; no effect on results)
    dt_min: float = 0.001  # init range of the step size dt
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)  # init range of -A per head
    norm_eps: float = 1e-5  # gated RMSNorm epsilon
    norm_before_gate: bool = False  # Mamba2 default: y * silu(z), then normalise
    bias: bool = False  # bias on in_proj / out_proj
    conv_bias: bool = True
    levels: tuple[int, ...] = DEFAULT_LEVELS  # the granularities this checkpoint was trained at

    def __post_init__(self) -> None:
        if self.headdim is None:
            self.headdim = max(1, self.d_model // ORIGINAL_HEADS_PER_D_MODEL)
        self.A_init_range = tuple(self.A_init_range)
        self.levels = tuple(int(k) for k in self.levels)
        for name in ("d_model", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.levels or 1 not in self.levels:
            raise ValueError(f"levels must include 1 (the full width), got {self.levels}")
        for k in self.levels:
            self.width_for_level(k)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def d_bc(self) -> int:
        """Channels of B plus C (never sliced)."""
        return 2 * self.ngroups * self.d_state

    def check_width(self, width: int) -> int:
        """Validate a nested width (in d_model units) and return it."""
        if not isinstance(width, int) or isinstance(width, bool):
            raise TypeError(f"width must be an int, got {type(width).__name__}")
        if not 0 < width <= self.d_model:
            raise ValueError(f"width must be in 1..{self.d_model} (d_model), got {width}")
        inner = self.expand * width
        if inner % self.headdim:
            raise ValueError(
                f"width {width} gives {inner} inner channels, not a multiple of headdim {self.headdim}; "
                f"valid widths are multiples of {self.width_quantum}"
            )
        heads = inner // self.headdim
        if heads % self.ngroups:
            raise ValueError(f"width {width} gives {heads} heads, not divisible by ngroups {self.ngroups}")
        return width

    @property
    def width_quantum(self) -> int:
        """Smallest step between valid widths."""
        step = 1
        while (self.expand * step) % (self.headdim * self.ngroups):
            step += 1
        return step

    def width_for_level(self, level: int) -> int:
        """Width of Matryoshka level k (d_model // k), validated."""
        if not isinstance(level, int) or isinstance(level, bool) or level <= 0:
            raise ValueError(f"mrl_level must be a positive integer, got {level!r}")
        if self.d_model % level:
            raise ValueError(f"mrl_level {level} does not divide d_model {self.d_model}")
        try:
            return self.check_width(self.d_model // level)
        except ValueError as err:
            raise ValueError(f"mrl_level {level} is not valid for this block: {err}") from None

    def valid_widths(self) -> list[int]:
        q = self.width_quantum
        return list(range(q, self.d_model + 1, q))


def _block_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(MatMamba2Config)}


@dataclass
class ModelConfig:
    """Fields shared by the LM and the vision model."""

    n_layer: int = 4  # number of residual MatMamba2 blocks
    block: MatMamba2Config = field(default_factory=MatMamba2Config)
    residual_in_fp32: bool = True  # keep the residual stream in fp32 under autocast

    def __post_init__(self) -> None:
        if isinstance(self.block, dict):
            self.block = MatMamba2Config(**self.block)
        if not isinstance(self.n_layer, int) or self.n_layer <= 0:
            raise ValueError(f"n_layer must be a positive integer, got {self.n_layer!r}")

    @property
    def d_model(self) -> int:
        return self.block.d_model

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model_type"] = self.model_type
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = {k: v for k, v in data.items() if k not in ("model_type", "fingerprint")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    model_type = "base"


@dataclass
class MatMambaLMConfig(ModelConfig):
    """Causal language model: embedding, n_layer blocks, final RMSNorm, tied head."""

    vocab_size: int = 256  # token ids are 0..vocab_size-1
    pad_vocab_size_multiple: int = 8  # embedding rows rounded up for aligned matmuls
    tie_embeddings: bool = True  # lm_head shares the embedding matrix

    model_type = "matmamba-lm"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vocab_size <= 0 or self.pad_vocab_size_multiple <= 0:
            raise ValueError("vocab_size and pad_vocab_size_multiple must be positive")

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def from_mamba_ssm(cls, data: dict[str, Any]) -> MatMambaLMConfig:
        """Read an original MatMamba / mamba-ssm `MambaConfig` dict (headdim = d_model // 32)."""
        if data.get("d_intermediate", 0):
            raise ValueError("checkpoints with an MLP (d_intermediate > 0) are not supported")
        ssm = dict(data.get("ssm_cfg") or {})
        layer = ssm.pop("layer", "Mamba2")
        if layer != "Mamba2":
            raise ValueError(f"only Mamba2 layers can be nested, this checkpoint uses {layer}")
        allowed = _block_fields() - {"headdim", "levels", "d_model"}
        block = {k: v for k, v in ssm.items() if k in allowed}
        block["d_model"] = data["d_model"]
        block["headdim"] = data["d_model"] // ORIGINAL_HEADS_PER_D_MODEL
        return cls(
            n_layer=data["n_layer"],
            vocab_size=data["vocab_size"],
            pad_vocab_size_multiple=data.get("pad_vocab_size_multiple", 8),
            tie_embeddings=data.get("tie_embeddings", True),
            residual_in_fp32=data.get("residual_in_fp32", True),
            block=MatMamba2Config(**block),
        )


@dataclass
class MatMambaVisionConfig(ModelConfig):
    """Image classifier: patch embedding, blocks, class token as a suffix, head."""

    in_chans: int = 1  # image channels
    patch_size: int = 4  # square patches; image sides must be multiples of it
    image_size: int = 28  # size it was trained at (any multiple of patch_size works)
    n_classes: int = 10

    model_type = "matmamba-vision"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("in_chans", "patch_size", "image_size", "n_classes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")


CONFIG_CLASSES: dict[str, type[ModelConfig]] = {
    MatMambaLMConfig.model_type: MatMambaLMConfig,
    MatMambaVisionConfig.model_type: MatMambaVisionConfig,
}


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Build the right config from a config.json dict (ours, or an original MambaConfig)."""
    kind = data.get("model_type")
    if kind in CONFIG_CLASSES:
        return CONFIG_CLASSES[kind].from_dict(data)
    if "ssm_cfg" in data or ("d_model" in data and "vocab_size" in data):
        return MatMambaLMConfig.from_mamba_ssm(data)
    raise ValueError(f"config.json has unknown model_type {kind!r}; expected one of {sorted(CONFIG_CLASSES)}")
