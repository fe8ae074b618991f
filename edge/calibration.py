"""A cascade's calibration in numpy terms (no torch): the trade-off curve and the expected escalation band.

Shared by the tuner (``router.tune`` draws the curve on calibration data), the monitor
(``router.monitor`` compares a router's live rate with the band) and the demo client
(``python -m edge demo`` draws the curve of a measured run).

    curve = tradeoff(conf, edge_correct, cloud_correct)   # escalate items with conf < t, for each t
    rate, low, high = expected_band("thresholds.json")    # written by python -m router.tune
    outside_band(escalated=41, total=200, band=(rate, low, high))
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# z for a two-sided 95% Wilson interval on an observed escalation rate.
Z95 = 1.959963984540054


@dataclass
class Curve:
    """One measure: candidate thresholds (ascending) and, at each, escalation rate and cascade accuracy."""

    measure: str
    thresholds: np.ndarray
    escalation: np.ndarray
    accuracy: np.ndarray


def tradeoff(conf: np.ndarray, edge_correct: np.ndarray, cloud_correct: np.ndarray, measure: str = "") -> Curve:
    """For each threshold t in the sorted unique confidences: mean(conf < t) and the cascade accuracy."""
    n = conf.shape[0]
    order = np.argsort(conf, kind="stable")
    c = conf[order]
    # Cascade correct = cloud_correct if escalated else edge_correct = edge + escalated * (cloud - edge).
    gain = np.concatenate([[0], np.cumsum(cloud_correct[order].astype(np.int64) - edge_correct[order])])
    thresholds = np.unique(c)
    escalated = np.searchsorted(c, thresholds, side="left")  # items with conf < t
    accuracy = (edge_correct.sum() + gain[escalated]) / n
    return Curve(measure, thresholds, escalated / n, accuracy)


def expected_band(path: str | Path) -> tuple[float, float, float]:
    """(expected rate, low, high) from a thresholds file written by router.tune."""
    path = Path(path)
    data = json.loads(path.read_text())
    exp = data.get("expected_escalation")
    if not isinstance(exp, dict) or "rate" not in exp or "ci95" not in exp:
        raise ValueError(f"{path} has no expected_escalation band; write it with `python -m router.tune`")
    low, high = exp["ci95"]
    return float(exp["rate"]), float(low), float(high)


def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (0..1 when n is 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def outside_band(escalated: float, total: float, band: tuple[float, float, float]) -> bool:
    """True when the observed rate's 95% interval does not overlap the calibrated band (rate, low, high)."""
    if total <= 0:
        return False
    low, high = wilson(escalated, total)
    return high < band[1] or low > band[2]
