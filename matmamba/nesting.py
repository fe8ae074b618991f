"""The one place that knows which parameter entries a nested width uses.

A block stored at `max_width` (d_model, or less for a partially loaded edge model)
lays its parameters out as in mamba-ssm's Mamba2:

    in_proj rows   [ z (di_max) | x (di_max) | B, C (d_bc) | dt (h_max) ]
    conv channels  [ x (di_max) | B, C (d_bc) ]
    dt_bias, A_log, D: one entry per head (h_max); norm.weight: di_max
    out_proj columns: di_max

Width w uses the first di = expand*w channels of z and x, the first di/headdim heads,
all of B and C, and the first di input columns of out_proj. `nested_ranges` names those
ranges once; `take` applies them to a tensor or to a lazy safetensors slice, so the
forward pass, the decode step, state allocation and partial loading all agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import MatMamba2Config

Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class NestedDims:
    """Sizes of one block at one width."""

    width: int  # in d_model units
    d_inner: int  # expand * width: channels of z, x, the norm and out_proj's input
    nheads: int  # d_inner // headdim
    headdim: int
    d_state: int
    ngroups: int
    d_bc: int  # B plus C channels (always full)
    d_conv: int

    @property
    def conv_dim(self) -> int:
        return self.d_inner + self.d_bc

    @property
    def in_proj_dim(self) -> int:
        return 2 * self.d_inner + self.d_bc + self.nheads


def nested_dims(cfg: MatMamba2Config, width: int) -> NestedDims:
    cfg.check_width(width)
    d_inner = cfg.expand * width
    return NestedDims(
        width=width,
        d_inner=d_inner,
        nheads=d_inner // cfg.headdim,
        headdim=cfg.headdim,
        d_state=cfg.d_state,
        ngroups=cfg.ngroups,
        d_bc=cfg.d_bc,
        d_conv=cfg.d_conv,
    )


def _merge(ranges: Sequence[tuple[int, int]]) -> Ranges:
    out: list[tuple[int, int]] = []
    for start, stop in ranges:
        if stop <= start:
            continue
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], stop)
        else:
            out.append((start, stop))
    return tuple(out)


def nested_ranges(cfg: MatMamba2Config, width: int, max_width: int) -> dict[str, tuple[int, Ranges]]:
    """For each block parameter: (dimension to slice, index ranges along it) at `width`.

    Parameters absent from the result (out_proj.bias) are used in full.
    """
    if width > max_width:
        raise ValueError(
            f"width {width} exceeds the {max_width} channels this block holds "
            f"(it was partially loaded at width {max_width}); load the checkpoint at a larger width"
        )
    w, full = nested_dims(cfg, width), nested_dims(cfg, max_width)
    di, dm, h, bc = w.d_inner, full.d_inner, w.nheads, w.d_bc
    in_rows = _merge([(0, di), (dm, dm + di), (2 * dm, 2 * dm + bc + h)])
    conv_rows = _merge([(0, di), (dm, dm + bc)])
    heads = ((0, h),)
    return {
        "in_proj.weight": (0, in_rows),
        "in_proj.bias": (0, in_rows),
        "conv1d.weight": (0, conv_rows),
        "conv1d.bias": (0, conv_rows),
        "dt_bias": (0, heads),
        "A_log": (0, heads),
        "D": (0, heads),
        "norm.weight": (0, ((0, di),)),
        "out_proj.weight": (1, ((0, di),)),
    }


def take(source: Any, dim: int, ranges: Ranges) -> torch.Tensor:
    """Slice `source` (a tensor or a safetensors lazy slice) along `dim` and join the pieces.

    A single range gives a view of a tensor (no copy); several are concatenated.
    """
    pieces = []
    for start, stop in ranges:
        index = [slice(None)] * dim + [slice(start, stop)]
        pieces.append(source[tuple(index)])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def parse_widths(spec: str | Sequence[int] | int, n_layer: int, cfg: MatMamba2Config) -> tuple[int, ...]:
    """Validate a Mix'n'Match spec: one width per layer (a list, or "512,256,...")."""
    if isinstance(spec, str):
        try:
            spec = [int(part) for part in spec.replace(" ", "").split(",") if part]
        except ValueError:
            raise ValueError(f"a Mix'n'Match spec is comma-separated integers, got {spec!r}") from None
    if isinstance(spec, int):
        spec = [spec] * n_layer
    widths = tuple(spec)
    if len(widths) != n_layer:
        raise ValueError(f"a Mix'n'Match spec needs one width per layer ({n_layer}), got {len(widths)}")
    for i, w in enumerate(widths):
        try:
            cfg.check_width(w)
        except (ValueError, TypeError) as err:
            raise ValueError(f"layer {i}: {err}") from None
    return widths
