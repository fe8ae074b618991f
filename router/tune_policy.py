"""Trade-off curves and operating points of a chain of edge tiers followed by the cloud.

A chain has one threshold per edge stage (a single edge level is a chain of one). An item
is answered by the first stage whose confidence is at or above its threshold, and by the
cloud when every stage doubts it. The "accuracy" of a policy is the share of items answered
correctly (LM: answered as the cloud would have).

- :func:`tradeoff`: one stage, every threshold (the sorted unique confidences): escalation rate
  and cascade accuracy.
- :func:`chain_points`: a chain, every combination of the first stages' thresholds on a
  quantile grid (``GRID`` points each) with every threshold of the last stage: cloud rate,
  accuracy and how many items reach each stage (for the FLOPs).
- :func:`at_target`: the best accuracy at a cloud rate as close to the target as the data
  allow without exceeding it (per grid point of the first stages, the last stage's threshold
  closest to the target; then the best of those).
- :func:`pick_by_drop`: the lowest cloud rate whose drop vs cloud-only is <= D with
  probability >= 1 - delta (candidates ordered on one half, tested on the other).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.calibration import tradeoff

from .confidence import get_measure
from .tune_data import Records
from .tune_stats import binomial_lower, binomial_upper

GRID = 60  # quantile-grid thresholds per non-final chain stage
SPLIT_SEED = 0
RATE_STEPS = 201  # cloud-rate slices (100 %, 99.5 %, ..., 0) the drop guarantee walks through
EPS = 1e-12


def oracle_curve(edge_correct: np.ndarray, cloud_correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Escalate the edge's mistakes first (those the cloud gets right first), then the rest."""
    n = edge_correct.shape[0]
    # Order: edge wrong & cloud right, edge wrong & cloud wrong, edge right & cloud right, edge right & cloud wrong.
    key = np.where(~edge_correct, np.where(cloud_correct, 0, 1), np.where(cloud_correct, 2, 3))
    order = np.argsort(key, kind="stable")
    gain = np.concatenate([[0], np.cumsum(cloud_correct[order].astype(np.int64) - edge_correct[order])])
    return np.arange(n + 1) / n, (edge_correct.sum() + gain) / n


def oracle_rate_at(accuracy: float, edge_correct: np.ndarray, cloud_correct: np.ndarray) -> float:
    """Smallest escalation rate at which the oracle router reaches ``accuracy`` (1.0 if it never does)."""
    rate, acc = oracle_curve(edge_correct, cloud_correct)
    ok = np.nonzero(acc >= accuracy - EPS)[0]
    return float(rate[ok[0]]) if ok.size else 1.0


# ------------------------------------------------------------------ routing a chain


def route(rec: Records, measure: str, thresholds: tuple[float, ...]) -> np.ndarray:
    """(N,) index of the stage answering each item; len(thresholds) = the cloud."""
    stage = np.full(rec.n, len(thresholds))
    open_ = np.ones(rec.n, dtype=bool)
    for s, t in enumerate(thresholds):
        keep = open_ & (rec.conf[s][measure] >= t)
        stage[keep] = s
        open_ &= ~keep
    return stage


def answered_correct(rec: Records, stage: np.ndarray) -> np.ndarray:
    """(N,) bool: correctness of the tier that answered each item."""
    return np.choose(stage, [*rec.correct, rec.cloud_correct])


@dataclass
class Points:
    """Operating points of a chain: thresholds (P, S), cloud rate (P,), accuracy (P,), reach (P, S)."""

    measure: str
    thresholds: np.ndarray
    cloud_rate: np.ndarray
    accuracy: np.ndarray
    reach: np.ndarray  # fraction of items each edge stage runs on (stage 0: 1.0)
    group: np.ndarray  # (P,) index of the first stages' grid point (for at_target)

    def flops(self, edge_flops: list[int], cloud_flops: int) -> tuple[np.ndarray, np.ndarray]:
        """(edge FLOPs per item, cloud FLOPs per item) of every point."""
        return self.reach @ np.asarray(edge_flops, dtype=np.float64), self.cloud_rate * cloud_flops


def _grid(conf: np.ndarray) -> np.ndarray:
    return np.unique(np.quantile(conf, np.linspace(0.0, 1.0, GRID)))


def chain_points(rec: Records, measure: str) -> Points:
    """Every operating point of the chain (module docstring); exact over the last stage's thresholds."""
    n, last = rec.n, len(rec.levels) - 1
    rows: list[tuple[np.ndarray, ...]] = []
    grids = [_grid(rec.conf[s][measure]) for s in range(last)]
    for g, prefix in enumerate(itertools.product(*grids)):
        open_ = np.ones(n, dtype=bool)
        decided_correct, reach = 0, [1.0]
        for s, t in enumerate(prefix):
            keep = open_ & (rec.conf[s][measure] >= t)
            decided_correct += int(rec.correct[s][keep].sum())
            open_ &= ~keep
            reach.append(open_.mean())
        sub = np.flatnonzero(open_)
        if sub.size == 0:
            row_t = np.array([get_measure(measure).high])  # nothing reaches the last stage: any threshold
            esc, acc = np.zeros(1), np.zeros(1)
        else:
            c = tradeoff(rec.conf[last][measure][sub], rec.correct[last][sub], rec.cloud_correct[sub], measure)
            row_t, esc, acc = c.thresholds, c.escalation * sub.size / n, c.accuracy * sub.size / n
        m = row_t.size
        thresholds = np.column_stack([np.full(m, t) for t in prefix] + [row_t])
        rows.append((thresholds, esc, decided_correct / n + acc, np.tile(reach, (m, 1)), np.full(m, g)))
    t, esc, acc, reach, group = (np.concatenate(parts) for parts in zip(*rows))
    return Points(measure, t, esc, acc, reach, group)


