"""Tune the router's confidence thresholds on calibration data: ``python -m router.tune``.

    python -m router.tune --checkpoint checkpoints/matmamba-vision-fmnist --edge-level 4 \\
        --data fashion-mnist --target-escalation 0.2 --out thresholds.json --plot curve.png \\
        [--measure max_softmax] [--max-accuracy-drop 0.005 --delta 0.05] [--eval-data fashion-mnist:test] \\
        [--limit N] [--device cpu] [--cache DIR]
    python -m router.tune --checkpoint checkpoints/matmamba-vision-fmnist --edge-level 8,2 ...   # a chain
    python -m router.tune --checkpoint checkpoints/matmamba-lm-austen --edge-level 4 \\
        --data data/austen-heldout.txt --target-escalation 0.3 --out lm.json --plot lm.png

``--data``: ``fashion-mnist[:SPLIT]``, a directory of labelled images, or a text file for an
LM checkpoint (router/tune_data.py defines each, and what "correct" means for LM segments).
The full model and every edge level of ``--edge-level`` (one level, or a chain such as
``8,2``: level 8 first, then level 2, then the cloud) run over the calibration items
(progress bars). Per item it records each level's confidence under every measure of the
task (router/confidence.py) and whether each tier is correct. For each measure it prints the
operating point at ``--target-escalation`` (the share of items sent to the cloud) and
plots accuracy against the cloud rate and against cloud FLOPs, with the oracle router
(escalate exactly the items no edge tier gets right) and random escalation as references
(router/tune_policy.py has the search, joint over a chain's thresholds).

Operating point:
- ``--target-escalation R``: for ``--measure`` (default: the measure with the best accuracy
  at rate R), the thresholds with the best accuracy at a cloud rate closest to R without
  exceeding it (one stage: the threshold whose rate is closest to R).
- ``--max-accuracy-drop D``: the lowest cloud rate whose accuracy drop vs the full model is
  <= D with probability >= 1 - ``--delta``: candidates ordered on one half of the calibration
  data, tested in that order on the other half with an exact binomial upper bound of the drop
  (router/tune_policy.py, ``pick_by_drop``). When none passes, nothing is written and the exit
  status is 3.

``--eval-data`` (never the calibration data) applies the chosen thresholds to a separate set
and reports the cloud rate, accuracy, drop vs cloud-only, cloud FLOPs saved, and the oracle
router's rate at the same accuracy; the plot is then drawn on that set.

The file written is the router's thresholds format (router/thresholds.py, validated with its
parser before writing; ``stages`` for a chain) plus report keys the router ignores except
``expected_escalation`` (the band of its drift signal).
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

from matmamba.devices import resolve_device

from .confidence import LM, VISION
from .thresholds import Stage, Thresholds, ThresholdsError, parse_levels, parse_thresholds
from .tune_data import TASK_MEASURES, Records, lm_records, load_image_dir, text_contexts, vision_records
from .tune_plot import plot_tradeoff
from .tune_policy import (
    answered_correct,
    at_target,
    chain_points,
    oracle_rate_at,
    pick_by_drop,
    route,
)
from .tune_stats import clopper_pearson

EXIT_NO_THRESHOLD = 3
ALL_MEASURES = TASK_MEASURES[VISION] + TASK_MEASURES[LM]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m router.tune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Re-tuning from the router's traffic log takes other flags: "
                                       "python -m router.tune --from-log DIR --help")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (the one the router serves)")
    p.add_argument("--edge-level", required=True,
                   help="edge nesting level (width d_model / K), or a chain of levels such as 8,2")
    p.add_argument("--data", required=True,
                   help="calibration data: fashion-mnist[:SPLIT], a directory of labelled images, or a text file (LM)")
    p.add_argument("--target-escalation", type=float, required=True, help="wanted cloud escalation rate, in [0, 1]")
    p.add_argument("--out", required=True, help="thresholds file to write")
    p.add_argument("--plot", help="PNG of the trade-off curves")
    p.add_argument("--measure", choices=ALL_MEASURES,
                   help="confidence measure (default: best accuracy at the target rate)")
    p.add_argument("--max-accuracy-drop", type=float,
                   help="pick the lowest escalation whose accuracy drop vs cloud-only is <= D (verified, see above)")
    p.add_argument("--delta", type=float, default=0.05, help="failure probability of the verification (default 0.05)")
    p.add_argument("--eval-data", help="separate evaluation data (same forms as --data), e.g. fashion-mnist:test")
    p.add_argument("--split", choices=["auto", "val", "test-sample"], default="auto",
                   help='split of "--data fashion-mnist" (default: "val" when the full set is installed, '
                        'else "test-sample")')
    p.add_argument("--limit", type=int, help="use only the first N calibration items (and evaluation items)")
    p.add_argument("--context-tokens", type=int, default=64, help="LM: context length before a segment (64)")
    p.add_argument("--segment-tokens", type=int, default=8,
                   help="LM: tokens per segment, as the router's --segment-tokens (8)")
    p.add_argument("--stride", type=int, default=32, help="LM: tokens between the starts of contexts (32)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--cache", type=Path, help="directory keeping the models' outputs per data set and level, so "
                                              "re-tuning (another target, measure or chain) skips the model runs")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        args.levels = parse_levels(args.edge_level)
    except ValueError as err:
        p.error(str(err))
    if not (math.isfinite(args.target_escalation) and 0.0 <= args.target_escalation <= 1.0):
        p.error(f"--target-escalation must be a fraction in [0, 1] (e.g. 0.2 for 20 %), got {args.target_escalation}")
    if args.max_accuracy_drop is not None and not math.isfinite(args.max_accuracy_drop):
        p.error(f"--max-accuracy-drop must be a finite number, got {args.max_accuracy_drop}")
    if not 0.0 < args.delta < 1.0:
        p.error(f"--delta must be in (0, 1), got {args.delta}")
    if args.limit is not None and args.limit < 2:
        p.error(f"--limit must be at least 2, got {args.limit}")
    for name in ("context_tokens", "segment_tokens", "stride"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.eval_data is not None and args.eval_data == args.data:
        p.error("--eval-data must not be the calibration data (--data)")
    for flag, path in (("--out", args.out), ("--plot", args.plot)):  # said now, not after the model runs
        if path is not None and not Path(path).resolve().parent.is_dir():
            p.error(f"{flag} {path}: the directory {Path(path).parent} does not exist")
    try:
        args.device = resolve_device(args.device)
    except (ValueError, RuntimeError) as err:  # no CUDA, or a name torch does not know
        p.error(f"--device: {err}")


# ------------------------------------------------------------------ data


@dataclass
class Dataset:
    """Records of one data set and how to describe it."""

    records: Records
    description: str
    name: str  # "fashion-mnist", "images", "text"
    split: str = ""


def _vision_data(spec: str, args: argparse.Namespace, model) -> tuple[torch.Tensor, torch.Tensor, str, str, str]:
    from matmamba.data import has_full_fashion_mnist, load_fashion_mnist
    from matmamba.data.fashion_mnist import FMNIST_CLASSES

    if spec == "fashion-mnist" or spec.startswith("fashion-mnist:"):
        split = spec.partition(":")[2] or args.split
        if split == "auto":
            split = "val" if has_full_fashion_mnist() else "test-sample"
        images, labels = load_fashion_mnist(split)
        return images, labels, f"fashion-mnist {split!r}", "fashion-mnist", split
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"--data {spec}: expected fashion-mnist[:SPLIT] or a directory of labelled images "
                         "(one subfolder per class) for a vision checkpoint")
    cfg = model.config
    names = FMNIST_CLASSES if cfg.n_classes == len(FMNIST_CLASSES) else tuple(str(i) for i in range(cfg.n_classes))
    images, labels = load_image_dir(path, names, cfg.image_size)
    return images[:, 0], labels, f"images under {path}", "images", ""


def load_dataset(spec: str, args: argparse.Namespace, model, device: torch.device) -> Dataset:
    """Records of ``spec`` (a --data value) for the checkpoint's task."""
    if hasattr(model.config, "n_classes"):
        images, labels, description, name, split = _vision_data(spec, args, model)
        if args.limit is not None:
            images, labels = images[:args.limit], labels[:args.limit]
        key = {"fingerprint": model.fingerprint, "task": VISION}
        rec = vision_records(model, args.levels, images, labels.numpy(), device, args.cache, key)
        return Dataset(rec, f"{description}, {rec.n} images", name, split)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--data {spec}: an LM checkpoint is tuned on a UTF-8 text file "
                         "(e.g. data/austen-heldout.txt)")
    if model.tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer; LM tuning needs one to read {spec}")
    ids = model.tokenizer.encode(path.read_text(encoding="utf-8"))
    contexts = text_contexts(ids, args.context_tokens, args.segment_tokens, args.stride)
    if args.limit is not None:
        contexts = contexts[:args.limit]
    key = {"fingerprint": model.fingerprint, "task": LM}
    rec = lm_records(model, args.levels, contexts, args.segment_tokens, device, args.cache, key)
    return Dataset(rec, f"{path.name}: {rec.n} segments of {args.segment_tokens} tokens after "
                        f"{args.context_tokens}-token contexts (stride {args.stride})", "text")


