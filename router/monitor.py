"""Watch a router's escalation rate against its calibrated operating point.

    python -m router.monitor --metrics http://127.0.0.1:9100/metrics [--thresholds thresholds.json]
    python -m router.monitor --metrics http://127.0.0.1:9100/metrics --once

Every `--interval` seconds it reads the router's Prometheus endpoint and prints one table:
request rate, items answered per tier, the escalation rate (all time, the router's sliding
window, and since the last reading), latency percentiles per tier (p50/p95/p99 of the edge
time per item and of the cloud round trip, interpolated in the histogram buckets), degraded
answers, and the thresholds in force. The expected escalation rate and its 95% band come from
`--thresholds` (a file written by `python -m router.tune`) or else from the router itself
(`router_escalation_expected`, from its thresholds file); it says DRIFT when the observed
rate's own 95% interval lies outside that band: all time, for the items since the last reading,
and over the router's sliding window (its last 1,000 decisions, or its drift gauge). With shadow escalation on (router
--shadow-rate) it also shows the estimated edge/cloud agreement on kept items with its 95% Wilson
interval.
With `--once` the exit status is the router window's verdict: what traffic does now, which a re-tune
changes within 1,000 decisions, while the all-time rate keeps the traffic from before it.
Exit status: 0, or 1 when the endpoint cannot be read, 2 for bad arguments (a missing or
bandless --thresholds file), or 4 with `--once` when it says DRIFT.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from edge.calibration import expected_band, outside_band, wilson

from .metrics import MIN_DRIFT_DECISIONS

DRIFT_EXIT = 4
# Shadow-escalation samples -> Snapshot.shadow key ("" = the sample's outcome label: sent, dropped, ...).
SHADOW_SAMPLES = {"router_shadow_compared_total": "compared", "router_shadow_agreed_total": "agreed",
                  "router_shadow_window_items": "window_n", "router_shadow_agreement": "window_rate",
                  "router_shadow_total": ""}


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
    router_band: tuple[float, float, float] | None = None  # router_escalation_expected, when published
    router_drift: bool = False  # router_escalation_drift is 1 for some method
    taken: float = field(default_factory=time.monotonic)
    shadow: dict[str, float] = field(default_factory=dict)  # compared, agreed, window_rate, window_n, outcomes
    window_items: float = 0.0  # decisions in the window of window_rate (router_escalation_window_items)

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
    escalations = degraded = requests = 0.0
    rates: dict[str, float] = {}  # method -> the router's window rate
    sizes: dict[str, float] = {}  # method -> decisions in that window
    thresholds: dict[str, str] = {}
    buckets: dict[str, dict[float, float]] = {}
    expected: dict[str, float] = {}
    drift = False
    shadow: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name in SHADOW_SAMPLES:
                key = SHADOW_SAMPLES[name] or labels.get("outcome", "")
                shadow[key] = shadow.get(key, 0.0) + value
            elif name == "router_items_total":
                items[labels.get("tier", "")] = items.get(labels.get("tier", ""), 0.0) + value
            elif name == "router_escalations_total":
                escalations += value
            elif name == "router_degraded_total":
                degraded += value
            elif name == "router_requests_total":
                requests += value
            elif name == "router_escalation_rate":
                rates[labels.get("method", "")] = value
            elif name == "router_escalation_window_items":
                sizes[labels.get("method", "")] = value
            elif name == "router_thresholds_info":
                thresholds = dict(labels)
            elif name in HISTOGRAMS:
                tier = buckets.setdefault(HISTOGRAMS[name], {})
                bound = float(labels["le"])
                tier[bound] = tier.get(bound, 0.0) + value
            elif name == "router_escalation_expected":
                expected[labels.get("bound", "")] = value
            elif name == "router_escalation_drift":
                drift = drift or value > 0
    band = None
    if {"rate", "low", "high"} <= expected.keys():
        band = expected["rate"], expected["low"], expected["high"]
    method = max(rates, key=rates.get, default="")  # the method whose window escalates most
    return Snapshot(items, escalations, degraded, rates.get(method, 0.0), thresholds, requests, buckets, band, drift,
                    shadow=shadow, window_items=sizes.get(method, 0.0))


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


def drifted(snap: Snapshot, band: tuple[float, float, float] | None) -> bool:
    """True when the observed rate's 95% interval does not overlap the calibrated band (or the router says so)."""
    if snap.router_drift:
        return True
    return band is not None and outside_band(snap.escalations, snap.total, band)


def window_drifted(snap: Snapshot, band: tuple[float, float, float] | None) -> bool:
    """The verdict on the router's sliding window (the ``--once`` exit status): its drift gauge, or, against
    ``band``, the window rate's 95% interval once the window holds MIN_DRIFT_DECISIONS decisions."""
    if snap.router_drift:
        return True
    n = int(snap.window_items)
    return band is not None and n >= MIN_DRIFT_DECISIONS and outside_band(round(snap.window_rate * n), n, band)


