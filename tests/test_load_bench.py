"""bench.load's bookkeeping (memory from /proc, process roles, the summary) and bench.reliability_report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from bench import reliability_report
from bench.load import MIB, MemoryWatch, Tally, router_processes, rss_bytes, summarize


def test_rss_of_this_process_and_of_a_gone_one() -> None:
    assert 10 * MIB < rss_bytes(os.getpid()) < 64 * 1024 * MIB
    assert rss_bytes(2 ** 22 + 12345) == 0  # above Linux's largest pid: 0, not an error


def test_router_processes_sorts_descendants_by_role() -> None:
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); " \
             "time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 10
        while not (found := router_processes(parent.pid))["ray (gcs, raylet, ...)"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(found["ray (gcs, raylet, ...)"]) == 1 and found["edge workers (Ray actors)"] == []
    finally:
        for pid in router_processes(parent.pid)["ray (gcs, raylet, ...)"]:
            os.kill(pid, 9)
        parent.kill()
        parent.wait()


def test_memory_report_uses_the_measured_window() -> None:
    watch = MemoryWatch({"a": [1], "b": [2, 3]})
    watch.samples = [(0.0, {"a": 100 * MIB, "b": 50 * MIB}), (1.0, {"a": 10 * MIB, "b": 60 * MIB}),
                     (2.0, {"a": 30 * MIB, "b": 55 * MIB}), (3.0, {"a": 20 * MIB, "b": 58 * MIB})]
    report = watch.report(start=1.0)  # the warm-up sample at 0.0 is left out
    assert report["a"] == {"start_mib": 10.0, "end_mib": 20.0, "peak_mib": 30.0, "growth_mib": 10.0, "processes": 1}
    assert report["b"]["growth_mib"] == -2.0 and report["b"]["processes"] == 2


def test_summary_counts_every_request_once() -> None:
    tally = Tally(latencies_ms=[10.0] * 98 + [50.0, 900.0], tiers=Counter(edge=80, cloud=15, degraded=5),
                  errors=Counter(RESOURCE_EXHAUSTED=7), sent=107)
    s = summarize(tally, seconds=10.0)
    assert s["answered"] == 100 and s["lost"] == 0 and s["errors"] == {"RESOURCE_EXHAUSTED": 7}
    assert s["escalation_rate"] == 0.2 and s["answers_per_s"] == 10.0
    assert s["latency_ms"]["p50"] == 10.0 and s["latency_ms"]["max"] == 900.0
    assert summarize(Tally(sent=3), 1.0)["lost"] == 3  # sent, neither answered nor refused


def test_report_renders_what_ran_and_names_what_did_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reliability_report, "RESULTS", tmp_path)
    empty = reliability_report.render()
    assert "not run" in empty and "Not run." in empty
    (tmp_path / "faults.json").write_text(json.dumps({"kill one": {
        "requests": 10, "answered": 10, "lost": 0, "errors": 0, "edge": 0, "cloud": 9, "degraded": 1,
        "max_latency_s": 0.2, "router_down_s": 3.0}}))
    (tmp_path / "fuzz.json").write_text(json.dumps({"examples_per_property": 5, "cases": {"cloud-lm/Score": 5},
                                                    "codes": {"INVALID_ARGUMENT": 5}, "total": 5,
                                                    "servers_crashed": 0}))
    text = reliability_report.render()
    assert "| kill one | 10 | 10 | 0 | 0 | 9 | 0 | 1 | 0.2 | router down 3.0 s |" in text
    assert "| cloud-lm | - | 5 | - | - | - | - |" in text
    assert "**10 requests under load and faults, 0 lost; 5 bad-input cases; 0 server crashes**" in text
