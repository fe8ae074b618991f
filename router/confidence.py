"""Confidence measures of the edge model's answers (numpy only): higher means more confident.

The router compares one measure with a threshold and escalates an item to the cloud when
``confidence < threshold``. Classification measures read the softmax probabilities of one
image; language-model measures read the log-probabilities of the tokens of one sequence (a
scored sequence, or a segment of generated tokens).

| measure | task | range | definition |
| --- | --- | --- | --- |
| ``max_softmax`` | vision | [1/C, 1] | largest class probability |
| ``margin`` | vision | [0, 1] | largest minus second-largest class probability |
| ``neg_entropy`` | vision | [-ln C, 0] | sum_c p_c ln p_c (0 = all mass on one class) |
| ``mean_token_logprob`` | lm | (-inf, 0] | mean over tokens of ln p(token) |
| ``min_token_prob`` | lm | [0, 1] | smallest p(token) over the tokens |

A sequence with no scored token (a one-token Score request) has nothing to doubt: its
``mean_token_logprob`` is 0 and its ``min_token_prob`` is 1, so it is never escalated.

    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]], dtype=np.float32)
    confidence("max_softmax", probs)   # ~ [0.7, 0.4]
    confidence("margin", probs)        # ~ [0.5, 0.05]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

VISION = "vision"
LM = "lm"


def max_softmax(probs: np.ndarray) -> np.ndarray:
    """probs (N, C) -> (N,) largest probability per row."""
    return np.asarray(probs, dtype=np.float64).max(axis=-1)


def margin(probs: np.ndarray) -> np.ndarray:
    """probs (N, C) with C >= 2 -> (N,) top-1 minus top-2 probability per row."""
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[-1] < 2:
        raise ValueError(f"margin needs at least 2 classes, got probabilities of shape {p.shape}")
    top2 = np.partition(p, p.shape[-1] - 2, axis=-1)[..., -2:]  # (N, 2): second, first
    return top2[..., 1] - top2[..., 0]


def neg_entropy(probs: np.ndarray) -> np.ndarray:
    """probs (N, C) -> (N,) sum_c p ln p (negative entropy in nats; 0 log 0 counts as 0)."""
    p = np.asarray(probs, dtype=np.float64)
    logp = np.log(np.where(p > 0, p, 1.0))
    return (p * logp).sum(axis=-1)


def mean_token_logprob(token_logprobs: np.ndarray) -> np.ndarray:
    """token_logprobs (N, T) -> (N,) mean log-probability per sequence (0 when T == 0)."""
    lp = np.asarray(token_logprobs, dtype=np.float64)
    if lp.shape[-1] == 0:
        return np.zeros(lp.shape[:-1])
    return lp.mean(axis=-1)


def min_token_prob(token_logprobs: np.ndarray) -> np.ndarray:
    """token_logprobs (N, T) -> (N,) smallest token probability per sequence (1 when T == 0)."""
    lp = np.asarray(token_logprobs, dtype=np.float64)
    if lp.shape[-1] == 0:
        return np.ones(lp.shape[:-1])
    return np.exp(lp.min(axis=-1))


@dataclass(frozen=True)
class Measure:
    """One confidence measure: the task it applies to, its function and the range of its values."""

    name: str
    task: str  # VISION (reads probabilities (N, C)) or LM (reads token log-probabilities (N, T))
    fn: Callable[[np.ndarray], np.ndarray]
    low: float  # smallest possible value (thresholds below it would never escalate anything)
    high: float  # largest possible value


MEASURES: dict[str, Measure] = {
    m.name: m
    for m in (
        Measure("max_softmax", VISION, max_softmax, 0.0, 1.0),
        Measure("margin", VISION, margin, 0.0, 1.0),
        Measure("neg_entropy", VISION, neg_entropy, -math.inf, 0.0),
        Measure("mean_token_logprob", LM, mean_token_logprob, -math.inf, 0.0),
        Measure("min_token_prob", LM, min_token_prob, 0.0, 1.0),
    )
}
# Other spellings accepted in thresholds files, mapped to the canonical name.
ALIASES = {"max_prob": "max_softmax", "mean_logprob": "mean_token_logprob", "min_prob": "min_token_prob"}


def get_measure(name: str, task: str | None = None) -> Measure:
    """The measure called ``name`` (or an alias); ValueError naming the choices when unknown or for another task."""
    canonical = ALIASES.get(name, name)
    measure = MEASURES.get(canonical)
    choices = [m.name for m in MEASURES.values() if task is None or m.task == task]
    if measure is None:
        raise ValueError(f"unknown confidence measure {name!r}; choose one of {choices}")
    if task is not None and measure.task != task:
        raise ValueError(f"confidence measure {name!r} is for {measure.task} checkpoints; this one is {task}: "
                         f"choose one of {choices}")
    return measure


def confidence(measure: str, values: np.ndarray) -> np.ndarray:
    """Confidence (N,) float64 of each row of ``values`` under ``measure``.

    values: probabilities (N, C) for a vision measure, token log-probabilities (N, T) for an LM measure.
    """
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"confidence expects a 2-D array (items, values), got shape {values.shape}")
    return get_measure(measure).fn(values)


def should_escalate(conf: np.ndarray, threshold: float) -> np.ndarray:
    """(N,) bool: True where the edge is not confident enough (``conf < threshold``)."""
    return np.asarray(conf) < threshold
