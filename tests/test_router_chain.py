"""A chain of edge tiers (edge level 8 -> edge level 2 -> cloud): thresholds files, joint tuning, serving.

The serving test runs the real router (RouterThread, Ray actors of the session's cluster) in
front of a real ``python -m cloud`` process on the shipped vision checkpoint, and checks item by
item which tier answered against the stages computed here from the same checkpoint.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from edge.client import EdgeClient
from matmamba import load_model
from matmamba.data import load_fashion_mnist, normalize_images
from router.__main__ import build_parser, config_from_args
from router.thresholds import ThresholdsError, ThresholdStore, load_thresholds, parse_levels
from router.tune_data import Records
from router.tune_policy import answered_correct, at_target, chain_points, route

from .test_router_integration import VISION, cloud_process, scrape, separated_threshold

FP = "ab" * 32
LEVELS = (8, 2)


def _chain_file(tmp_path: Path, stages: list[dict], **extra) -> Path:
    path = tmp_path / "chain.json"
    path.write_text(json.dumps({"stages": stages, "checkpoint_fingerprint": FP, **extra}))
    return path


STAGES = [{"edge_level": 8, "measure": "max_softmax", "threshold": 0.9},
          {"edge_level": 2, "measure": "margin", "threshold": 0.4}]


def test_a_chain_file_loads_for_its_levels_only(tmp_path: Path) -> None:
    path = _chain_file(tmp_path, STAGES, expected_escalation={"rate": 0.1, "ci95": [0.08, 0.12]})
    t = load_thresholds(path, task="vision", fingerprint=FP, edge_levels=LEVELS)
    assert [(s.edge_level, s.measure, s.threshold) for s in t.chain] == [(8, "max_softmax", 0.9), (2, "margin", 0.4)]
    assert (t.measure, t.threshold, t.edge_level) == ("max_softmax", 0.9, 8)  # the first stage
    assert t.band == (0.1, 0.08, 0.12)
    assert [s.edge_level for s in t.to_proto().stages] == [8, 2]
    assert t.stage_for(2).measure == "margin" and t.stage_for(4).edge_level == 8
    for levels in [(4,), (8, 4), (2, 8, 1)]:
        with pytest.raises(ThresholdsError, match="tuned for edge level 8,2") as err:
            load_thresholds(path, task="vision", fingerprint=FP, edge_levels=levels)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    single = tmp_path / "single.json"
    single.write_text(json.dumps({"measure": "max_softmax", "threshold": 0.8, "edge_level": 4}))
    with pytest.raises(ThresholdsError, match="--edge-level 4"):
        load_thresholds(single, task="vision", edge_levels=LEVELS)


@pytest.mark.parametrize(("stages", "extra", "match"), [
    ([], {}, "non-empty list"),
    ([{"measure": "max_softmax", "threshold": 0.5}], {}, 'needs its "edge_level"'),
    ([{"edge_level": 8, "measure": "mean_token_logprob", "threshold": -1}], {}, "for lm checkpoints"),
    (STAGES, {"measure": "max_softmax", "threshold": 0.5}, "either"),
])
def test_bad_chain_files_are_refused(tmp_path: Path, stages: list, extra: dict, match: str) -> None:
    with pytest.raises(ThresholdsError, match=match) as err:
        load_thresholds(_chain_file(tmp_path, stages, **extra), task="vision", edge_levels=LEVELS)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_chain_default_and_command_line() -> None:
    store = ThresholdStore(task="vision", fingerprint=FP, edge_levels=LEVELS)
    assert [(s.edge_level, s.threshold) for s in store.current.chain] == [(8, 0.8), (2, 0.8)]
    config = config_from_args(build_parser().parse_args(
        ["--checkpoint", "x", "--edge-level", "8,2", "--cloud", "127.0.0.1:1"]))
    assert config.chain == LEVELS and config.edge().edge_level == 2  # the workers load the widest slice
    assert parse_levels("4") == (4,)
    for bad in ("2,8", "8,8", "a", "0"):
        with pytest.raises(ValueError, match="--edge-level"):
            parse_levels(bad)


def _synthetic(n: int, seed: int) -> Records:
    rng = np.random.default_rng(seed)
    conf = [{"max_softmax": rng.random(n)} for _ in LEVELS]
    correct = [rng.random(n) < 0.3 + 0.6 * c["max_softmax"] for c in conf]  # confidence predicts correctness
    return Records("vision", LEVELS, conf, correct, rng.random(n) < 0.95)


def test_joint_search_is_the_best_pair_at_the_target() -> None:
    rec, target = _synthetic(300, 0), 0.2
    points = chain_points(rec, "max_softmax")
    best = at_target(points, target)
    chosen = tuple(points.thresholds[best])
    stage = route(rec, "max_softmax", chosen)
    assert (stage == 2).mean() == pytest.approx(points.cloud_rate[best]) and points.cloud_rate[best] <= target
    assert answered_correct(rec, stage).mean() == pytest.approx(points.accuracy[best])
    # Brute force over the same first-stage grid and every last-stage threshold: nothing better at the target
    # among the rates closest to it for each first-stage threshold.
    grid = np.unique(points.thresholds[:, 0])
    last = np.unique(np.concatenate([rec.conf[1]["max_softmax"], [1.0]]))
    for t0 in grid:
        options = []
        for t1 in last:
            s = route(rec, "max_softmax", (t0, t1))
            if (s == 2).mean() <= target:
                options.append(((s == 2).mean(), answered_correct(rec, s).mean()))
        if options:
            top_rate = max(r for r, _ in options)
            acc = max(a for r, a in options if r == top_rate)
            assert acc <= points.accuracy[best] + 1e-12
    assert len(list(itertools.islice(grid, 3))) == 3


# ------------------------------------------------------------------ serving a chain


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory, ray_cluster):
    proc = cloud_process(VISION, tmp_path_factory.mktemp("chain"), "cloud-vision-chain").start()
    try:
        yield proc.wait_serving()
    finally:
        proc.kill()


def test_router_serves_a_chain_stage_by_stage(cloud, tmp_path: Path) -> None:
    from router.server import RouterConfig, RouterThread

    images = load_fashion_mnist("test-sample")[0][:64]
    model = load_model(VISION)
    with torch.inference_mode():
        probs = {k: model(normalize_images(images), mrl_level=k).softmax(-1).numpy() for k in LEVELS}
    t8 = separated_threshold(probs[8].max(-1), 0.5)
    doubt = probs[8].max(-1) < t8
    t2 = separated_threshold(probs[2].max(-1)[doubt], 0.4)
    expected = np.where(~doubt, 8, np.where(probs[2].max(-1) >= t2, 2, 1))  # 1 = the cloud (full width)
    assert {8, 2, 1} <= set(expected.tolist())
    path = tmp_path / "chain.json"
    path.write_text(json.dumps({"stages": [{"edge_level": 8, "measure": "max_softmax", "threshold": t8},
                                           {"edge_level": 2, "measure": "max_softmax", "threshold": t2}],
                                "checkpoint_fingerprint": model.fingerprint, "version": "chain-1",
                                "expected_escalation": {"rate": 0.5, "ci95": [0.45, 0.55]}}))
    config = RouterConfig(checkpoint=VISION, edge_level=8, edge_levels=LEVELS, cloud=(cloud.address,), port=0,
                          metrics_port=0, thresholds=path, deadline_ms=5000, health_interval_ms=200, grace_s=1.0,
                          max_batch=64)
    router = RouterThread(config)
    server = router.start()
    try:
        with EdgeClient(server.address) as client:
            answers = client.classify(images.numpy()[:, None])
            assert client.thresholds().version == "chain-1"
        levels = model.config.d_model // np.array([a.served.width for a in answers])
        tiers = np.array([a.tier for a in answers])
        np.testing.assert_array_equal(levels, expected)
        np.testing.assert_array_equal(tiers == "cloud", expected == 1)
        assert not any(a.degraded for a in answers)
        got = np.stack([a.probs for a in answers])
        for k in LEVELS:
            np.testing.assert_allclose(got[expected == k], probs[k][expected == k], atol=1e-4)
        thresholds = {8: t8, 2: t2, 1: t2}  # a cloud answer carries the last stage's judgement
        assert all(a.served.threshold == thresholds[k] for a, k in zip(answers, expected))
        metrics = scrape(server.metrics_port)
        rate = metrics[("router_escalation_rate", (("method", "Classify"),))]
        assert rate == pytest.approx((expected == 1).mean())
        assert metrics[("router_escalation_expected", (("bound", "rate"),))] == 0.5
        assert metrics[("router_cloud_calls_total", (("code", "OK"), ("replica", cloud.address)))] >= 1
    finally:
        router.stop()
