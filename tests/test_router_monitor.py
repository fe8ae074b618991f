"""router.monitor against a real /metrics endpoint served by the router's own metrics registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge.calibration import wilson
from router.metrics import RouterMetrics
from router.monitor import DRIFT_EXIT, main


def serve_metrics(*batches: tuple[int, int]) -> tuple[RouterMetrics, int]:
    """A router registry that recorded each batch of (escalated, kept) decisions in turn, served on 127.0.0.1."""
    metrics = RouterMetrics()
    for escalated, kept in batches:
        flags = np.array([True] * escalated + [False] * kept)
        metrics.record_decisions("Classify", "margin", np.linspace(0, 1, flags.size), flags)
        for up in flags:
            metrics.record_item("Classify", "cloud" if up else "edge", False, 1.0, 2.0 if up else 0.0)
    return metrics, metrics.serve("127.0.0.1", 0)


def band_file(tmp_path: Path, rate: float, low: float, high: float) -> Path:
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"measure": "margin", "threshold": 0.7,
                                "expected_escalation": {"rate": rate, "ci95": [low, high]}}))
    return path


def once_against(tmp_path: Path, *batches: tuple[int, int]) -> int:
    """`router.monitor --once` against a router registry fed ``batches``, with the band 18-22 % around 20 %."""
    metrics, port = serve_metrics(*batches)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        return main(["--metrics", url, "--thresholds", str(band_file(tmp_path, 0.2, 0.18, 0.22)), "--once"])
    finally:
        metrics.close()


@pytest.mark.parametrize("escalated, kept, expected_exit", [(200, 800, 0), (500, 500, DRIFT_EXIT)])
def test_once_reports_the_rate_and_flags_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               escalated: int, kept: int, expected_exit: int) -> None:
    code = once_against(tmp_path, (escalated, kept))
    out = capsys.readouterr().out
    assert code == expected_exit
    assert f"{escalated / (escalated + kept):.2%}" in out
    assert ("DRIFT" in out) == (expected_exit == DRIFT_EXIT)


def test_unreachable_endpoint_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--metrics", "http://127.0.0.1:9/metrics", "--once", "--interval", "1"]) == 1
    assert "cannot read" in capsys.readouterr().out


def test_wilson_interval_known_value() -> None:
    low, high = wilson(20, 100)
    assert abs(low - 0.1333) < 1e-3 and abs(high - 0.2888) < 1e-3
    assert wilson(0, 0) == (0.0, 1.0)


def test_once_judges_the_router_window_not_the_traffic_before_a_retune(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1,000 decisions at 50% escalation, then 1,000 at 20% (after a re-tune): all time says DRIFT,
    the router's window (the last 1,000) is back in the band, and the --once exit follows the window."""
    code = once_against(tmp_path, (500, 500), (200, 800))
    out = capsys.readouterr().out
    assert code == 0
    assert "35.00%" in out and "20.00%  (1,000 decisions)" in out
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines() if line.count("│") == 3}
    assert rows["status, all time"] == "DRIFT" and rows["status, router window"] == "within band"
