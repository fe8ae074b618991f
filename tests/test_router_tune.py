"""python -m router.tune on a tiny untrained vision checkpoint and the shipped test sample."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from matmamba.data import load_fashion_mnist, normalize_images
from matmamba.pretrained import load_model
from router.confidence import VISION, confidence
from router.thresholds import load_thresholds
from router.tune import (
    betainc,
    binomial_lower,
    binomial_upper,
    clopper_pearson,
    main,
    oracle_curve,
    tradeoff,
)

from .conftest import small_vision

LIMIT = 200


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    fingerprint = small_vision().save_pretrained(path)
    return path, fingerprint


def _args(checkpoint, out, plot, *extra):
    return ["--checkpoint", str(checkpoint), "--edge-level", "4", "--data", "fashion-mnist",
            "--target-escalation", "0.2", "--out", str(out), "--plot", str(plot), "--split", "test-sample",
            "--limit", str(LIMIT), *extra]


def test_tune_writes_a_file_the_router_loads(checkpoint, tmp_path, capsys):
    path, fingerprint = checkpoint
    out, plot = tmp_path / "thr.json", tmp_path / "curve.png"
    assert main(_args(path, out, plot)) == 0
    printed = capsys.readouterr()
    assert "cascade acc" in printed.out and "max_softmax" in printed.out
    assert "optimistic" in printed.err  # calibrating on test data is warned about

    thr = load_thresholds(out, task=VISION, fingerprint=fingerprint, edge_level=4)
    assert thr.checkpoint_fingerprint == fingerprint
    data = json.loads(out.read_text())
    assert data["n"] == LIMIT and data["calibration"]["split"] == "test-sample"
    rate = data["expected_escalation"]["rate"]
    assert rate <= 0.2
    lo, hi = data["expected_escalation"]["ci95"]
    assert lo <= rate <= hi

    # Escalation rate recomputed independently from the edge model's outputs.
    images, _ = load_fashion_mnist("test-sample")
    edge = load_model(path, mrl_level=4)
    with torch.inference_mode():
        probs = edge(normalize_images(images[:LIMIT]), mrl_level=4).float().softmax(-1).numpy()
    conf = confidence(thr.measure, probs)
    assert (conf < thr.threshold).mean() == pytest.approx(rate, abs=1e-12)
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_impossible_accuracy_drop_exits_3_and_writes_nothing(checkpoint, tmp_path, capsys):
    out, plot = tmp_path / "thr.json", tmp_path / "curve.png"
    assert main(_args(checkpoint[0], out, plot, "--max-accuracy-drop", "-1")) == 3
    assert "NO THRESHOLD QUALIFIES" in capsys.readouterr().err
    assert not out.exists() and not plot.exists()


def test_bad_target_escalation_is_refused(checkpoint, tmp_path, capsys):
    args = _args(checkpoint[0], tmp_path / "t.json", tmp_path / "c.png")
    args[args.index("--target-escalation") + 1] = "1.5"
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "--target-escalation must be a fraction in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_lm_data_is_not_implemented(checkpoint, tmp_path, capsys):
    args = _args(checkpoint[0], tmp_path / "t.json", tmp_path / "c.png")
    args[args.index("--data") + 1] = "austen"
    with pytest.raises(SystemExit):
        main(args)
    assert "not implemented yet" in capsys.readouterr().err


def test_binomial_bounds_known_values():
    # Closed forms: I_x(1, b) = 1 - (1 - x)^b and I_x(a, 1) = x^a.
    assert betainc(1, 7, 0.3) == pytest.approx(1 - 0.7**7, rel=1e-10)
    assert betainc(5, 1, 0.6) == pytest.approx(0.6**5, rel=1e-10)
    assert betainc(2.5, 3.5, 0.5) + betainc(3.5, 2.5, 0.5) == pytest.approx(1.0, abs=1e-12)
    # k = 0: upper = 1 - alpha^(1/n) ("rule of three" ~ 3/n); k = n: lower = alpha^(1/n).
    assert binomial_upper(0, 10, 0.05) == pytest.approx(1 - 0.05 ** (1 / 10), abs=1e-9)
    assert binomial_lower(10, 10, 0.05) == pytest.approx(0.05 ** (1 / 10), abs=1e-9)
    # Exact (Clopper-Pearson) 95 % interval of 5 / 100: [0.01643, 0.11284] (R binom.test).
    lo, hi = clopper_pearson(5, 100)
    assert lo == pytest.approx(0.01643, abs=5e-5) and hi == pytest.approx(0.11284, abs=5e-5)
    # The bound is the p at which P(X <= k) = alpha.
    k, n, alpha = 7, 50, 0.05
    p = binomial_upper(k, n, alpha)
    cdf = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
    assert cdf == pytest.approx(alpha, abs=1e-9)


def test_tradeoff_and_oracle():
    conf = np.array([0.9, 0.2, 0.5, 0.5, 0.7])
    edge = np.array([True, False, True, False, True])
    cloud = np.array([True, True, True, True, False])
    c = tradeoff(conf, edge, cloud)
    assert c.thresholds.tolist() == [0.2, 0.5, 0.7, 0.9]
    assert c.escalation.tolist() == [0.0, 0.2, 0.6, 0.8]
    assert c.accuracy.tolist() == pytest.approx([0.6, 0.8, 1.0, 0.8])
    rate, acc = oracle_curve(edge, cloud)
    assert acc[0] == pytest.approx(0.6) and acc[2] == pytest.approx(1.0) and acc[-1] == pytest.approx(0.8)
    assert rate[-1] == 1.0