# ------------------------------------------------------------------ FLOPs and reports


def flops_per_item(cfg, levels: tuple[int, ...], args: argparse.Namespace) -> tuple[list[int], int]:
    """(FLOPs of each edge level, of the full model) per item (LM: context re-read + segment)."""
    from matmamba.flops import count_flops, vision_tokens

    tokens = vision_tokens(cfg) if hasattr(cfg, "n_classes") else args.context_tokens + args.segment_tokens
    edge = [count_flops(cfg, [cfg.block.width_for_level(k)] * cfg.n_layer, tokens) for k in levels]
    return edge, count_flops(cfg, [cfg.d_model] * cfg.n_layer, tokens)


def summarize(rec: Records, measure: str, thresholds: tuple[float, ...], flops: tuple[list[int], int]) -> dict:
    """Cloud rate (with its 95 % interval), accuracy, FLOPs and the oracle's rate at that accuracy."""
    stage = route(rec, measure, thresholds)
    k = int((stage == len(thresholds)).sum())
    rate, (lo, hi) = k / rec.n, clopper_pearson(k, rec.n, 0.95)
    accuracy = float(answered_correct(rec, stage).mean())
    edge_flops, cloud_flops = flops
    reach = [float((stage >= s).mean()) for s in range(len(thresholds))]
    any_edge = np.logical_or.reduce(rec.correct)
    oracle = oracle_rate_at(accuracy, any_edge, rec.cloud_correct)
    return {"n": rec.n, "cloud_rate": rate, "escalated": k, "ci95": [lo, hi], "accuracy": accuracy,
            "cloud_only": float(rec.cloud_correct.mean()), "edge_only": [float(c.mean()) for c in rec.correct],
            "drop": float(rec.cloud_correct.mean()) - accuracy,
            "answered_by_level": {str(lvl): float((stage == s).mean()) for s, lvl in enumerate(rec.levels)},
            "edge_flops_per_item": float(np.dot(reach, edge_flops)), "cloud_flops_per_item": rate * cloud_flops,
            "cloud_flops_saved": 1.0 - rate, "oracle_rate_at_same_accuracy": oracle}


