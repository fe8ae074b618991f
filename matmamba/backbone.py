"""Residual stack of nested blocks shared by the LM and the vision model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import kernels
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
        tensor on the device (see ``BlockState.rewind``), as a CUDA graph that decides it on the device does.
        After a short chunk (``NestedStack._short_chunk``) of a stacked cache that is one launch for every layer."""
        traces = [state.trace for state in self.states]
        if isinstance(keep, torch.Tensor) and all(t is not None and t.states is not None for t in traces):
            kernels.rewind_select_triton([s.ssm for s in self.states], [t.states for t in traces],
                                         [s.conv for s in self.states], [t.conv_window for t in traces], keep)
            for state in self.states:
                state.trace = None
            return
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
        """Zero states per layer; at one width for all layers, views of one stacked conv and one stacked SSM tensor
        (so that kernels can treat every layer in one launch: `kernels.rewind_select_triton`)."""
        states = [layer.mixer.allocate_state(batch, w, device, dtype) for layer, w in zip(self.layers, widths)]
        if len(set(widths)) == 1:
            conv, ssm = torch.stack([s.conv for s in states]), torch.stack([s.ssm for s in states])
            states = [BlockState(conv[i], ssm[i], s.width) for i, s in enumerate(states)]
        return InferenceCache(states=states, widths=widths)

    def forward(self, h: torch.Tensor, widths: tuple[int, ...], cache: InferenceCache | None = None,
                keep_states: bool = False) -> torch.Tensor:
        if cache is not None and cache.widths != widths:
            raise ValueError(f"cache was allocated for widths {cache.widths}, the call uses {widths}")
        if keep_states and cache is not None and self._short_chunk_ok(h, widths):
            return self._short_chunk(h[0], cache)[None]
        if self.config.residual_in_fp32:
            h = h.float()
        for i, layer in enumerate(self.layers):
            h = layer(h, widths[i], None if cache is None else cache.states[i], keep_states)
        if cache is not None:
            cache.seqlen += h.shape[1]
        return h

    def _short_chunk_ok(self, h: torch.Tensor, widths: tuple[int, ...]) -> bool:
        return h.shape[0] == 1 and all(layer.mixer.short_chunk_ok(h[0], w) for layer, w in zip(self.layers, widths))

    def _short_chunk(self, h: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """A short chunk of one sequence with ``keep_states`` (speculative verification), h (L, d_model) -> the
        residual stream after the last layer, (L, d_model): `step`'s kernels over L positions at once
        (`MatMamba2.chunk_prenorm`), where the chunked path would run mamba-ssm's chunked scan, several kernels
        a layer, for a handful of tokens."""
        length, states = h.shape[0], cache.states
        windows = traces = [None] * len(states)
        if kernels.layer_stride([s.ssm for s in states]) is not None:  # trace buffers stacked as the cache is
            conv, ssm = states[0].conv, states[0].ssm
            windows = torch.empty(len(states), 1, conv.shape[1], conv.shape[2] + length, device=h.device,
                                  dtype=conv.dtype)
            traces = torch.empty(len(states), length, *ssm.shape, device=h.device, dtype=torch.float32)
        residual = None
        for layer, state, window, trace in zip(self.layers, states, windows, traces):
            h, residual = layer.mixer.chunk_prenorm(h, residual, layer.norm, self.config.residual_in_fp32, state,
                                                    window, trace)
        cache.seqlen += length
        return residual + h.to(residual.dtype)

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
