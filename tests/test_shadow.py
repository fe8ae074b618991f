"""Shadow escalation pieces without a cloud: sampling, admission, LM records, metrics and the monitor's rows."""

from __future__ import annotations

import time

import numpy as np
import pytest
from prometheus_client import generate_latest

from proto import matmamba_pb2 as pb
from proto.tensors import to_tensor_msg
from router.escalation import ReplicaPool
from router.metrics import RouterMetrics
from router.monitor import parse, render, shadow_rows
from router.shadow import ShadowSender, ShadowSettings, _cloud_dist, shadow_record
from router.thresholds import Thresholds
from router.traffic_log import Observed, next_token_probs, request_record


def _sender(rate: float, seed: int = 0) -> ShadowSender:
    pool = ReplicaPool([], fingerprint="ab" * 32, task=pb.VISION)  # no replica: none is ever eligible
    return ShadowSender(ShadowSettings(rate=rate, max_inflight=2, seed=seed), pool, RouterMetrics(), None)


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="--shadow-rate"):
        ShadowSettings(rate=1.5)
    with pytest.raises(ValueError, match="--shadow-max-inflight"):
        ShadowSettings(rate=0.1, max_inflight=0)


def test_only_kept_items_are_sampled_at_the_rate() -> None:
    sender = _sender(0.3)
    kept = np.arange(20_000) % 4 != 0  # every fourth item escalated
    rows = sender.pick(kept)
    assert kept[rows].all()
    assert abs(rows.size / kept.sum() - 0.3) < 0.015
    assert _sender(0.0).pick(kept).size == 0


def test_a_shadow_without_an_eligible_replica_is_dropped_not_queued() -> None:
    sender = _sender(1.0)
    assert not sender.admit("Classify") and sender.inflight == 0
    text = generate_latest(sender.metrics.registry).decode()
    assert 'router_shadow_total{method="Classify",outcome="dropped"} 1.0' in text


def _lm_observed() -> Observed:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 50))  # (N, L, V)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tokens = rng.integers(0, 50, size=(3, 5))
    token_lp = np.take_along_axis(logprobs[:, :-1], tokens[:, 1:, None], -1)[..., 0]  # (N, L-1)
    policy = Thresholds("mean_token_logprob", -4.0, "lm-1")
    escalated = token_lp.mean(-1) < -4.0
    served = [pb.ServedBy(tier=pb.CLOUD if e else pb.EDGE, edge_ms=3.0) for e in escalated]
    dist = next_token_probs(logprobs)
    return Observed("Score", "s-1", time.monotonic(), policy, token_lp, dist, dist, tokens, escalated, served)


def test_score_records_hold_every_lm_measure_and_the_next_token_answer() -> None:
    obs = _lm_observed()
    record = request_record(obs, key="b-0", task="lm", fingerprint="cd" * 32, edge_level=4, shadow_rate=0.1,
                            shadow={1: "sent"}, max_input_bytes=1 << 16)
    assert record["kind"] == "request" and record["method"] == "Score" and record["task"] == "lm"
    item = record["items"][1]
    assert set(item["conf"]) == {"mean_token_logprob", "min_token_prob"}
    assert item["conf"]["mean_token_logprob"] == pytest.approx(obs.conf_values[1].mean())
    assert item["edge"][0][0] == int(obs.edge[1].argmax()) and item["shadow"] == "sent"
    assert np.array_equal(np.frombuffer(record["input"]["data"], record["input"]["dtype"]).reshape(3, 5), obs.inputs)
    assert request_record(obs, key="b-1", task="lm", fingerprint="cd" * 32, edge_level=4, shadow_rate=0.0, shadow={},
                          max_input_bytes=None).get("input") is None


def test_score_shadow_answers_are_compared_on_the_next_token() -> None:
    obs = _lm_observed()
    cloud_lp = np.log(obs.edge[[0, 2]])[:, None, :].astype(np.float32).copy()  # (2, 1, V): last_only reply
    cloud_lp[1, 0, :] = cloud_lp[1, 0, ::-1]  # the second disagrees
    reply = pb.ScoreReply(logprobs=to_tensor_msg(cloud_lp))
    cloud = _cloud_dist("Score", reply, 2)
    record = shadow_record(obs, np.array([0, 2]), "b-0", 0.1, cloud=cloud)
    assert record["agree"] == [True, obs.edge[2].argmax() == obs.edge[2].argmin()]
    assert record["items"] == [0, 2] and record["cloud"][0][0][0] == int(obs.edge[0].argmax())


def test_monitor_shows_the_live_agreement_with_its_interval() -> None:
    metrics = RouterMetrics()
    metrics.shadow.labels(method="Classify", outcome="sent").inc(50)
    metrics.shadow.labels(method="Classify", outcome="answered").inc(50)
    metrics.shadow.labels(method="Classify", outcome="dropped").inc(7)
    metrics.record_shadow("Classify", np.arange(50) % 10 != 0)  # 45 of 50 agree
    snap = parse(generate_latest(metrics.registry).decode())
    assert snap.shadow["compared"] == 50 and snap.shadow["agreed"] == 45 and snap.shadow["window_n"] == 50
    rows = dict(shadow_rows(snap, None))
    assert rows["shadow escalations"] == "50 answered, 7 dropped under load, 0 failed"
    assert rows["edge/cloud agreement on kept items, all time"].startswith("90.00%  (95% 78.64% - 95.65%, n=50)")
    assert "edge/cloud agreement, router window" in rows
    render(snap, None, None)  # the table builds
    assert shadow_rows(parse(generate_latest(RouterMetrics().registry).decode()), None) == []


def test_monitor_judges_the_last_reading_as_well_as_all_time() -> None:
    from rich.console import Console

    from router.monitor import Snapshot

    band = (0.2, 0.17, 0.23)
    previous = Snapshot({"edge": 400, "cloud": 600}, 600, 0.0, 0.0, {})  # 60 % escalated: the shift
    now = Snapshot({"edge": 1200, "cloud": 800}, 800, 0.0, 0.0, {})  # the last 1,000 items: 20 %
    console = Console(record=True, width=120)
    console.print(render(now, previous, band))
    text = console.export_text()
    assert "DRIFT" in text.split("status, since last reading")[0]
    assert "within band" in text.split("status, since last reading")[1]
