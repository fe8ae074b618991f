"""Tune the router's confidence threshold on calibration data: ``python -m router.tune``.

    python -m router.tune --checkpoint checkpoints/matmamba-vision-fmnist --edge-level 4 \\
        --data fashion-mnist --target-escalation 0.2 --out thresholds.json --plot curve.png \\
        [--measure max_softmax] [--max-accuracy-drop 0.005 --delta 0.05] [--limit N] [--device cpu]

Vision (Fashion-MNIST) only in this version. The edge submodel (``load_model(dir, mrl_level=k)``)
and the full model run over the calibration images (the "val" split when the full set is
installed, else the shipped "test-sample"; ``--split`` forces one). Per image it records the
edge model's confidence under every vision measure of router/confidence.py, whether edge and
cloud are correct, and whether they agree. For each measure and each candidate threshold (the
sorted unique confidences; an item is escalated when ``confidence < threshold``) it computes the
escalation rate and the cascade accuracy (escalated -> cloud answer, kept -> edge answer).

Operating point:
- ``--target-escalation R``: for ``--measure`` (default: the measure with the best cascade
  accuracy at rate R), the threshold whose escalation rate is closest to R without exceeding it.
- ``--max-accuracy-drop D``: the calibration set is split in two halves (fixed seed). On the
  first half, the lowest-escalation threshold whose drop (cloud-only accuracy minus cascade
  accuracy) is <= D is picked. On the held-out half, the drop is bounded by the
  disagreement-induced error, the fraction of items that are kept at the edge while the edge is
  wrong and the cloud right (the drop can never exceed it); its one-sided Clopper-Pearson upper
  bound at level 1 - delta must be <= D. Otherwise nothing is written and the exit status is 3.

The file written is the router's thresholds format (router/thresholds.py, validated with its
parser before writing) plus report keys the router ignores: the expected escalation rate with a
95 % Clopper-Pearson interval, the expected accuracies, the calibration data, n and the date.
Exit status: 0 written, 2 bad arguments, 3 no threshold meets --max-accuracy-drop.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge.calibration import Curve, tradeoff

from .confidence import MEASURES, VISION
from .thresholds import Thresholds, ThresholdsError, parse_thresholds

BATCH = 250
SPLIT_SEED = 0
EXIT_NO_THRESHOLD = 3
VISION_MEASURES = [m.name for m in MEASURES.values() if m.task == VISION]


# ------------------------------------------------------------------ binomial bounds (no scipy)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0, x in [0, 1] (via math.lgamma)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _beta_quantile(q: float, a: float, b: float) -> float:
    """x with I_x(a, b) = q, by bisection (I_x is increasing in x)."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13:
            break
    return (lo + hi) / 2


