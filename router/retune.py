"""Re-tune the confidence threshold from the router's traffic log: ``python -m router.tune --from-log DIR``.

    python -m router.tune --from-log /var/log/matmamba/traffic [--last 5000 | --since 2026-11-24T10:00] \\
        [--target-escalation 0.2] [--measure max_softmax] [--plot curve.png] [--apply --out thresholds.json]

It reads the ``"request"`` and ``"shadow"`` records of a traffic log (router/traffic_log.py) for
one checkpoint fingerprint and one method (the newest record's unless ``--method`` says), within
the window asked for, and joins every shadow answer to its item.

**What is known, and how it is weighted.** Every item has its confidence under every measure,
so the escalation rate of *any* threshold is exact on the logged traffic. Edge/cloud agreement
(top-1 class, or top-1 next token for Score) is observed for two strata: items escalated under
the policy in force when they came (the cloud answered them; degraded ones are missing) and
kept items that a shadow escalation sampled with probability p (router/shadow.py). Within a
stratum (escalated, or kept at shadow rate p) the observed items are a random sample, so each
stands for N_stratum / n_observed items (1/p for shadows, up to shadows lost to load or failures).
The estimated number of disagreements among the items a threshold t would keep, D(t), is the
weighted sum over observed items with confidence >= t; the estimated **cascade agreement** with
a cloud-only router is 1 - D(t) / N, with a normal-approximation 95 % interval from the
stratified-sampling variance (Agresti-Coull shares, so that a stratum where no disagreement was
seen still carries uncertainty). Without shadow samples only the escalation side is known.

**Operating point.** The current policy's escalation rate (95 % Clopper-Pearson), the agreement
on kept items from shadows (95 % Wilson with the Kish effective sample size), and the cascade
agreement. **Proposal**: for ``--target-escalation R`` (default: the target of the thresholds in
force, when the file named one) the threshold of the measure whose escalation rate on the window
is closest to R without exceeding it, with its expected rate and band. ``--apply --out FILE``
writes it as a thresholds file (router/thresholds.py format, checked with the router's parser,
written atomically): point the router's ``--thresholds`` at FILE and it reloads it within
``--thresholds-poll-ms``. Exit status: 0, 2 bad arguments or no usable records.

**Generate.** Generate records (one per stream) are ignored unless ``--method Generate`` is given;
then each segment of a segment-mode stream is an item (its confidence under every LM measure and
its escalation decision), and only the escalation side is re-tuned: the rate of any threshold is
exact, agreement is not estimated (a segment has no single answer to compare, and Generate is
never shadowed). Speculative streams are skipped (they have no escalation decision).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.calibration import Z95, Curve, wilson

from .confidence import MEASURES
from .thresholds import Thresholds, ThresholdsError, parse_thresholds
from .traffic_log import log_files, read_records
from .tune_stats import clopper_pearson

ESCALATED, SHADOW = 1, 2  # where an item's cloud answer came from (0 = none)


@dataclass
class LogItems:
    """Items of the logged requests of one method and checkpoint, oldest first."""

    conf: dict[str, np.ndarray]  # measure -> (N,) confidence
    escalated: np.ndarray  # (N,) bool: below the threshold in force when it came
    degraded: np.ndarray  # (N,) bool
    agree: np.ndarray  # (N,) bool: edge top-1 == cloud top-1 (meaningful where source > 0)
    source: np.ndarray  # (N,) int8: 0 no cloud answer, ESCALATED, SHADOW
    shadow_rate: np.ndarray  # (N,) the request's shadow rate
    t: np.ndarray  # (N,) unix seconds of the request
    last: dict[str, Any]  # the newest request record (its policy, fingerprint, edge level)
    notes: dict[str, int] = field(default_factory=dict)  # records skipped, shadow outcomes

    @property
    def n(self) -> int:
        return int(self.escalated.shape[0])

    def select(self, mask: np.ndarray) -> LogItems:
        return LogItems({k: v[mask] for k, v in self.conf.items()}, self.escalated[mask], self.degraded[mask],
                        self.agree[mask], self.source[mask], self.shadow_rate[mask], self.t[mask], self.last,
                        self.notes)


def _item_row(rec: dict[str, Any], item: dict[str, Any]) -> list[Any]:
    """[conf, escalated, degraded, agree, source, shadow rate, t, fingerprint, method] of one logged item."""
    cloud = item.get("cloud") if item["tier"] == "cloud" else None  # Generate items carry no answers
    source, agree = (ESCALATED, item["edge"][0][0] == cloud[0][0]) if cloud is not None else (0, False)
    return [item["conf"], item["escalated"], item["degraded"], agree, source, rec["shadow_rate"], rec["t"],
            rec["fingerprint"], rec["method"]]


def _join_shadow(rec: dict[str, Any], rows: list[list[Any]], waiting: dict[tuple[str, int], int],
                 notes: Counter) -> None:
    """Mark the items a shadow record answered (its request record came before it)."""
    answered = rec.get("agree")
    if answered is None:
        notes["shadow failed"] += len(rec.get("items", ()))
    for n, item in enumerate(rec.get("items", ())):
        row = waiting.pop((rec["key"], item), None)
        if row is not None and answered is not None:
            rows[row][3], rows[row][4] = bool(answered[n]), SHADOW


def load_items(directory: str | Path, method: str | None = None, since: float | None = None) -> LogItems:
    """Items of the log for one method and checkpoint (the newest request's unless ``method`` is given).

    Generate records are used only when ``method`` is "Generate", and then only segment-mode ones
    (one item per segment); speculative rounds have no escalation decision to re-tune.
    Records are read one at a time; only a small row per item is kept (a full log fits in memory).
    """
    rows: list[list[Any]] = []
    waiting: dict[tuple[str, int], int] = {}  # (request key, item) of sent shadows -> row
    last, notes = None, Counter()
    for rec in read_records(directory):
        kind = rec.get("kind")
        if kind == "shadow":
            _join_shadow(rec, rows, waiting, notes)
        if kind != "request" or rec["method"] != (method or rec["method"]) or (since is not None and rec["t"] < since):
            continue
        if rec["method"] == "Generate" and (method is None or rec.get("mode") != "segment"):
            notes["Generate records skipped" if method is None else "speculative Generate records skipped"] += 1
            continue
        last = rec
        for i, item in enumerate(rec["items"]):
            if item.get("shadow") == "sent":
                waiting[(rec["key"], i)] = len(rows)
            notes["shadow dropped under load"] += item.get("shadow") == "dropped"
            rows.append(_item_row(rec, item))
    if last is None:
        hint = " (Generate records are used only with --method Generate)" if notes["Generate records skipped"] else ""
        raise ValueError(f"{directory} holds no {method or ''} request records{' since then' if since else ''}{hint}; "
                         "is it the --traffic-log directory of a router that has answered requests?")
    keep = [r for r in rows if r[7] == last["fingerprint"] and r[8] == last["method"]]
    notes["items skipped (other method or checkpoint)"] = len(rows) - len(keep)
    conf = {m: np.array([r[0][m] for r in keep], dtype=np.float64) for m in keep[0][0]}
    cols = list(zip(*[r[1:7] for r in keep]))
    return LogItems(conf, np.array(cols[0], bool), np.array(cols[1], bool), np.array(cols[2], bool),
                    np.array(cols[3], np.int8), np.array(cols[4], np.float64), np.array(cols[5], np.float64), last,
                    dict(notes))


# ------------------------------------------------------------------ estimates


def _strata(items: LogItems) -> list[tuple[np.ndarray, np.ndarray]]:
    """(members, observed members) per stratum: escalated items, and kept items per shadow rate."""
    out = [(items.escalated, items.escalated & (items.source == ESCALATED))]
    for p in np.unique(items.shadow_rate[~items.escalated]):
        members = ~items.escalated & (items.shadow_rate == p)
        out.append((members, members & (items.source == SHADOW)))
    return out


def cascade_agreement(items: LogItems, measure: str, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Estimated agreement of the cascade with cloud-only at each threshold, and its standard error.

    NaN where some items the threshold would keep belong to a stratum with no observed cloud answer.
    """
    conf = items.conf[measure]
    disagree, variance = np.zeros(thresholds.shape), np.zeros(thresholds.shape)
    for members, observed in _strata(items):
        big_n, small_n = int(members.sum()), int(observed.sum())
        if big_n == 0:
            continue
        if small_n == 0:
            disagree[conf[members].max() >= thresholds] = np.nan
            continue
        # m(t): share of the observed members kept at t whose edge and cloud answers differ
        bad = np.sort(conf[observed & ~items.agree])
        m = (bad.size - np.searchsorted(bad, thresholds, side="left")) / small_n
        disagree += big_n * m
        # Stratified sampling of a 0/1 variable, finite-population corrected; the variance uses the
        # Agresti-Coull share (x + 2) / (n + 4), so that a stratum with no disagreement seen is not certain.
        m_ac = (m * small_n + 2) / (small_n + 4)
        variance += big_n ** 2 * (1 - small_n / big_n) * m_ac * (1 - m_ac) / small_n
    return 1.0 - disagree / items.n, np.sqrt(variance) / items.n


def kept_agreement(items: LogItems) -> tuple[float, float, float, int] | None:
    """Edge/cloud agreement on kept items from shadow samples (weighted 1/p): estimate, 95 % low, high, samples."""
    observed = ~items.escalated & (items.source == SHADOW)
    if not observed.any():
        return None
    w = 1.0 / items.shadow_rate[observed]
    estimate = float((w * items.agree[observed]).sum() / w.sum())
    n_eff = w.sum() ** 2 / (w ** 2).sum()  # Kish effective sample size (= samples when p never changed)
    low, high = wilson(estimate * n_eff, n_eff)
    return estimate, low, high, int(observed.sum())


def curve_of(items: LogItems, measure: str) -> Curve:
    """Escalation rate (exact on the log) and estimated cascade agreement at every candidate threshold."""
    conf = np.sort(items.conf[measure])
    thresholds = np.unique(conf)
    escalation = np.searchsorted(conf, thresholds, side="left") / items.n
    agreement, _ = cascade_agreement(items, measure, thresholds)
    return Curve(measure, thresholds, escalation, agreement)


# ------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m router.tune --from-log", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-log", required=True, type=Path, help="the router's --traffic-log directory")
    p.add_argument("--target-escalation", type=float,
                   help="wanted escalation rate in [0, 1] (default: the target of the thresholds in force)")
    p.add_argument("--measure", choices=list(MEASURES), help="confidence measure (default: the one in force)")
    p.add_argument("--method", choices=["Classify", "Score", "Generate"],
                   help="requests to use (default: the newest Classify or Score request's; Generate: its segments, "
                        "escalation side only)")
    p.add_argument("--since", help="only requests from this time on: unix seconds or ISO 8601 (UTC if no zone)")
    p.add_argument("--last", type=int, help="only the newest N items (after --since)")
    p.add_argument("--apply", action="store_true", help="write the proposed thresholds to --out")
    p.add_argument("--out", help="thresholds file to write with --apply (the router's --thresholds file)")
    p.add_argument("--plot", help="PNG of the re-estimated trade-off curve")
    return p


def _since(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: give unix seconds or an ISO 8601 time such as 2026-11-24T10:00") from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def _window(items: LogItems, last: int | None) -> LogItems:
    if not last or last >= items.n:
        return items
    mask = np.zeros(items.n, bool)
    mask[-last:] = True
    return items.select(mask)


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.from_log.is_dir() or not log_files(args.from_log):
        p.error(f"--from-log {args.from_log}: no traffic-NNNNNN.msgpack files there; start the router with "
                "--traffic-log DIR and send it traffic")
    if args.target_escalation is not None and not (math.isfinite(args.target_escalation)
                                                   and 0.0 <= args.target_escalation <= 1.0):
        p.error(f"--target-escalation must be a fraction in [0, 1], got {args.target_escalation}")
    if args.apply != bool(args.out):
        p.error("--apply and --out go together: --apply --out FILE writes the proposed thresholds to FILE")
    if args.last is not None and args.last < 1:
        p.error(f"--last must be at least 1, got {args.last}")


def _time(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def _report_current(items: LogItems, policy: dict[str, Any], target: float | None) -> dict[str, Any]:
    """Print the operating point in force on the window; return it as a dict."""
    k, n = int(items.escalated.sum()), items.n
    low, high = clopper_pearson(k, n)
    print(f"window: {n} items from {_time(items.t[0])} to {_time(items.t[-1])}")
    print(f"thresholds in force (newest record): {policy['measure']} >= {policy['threshold']:.6g} "
          f"(version {policy['version']})")
    print(f"  escalation rate  {k / n:.2%}  (95 % {low:.2%} - {high:.2%}); degraded {items.degraded.mean():.2%}")
    current: dict[str, Any] = {"escalation": {"rate": k / n, "ci95": [low, high]}}
    if target is not None:
        verdict = "inside" if low <= target <= high else "OUTSIDE"
        print(f"  target {target:.2%} is {verdict} the observed rate's 95 % interval")
    esc = items.escalated & (items.source == ESCALATED)
    if esc.any():
        print(f"  escalated items where the cloud kept the edge's answer: {items.agree[esc].mean():.2%} "
              f"of {int(esc.sum())}")
    kept = kept_agreement(items)
    if items.last["method"] == "Generate":
        print("  agreement: not estimated for Generate (segments carry no comparable answers and are never "
              "shadowed); the proposal matches the escalation rate only")
        return current
    if kept is None:
        print("  agreement on kept items: unknown (no shadow samples; start the router with --shadow-rate)")
        return current
    est, lo, hi, samples = kept
    share = 1 - k / n
    print(f"  edge/cloud agreement on kept items (shadow, {samples} samples): {est:.2%}  (95 % {lo:.2%} - {hi:.2%})")
    print(f"  cascade agreement with cloud-only: {1 - share * (1 - est):.2%}  "
          f"(95 % {1 - share * (1 - lo):.2%} - {1 - share * (1 - hi):.2%})")
    current["kept_agreement"] = {"estimate": est, "ci95": [lo, hi], "shadow_samples": samples}
    return current


def operating_index(curve: Curve, target: float) -> int:
    """Index of the threshold whose escalation rate is closest to ``target`` without exceeding it."""
    ok = np.nonzero(curve.escalation <= target + 1e-12)[0]
    return int(ok[-1])  # escalation[0] == 0 (threshold = the smallest confidence), so ok is never empty


def _plot(path: str, curve: Curve, points: dict[str, tuple[float, float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.plot(curve.escalation, curve.accuracy, lw=1.4, label=f"{curve.measure} (estimated from the log)")
    for (name, (x, y)), style in zip(points.items(), ("ko", "r*")):
        ax.plot([x], [y], style, ms=11, label=name)
    ax.set_xlabel("escalation rate")
    ax.set_ylabel("agreement with cloud-only (estimated)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(path: str, data: dict[str, Any], items: LogItems) -> None:
    """Validate with the router's parser, then write atomically (the router may be polling the file)."""
    raw = (json.dumps(data, indent=2) + "\n").encode("utf-8")
    parse_thresholds(raw, path=path, task=items.last["task"], fingerprint=items.last["fingerprint"],
                     edge_level=items.last["edge_level"])
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    tmp.write_bytes(raw)
    os.replace(tmp, path)


def _propose(items: LogItems, measure: str, target: float, policy: dict[str, Any]) -> dict[str, Any]:
    """The threshold for ``target`` on the window, its expected rate and agreement (printed and returned)."""
    curve = curve_of(items, measure)
    i = operating_index(curve, target)
    threshold, k = float(curve.thresholds[i]), int((items.conf[measure] < curve.thresholds[i]).sum())
    low, high = clopper_pearson(k, items.n)
    agreement, se = cascade_agreement(items, measure, curve.thresholds[i:i + 1])
    was = policy["threshold"] if measure == policy["measure"] else None
    moved = "" if was is None else f" ({'down' if threshold < was else 'up' if threshold > was else 'unchanged'} " \
                                   f"from {was:.6g})"
    print(f"\nproposed for target {target:.2%}: {measure} >= {threshold:.6g}{moved}: escalation {k / items.n:.2%} on "
          f"the window (95 % {low:.2%} - {high:.2%})")
    proposal = {"measure": measure, "threshold": threshold, "curve": curve, "escalated": k,
                "expected_escalation": {"rate": k / items.n, "escalated": k, "ci95": [low, high],
                                        "method": "Clopper-Pearson"}, "expected_agreement": None}
    if math.isfinite(agreement[0]):
        lo, hi = max(0.0, agreement[0] - Z95 * se[0]), min(1.0, agreement[0] + Z95 * se[0])
        proposal["expected_agreement"] = {"cascade": float(agreement[0]), "ci95": [lo, hi],
                                          "method": "stratified 1/p weights, normal approximation"}
        print(f"  estimated cascade agreement with cloud-only: {agreement[0]:.2%}  (95 % {lo:.2%} - {hi:.2%})")
    return proposal


def _plot_proposal(path: str, items: LogItems, proposal: dict[str, Any], current: dict[str, Any],
                   policy: dict[str, Any], title: str) -> None:
    curve: Curve = proposal["curve"]
    points = {}
    if proposal["measure"] == policy["measure"]:
        j = min(int(np.searchsorted(curve.thresholds, policy["threshold"], side="left")), len(curve.thresholds) - 1)
        points["in force"] = (current["escalation"]["rate"], float(curve.accuracy[j]))
    agreement = proposal["expected_agreement"]
    points["proposed"] = (proposal["expected_escalation"]["rate"], agreement["cascade"] if agreement else np.nan)
    _plot(path, curve, points, title)


def _thresholds_file(items: LogItems, proposal: dict[str, Any], target: float, policy: dict[str, Any],
                     current: dict[str, Any], directory: Path) -> dict[str, Any]:
    """The thresholds file of the proposal, with the report keys the router ignores."""
    now = dt.datetime.now(dt.UTC)
    measure, threshold = proposal["measure"], proposal["threshold"]
    thr = Thresholds(measure, threshold, f"retune-{now:%Y-%m-%dT%H:%M:%SZ}-{measure}-{threshold:.6g}",
                     target_escalation=target, edge_level=items.last["edge_level"],
                     checkpoint_fingerprint=items.last["fingerprint"])
    data = thr.to_file_dict()
    data.update({
        "expected_escalation": proposal["expected_escalation"],
        "expected_agreement": proposal["expected_agreement"],
        "traffic_log": {"directory": str(directory), "method": items.last["method"], "items": items.n,
                        "from": _time(items.t[0]), "to": _time(items.t[-1]), "previous": policy,
                        "previous_operating_point": current},
        "n": items.n,
        "date": now.isoformat(timespec="seconds"),
        "policy": {"rule": "retune_from_log", "target_escalation": target},
    })
    return data


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    _check(p, args)
    try:
        items = _window(load_items(args.from_log, args.method, _since(args.since) if args.since else None), args.last)
    except ValueError as err:
        p.error(str(err))
    policy = items.last["thresholds"]
    if policy.get("chain"):
        p.error(f"this log comes from a chain router (--edge-level {','.join(map(str, policy['chain']))}); re-tuning "
                "a chain from the log is not supported: tune it with `python -m router.tune --data ...`, which "
                "tunes a chain's stages jointly")
    target = args.target_escalation if args.target_escalation is not None else (policy.get("target") or None)
    measure = args.measure or policy["measure"]
    if measure not in items.conf:
        p.error(f"--measure {measure} is not a measure of this log's task ({sorted(items.conf)})")
    notes = ", ".join(f"{k}: {v}" for k, v in items.notes.items() if v)
    print(f"traffic log {args.from_log}: {items.last['method']} on checkpoint {items.last['fingerprint'][:12]}..., "
          f"edge level {items.last['edge_level']}" + (f"; {notes}" if notes else ""))
    current = _report_current(items, policy, target)
    if target is None:
        print("no target: give --target-escalation R to get a proposed threshold")
        return 0
    proposal = _propose(items, measure, target, policy)
    if args.plot:
        _plot_proposal(args.plot, items, proposal, current, policy,
                       f"{args.from_log.name}: {items.n} items, target {target:.0%}")
        print(f"wrote {args.plot}")
    if not args.apply:
        print("(not applied: add --apply --out FILE to write it)")
        return 0
    try:
        _write(args.out, _thresholds_file(items, proposal, target, policy, current, args.from_log), items)
    except ThresholdsError as err:
        print(f"error: internal: the file would be refused by the router: {err.message}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
