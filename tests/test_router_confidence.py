"""router/confidence.py: the confidence measures, their ranges, names and task checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from router.confidence import MEASURES, confidence, get_measure, should_escalate


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


PROBS = arrays(np.float64, st.tuples(st.integers(1, 8), st.integers(2, 12)),
               elements=st.floats(-20, 20, allow_nan=False)).map(_softmax)
LOGPROBS = arrays(np.float64, st.tuples(st.integers(1, 8), st.integers(1, 16)),
                  elements=st.floats(-30, 0, allow_nan=False))


def test_vision_measures_on_a_known_example() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(confidence("max_softmax", probs), [0.7, 0.4, 1.0])
    np.testing.assert_allclose(confidence("margin", probs), [0.5, 0.05, 1.0])
    expected = [sum(p * math.log(p) for p in row if p > 0) for row in probs]
    np.testing.assert_allclose(confidence("neg_entropy", probs), expected)
    assert confidence("neg_entropy", probs)[2] == 0.0  # all mass on one class: 0 log 0 counts as 0


def test_lm_measures_on_a_known_example() -> None:
    lp = np.log(np.array([[0.5, 0.25], [0.9, 0.1]]))
    np.testing.assert_allclose(confidence("mean_token_logprob", lp), lp.mean(-1))
    np.testing.assert_allclose(confidence("min_token_prob", lp), [0.25, 0.1])


def test_a_sequence_with_no_scored_token_is_fully_confident() -> None:
    empty = np.zeros((3, 0))
    assert confidence("mean_token_logprob", empty).tolist() == [0.0, 0.0, 0.0]
    assert confidence("min_token_prob", empty).tolist() == [1.0, 1.0, 1.0]


@settings(max_examples=60, deadline=None)
@given(PROBS)
def test_vision_measures_stay_in_their_ranges(probs: np.ndarray) -> None:
    n_classes = probs.shape[1]
    top = confidence("max_softmax", probs)
    assert np.all(top >= 1 / n_classes - 1e-9) and np.all(top <= 1 + 1e-9)
    gap = confidence("margin", probs)
    assert np.all(gap >= -1e-12) and np.all(gap <= top + 1e-12)
    ent = confidence("neg_entropy", probs)
    assert np.all(ent <= 1e-12) and np.all(ent >= -math.log(n_classes) - 1e-9)


@settings(max_examples=60, deadline=None)
@given(LOGPROBS)
def test_lm_measures_stay_in_their_ranges(lp: np.ndarray) -> None:
    mean = confidence("mean_token_logprob", lp)
    assert np.all(mean <= 0) and np.all(mean >= lp.min(-1) - 1e-9)
    low = confidence("min_token_prob", lp)
    assert np.all(low >= 0) and np.all(low <= np.exp(mean) + 1e-9)  # min <= geometric mean


def test_names_aliases_and_tasks() -> None:
    assert get_measure("max_prob").name == "max_softmax"
    assert get_measure("mean_logprob", "lm").name == "mean_token_logprob"
    assert {m.task for m in MEASURES.values()} == {"vision", "lm"}
    with pytest.raises(ValueError, match="unknown confidence measure 'entropy'.*max_softmax"):
        get_measure("entropy", "vision")
    with pytest.raises(ValueError, match="for lm checkpoints; this one is vision"):
        get_measure("mean_token_logprob", "vision")


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="2-D"):
        confidence("max_softmax", np.ones(3))
    with pytest.raises(ValueError, match="at least 2 classes"):
        confidence("margin", np.ones((2, 1)))


def test_escalation_is_strictly_below_the_threshold() -> None:
    assert should_escalate(np.array([0.79, 0.8, 0.81]), 0.8).tolist() == [True, False, False]
