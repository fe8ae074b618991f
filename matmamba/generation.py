"""Token sampling: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1.0 keeps all

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Scaled logits with filtered-out tokens set to -inf. logits: (batch, vocab)."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = probs.cumsum(-1) - probs >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `sample_next` draws from, fp32 (batch, vocab); greedy gives a one-hot row."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return filter_logits(logits, params).softmax(-1)


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row. logits: (batch, vocab) -> (batch,) int64."""
    if params.greedy:
        return logits.argmax(-1)
    return torch.multinomial(sampling_probs(logits, params), 1, generator=generator).squeeze(-1)


def sample_stream(logits: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor], max_new_tokens: int,
                  params: SamplingParams, eos_id: int | None = None,
                  generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The decode loop: from the prompt's last logits (batch, vocab), yield (tokens (batch,), log-probs (batch,)),
    calling ``step(tokens) -> next logits`` between tokens. Stops after max_new_tokens, or when every
    sequence has produced eos_id."""
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for i in range(max_new_tokens):
        token = sample_next(logits, params, generator)
        logprob = F.log_softmax(logits.float(), -1).gather(-1, token[:, None]).squeeze(-1)
        yield token, logprob
        if eos_id is not None:
            finished |= token == eos_id
            if bool(finished.all()):
                return
        if i + 1 < max_new_tokens:
            logits = step(token)
