"""bench/scale_bench.py: its pure helpers against the real metrics classes and checkpoint, and one tiny CPU run.

The end-to-end run starts two real ``python -m cloud`` replicas and, per replica count, a real
``python -m router`` joining the session's Ray cluster, with client processes on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import generate_latest

from bench.load import Tally
from bench.scale_bench import (
    balance,
    cloud_calls,
    escalate_all_thresholds,
    failures,
    main,
    merge_tallies,
    parse_counts,
    placement,
    replica_figures,
    router_items,
    run_summary,
    samples,
    scaling,
)
from cloud.metrics import CloudMetrics
from matmamba import load_model
from matmamba.data import load_fashion_mnist
from matmamba.data.fashion_mnist import FMNIST_MEAN, FMNIST_STD
from router.confidence import confidence, should_escalate
from router.metrics import RouterMetrics
from router.thresholds import parse_thresholds

REPO_ROOT = Path(__file__).resolve().parents[1]
VISION = REPO_ROOT / "checkpoints" / "matmamba-vision-fmnist"
LM = REPO_ROOT / "checkpoints" / "matmamba-lm-austen"


def page(registry) -> dict:
    return samples(generate_latest(registry).decode())


# ------------------------------------------------------------------ placement and flags


def test_placement_one_replica_per_gpu_or_several_on_one() -> None:
    assert placement(2, "cpu", 0, 1) == [None, None]
    assert placement(3, "cuda", 4, 1) == ["0", "1", "2"]
    assert placement(2, "cuda", 1, 2) == ["0", "0"]  # the one-GPU stand-in
    assert placement(4, "cuda", 2, 2) == ["0", "0", "1", "1"]
    with pytest.raises(ValueError, match="--replicas-per-gpu"):
        placement(2, "cuda", 1, 1)


def test_parse_counts_takes_increasing_positive_counts() -> None:
    assert parse_counts("1,2,4") == (1, 2, 4)
    for bad in ("2,1", "0,1", "1,1", "a", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_counts(bad)


# ------------------------------------------------------------------ the thresholds file


def test_escalate_all_file_passes_the_routers_checks_and_escalates_every_shipped_image() -> None:
    data = escalate_all_thresholds(VISION, 8)
    raw = json.dumps(data).encode()
    fingerprint = json.loads((VISION / "config.json").read_text())["fingerprint"]
    policy = parse_thresholds(raw, path="escalate-all.json", task="vision", fingerprint=fingerprint, edge_level=8)
    assert (policy.measure, policy.threshold, policy.edge_level) == ("neg_entropy", 0.0, 8)
    other = json.loads((LM / "config.json").read_text())["fingerprint"]
    with pytest.raises(ValueError, match="tuned for checkpoint"):  # the fingerprint is really checked
        parse_thresholds(raw, path="escalate-all.json", task="vision", fingerprint=other, edge_level=8)
    images = load_fashion_mnist("test-sample")[0][:512, None].float()  # (512, 1, 28, 28)
    edge = load_model(VISION, mrl_level=8)
    with torch.no_grad():
        probs = edge((images / 255 - FMNIST_MEAN) / FMNIST_STD, mrl_level=8).float().softmax(-1).numpy()
    conf = confidence(policy.measure, probs)
    assert should_escalate(conf, policy.threshold).all(), conf.max()


# ------------------------------------------------------------------ aggregation


def tally(latencies: list[float], cloud: int, sent: int, errors: dict[str, int] | None = None) -> Tally:
    t = Tally(latencies_ms=list(latencies), sent=sent)
    t.tiers["cloud"] += cloud
    t.errors.update(errors or {})
    return t


def test_merged_tallies_summarise_to_images_per_s_and_ratios() -> None:
    one = merge_tallies([tally([10.0] * 50, 50, 50), tally([30.0] * 50, 50, 50)])
    two = merge_tallies([tally([5.0] * 100, 100, 100), tally([5.0] * 100, 100, 100)])
    assert (one.sent, one.tiers["cloud"], len(one.latencies_ms)) == (100, 100, 100)
    runs = [{"replicas": 1, "summary": run_summary(one, 10.0, 8)},
            {"replicas": 2, "summary": run_summary(two, 10.0, 8)}]
    assert runs[0]["summary"]["images_per_s"] == 80.0 and runs[0]["summary"]["requests_per_s"] == 10.0
    assert runs[1]["summary"]["images_per_s"] == 160.0
    ratio = scaling(runs)
    assert ratio["1"]["throughput_ratio"] == 1.0 and ratio["1"]["ideal"] == 1.0 and ratio["1"]["rounds"] == 1
    assert ratio["2"]["throughput_ratio"] == 2.0 and ratio["2"]["ideal"] == 2.0
    assert ratio["2"]["p99_ratio"] == pytest.approx(5.0 / 30.0, abs=1e-3)
    slow = merge_tallies([tally([5.0] * 50, 50, 50)])  # a third round of 2 replicas: medians over rounds
    rounds = scaling(runs + [{"replicas": 2, "summary": run_summary(slow, 10.0, 8)}] + runs[1:])
    assert rounds["2"]["images_per_s_by_round"] == [160.0, 40.0, 160.0] and rounds["2"]["throughput_ratio"] == 2.0
    assert failures({"runs": runs}) == []
    bad = merge_tallies([tally([10.0] * 9, 9, 12, {"UNAVAILABLE": 2})])
    problems = failures({"runs": [{"replicas": 1, "summary": run_summary(bad, 1.0, 8)}]})
    assert any("UNAVAILABLE" in p for p in problems) and any("1 requests lost" in p for p in problems)


def test_replica_figures_from_a_real_cloud_metrics_page() -> None:
    metrics = CloudMetrics()
    metrics.requests.labels(method="Classify", code="OK").inc(3)
    before = page(metrics.registry)
    metrics.requests.labels(method="Classify", code="OK").inc(40)
    metrics.requests.labels(method="Classify", code="RESOURCE_EXHAUSTED").inc(2)
    metrics.requests.labels(method="ModelInfo", code="OK").inc(5)  # health rounds: not counted
    for _ in range(10):
        metrics.batch_size.labels(method="Classify").observe(32)
        metrics.compute.labels(method="Classify").observe(0.15)
    figures = replica_figures(before, page(metrics.registry), seconds=2.0)
    assert figures == {"classify_ok": 40, "classify_failed": 2, "busy": 0.75, "mean_batch": 32.0}


def test_balance_and_router_counts_from_a_real_router_metrics_page() -> None:
    assert balance([50, 50]) == {"shares": [0.5, 0.5], "spread": True}
    assert balance([90, 10]) == {"shares": [0.9, 0.1], "spread": False}  # 10% < half of a fair 50%
    assert balance([0, 0])["spread"] is False
    metrics = RouterMetrics()
    metrics.record_item("Classify", "cloud", False, 1.0, 2.0)
    before = page(metrics.registry)
    for _ in range(6):
        metrics.record_item("Classify", "cloud", False, 1.0, 2.0)
    metrics.record_item("Classify", "edge", True, 1.0, 0.0)  # a degraded answer
    metrics.record_cloud_call("127.0.0.1:1", grpc.StatusCode.OK)
    metrics.record_cloud_call("127.0.0.1:2", grpc.StatusCode.UNAVAILABLE)
    after = page(metrics.registry)
    assert router_items(before, after) == {"edge": 0.0, "cloud": 6.0, "degraded": 1.0}
    assert cloud_calls(before, after) == {"127.0.0.1:1 OK": 1.0, "127.0.0.1:2 UNAVAILABLE": 1.0}


# ------------------------------------------------------------------ one tiny run


@pytest.mark.slow
def test_tiny_cpu_run_spreads_escalations_over_two_replicas(ray_cluster, tmp_path: Path) -> None:
    """Two replicas only (each router start costs ~10 s here); 1 vs N is the helpers' arithmetic above."""
    out = tmp_path / "scale.json"
    code = main(["--device", "cpu", "--replicas", "2", "--seconds", "2", "--warmup-s", "1", "--client-procs", "1",
                 "--clients", "4", "--images-per-request", "4", "--ray-address", ray_cluster.address,
                 "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and result["failures"] == []
    (r,) = result["runs"]
    s = r["summary"]
    assert r["replicas"] == 2 and s["answered"] > 0 and s["errors"] == {} and s["lost"] == 0
    assert s["images_per_s"] == pytest.approx(s["answered"] * 4 / r["measured_seconds"], rel=0.01)
    images = r["router_images_by_tier"]
    assert images["cloud"] > 0 and images["edge"] == images["degraded"] == 0  # every image reached the cloud
    calls = [x["classify_ok"] for x in r["replica_figures"]]
    assert len(calls) == 2 and r["balance"]["spread"], calls  # least-outstanding balancing used both
    assert sum(calls) == pytest.approx(images["cloud"] / 4, abs=2)  # one cloud call per 4-image request
    assert set(r["router_exit_codes"].values()) == {0} and set(result["cloud_exit_codes"].values()) == {0}
    assert "| 2 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0
    assert result["scaling"]["2"]["throughput_ratio"] == 1.0  # the first count is its own base
    assert r["load_average_1min"] >= 0