def _print_table(rec: Records, per_measure: dict[str, tuple[tuple[float, ...], dict]], chosen: str, target: float,
                 kind: str) -> None:
    print(f"operating points at target cloud rate {target:g} (closest rate not above it):")
    header = f"{'measure':<20}{'thresholds':>24}{'cloud rate':>12}{kind:>14}{'oracle rate':>13}"
    print(header)
    print("-" * len(header))
    for m, (thr, s) in per_measure.items():
        mark = "  <- best" if m == chosen else ""
        print(f"{m:<20}{', '.join(f'{t:.4g}' for t in thr):>24}{s['cloud_rate']:>12.2%}{s['accuracy']:>14.2%}"
              f"{s['oracle_rate_at_same_accuracy']:>13.2%}{mark}")
    edge = ", ".join(f"level {lvl} {c.mean():.2%}" for lvl, c in zip(rec.levels, rec.correct))
    print(f"edge-only: {edge}; cloud-only: {rec.cloud_correct.mean():.2%}")


def _print_summary(title: str, s: dict, kind: str) -> None:
    lo, hi = s["ci95"]
    by_level = ", ".join(f"level {k} {v:.2%}" for k, v in s["answered_by_level"].items())
    print(f"{title}: cloud rate {s['cloud_rate']:.2%} (95 % {lo:.2%} - {hi:.2%}), {kind} {s['accuracy']:.2%} "
          f"(cloud-only {s['cloud_only']:.2%}, drop {s['drop'] * 100:.2f} points), answered by {by_level}; "
          f"cloud FLOPs saved {s['cloud_flops_saved']:.2%}; oracle router's rate at the same {kind}: "
          f"{s['oracle_rate_at_same_accuracy']:.2%}")


