"""router.monitor with the band the router publishes itself, its drift gauge and latency percentiles."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest

from router.metrics import RouterMetrics
from router.monitor import DRIFT_EXIT, main, parse, percentile
from router.thresholds import Thresholds


def test_percentiles_interpolate_in_the_buckets() -> None:
    buckets = {0.001: 50.0, 0.002: 90.0, 0.005: 100.0, float("inf"): 100.0}
    assert percentile(buckets, 0.5) == pytest.approx(0.001)
    assert percentile(buckets, 0.7) == pytest.approx(0.0015)
    assert percentile(buckets, 0.95) == pytest.approx(0.0035)
    assert percentile({float("inf"): 0.0}, 0.5) is None


@pytest.mark.parametrize("escalated, expected_exit", [(200, 0), (500, DRIFT_EXIT)])
def test_the_routers_own_band_and_drift_gauge(capsys: pytest.CaptureFixture[str], escalated: int,
                                              expected_exit: int) -> None:
    metrics = RouterMetrics()
    metrics.set_thresholds(Thresholds("max_softmax", 0.8, "v", band=(0.2, 0.18, 0.22)))
    flags = np.arange(1000) < escalated
    metrics.record_decisions("Classify", "max_softmax", np.zeros(flags.size), flags)
    for up in flags:
        metrics.record_item("Classify", "cloud" if up else "edge", False, 1.5, 4.0 if up else 0.0)
    port = metrics.serve("127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url) as reply:
            snap = parse(reply.read().decode())
        assert snap.router_band == (0.2, 0.18, 0.22) and snap.router_drift == (expected_exit == DRIFT_EXIT)
        assert main(["--metrics", url, "--once"]) == expected_exit
    finally:
        metrics.close()
    out = capsys.readouterr().out
    assert "edge latency p50" in out and "calibrated rate" in out and "18.00%" in out
