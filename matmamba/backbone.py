"""Residual stack of nested blocks shared by the LM and the vision model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .block import BlockState, MatMamba2
from .config import ModelConfig
from .nesting import parse_widths

WidthSpec = int | str | Sequence[int]


class ResidualBlock(nn.Module):
    """Pre-norm residual block: h + mixer(norm(h)) (mamba-ssm's `Block` without an MLP)."""

    def __init__(self, config: ModelConfig, max_width: int | None = None) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(config.d_model, eps=config.block.norm_eps)
        self.mixer = MatMamba2(config=config.block, max_width=max_width)

    def forward(self, h: torch.Tensor, width: int, state: BlockState | None = None,
                keep_states: bool = False) -> torch.Tensor:
        out = self.mixer(self.norm(h.to(self.norm.weight.dtype)), width=width, state=state, keep_states=keep_states)
        return h + out.to(h.dtype)


@dataclass
class InferenceCache:
    """Per-layer recurrent states for a batch of sequences at one width spec."""

    states: list[BlockState]
    widths: tuple[int, ...]
    seqlen: int = 0  # tokens consumed so far

    @property
    def batch_size(self) -> int:
        return self.states[0].ssm.shape[0]

    def clone(self) -> InferenceCache:
        """An independent copy (a checkpoint to return to with ``copy_``)."""
        return InferenceCache([s.clone() for s in self.states], self.widths, self.seqlen)

    def copy_(self, other: InferenceCache) -> None:
        """Overwrite this cache with ``other`` (a checkpoint of it from ``clone``)."""
        if other.widths != self.widths:
            raise ValueError(f"cannot copy a cache of widths {other.widths} into one of widths {self.widths}")
        for mine, theirs in zip(self.states, other.states):
            mine.copy_(theirs)
        self.seqlen = other.seqlen

    def rewind(self, keep: int) -> None:
        """Return to the state after the first ``keep`` tokens of the last ``forward(..., keep_states=True)``.

        E.g. after reading 9 tokens with keep_states, ``rewind(3)`` leaves the cache as if only the
        first 3 of them had been read. The recorded states are dropped, so rewind once per chunk.
        """
        length = self.states[0].trace.length if self.states[0].trace is not None else 0
        self.rewind_states(keep)
        self.seqlen -= length - keep

    def rewind_states(self, keep: int | torch.Tensor) -> None:
        """``rewind`` of the layers' states only, ``seqlen`` left to the caller: with ``keep`` a 0-dim int64
        tensor on the device (see ``BlockState.rewind``), as a CUDA graph that decides it on the device does."""
        for state in self.states:
            state.rewind(keep)


class NestedStack(nn.Module):
    """The blocks plus the width-spec logic every model uses."""

    def __init__(self, config: ModelConfig, max_width: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(ResidualBlock(config, max_width) for _ in range(config.n_layer))

    def resolve_widths(self, mrl_level: int | None = None, widths: WidthSpec | None = None) -> tuple[int, ...]:
        """One width per layer from an mrl_level, a Mix'n'Match spec, or the blocks' mixnmatch attributes."""
        if widths is not None:
            if mrl_level is not None:
                raise ValueError("give mrl_level or widths (a Mix'n'Match spec), not both")
            spec = parse_widths(widths, len(self.layers), self.config.block)
            return tuple(layer.mixer.resolve_width(width=w) for layer, w in zip(self.layers, spec))
        return tuple(layer.mixer.resolve_width(mrl_level) for layer in self.layers)

    def allocate_cache(self, batch: int, widths: tuple[int, ...], device: torch.device | None = None,
                       dtype: torch.dtype | None = None) -> InferenceCache:
        states = [layer.mixer.allocate_state(batch, w, device, dtype) for layer, w in zip(self.layers, widths)]
        return InferenceCache(states=states, widths=widths)

    def forward(self, h: torch.Tensor, widths: tuple[int, ...], cache: InferenceCache | None = None,
                keep_states: bool = False) -> torch.Tensor:
        if cache is not None and cache.widths != widths:
            raise ValueError(f"cache was allocated for widths {cache.widths}, the call uses {widths}")
        if self.config.residual_in_fp32:
            h = h.float()
        for i, layer in enumerate(self.layers):
            h = layer(h, widths[i], None if cache is None else cache.states[i], keep_states)
        if cache is not None:
            cache.seqlen += h.shape[1]
        return h

    def step(self, h: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """One token per sequence, (batch, d_model) -> (batch, d_model): the residual stream after the last
        layer, as ``forward`` computes it, with each residual add fused into the next layer's norm."""
        residual = None
        for layer, state in zip(self.layers, cache.states):
            h, residual = layer.mixer.step_prenorm(h, residual, layer.norm, self.config.residual_in_fp32, state)
        cache.seqlen += 1
        return residual + h.to(residual.dtype)


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """Embeddings N(0, 0.02), zero biases, and each residual branch's out_proj scaled by
    1/sqrt(n_layer) (GPT-2 style) so the residual stream does not grow with depth."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    for name, p in model.named_parameters():
        if name.endswith("out_proj.weight"):
            p.div_(model.config.n_layer**0.5)