# ------------------------------------------------------------------ file


def thresholds_file(args: argparse.Namespace, measure: str, thresholds: tuple[float, ...], fingerprint: str,
                    report: dict[str, Any]) -> bytes:
    now = dt.datetime.now(dt.UTC)
    version = f"tune-{now:%Y-%m-%dT%H:%M:%SZ}-{measure}-" + "-".join(f"{t:.6g}" for t in thresholds)
    stages = tuple(Stage(level, measure, t) for level, t in zip(args.levels, thresholds))
    thr = Thresholds(measure, thresholds[0], version, target_escalation=report["tuned_for"],
                     edge_level=args.levels[0], checkpoint_fingerprint=fingerprint, stages=stages)
    data = thr.to_file_dict()
    cal = report["calibration"]
    data.update({
        "expected_escalation": {"rate": cal["cloud_rate"], "escalated": cal["escalated"], "ci95": cal["ci95"],
                                "method": "Clopper-Pearson"},
        "expected_accuracy": {"cascade": cal["accuracy"], "edge_only": cal["edge_only"],
                              "cloud_only": cal["cloud_only"], "meaning": report["kind"]},
        "expected_cloud_flops_per_item": cal["cloud_flops_per_item"],
        "calibration": report["data"], "n": cal["n"], "date": now.isoformat(timespec="seconds"),
        "policy": report["policy"],
    })
    if "evaluation" in report:
        data["evaluation"] = report["evaluation"]
    return (json.dumps(data, indent=2) + "\n").encode("utf-8")


# ------------------------------------------------------------------ main


def _choose(rec: Records, args: argparse.Namespace, flops) -> tuple[str, tuple[float, ...], dict]:
    """Measure and thresholds at the target (printed for every measure)."""
    per_measure = {}
    for m in rec.measures:
        points = chain_points(rec, m)
        thr = tuple(float(t) for t in points.thresholds[at_target(points, args.target_escalation)])
        per_measure[m] = (thr, summarize(rec, m, thr, flops))
    best = max(per_measure, key=lambda m: per_measure[m][1]["accuracy"])
    measure = args.measure or best
    if measure not in per_measure:
        raise ValueError(f"--measure {measure} is not a measure of this checkpoint's task; "
                         f"choose one of {rec.measures}")
    _print_table(rec, per_measure, best, args.target_escalation, _kind(rec))
    return measure, per_measure[measure][0], {"rule": "target_escalation", "target_escalation": args.target_escalation}


def _kind(rec: Records) -> str:
    return "accuracy" if rec.task == VISION else "agreement"


