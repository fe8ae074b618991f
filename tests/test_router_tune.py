"""python -m router.tune: vision (shipped sample, labelled-image folders), chains, LM text, the drop guarantee."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from matmamba.data import load_fashion_mnist, normalize_images
from matmamba.data.fashion_mnist import FMNIST_CLASSES
from matmamba.data.tokenizer import ByteTokenizer
from matmamba.pretrained import load_model
from router.confidence import LM, VISION, confidence
from router.thresholds import load_thresholds
from router.tune import main
from router.tune_data import folder_slug
from router.tune_policy import drop_upper_bound, oracle_curve, oracle_rate_at, tradeoff
from router.tune_stats import betainc, binomial_lower, binomial_upper, clopper_pearson

from .conftest import small_lm, small_vision

REPO_ROOT = Path(__file__).resolve().parents[1]
VISION_CKPT = REPO_ROOT / "checkpoints" / "matmamba-vision-fmnist"
TEXT = REPO_ROOT / "data" / "austen-heldout.txt"
LIMIT = 200


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    fingerprint = small_vision().save_pretrained(path)
    return path, fingerprint


def _args(checkpoint, out, plot, *extra, levels="4"):
    return ["--checkpoint", str(checkpoint), "--edge-level", levels, "--data", "fashion-mnist",
            "--target-escalation", "0.2", "--out", str(out), "--plot", str(plot), "--split", "test-sample",
            "--limit", str(LIMIT), *extra]


def _edge_conf(path: Path, level: int, measure: str) -> np.ndarray:
    images, _ = load_fashion_mnist("test-sample")
    model = load_model(path)
    with torch.inference_mode():
        probs = model(normalize_images(images[:LIMIT]), mrl_level=level).float().softmax(-1).numpy()
    return confidence(measure, probs)


def test_tune_hits_the_target_within_its_band_and_the_router_loads_the_file(checkpoint, tmp_path, capsys):
    path, fingerprint = checkpoint
    out, plot = tmp_path / "thr.json", tmp_path / "curve.png"
    assert main(_args(path, out, plot)) == 0
    printed = capsys.readouterr()
    assert "cloud rate" in printed.out and "max_softmax" in printed.out
    assert "optimistic" in printed.err  # calibrating on test data is warned about

    thr = load_thresholds(out, task=VISION, fingerprint=fingerprint, edge_level=4)
    assert thr.checkpoint_fingerprint == fingerprint and thr.target_escalation == 0.2
    data = json.loads(out.read_text())
    assert data["n"] == LIMIT and data["calibration"]["split"] == "test-sample"
    rate = data["expected_escalation"]["rate"]
    lo, hi = data["expected_escalation"]["ci95"]
    assert lo <= 0.2 <= hi and lo <= rate <= hi and 0.2 - 2 / LIMIT <= rate <= 0.2  # the target, within its band
    assert thr.band == (rate, lo, hi)
    # Escalation rate recomputed independently from the edge model's outputs.
    conf = _edge_conf(path, 4, thr.measure)
    assert (conf < thr.threshold).mean() == pytest.approx(rate, abs=1e-12)
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_chain_is_tuned_jointly_and_written_with_stages(checkpoint, tmp_path):
    path, fingerprint = checkpoint
    out = tmp_path / "chain.json"
    assert main(_args(path, out, tmp_path / "chain.png", "--measure", "max_softmax", levels="8,2")) == 0
    thr = load_thresholds(out, task=VISION, fingerprint=fingerprint, edge_levels=(8, 2))
    assert [s.edge_level for s in thr.chain] == [8, 2] and all(s.measure == "max_softmax" for s in thr.chain)
    data = json.loads(out.read_text())
    c8, c2 = _edge_conf(path, 8, "max_softmax"), _edge_conf(path, 2, "max_softmax")
    to_cloud = (c8 < thr.chain[0].threshold) & (c2 < thr.chain[1].threshold)
    assert to_cloud.mean() == pytest.approx(data["expected_escalation"]["rate"])
    assert 0.2 - 2 / LIMIT <= to_cloud.mean() <= 0.2
    with pytest.raises(SystemExit) as exc:  # wide to narrow
        main(_args(path, tmp_path / "x.json", tmp_path / "x.png", levels="2,8"))
    assert exc.value.code == 2


def test_the_promised_drop_holds_on_a_separate_split(tmp_path):
    """Calibrate on the first 600 shipped test images; evaluate on the next 600, given as labelled PNG folders."""
    images, labels = load_fashion_mnist("test-sample")
    folders = tmp_path / "eval"
    for i in range(600, 1200):
        folder = folders / folder_slug(FMNIST_CLASSES[int(labels[i])])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].numpy()).save(folder / f"{i}.png")
    out, max_drop = tmp_path / "drop.json", 0.02
    args = ["--checkpoint", str(VISION_CKPT), "--edge-level", "4", "--data", "fashion-mnist:test-sample",
            "--limit", "600", "--eval-data", str(folders), "--target-escalation", "0.2", "--out", str(out),
            "--max-accuracy-drop", str(max_drop), "--delta", "0.05"]
    assert main(args) == 0
    data = json.loads(out.read_text())
    policy, evaluation = data["policy"], data["evaluation"]
    assert policy["rule"] == "max_accuracy_drop" and policy["verify_drop_upper_bound"] <= max_drop
    assert evaluation["n"] == 600 and evaluation["drop"] <= max_drop
    assert 0.0 < evaluation["cloud_rate"] < 1.0 and evaluation["cloud_flops_saved"] == 1 - evaluation["cloud_rate"]
    assert evaluation["oracle_rate_at_same_accuracy"] <= evaluation["cloud_rate"]


def test_image_folders_must_name_classes(tmp_path, capsys):
    (tmp_path / "imgs" / "spaceship").mkdir(parents=True)
    args = ["--checkpoint", str(VISION_CKPT), "--edge-level", "4", "--data", str(tmp_path / "imgs"),
            "--target-escalation", "0.2", "--out", str(tmp_path / "t.json")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "'spaceship'" in err and "t-shirt-top" in err
    assert not (tmp_path / "t.json").exists()


def test_lm_tuning_on_a_text_file_measures_agreement_with_the_cloud(tmp_path):
    tok = ByteTokenizer()
    path = tmp_path / "lm"
    fingerprint = small_lm(vocab_size=tok.vocab_size).save_pretrained(path, tokenizer=tok)
    out = tmp_path / "lm.json"
    args = ["--checkpoint", str(path), "--edge-level", "4", "--data", str(TEXT), "--target-escalation", "0.3",
            "--out", str(out), "--plot", str(tmp_path / "lm.png"), "--limit", "48", "--context-tokens", "16",
            "--segment-tokens", "4", "--stride", "40"]
    assert main(args) == 0
    thr = load_thresholds(out, task=LM, fingerprint=fingerprint, edge_level=4)
    assert thr.measure in ("mean_token_logprob", "min_token_prob")
    data = json.loads(out.read_text())
    assert data["expected_accuracy"]["meaning"] == "agreement" and data["n"] == 48
    # Edge "correct" = its greedy 4-token segment equals the full model's, recomputed here.
    model = load_model(path)
    ids = np.asarray(tok.encode(TEXT.read_text(encoding="utf-8")))
    contexts = torch.from_numpy(np.stack([ids[s:s + 16] for s in range(0, 48 * 40, 40)]))
    edge = model.generate(contexts, 4, mrl_level=4, temperature=0.0)[:, 16:]
    cloud = model.generate(contexts, 4, temperature=0.0)[:, 16:]
    assert data["expected_accuracy"]["edge_only"] == [pytest.approx((edge == cloud).all(-1).float().mean().item())]
    assert data["expected_accuracy"]["cloud_only"] == 1.0


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


def test_drop_bound_covers_the_true_drop():
    # True drop 0.01: P(cascade worse) = 0.03, P(better) = 0.02. Over 200 draws of n = 2000 the 90 % bound
    # must cover it in about 90 % of them or more (it is conservative).
    rng, covered = np.random.default_rng(1), 0
    for _ in range(200):
        u = rng.random(2000)
        cloud = np.ones(2000, dtype=bool)
        cascade = u >= 0.03
        cloud[u > 0.98] = False  # the cloud wrong, the cascade right
        bound, worse, better = drop_upper_bound(cloud, cascade, 0.1)
        covered += bound >= 0.01
    assert covered >= 180


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
    assert oracle_rate_at(0.8, edge, cloud) == pytest.approx(0.2) and oracle_rate_at(1.1, edge, cloud) == 1.0