def at_target(points: Points, target: float) -> int:
    """Index of the point with the best accuracy among each group's rate closest to ``target`` (not above)."""
    best, best_key = -1, (-np.inf, -np.inf)
    for g in np.unique(points.group):
        idx = np.flatnonzero((points.group == g) & (points.cloud_rate <= target + EPS))
        if idx.size == 0:
            continue
        i = int(idx[np.argmax(points.cloud_rate[idx])])  # rates are ascending within a group; ties: first max
        key = (points.cloud_rate[i], points.accuracy[i])
        if best < 0 or key[1] > best_key[1] + EPS or (abs(key[1] - best_key[1]) <= EPS and key[0] > best_key[0]):
            best, best_key = i, key
    return best


def pareto(points: Points, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upper envelope of accuracy against cost ``x``: the best accuracy at each cost or less, as steps
    (the points where it improves, and the largest cost)."""
    order = np.lexsort((-points.accuracy, x))
    xs, acc = x[order], np.maximum.accumulate(points.accuracy[order])
    keep = np.concatenate([[True], acc[1:] > acc[:-1] + EPS])
    keep[-1] = True
    return xs[keep], acc[keep]


def _thresholds_of(points: Points, i: int) -> tuple[float, ...]:
    return tuple(float(t) for t in points.thresholds[i])


def drop_upper_bound(cloud_correct: np.ndarray, cascade_correct: np.ndarray, delta: float) -> tuple[float, int, int]:
    """Upper confidence bound (level 1 - delta) of the accuracy drop, and its counts (worse, better).

    Per item the drop is +1 where the cloud is right and the cascade wrong, -1 the other way round,
    else 0. Bound: Clopper-Pearson upper bound of P(+1) at delta/2 minus the lower bound of P(-1)
    at delta/2 (a union bound over the two).
    """
    n = cloud_correct.shape[0]
    worse = int((cloud_correct & ~cascade_correct).sum())
    better = int((~cloud_correct & cascade_correct).sum())
    return binomial_upper(worse, n, delta / 2) - binomial_lower(better, n, delta / 2), worse, better


def pick_by_drop(rec: Records, measure: str, max_drop: float,
                 delta: float) -> tuple[tuple[float, ...] | None, dict[str, Any]]:
    """Thresholds whose drop vs cloud-only is <= D with probability >= 1 - delta, or None (report says why).

    The calibration set is split in two halves (fixed seed). The selection half orders the
    candidates: for slices of the cloud rate from 100 % down (``RATE_STEPS`` steps), the
    operating point with the best accuracy in the slice.
    The verification half tests them in that order (fixed-sequence testing, each at level delta):
    a candidate passes when :func:`drop_upper_bound` <= D; the walk stops at the first failure,
    and the last candidate passed (the lowest cloud rate) is chosen. Testing in an order fixed
    before looking at the verification half keeps the chance that any passed candidate's true
    drop exceeds D at most delta.
    """
    perm = np.random.default_rng(SPLIT_SEED).permutation(rec.n)
    half = rec.n // 2
    pick, check = rec.subset(perm[:half]), rec.subset(perm[half:])
    points = chain_points(pick, measure)
    report: dict[str, Any] = {"max_accuracy_drop": max_drop, "delta": delta, "split_seed": SPLIT_SEED,
                              "n_select": pick.n, "n_verify": check.n, "method": "fixed-sequence test, "
                              "Clopper-Pearson bounds of the paired accuracy difference"}
    candidates: list[int] = []  # per cloud-rate slice, from 100 % down: the best point in it
    step = 1.0 / (RATE_STEPS - 1)
    for budget in np.linspace(1.0, 0.0, RATE_STEPS):
        within = np.flatnonzero((points.cloud_rate <= budget + EPS) & (points.cloud_rate > budget - step + EPS))
        if within.size:
            i = int(within[np.lexsort((-points.cloud_rate[within], -points.accuracy[within]))[0]])
            if not candidates or candidates[-1] != i:
                candidates.append(i)
    chosen, tested = None, 0
    for i in candidates:  # highest cloud-rate budget first
        thresholds = _thresholds_of(points, i)
        stage = route(check, measure, thresholds)
        bound, worse, better = drop_upper_bound(check.cloud_correct, answered_correct(check, stage), delta)
        if bound > max_drop:
            break
        tested += 1
        chosen = (thresholds, bound, worse, better, float(points.cloud_rate[i]), stage)
    report["candidates_passed"] = tested
    if chosen is None:
        report["failure"] = (f"even the first candidate (cloud rate {points.cloud_rate[candidates[0]]:.2%}), the "
                             f"{1 - delta:.0%} upper bound of the drop on the held-out half exceeds {max_drop}; "
                             "use more calibration data, a larger D or a larger --delta")
        return None, report
    thresholds, bound, worse, better, rate, stage = chosen
    report.update(thresholds=list(thresholds), selection_escalation=rate,
                  verify_escalation=float((stage == len(thresholds)).mean()),
                  verify_drop=float(check.cloud_correct.mean() - answered_correct(check, stage).mean()),
                  verify_worse=worse, verify_better=better, verify_drop_upper_bound=bound)
    return thresholds, report
