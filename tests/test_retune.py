"""Re-tuning from the traffic log (router/retune.py) on synthetic logs drawn from a known distribution.

The logs are written by the router's own writer and record builders (TrafficLog, request_record,
shadow_record); only the traffic is synthetic. An item's edge confidence c = max_softmax is drawn
from a Beta distribution, and the cloud agrees with the edge's top-1 with probability c, so the
true agreement of any policy is known in closed form (by a large Monte Carlo sample here).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest

from proto import matmamba_pb2 as pb
from router import retune
from router.monitor import expected_band, wilson
from router.shadow import shadow_record
from router.thresholds import Stage, Thresholds, load_thresholds
from router.traffic_log import LogSettings, Observed, TrafficLog, request_record
from router.tune import main as tune_main

FINGERPRINT = "ab" * 32
CLASSES = 10
EASY, HARD = (8.0, 2.0), (3.0, 2.0)  # Beta(a, b) of the edge confidence before / after the shift


def _probs(c: np.ndarray) -> np.ndarray:
    """(N, 10) edge probabilities with max_softmax c on class 0 and the rest spread evenly."""
    p = np.repeat(((1 - c) / (CLASSES - 1))[:, None], CLASSES, axis=1)
    p[:, 0] = c
    return p


def write_traffic(log: TrafficLog, rng: np.random.Generator, n: int, beta: tuple[float, float], policy: Thresholds,
                  shadow_rate: float, t0: float, start: int = 0, gamma: float = 1.0) -> None:
    """n one-item Classify requests as a router with ``policy`` and ``shadow_rate`` would log them.

    The cloud agrees with the edge with probability c ** gamma (gamma > 1: an overconfident edge).
    """
    c = np.clip(rng.beta(*beta, size=n), 0.11, 0.999)
    agree = rng.random(n) < c ** gamma
    for i in range(n):
        edge = _probs(c[i:i + 1])
        cloud = edge[:, ::-1].copy() if not agree[i] else edge.copy()  # top-1 class 9 when the cloud disagrees
        escalated = c[i:i + 1] < policy.threshold
        served = [pb.ServedBy(tier=pb.CLOUD if escalated[0] else pb.EDGE, edge_ms=5.0, cloud_ms=20.0 * escalated[0])]
        answer = cloud if escalated[0] else edge
        obs = Observed("Classify", f"r{start + i}", time.monotonic(), policy, edge, edge, answer,
                       np.zeros((1, 1, 28, 28), np.uint8), escalated, served)
        shadowed = not escalated[0] and rng.random() < shadow_rate
        key = f"k{start + i}"
        record = request_record(obs, key=key, task="vision", fingerprint=FINGERPRINT, edge_level=4,
                                shadow_rate=shadow_rate, shadow={0: "sent"} if shadowed else {}, max_input_bytes=None)
        record["t"] = t0 + i
        log.submit(record)
        if shadowed:
            log.submit(shadow_record(obs, np.array([0]), key, shadow_rate, cloud=cloud))


def true_values(beta: tuple[float, float], threshold: float, gamma: float = 1.0,
                n: int = 2_000_000) -> tuple[float, float, float]:
    """(escalation rate, agreement on kept items, cascade agreement) of ``threshold`` under Beta(beta)."""
    c = np.clip(np.random.default_rng(99).beta(*beta, size=n), 0.11, 0.999)
    kept, agree = c >= threshold, c ** gamma
    return 1 - kept.mean(), agree[kept].mean(), 1 - (kept * (1 - agree)).mean()


def _policy(threshold: float, version: str = "v1") -> Thresholds:
    return Thresholds("max_softmax", threshold, version, target_escalation=0.2, edge_level=4,
                      checkpoint_fingerprint=FINGERPRINT)


def _log(path: Path) -> TrafficLog:
    return TrafficLog(LogSettings(path)).start()


def test_estimates_cover_the_truth_and_weight_shadows_by_one_over_p(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    t0 = float(np.quantile(np.random.default_rng(1).beta(*EASY, 100_000), 0.2))  # ~20 % escalated
    log = _log(tmp_path)
    # Easy traffic shadowed at p = 0.5, then harder traffic (an overconfident edge) at p = 0.05:
    # unweighted, the easy samples would dominate the estimate.
    write_traffic(log, rng, 3000, EASY, _policy(t0), 0.5, t0=1000.0)
    write_traffic(log, rng, 3000, HARD, _policy(t0), 0.05, t0=5000.0, start=3000, gamma=4.0)
    log.close()
    items = retune.load_items(tmp_path)
    assert items.n == 6000 and set(items.conf) == {"max_softmax", "margin", "neg_entropy"}
    (esc_e, kept_e, _), (esc_h, kept_h, _) = true_values(EASY, t0), true_values(HARD, t0, 4.0)
    share_e = (1 - esc_e) / ((1 - esc_e) + (1 - esc_h))
    truth = share_e * kept_e + (1 - share_e) * kept_h
    estimate, low, high, samples = retune.kept_agreement(items)
    shadows = ~items.escalated & (items.source == retune.SHADOW)
    unweighted = items.agree[shadows].mean()
    assert low <= truth <= high and abs(estimate - truth) < abs(unweighted - truth)
    assert samples == int(shadows.sum()) and samples > 500
    # Cascade agreement of the policy in force, and of other thresholds, against the truth.
    for threshold in (t0, 0.5, 0.9):
        agreement, se = retune.cascade_agreement(items, "max_softmax", np.array([threshold]))
        kept_truth = 0.5 * (true_values(EASY, threshold)[2] + true_values(HARD, threshold, 4.0)[2])
        assert abs(agreement[0] - kept_truth) <= 1.96 * se[0] + 0.002, threshold


def test_without_shadows_only_the_escalation_side_is_known(tmp_path: Path) -> None:
    log = _log(tmp_path)
    write_traffic(log, np.random.default_rng(2), 500, EASY, _policy(0.8), 0.0, t0=0.0)
    log.close()
    items = retune.load_items(tmp_path)
    assert retune.kept_agreement(items) is None
    agreement, _ = retune.cascade_agreement(items, "max_softmax", np.array([0.0, 0.8, 1.01]))
    assert np.isnan(agreement[0]) and np.isnan(agreement[1])  # these keep items nobody checked
    assert agreement[2] == 1.0  # everything escalated: the cascade is the cloud


def test_retune_after_a_shift_moves_the_threshold_down_and_restores_the_rate(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(3)
    t0 = float(np.quantile(np.random.default_rng(1).beta(*EASY, 100_000), 0.2))
    directory, out = tmp_path / "log", tmp_path / "thresholds.json"
    log = _log(directory)
    write_traffic(log, rng, 2000, EASY, _policy(t0), 0.1, t0=1000.0)
    write_traffic(log, rng, 4000, HARD, _policy(t0), 0.1, t0=10_000.0, start=2000)  # the shift
    log.close()
    assert true_values(HARD, t0)[0] > 0.5  # after the shift far more than the 20 % target escalates
    code = tune_main(["--from-log", str(directory), "--since", "10000", "--apply", "--out", str(out),
                      "--plot", str(tmp_path / "curve.png")])
    assert code == 0
    text = capsys.readouterr().out
    assert "target 20.00% is OUTSIDE" in text and "(down from" in text
    new = load_thresholds(out, task="vision", fingerprint=FINGERPRINT, edge_level=4)
    assert new.measure == "max_softmax" and new.threshold < t0 and new.target_escalation == 0.2
    data = json.loads(out.read_text())
    assert data["traffic_log"]["items"] == 4000 and data["traffic_log"]["previous"]["threshold"] == t0
    assert (tmp_path / "curve.png").stat().st_size > 10_000
    # Fresh post-shift traffic under the new threshold: its rate's interval meets the band (no DRIFT).
    rate, band_low, band_high = expected_band(out)
    assert band_low <= 0.2 <= band_high + 1e-9 and rate <= 0.2
    c = np.clip(np.random.default_rng(4).beta(*HARD, size=4000), 0.11, 0.999)
    k = int((c < new.threshold).sum())
    low, high = wilson(k, c.size)
    assert high >= band_low and low <= band_high
    assert abs(k / c.size - 0.2) < 0.025
    # The re-estimated agreement of the new point against the truth.
    agreement = data["expected_agreement"]
    assert agreement["ci95"][0] - 0.01 <= true_values(HARD, new.threshold)[2] <= agreement["ci95"][1] + 0.01


def test_report_only_and_bad_arguments(tmp_path: Path, capsys) -> None:
    log = _log(tmp_path / "log")
    write_traffic(log, np.random.default_rng(5), 300, EASY, _policy(0.8), 0.2, t0=0.0)
    log.close()
    assert tune_main(["--from-log", str(tmp_path / "log"), "--last", "100"]) == 0
    text = capsys.readouterr().out
    assert "window: 100 items" in text and "agreement on kept items" in text and "not applied" in text
    for argv, message in ((["--apply"], "go together"), (["--target-escalation", "2"], "fraction"),
                          (["--measure", "mean_token_logprob"], "not a measure of this log")):
        with pytest.raises(SystemExit) as exit_:
            tune_main(["--from-log", str(tmp_path / "log"), *argv])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tune_main(["--from-log", str(tmp_path / "empty")])
    assert "no traffic-NNNNNN.msgpack files" in capsys.readouterr().err


def test_a_chain_routers_log_is_refused_with_what_to_do(tmp_path: Path, capsys) -> None:
    chain = dataclasses.replace(_policy(0.8), stages=(Stage(8, "max_softmax", 0.9), Stage(4, "max_softmax", 0.8)))
    log = _log(tmp_path / "log")
    write_traffic(log, np.random.default_rng(6), 50, EASY, chain, 0.0, t0=0.0)
    log.close()
    with pytest.raises(SystemExit) as exit_:
        tune_main(["--from-log", str(tmp_path / "log"), "--target-escalation", "0.2"])
    assert exit_.value.code == 2
    assert "chain router (--edge-level 8,4)" in capsys.readouterr().err