def binomial_upper(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson upper bound: P(p <= bound) >= 1 - alpha for k successes in n trials."""
    if not 0 <= k <= n or n <= 0:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    return 1.0 if k == n else _beta_quantile(1.0 - alpha, k + 1, n - k)


def binomial_lower(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson lower bound at level 1 - alpha."""
    if not 0 <= k <= n or n <= 0:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    return 0.0 if k == 0 else _beta_quantile(alpha, k, n - k + 1)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided Clopper-Pearson (exact binomial) interval at ``level`` for k successes in n trials."""
    alpha = 1.0 - level
    return binomial_lower(k, n, alpha / 2), binomial_upper(k, n, alpha / 2)


# ------------------------------------------------------------------ per-image records


@dataclass
class Records:
    """Per calibration image: confidences (one array per measure), correctness and agreement."""

    conf: dict[str, np.ndarray]  # measure -> (N,) float64
    edge_correct: np.ndarray  # (N,) bool
    cloud_correct: np.ndarray  # (N,) bool
    agree: np.ndarray  # (N,) bool: edge and cloud predict the same class

    @property
    def n(self) -> int:
        return int(self.edge_correct.shape[0])

    def subset(self, idx: np.ndarray) -> Records:
        return Records({k: v[idx] for k, v in self.conf.items()}, self.edge_correct[idx], self.cloud_correct[idx],
                       self.agree[idx])


@torch.inference_mode()
def predict_probs(model, images: torch.Tensor, device: torch.device, mrl_level: int | None,
                  desc: str) -> np.ndarray:
    """Softmax probabilities (N, C) float32, in batches of 250 (as the edge worker computes them)."""
    from tqdm import tqdm

    from matmamba.data import normalize_images

    out = []
    for start in tqdm(range(0, images.shape[0], BATCH), desc=desc, unit="batch", file=sys.stderr):
        x = normalize_images(images[start:start + BATCH]).to(device)
        logits = model(x, mrl_level=mrl_level) if mrl_level else model(x)
        out.append(logits.float().softmax(-1).cpu().numpy())
    return np.concatenate(out)


def build_records(edge_probs: np.ndarray, cloud_probs: np.ndarray, labels: np.ndarray) -> Records:
    from .confidence import confidence

    edge_pred, cloud_pred = edge_probs.argmax(-1), cloud_probs.argmax(-1)
    conf = {name: confidence(name, edge_probs) for name in VISION_MEASURES}
    return Records(conf, edge_pred == labels, cloud_pred == labels, edge_pred == cloud_pred)


# ------------------------------------------------------------------ trade-off curves


def oracle_curve(edge_correct: np.ndarray, cloud_correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Escalate the edge's mistakes first (those the cloud gets right first), then the rest."""
    n = edge_correct.shape[0]
    # Order: edge wrong & cloud right, edge wrong & cloud wrong, edge right & cloud right, edge right & cloud wrong.
    key = np.where(~edge_correct, np.where(cloud_correct, 0, 1), np.where(cloud_correct, 2, 3))
    order = np.argsort(key, kind="stable")
    gain = np.concatenate([[0], np.cumsum(cloud_correct[order].astype(np.int64) - edge_correct[order])])
    return np.arange(n + 1) / n, (edge_correct.sum() + gain) / n


def operating_index(curve: Curve, target: float) -> int:
    """Index of the threshold whose escalation rate is closest to ``target`` without exceeding it."""
    ok = np.nonzero(curve.escalation <= target + 1e-12)[0]
    return int(ok[-1])  # escalation[0] == 0 (threshold = the smallest confidence), so ok is never empty


# ------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m router.tune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (the one the router serves)")
    p.add_argument("--edge-level", type=int, required=True, help="edge nesting level (width d_model / K)")
    p.add_argument("--data", required=True, help='calibration data: "fashion-mnist" (LM/text: not implemented yet)')
    p.add_argument("--target-escalation", type=float, required=True, help="wanted escalation rate, in [0, 1]")
    p.add_argument("--out", required=True, help="thresholds file to write")
    p.add_argument("--plot", help="PNG of the trade-off curves")
    p.add_argument("--measure", choices=VISION_MEASURES,
                   help="confidence measure (default: best cascade accuracy at the target rate)")
    p.add_argument("--max-accuracy-drop", type=float,
                   help="pick the lowest escalation whose accuracy drop vs cloud-only is <= D (verified, see above)")
    p.add_argument("--delta", type=float, default=0.05, help="failure probability of the verification (default 0.05)")
    p.add_argument("--split", choices=["auto", "val", "test-sample"], default="auto",
                   help='calibration split (default: "val" when the full set is installed, else "test-sample")')
    p.add_argument("--limit", type=int, help="use only the first N calibration images")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.data != "fashion-mnist":
        p.error(f"--data {args.data!r}: only vision tuning on fashion-mnist is implemented in this version; "
                "LM/text tuning is not implemented yet")
    if not (math.isfinite(args.target_escalation) and 0.0 <= args.target_escalation <= 1.0):
        p.error(f"--target-escalation must be a fraction in [0, 1] (e.g. 0.2 for 20 %), got {args.target_escalation}")
    if args.max_accuracy_drop is not None and not math.isfinite(args.max_accuracy_drop):
        p.error(f"--max-accuracy-drop must be a finite number, got {args.max_accuracy_drop}")
    if not 0.0 < args.delta < 1.0:
        p.error(f"--delta must be in (0, 1), got {args.delta}")
    if args.limit is not None and args.limit < 2:
        p.error(f"--limit must be at least 2, got {args.limit}")
    if args.edge_level < 1:
        p.error(f"--edge-level must be a positive integer, got {args.edge_level}")


def _calibration(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, str]:
    from matmamba.data import has_full_fashion_mnist, load_fashion_mnist

    split = args.split if args.split != "auto" else ("val" if has_full_fashion_mnist() else "test-sample")
    images, labels = load_fashion_mnist(split)
    if args.limit is not None:
        images, labels = images[:args.limit], labels[:args.limit]
    return images, labels, split


def _pick_by_drop(rec: Records, measure: str, max_drop: float, delta: float) -> tuple[float | None, dict[str, Any]]:
    """Threshold chosen on one half and verified on the other (see the module docstring), or None."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(rec.n)
    half = rec.n // 2
    pick, check = rec.subset(perm[:half]), rec.subset(perm[half:])
    curve = tradeoff(pick.conf[measure], pick.edge_correct, pick.cloud_correct, measure)
    cloud_acc = pick.cloud_correct.mean()
    ok = np.nonzero(cloud_acc - curve.accuracy <= max_drop)[0]
    report: dict[str, Any] = {"max_accuracy_drop": max_drop, "delta": delta, "split_seed": SPLIT_SEED,
                              "n_select": pick.n, "n_verify": check.n}
    if ok.size == 0:
        report["failure"] = (f"no threshold of {measure} keeps the accuracy drop <= {max_drop} on the selection half "
                             f"(best drop {cloud_acc - curve.accuracy.max():.4f}, at full escalation "
                             f"the cascade equals cloud-only)")
        return None, report
    threshold = float(curve.thresholds[ok[0]])
    kept = ~(check.conf[measure] < threshold)
    k = int((kept & ~check.edge_correct & check.cloud_correct).sum())
    bound = binomial_upper(k, check.n, delta)
    drop = float(check.cloud_correct.mean() - np.where(kept, check.edge_correct, check.cloud_correct).mean())
    report.update(threshold_from_selection=threshold, selection_escalation=float(curve.escalation[ok[0]]),
                  selection_drop=float(cloud_acc - curve.accuracy[ok[0]]), verify_drop=drop,
                  verify_disagreement_errors=k, verify_drop_upper_bound=bound)
    if bound > max_drop:
        report["failure"] = (f"threshold {threshold:.6g} of {measure} met the drop on the selection half, but on the "
                             f"held-out half the {1 - delta:.0%} upper bound of the disagreement-induced error is "
                             f"{bound:.4f} > {max_drop} ({k} of {check.n} kept items wrong at the edge, right "
                             "in the cloud); use more calibration data, a larger D or a larger --delta")
        return None, report
    return threshold, report


def _plot(path: str, curves: dict[str, Curve], rec: Records, chosen: tuple[str, float, float], full_flops: int,
          title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edge_acc, cloud_acc = rec.edge_correct.mean(), rec.cloud_correct.mean()
    o_rate, o_acc = oracle_curve(rec.edge_correct, rec.cloud_correct)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, scale, xlabel in ((axes[0], 1.0, "escalation rate"),
                              (axes[1], full_flops / 1e6, "cloud MFLOPs per image (escalation rate x full model)")):
        for name, curve in curves.items():
            ax.plot(curve.escalation * scale, curve.accuracy, label=name, lw=1.4)
        ax.plot(o_rate * scale, o_acc, "k--", lw=1, label="oracle router")
        ax.plot([0, scale], [edge_acc, cloud_acc], ":", color="gray", lw=1.2, label="random escalation")
        measure, rate, acc = chosen
        ax.plot([rate * scale], [acc], "r*", ms=14, label=f"chosen ({measure})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("cascade accuracy")
        ax.grid(alpha=0.3)
        lo = min(edge_acc, cloud_acc, min(c.accuracy.min() for c in curves.values()))
        ax.set_ylim(lo - 0.01, max(o_acc.max(), cloud_acc) + 0.01)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--from-log" or a.startswith("--from-log=") for a in argv):  # re-tuning from the traffic log
        from .retune import main as retune_main

        return retune_main(argv)
    p = _parser()
    args = p.parse_args(argv)
    _check_args(p, args)

    from matmamba.flops import count_flops, vision_tokens
    from matmamba.pretrained import load_model

    device = torch.device(args.device)
    images, labels, split = _calibration(args)
    n = int(labels.shape[0])
    source = f"fashion-mnist {split!r}, first {n} images" if args.limit else f"fashion-mnist {split!r}, {n} images"
    print(f"calibration data: {source}")
    if split.startswith("test"):
        print(f"WARNING: calibrating on the {split!r} split (test data; the full Fashion-MNIST set is not installed or "
              "--split chose it): accuracy measured later on these test images will be optimistic.",
              file=sys.stderr)

    edge = load_model(args.checkpoint, mrl_level=args.edge_level, device=device)
    full = load_model(args.checkpoint, device=device)
    if getattr(edge.config, "model_type", "") != getattr(full.config, "model_type", "") or not hasattr(
            full.config, "n_classes"):
        print(f"error: {args.checkpoint} is not a vision checkpoint; LM/text tuning is not implemented yet",
              file=sys.stderr)
        return 2
    fingerprint = full.fingerprint or ""
    edge_probs = predict_probs(edge, images, device, args.edge_level, f"edge (level {args.edge_level})")
    cloud_probs = predict_probs(full, images, device, None, "cloud (full width)")
    rec = build_records(edge_probs, cloud_probs, labels.numpy())

    cfg = full.config
    tokens = vision_tokens(cfg)
    full_flops = count_flops(cfg, [cfg.d_model] * cfg.n_layer, tokens)
    edge_flops = count_flops(cfg, [cfg.block.width_for_level(args.edge_level)] * cfg.n_layer, tokens)
    edge_acc, cloud_acc = float(rec.edge_correct.mean()), float(rec.cloud_correct.mean())
    target = args.target_escalation

    curves = {m: tradeoff(rec.conf[m], rec.edge_correct, rec.cloud_correct, m) for m in VISION_MEASURES}
    at_target = {m: operating_index(c, target) for m, c in curves.items()}
    measure = args.measure or max(VISION_MEASURES, key=lambda m: curves[m].accuracy[at_target[m]])

    print(f"\nn = {n}; edge agrees with cloud on {rec.agree.mean():.2%}; FLOPs per image: "
          f"edge {edge_flops / 1e6:.2f} M, cloud {full_flops / 1e6:.2f} M")
    print(f"operating points at target escalation {target:g} (closest rate not above it):")
    header = f"{'measure':<14}{'threshold':>12}{'escalation':>12}{'cascade acc':>13}{'edge-only':>11}{'cloud-only':>12}"
    print(header)
    print("-" * len(header))
    for m, c in curves.items():
        i = at_target[m]
        mark = "  <- chosen" if m == measure and args.max_accuracy_drop is None else ""
        print(f"{m:<14}{c.thresholds[i]:>12.6g}{c.escalation[i]:>12.2%}{c.accuracy[i]:>13.2%}{edge_acc:>11.2%}"
              f"{cloud_acc:>12.2%}{mark}")

    policy: dict[str, Any] = {"rule": "target_escalation", "target_escalation": target}
    if args.max_accuracy_drop is not None:
        threshold, report = _pick_by_drop(rec, measure, args.max_accuracy_drop, args.delta)
        if threshold is None:
            print(f"\nNO THRESHOLD QUALIFIES for --max-accuracy-drop {args.max_accuracy_drop}: {report['failure']}. "
                  f"Nothing written to {args.out}.", file=sys.stderr)
            return EXIT_NO_THRESHOLD
        policy = {"rule": "max_accuracy_drop", **report}
        print(f"\n--max-accuracy-drop {args.max_accuracy_drop}: {measure} >= {threshold:.6g} (held-out drop "
              f"{report['verify_drop']:.4f}, {1 - args.delta:.0%} upper bound {report['verify_drop_upper_bound']:.4f})")
    else:
        threshold = float(curves[measure].thresholds[at_target[measure]])

    escalated = rec.conf[measure] < threshold
    k = int(escalated.sum())
    rate = k / n
    lo, hi = clopper_pearson(k, n, 0.95)
    accuracy = float(np.where(escalated, rec.cloud_correct, rec.edge_correct).mean())
    print(f"\nchosen: {measure} >= {threshold:.6g}: escalation {rate:.2%} (95 % interval {lo:.2%} - {hi:.2%}), "
          f"cascade accuracy {accuracy:.2%} (edge-only {edge_acc:.2%}, cloud-only {cloud_acc:.2%}), "
          f"cloud {rate * full_flops / 1e6:.2f} MFLOPs per image")

    now = dt.datetime.now(dt.UTC)
    version = f"tune-{now:%Y-%m-%dT%H:%M:%SZ}-{measure}-{threshold:.6g}"
    # Under --max-accuracy-drop the threshold was not chosen for --target-escalation: record the rate it gives.
    tuned_for = target if args.max_accuracy_drop is None else rate
    thr = Thresholds(measure, threshold, version, target_escalation=tuned_for, edge_level=args.edge_level,
                     checkpoint_fingerprint=fingerprint)
    data = thr.to_file_dict()
    data.update({
        "expected_escalation": {"rate": rate, "escalated": k, "ci95": [lo, hi], "method": "Clopper-Pearson"},
        "expected_accuracy": {"cascade": accuracy, "edge_only": edge_acc, "cloud_only": cloud_acc},
        "expected_cloud_flops_per_image": rate * full_flops,
        "calibration": {"data": "fashion-mnist", "split": split, "description": source,
                        "test_data": split.startswith("test")},
        "n": n,
        "date": now.isoformat(timespec="seconds"),
        "policy": policy,
    })
    raw = (json.dumps(data, indent=2) + "\n").encode("utf-8")
    try:  # the router's own validation, so a file is never written that it would refuse
        parse_thresholds(raw, path=args.out, task=VISION, fingerprint=fingerprint, edge_level=args.edge_level)
    except ThresholdsError as err:
        print(f"error: internal: the tuned file would be refused by the router: {err.message}", file=sys.stderr)
        return 1
    Path(args.out).write_bytes(raw)
    print(f"wrote {args.out}")
    if args.plot:
        title = (f"{Path(args.checkpoint).name}, edge level {args.edge_level}, {source}; "
                 f"edge {edge_acc:.2%}, cloud {cloud_acc:.2%}")
        _plot(args.plot, curves, rec, (measure, rate, accuracy), full_flops, title)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
