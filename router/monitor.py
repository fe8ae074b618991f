"""Watch a router's escalation rate against its calibrated operating point.

    python -m router.monitor --metrics http://127.0.0.1:9100/metrics [--thresholds thresholds.json]
    python -m router.monitor --metrics http://127.0.0.1:9100/metrics --once

Every `--interval` seconds it reads the router's Prometheus endpoint and prints one table:
request rate, items answered per tier, the escalation rate (all time, the router's sliding
window, and since the last reading), latency percentiles per tier (p50/p95/p99 of the edge
time per item and of the cloud round trip, interpolated in the histogram buckets), degraded
answers, and the thresholds in force. The expected escalation rate and its 95% band come from
`--thresholds` (a file written by `python -m router.tune`) or else from the router itself
(`router_expected_escalation_rate`, from its thresholds file); it says DRIFT when the observed
rate's own 95% interval lies outside that band, or when the router's drift gauge is up.
Exit status: 0, or 1 when the endpoint cannot be read, or 4 with `--once` when it says DRIFT.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from .tune_stats import wilson

DRIFT_EXIT = 4


@dataclass(frozen=True)
class Snapshot:
    """The numbers the monitor shows, read from one scrape."""

    items: dict[str, float]  # tier -> answered items
    escalations: float
    degraded: float
    window_rate: float  # the router's own sliding-window rate (max over methods)
    thresholds: dict[str, str]  # router_thresholds_info labels
    requests: float = 0.0  # finished RPCs
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)  # tier -> upper bound -> count
    router_band: tuple[float, float, float] | None = None  # router_expected_escalation_rate, when published
    router_drift: bool = False  # router_escalation_drift is 1 for some method
    taken: float = field(default_factory=time.monotonic)

    @property
    def total(self) -> float:
        return sum(self.items.values())

    @property
    def rate(self) -> float:
        return self.escalations / self.total if self.total else 0.0


HISTOGRAMS = {"router_edge_seconds_bucket": "edge", "router_cloud_seconds_bucket": "cloud"}


def parse(text: str) -> Snapshot:
    """Summarise a router's /metrics text."""
    items: dict[str, float] = {}
    escalations = degraded = window = requests = 0.0
    thresholds: dict[str, str] = {}
    buckets: dict[str, dict[float, float]] = {}
    expected: dict[str, float] = {}
    drift = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "router_items_total":
                items[labels.get("tier", "")] = items.get(labels.get("tier", ""), 0.0) + value
            elif name == "router_escalations_total":
                escalations += value
            elif name == "router_degraded_total":
                degraded += value
            elif name == "router_requests_total":
                requests += value
            elif name == "router_escalation_rate":
                window = max(window, value)
            elif name == "router_thresholds_info":
                thresholds = dict(labels)
            elif name in HISTOGRAMS:
                tier = buckets.setdefault(HISTOGRAMS[name], {})
                bound = float(labels["le"])
                tier[bound] = tier.get(bound, 0.0) + value
            elif name == "router_expected_escalation_rate":
                expected[labels.get("bound", "")] = value
            elif name == "router_escalation_drift":
                drift = drift or value > 0
    band = None
    if {"expected", "low", "high"} <= expected.keys() and expected["high"] > 0:
        band = expected["expected"], expected["low"], expected["high"]
    return Snapshot(items, escalations, degraded, window, thresholds, requests, buckets, band, drift)


def percentile(buckets: dict[float, float], q: float) -> float | None:
    """The q-quantile of a cumulative histogram (upper bound -> count), interpolated in its bucket."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bucket: its bound is all one can say
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def expected_band(path: Path) -> tuple[float, float, float]:
    """(expected rate, low, high) from a thresholds file written by router.tune."""
    data = json.loads(path.read_text())
    exp = data.get("expected_escalation")
    if not isinstance(exp, dict) or "rate" not in exp or "ci95" not in exp:
        raise ValueError(f"{path} has no expected_escalation band; write it with `python -m router.tune`")
    low, high = exp["ci95"]
    return float(exp["rate"]), float(low), float(high)


def drifted(snap: Snapshot, band: tuple[float, float, float] | None) -> bool:
    """True when the observed rate's 95% interval does not overlap the calibrated band (or the router says so)."""
    if snap.router_drift:
        return True
    if band is None or snap.total == 0:
        return False
    low, high = wilson(snap.escalations, snap.total)
    return high < band[1] or low > band[2]


def render(snap: Snapshot, previous: Snapshot | None, band: tuple[float, float, float] | None) -> Table:
    table = Table(title=f"router escalation at {time.strftime('%H:%M:%S')}", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    if previous is not None and snap.taken > previous.taken:
        per_s = (snap.requests - previous.requests) / (snap.taken - previous.taken)
        table.add_row("requests per second", f"{per_s:.1f}")
    for tier, count in sorted(snap.items.items()):
        table.add_row(f"items answered ({tier})", f"{count:,.0f}")
    low, high = wilson(snap.escalations, snap.total)
    table.add_row("escalation rate, all time", f"{snap.rate:.2%}  (95% {low:.2%} - {high:.2%})")
    table.add_row("escalation rate, router window", f"{snap.window_rate:.2%}")
    if previous is not None and snap.total > previous.total:
        recent = (snap.escalations - previous.escalations) / (snap.total - previous.total)
        table.add_row("escalation rate, since last reading", f"{recent:.2%}")
    for tier, hist in sorted(snap.buckets.items()):
        ps = [percentile(hist, q) for q in (0.5, 0.95, 0.99)]
        if ps[0] is not None:
            table.add_row(f"{tier} latency p50 / p95 / p99", " / ".join(f"{1e3 * p:.2f} ms" for p in ps))
    table.add_row("degraded answers", f"{snap.degraded:,.0f}")
    if snap.thresholds:
        table.add_row("thresholds", f"{snap.thresholds.get('measure')} >= {snap.thresholds.get('threshold')} "
                                    f"(version {snap.thresholds.get('version')})")
    if band is not None:
        table.add_row("calibrated rate", f"{band[0]:.2%}  (95% {band[1]:.2%} - {band[2]:.2%})")
        table.add_row("status", "[bold red]DRIFT[/]" if drifted(snap, band) else "[green]within band[/]")
    elif snap.router_drift:
        table.add_row("status", "[bold red]DRIFT[/] (the router's drift gauge)")
    return table


def scrape(url: str, timeout: float) -> Snapshot:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (an operator-given URL)
        return parse(response.read().decode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m router.monitor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metrics", required=True, help="the router's /metrics URL")
    p.add_argument("--thresholds", type=Path, default=None, help="thresholds file from router.tune (for the band)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between readings")
    p.add_argument("--once", action="store_true", help="one reading, then exit (4 on DRIFT)")
    p.add_argument("--count", type=int, default=0, help="stop after N readings (0 = until interrupted)")
    args = p.parse_args(argv)
    band = expected_band(args.thresholds) if args.thresholds else None
    console, previous, done = Console(), None, 0
    while True:
        try:
            snap = scrape(args.metrics, timeout=max(1.0, args.interval))
        except OSError as err:
            console.print(f"[red]cannot read {args.metrics}: {err}[/]; is the router running with --metrics-port?")
            return 1
        shown = band or snap.router_band
        console.print(render(snap, previous, shown))
        done += 1
        if args.once:
            return DRIFT_EXIT if drifted(snap, shown) else 0
        if args.count and done >= args.count:
            return 0
        previous = snap
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
