"""`make demo` end to end (``python -m router.demo``, small settings): real cloud and router processes on
127.0.0.1, Ray inside the router, the edge client's demo. The table's numbers are checked against the
per-image answers, the shipped labels, the FLOPs formula and the servers' own counters; every process
the demo started is gone afterwards, also when it is interrupted."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from edge.demo import Calibration, Record, load_test_images, render, summarize
from edge.images import read_idx
from matmamba.config import config_from_dict
from matmamba.flops import flops_per_item
from matmamba.pretrained import read_config
from router.demo import THRESHOLDS, VISION, session_members

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "data" / "fashion-mnist-sample"
N_IMAGES = 64
TOKENS = 16
STOPPED = re.compile(r"stopped (.+?); (.+)")
PID = re.compile(r"\(pid (\d+), exit (-?\d+|None)\)")


def _env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONUNBUFFERED": "1"}


def _assert_all_gone(stdout: str, expected_servers: int) -> None:
    """Every server named in a "stopped ..." line exited 0 and its session (Ray's processes) is empty."""
    pids = [(int(pid), code) for line in stdout.splitlines() if (m := STOPPED.search(line))
            for pid, code in PID.findall(m.group(1))]
    assert len(pids) == expected_servers, stdout
    for pid, code in pids:
        assert code == "0", stdout
        assert session_members(pid) == [], f"processes of server {pid}'s session are still running"
    assert stdout.count("no process left") == expected_servers // 2, stdout


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "router.demo", "--limit", str(N_IMAGES), "--tokens", str(TOKENS),
                           "--out", str(out)], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    stdout = done.stdout
    assert done.returncode == 0, stdout + done.stderr[-3000:]
    assert time.monotonic() - start < 300
    results = json.loads((out / "results.json").read_text())
    s, recs, cal = results["summary"], results["records"], results["calibration"]

    # the held-out images, in file order, every one answered by both runs
    labels = np.array([r["label"] for r in recs])
    assert labels.tolist() == read_idx(SAMPLE / "t10k-labels-idx1-ubyte.gz")[:N_IMAGES].tolist()
    assert s["n"] == N_IMAGES and s["errors"] == 0 and s["cloud_errors"] == 0

    # accuracies from the per-image answers
    for run, key in (("edge-only", "edge_answer"), ("cascade", "answer"), ("cloud-only", "cloud_answer")):
        assert s["accuracy"][run] == pytest.approx(np.mean([r[key] == r["label"] for r in recs]))
        assert f"{s['accuracy'][run]:.4f}" in stdout

    # the routing decisions: kept at the edge <=> confidence >= the threshold in force
    threshold = json.loads(THRESHOLDS.read_text())["threshold"]
    assert cal["threshold"] == pytest.approx(threshold) and cal["band"] is not None
    for r in recs:
        escalated = r["tier"] == "cloud" or r["degraded"]
        assert escalated == (r["confidence"] < threshold)
        if not escalated or r["degraded"]:
            assert r["answer"] == r["edge_answer"]
    cloud = sum(r["tier"] == "cloud" and not r["degraded"] for r in recs)
    degraded = sum(r["degraded"] for r in recs)
    assert s["answered"] == {"edge": N_IMAGES - cloud, "cloud": cloud, "degraded": degraded}
    assert s["escalated"] == cloud + degraded and s["rate"] == pytest.approx((cloud + degraded) / N_IMAGES)
    assert f"escalation rate {s['rate']:.1%} ({cloud + degraded}/{N_IMAGES})" in stdout
    # escalated images answered by the cloud agree with the replica called directly (same full model)
    agree = [r["answer"] == r["cloud_answer"] for r in recs if r["tier"] == "cloud" and not r["degraded"]]
    assert sum(not a for a in agree) <= 1

    # escalations equal the router's counter; cloud calls equal the replica's own count of Classify requests
    check = results["cross_check"]
    assert check["consistent"] and check["router_escalations"] == s["escalated"]
    assert check["expected_cloud_requests"][0] <= check["cloud_requests"] <= check["expected_cloud_requests"][1]
    assert check["expected_cloud_requests"][0] == cloud + N_IMAGES

    # FLOPs over the wire match the formula; the cascade's count follows from the cloud calls
    cfg = config_from_dict(read_config(VISION))
    edge_flops, full_flops = flops_per_item(cfg, cfg.d_model // 4), flops_per_item(cfg, cfg.d_model)
    assert results["router"]["flops_per_item"] == edge_flops and results["cloud"]["flops_per_item"] == full_flops
    assert s["mflops"]["cascade"] * 1e6 == pytest.approx(edge_flops + cloud / N_IMAGES * full_flops)
    assert s["saved"]["cascade"] == pytest.approx(1 - s["mflops"]["cascade"] * 1e6 / full_flops)

    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    generated = re.search(r"(\d+) tokens: (\d+) edge, (\d+) cloud, (\d+) degraded; finish (\w+)", stdout)
    assert generated is not None, stdout
    assert int(generated[1]) == TOKENS == sum(int(generated[i]) for i in (2, 3, 4)) and generated[5] == "length"
    _assert_all_gone(stdout, expected_servers=4)


@pytest.mark.slow
def test_demo_interrupted_stops_everything(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the demo alone, as a terminal sends it) once the servers serve: all of them stop."""
    proc = subprocess.Popen([sys.executable, "-m", "router.demo", "--no-lm", "--out", str(tmp_path)], cwd=REPO_ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "edge device client:" in line:
                break
        time.sleep(1.0)  # requests in flight
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout = "".join(lines) + rest
    assert proc.returncode == 130, stdout
    assert "interrupted: stopping the servers" in stdout
    _assert_all_gone(stdout, expected_servers=2)


def test_demo_client_reads_the_shipped_images_and_says_what_is_missing(tmp_path: Path) -> None:
    images, labels = load_test_images(None, 10)
    assert images.shape == (10, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    with pytest.raises(FileNotFoundError, match="--data"):
        load_test_images(tmp_path, 10)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a readable gzip file"):
        read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")


def test_summary_without_cloud_and_with_errors() -> None:
    """The compose client may run without --cloud; failed requests count as wrong and are listed."""
    records = [Record(1, answer=1, edge_answer=1, tier="edge", confidence=0.9, latency_ms=2.0),
               Record(2, answer=2, edge_answer=0, tier="cloud", confidence=0.1, latency_ms=9.0),
               Record(3, answer=0, edge_answer=0, tier="edge", degraded=True, confidence=0.2, latency_ms=30.0),
               Record(4, error="UNAVAILABLE: shutting down")]
    cal = Calibration("margin", 0.5, "v1", 0.2, band=(0.2, 0.1, 0.3))
    s = summarize(records, cal, edge_flops=10_000_000, cloud_flops=None, with_cloud=False)
    assert s.accuracy == {"edge-only": 0.25, "cascade": 0.5, "cloud-only": None}
    assert s.answered == {"edge": 2, "cloud": 1, "degraded": 1} and s.escalated == 2 and s.errors == 1
    assert s.rate == pytest.approx(2 / 3) and s.within_band is True  # 3 answers: a wide interval
    assert s.mflops == {"edge-only": 10.0, "cascade": None, "cloud-only": None}
    out = io.StringIO()
    Console(file=out, width=160).print(render(s, cal, "t"))
    text = out.getvalue()
    assert "cloud-only (direct)" in text and "degraded answers: 1" in text and "errors 1" in text
    assert "within band" in text
