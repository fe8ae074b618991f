"""MatMamba-LM: a causal language model whose every nested width shares one set of weights."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from .backbone import InferenceCache, NestedStack, WidthSpec, init_weights
from .config import MatMambaLMConfig
from .generation import SamplingParams, sample_stream
from .pretrained import PretrainedMixin


class LMBackbone(NestedStack):
    def __init__(self, config: MatMambaLMConfig, max_width: int | None = None) -> None:
        super().__init__(config, max_width)
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.norm_f = nn.RMSNorm(config.d_model, eps=config.block.norm_eps)


class MatMambaLM(PretrainedMixin, nn.Module):
    """Embedding -> n_layer MatMamba2 blocks -> RMSNorm -> tied head.

    Keys follow mamba-ssm's `MambaLMHeadModel` (`backbone.layers.N.mixer.in_proj.weight`, ...).
    """

    config_class = MatMambaLMConfig

    def __init__(self, config: MatMambaLMConfig, max_width: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = LMBackbone(config, max_width)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        init_weights(self)

    def check_ids(self, input_ids: torch.Tensor) -> None:
        """Raise ValueError / TypeError unless input_ids is a (batch, length>0) integer tensor of in-vocabulary ids."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (batch, length>0), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must be in 0..{self.config.vocab_size - 1}, got range {lo}..{hi}")

    def forward(self, input_ids: torch.Tensor, mrl_level: int | None = None, *, widths: WidthSpec | None = None,
                cache: InferenceCache | None = None, keep_states: bool = False) -> torch.Tensor:
        """input_ids: (batch, length) -> logits (batch, length, vocab_size).

        `mrl_level=k` runs every layer at d_model // k; `widths` gives one width per layer
        (Mix'n'Match). With `cache`, continues from and updates the recurrent state.
        `keep_states` (with `cache`) also records the state after every position, so that
        `cache.rewind(t)` returns to the state after the first t tokens of this call (speculative
        verification reads k drafted tokens in one pass, then keeps only the accepted ones).
        """
        self.check_ids(input_ids)
        if keep_states and cache is None:
            raise ValueError("keep_states needs a cache to continue from (allocate_cache)")
        spec = cache.widths if cache is not None and widths is None and mrl_level is None else \
            self.backbone.resolve_widths(mrl_level, widths)
        return self.forward_unchecked(input_ids, spec, cache, keep_states)

    def forward_unchecked(self, input_ids: torch.Tensor, spec: tuple[int, ...], cache: InferenceCache | None = None,
                          keep_states: bool = False) -> torch.Tensor:
        """``forward`` without its input checks, which read the ids back to the host: what a CUDA graph
        captures (a capture may not synchronise). The caller checks the ids (``check_ids``) before a replay."""
        h = self.backbone(self.backbone.embedding(input_ids), spec, cache, keep_states)
        return self._head(h)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.backbone.norm_f(h.to(self.backbone.norm_f.weight.dtype))
        return self.lm_head(h)[..., : self.config.vocab_size]

    def step(self, token_ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """One token per sequence: token_ids (batch,) -> logits (batch, vocab_size)."""
        h = self.backbone.step(self.backbone.embedding(token_ids), cache)
        return self._head(h)

    def allocate_cache(self, batch: int, mrl_level: int | None = None, *, widths: WidthSpec | None = None,
                       dtype: torch.dtype | None = None) -> InferenceCache:
        spec = self.backbone.resolve_widths(mrl_level, widths)
        return self.backbone.allocate_cache(batch, spec, self.lm_head.weight.device, dtype)

    @torch.inference_mode()
    def generate_stream(self, input_ids: torch.Tensor, max_new_tokens: int, *, mrl_level: int | None = None,
                        widths: WidthSpec | None = None, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, eos_id: int | None = None,
                        generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (tokens (batch,), log-probs (batch,)) one step at a time.

        The prompt is consumed in one parallel pass; each new token is one recurrent step.
        Stops after max_new_tokens, or when every sequence has produced eos_id.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        params = SamplingParams(temperature, top_k, top_p)
        cache = self.allocate_cache(input_ids.shape[0], mrl_level, widths=widths)
        logits = self.forward(input_ids, cache=cache)[:, -1]
        yield from sample_stream(logits, lambda token: self.step(token, cache), max_new_tokens, params, eos_id,
                                 generator)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Prompt (batch, length) -> prompt plus new tokens (batch, length + n). kwargs as generate_stream."""
        new = [token for token, _ in self.generate_stream(input_ids, max_new_tokens, **kwargs)]
        if not new:
            return input_ids
        return torch.cat([input_ids, torch.stack(new, dim=1).to(input_ids.dtype)], dim=1)