def shadow_rows(snap: Snapshot, previous: Snapshot | None) -> list[tuple[str, str]]:
    """Rows of the estimated edge/cloud agreement on kept items, from shadow escalations (none without them)."""
    sh = snap.shadow
    if not sh.get("sent") and not sh.get("dropped"):
        return []
    compared, agreed = sh.get("compared", 0.0), sh.get("agreed", 0.0)
    rows = [("shadow escalations", f"{sh.get('answered', 0):,.0f} answered, {sh.get('dropped', 0):,.0f} dropped "
                                   f"under load, {sh.get('failed', 0):,.0f} failed")]
    if compared:
        low, high = wilson(agreed, compared)
        rows.append(("edge/cloud agreement on kept items, all time",
                     f"{agreed / compared:.2%}  (95% {low:.2%} - {high:.2%}, n={compared:,.0f})"))
    if previous is not None and compared > previous.shadow.get("compared", 0.0):
        k, n = agreed - previous.shadow.get("agreed", 0.0), compared - previous.shadow.get("compared", 0.0)
        low, high = wilson(k, n)
        rows.append(("edge/cloud agreement, since last reading",
                     f"{k / n:.2%}  (95% {low:.2%} - {high:.2%}, n={n:,.0f})"))
    if sh.get("window_n"):
        k, n = sh.get("window_rate", 0.0) * sh["window_n"], sh["window_n"]
        low, high = wilson(k, n)
        rows.append(("edge/cloud agreement, router window", f"{k / n:.2%}  (95% {low:.2%} - {high:.2%}, n={n:,.0f})"))
    return rows


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
    table.add_row("escalation rate, router window", f"{snap.window_rate:.2%}  ({snap.window_items:,.0f} decisions)")
    if previous is not None and snap.total > previous.total:
        recent = (snap.escalations - previous.escalations) / (snap.total - previous.total)
        table.add_row("escalation rate, since last reading", f"{recent:.2%}")
    for tier, hist in sorted(snap.buckets.items()):
        ps = [percentile(hist, q) for q in (0.5, 0.95, 0.99)]
        if ps[0] is not None:
            table.add_row(f"{tier} latency p50 / p95 / p99", " / ".join(f"{1e3 * p:.2f} ms" for p in ps))
    table.add_row("degraded answers", f"{snap.degraded:,.0f}")
    for name, value in shadow_rows(snap, previous):
        table.add_row(name, value)
    if snap.thresholds:
        table.add_row("thresholds", f"{snap.thresholds.get('measure')} >= {snap.thresholds.get('threshold')} "
                                    f"(version {snap.thresholds.get('version')})")
    if band is not None:
        table.add_row("calibrated rate", f"{band[0]:.2%}  (95% {band[1]:.2%} - {band[2]:.2%})")
        table.add_row("status, all time", _verdict(drifted(snap, band)))
        if previous is not None and snap.total > previous.total:
            recent = Snapshot({"": snap.total - previous.total}, snap.escalations - previous.escalations, 0.0, 0.0, {})
            table.add_row("status, since last reading", _verdict(drifted(recent, band)))
        if snap.window_items < MIN_DRIFT_DECISIONS and not snap.router_drift:
            table.add_row("status, router window", f"too few decisions (< {MIN_DRIFT_DECISIONS})")
        else:
            table.add_row("status, router window", _verdict(window_drifted(snap, band)))
    elif snap.router_drift:
        table.add_row("status, router window", "[bold red]DRIFT[/] (the router's drift gauge)")
    return table


def _verdict(drift: bool) -> str:
    return "[bold red]DRIFT[/]" if drift else "[green]within band[/]"


def scrape(url: str, timeout: float) -> Snapshot:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (an operator-given URL)
        return parse(response.read().decode())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m router.monitor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metrics", required=True, help="the router's /metrics URL, e.g. http://127.0.0.1:9100/metrics")
    p.add_argument("--thresholds", type=Path, default=None,
                   help="thresholds file from router.tune (for the band; default: the band the router publishes)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between readings (default %(default)s)")
    p.add_argument("--once", action="store_true", help="one reading, then exit (4 on DRIFT)")
    p.add_argument("--count", type=int, default=0, help="stop after N readings (default 0: until interrupted)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if "://" not in args.metrics:
        p.error(f"--metrics takes a URL such as http://{args.metrics}/metrics, got {args.metrics!r}")
    if not (math.isfinite(args.interval) and args.interval > 0):
        p.error(f"--interval must be a positive number of seconds, got {args.interval}")
    if args.count < 0:
        p.error(f"--count must be 0 (until interrupted) or more, got {args.count}")
    try:
        band = expected_band(args.thresholds) if args.thresholds else None
    except json.JSONDecodeError as err:
        p.error(f"--thresholds {args.thresholds} is not JSON ({err}); give a file written by `python -m router.tune`")
    except (OSError, ValueError, TypeError, KeyError) as err:  # missing, no or a malformed band
        p.error(f"--thresholds {args.thresholds}: {err}")
    console, previous, done = Console(), None, 0
    while True:
        try:
            snap = scrape(args.metrics, timeout=max(1.0, args.interval))
        except http.client.HTTPException as err:  # something answered, but not HTTP
            console.print(f"[red]cannot read {args.metrics}: the answer is not HTTP ({type(err).__name__})[/]; "
                          "is that the router's gRPC port? /metrics is on its --metrics-port", highlight=False)
            return 1
        except (OSError, ValueError) as err:  # no answer, a bad URL, not Prometheus text
            console.print(f"[red]cannot read {args.metrics}: {err}[/]; is the router running with --metrics-port?",
                          highlight=False)
            return 1
        shown = band or snap.router_band
        console.print(render(snap, previous, shown))
        done += 1
        if args.once:
            return DRIFT_EXIT if window_drifted(snap, shown) else 0
        if args.count and done >= args.count:
            return 0
        previous = snap
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