def _run(args: argparse.Namespace) -> int:
    from matmamba.pretrained import load_model

    device = args.device
    model = load_model(args.checkpoint, device=device)
    levels = tuple(sorted(model.config.block.levels))
    if any(k not in levels or k == 1 for k in args.levels):
        raise ValueError(f"--edge-level {args.edge_level}: this checkpoint's edge levels are "
                         f"{[k for k in levels if k > 1]}")
    cal = load_dataset(args.data, args, model, device)
    rec, kind = cal.records, _kind(cal.records)
    print(f"calibration data: {cal.description}")
    if cal.split.startswith("test"):
        print(f"WARNING: calibrating on the {cal.split!r} split (test data; the full Fashion-MNIST set is not "
              "installed or --split chose it): accuracy measured later on these test images will be optimistic.",
              file=sys.stderr)
    flops = flops_per_item(model.config, args.levels, args)
    measure, thresholds, policy = _choose(rec, args, flops)
    if args.max_accuracy_drop is not None:
        picked, drop_report = pick_by_drop(rec, measure, args.max_accuracy_drop, args.delta)
        if picked is None:
            print(f"\nNO THRESHOLD QUALIFIES for --max-accuracy-drop {args.max_accuracy_drop}: "
                  f"{drop_report['failure']}. Nothing written to {args.out}.", file=sys.stderr)
            return EXIT_NO_THRESHOLD
        thresholds, policy = picked, {"rule": "max_accuracy_drop", **drop_report}
        print(f"\n--max-accuracy-drop {args.max_accuracy_drop}: held-out drop {drop_report['verify_drop']:.4f}, "
              f"{1 - args.delta:.0%} upper bound {drop_report['verify_drop_upper_bound']:.4f}")
    summary = summarize(rec, measure, thresholds, flops)
    chain = " -> ".join(f"level {k} ({measure} >= {t:.6g})" for k, t in zip(args.levels, thresholds))
    print(f"\nchosen: {chain} -> cloud")
    _print_summary("calibration", summary, kind)
    tuned_for = args.target_escalation if args.max_accuracy_drop is None else summary["cloud_rate"]
    report: dict[str, Any] = {"calibration": summary, "policy": policy, "tuned_for": tuned_for, "kind": kind,
                              "data": {"data": cal.name, "split": cal.split, "description": cal.description,
                                       "test_data": cal.split.startswith("test"), **rec.extra}}
    shown, title_data = rec, cal.description
    if args.eval_data:
        ev = load_dataset(args.eval_data, args, model, device)
        report["evaluation"] = {"data": ev.description, **summarize(ev.records, measure, thresholds, flops),
                                **ev.records.extra}
        _print_summary(f"evaluation on {ev.description}", report["evaluation"], kind)
        shown, title_data = ev.records, ev.description
    fingerprint = model.fingerprint or ""
    raw = thresholds_file(args, measure, thresholds, fingerprint, report)
    try:  # the router's own validation, so a file is never written that it would refuse
        parse_thresholds(raw, path=args.out, task=rec.task, fingerprint=fingerprint, edge_levels=args.levels)
    except ThresholdsError as err:
        print(f"error: internal: the tuned file would be refused by the router: {err.message}", file=sys.stderr)
        return 1
    Path(args.out).write_bytes(raw)
    print(f"wrote {args.out}")
    if args.plot:
        chosen = summarize(shown, measure, thresholds, flops)
        title = (f"{Path(args.checkpoint).name}, edge level {args.edge_level}, {title_data}; "
                 f"chosen {measure}: cloud rate {chosen['cloud_rate']:.1%}, {kind} {chosen['accuracy']:.2%}")
        plot_tradeoff(args.plot, shown, (measure, chosen), flops, title, kind)
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--from-log" or a.startswith("--from-log=") for a in argv):  # re-tuning from the traffic log
        from .retune import main as retune_main

        return retune_main(argv)
    p = _parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
