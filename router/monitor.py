"""Watch a router's escalation rate against its calibrated operating point.

    python -m router.monitor --metrics http://127.0.0.1:9100/metrics [--thresholds thresholds.json]
    python -m router.monitor --metrics http://127.0.0.1:9100/metrics --once

Every `--interval` seconds it reads the router's Prometheus endpoint and prints one table:
items answered per tier, the escalation rate (all time, the router's sliding window, and since
the last reading), degraded answers, and the thresholds in force. With `--thresholds` (a file
written by `python -m router.tune`) it also shows the expected escalation rate and its 95% band,
and says DRIFT when the observed rate's own 95% interval lies outside that band.
Exit status: 0, or 1 when the endpoint cannot be read, or 4 with `--once` when it says DRIFT.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from dataclasses import dataclass
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

    @property
    def total(self) -> float:
        return sum(self.items.values())

    @property
    def rate(self) -> float:
        return self.escalations / self.total if self.total else 0.0


def parse(text: str) -> Snapshot:
    """Summarise a router's /metrics text."""
    items: dict[str, float] = {}
    escalations = degraded = window = 0.0
    thresholds: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "router_items_total":
                tier = sample.labels.get("tier", "")
                items[tier] = items.get(tier, 0.0) + sample.value
            elif sample.name == "router_escalations_total":
                escalations += sample.value
            elif sample.name == "router_degraded_total":
                degraded += sample.value
            elif sample.name == "router_escalation_rate":
                window = max(window, sample.value)
            elif sample.name == "router_thresholds_info":
                thresholds = dict(sample.labels)
    return Snapshot(items, escalations, degraded, window, thresholds)


def expected_band(path: Path) -> tuple[float, float, float]:
    """(expected rate, low, high) from a thresholds file written by router.tune."""
    data = json.loads(path.read_text())
    exp = data.get("expected_escalation")
    if not isinstance(exp, dict) or "rate" not in exp or "ci95" not in exp:
        raise ValueError(f"{path} has no expected_escalation band; write it with `python -m router.tune`")
    low, high = exp["ci95"]
    return float(exp["rate"]), float(low), float(high)


def drifted(snap: Snapshot, band: tuple[float, float, float] | None) -> bool:
    """True when the observed rate's 95% interval does not overlap the calibrated band."""
    if band is None or snap.total == 0:
        return False
    low, high = wilson(snap.escalations, snap.total)
    return high < band[1] or low > band[2]


def render(snap: Snapshot, previous: Snapshot | None, band: tuple[float, float, float] | None) -> Table:
    table = Table(title=f"router escalation at {time.strftime('%H:%M:%S')}", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    for tier, count in sorted(snap.items.items()):
        table.add_row(f"items answered ({tier})", f"{count:,.0f}")
    low, high = wilson(snap.escalations, snap.total)
    table.add_row("escalation rate, all time", f"{snap.rate:.2%}  (95% {low:.2%} - {high:.2%})")
    table.add_row("escalation rate, router window", f"{snap.window_rate:.2%}")
    if previous is not None and snap.total > previous.total:
        recent = (snap.escalations - previous.escalations) / (snap.total - previous.total)
        table.add_row("escalation rate, since last reading", f"{recent:.2%}")
    table.add_row("degraded answers", f"{snap.degraded:,.0f}")
    if snap.thresholds:
        table.add_row("thresholds", f"{snap.thresholds.get('measure')} >= {snap.thresholds.get('threshold')} "
                                    f"(version {snap.thresholds.get('version')})")
    if band is not None:
        table.add_row("calibrated rate", f"{band[0]:.2%}  (95% {band[1]:.2%} - {band[2]:.2%})")
        table.add_row("status", "[bold red]DRIFT[/]" if drifted(snap, band) else "[green]within band[/]")
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
        console.print(render(snap, previous, band))
        done += 1
        if args.once:
            return DRIFT_EXIT if drifted(snap, band) else 0
        if args.count and done >= args.count:
            return 0
        previous = snap
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
