"""``python -m edge demo``: the cascade measured on held-out Fashion-MNIST test images, in one table.

    python -m edge demo --router HOST:PORT [--cloud HOST:PORT] [--limit N] [--plot FILE]
        [--concurrency C] [--data DIR] [--thresholds FILE] [--json FILE]

1. Every image goes to the router, one request each, ``--concurrency`` in flight, with a progress
   bar on stderr. Each answer carries its tier, the degraded flag, the edge confidence and the edge
   model's own class (``ImageResult.edge_predicted_class``), so edge-only accuracy is measured on
   the same run.
2. With ``--cloud``, every image also goes straight to that cloud replica: cloud-only accuracy and
   latency, and the full model's FLOPs per image (its ModelInfo).
3. One table: accuracy edge-only / cascade / cloud-only; answers per tier and cloud calls; the
   escalation rate against the calibrated target and its 95% band (read from the thresholds file
   the router runs when this host can read it, or from ``--thresholds``); FLOPs per image (ModelInfo)
   and saved against cloud-only; latency p50/p99 per tier; degraded answers and errors.
4. ``--plot FILE``: the trade-off curve of this run (cascade accuracy as a threshold on the edge
   confidence sweeps; needs ``--cloud``) with the measured and the calibrated operating points.
5. ``--json FILE``: the table's numbers and every image's record.

Images: the first ``--limit`` of ``t10k-{images-idx3,labels-idx1}-ubyte.gz`` in ``--data`` (default
$MATMAMBA_FMNIST_SAMPLE_DIR, else the repository's ``data/fashion-mnist-sample``: the first 2,000
Fashion-MNIST test images, used neither in training nor in calibration). No torch here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from proto import matmamba_pb2 as pb

from .calibration import expected_band, outside_band, tradeoff, wilson
from .client import EdgeClient, Prediction, RouterError
from .images import read_idx

SAMPLE_DIR_ENV = "MATMAMBA_FMNIST_SAMPLE_DIR"
DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "fashion-mnist-sample"
NO_ANSWER = -1  # class of an image whose request failed


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo subcommand's flags (--router and --timeout are added by the CLI for every command)."""
    p.add_argument("--cloud", default=None, help="a cloud replica HOST:PORT, called directly for cloud-only numbers")
    p.add_argument("--limit", type=int, default=2000, help="test images to send (default %(default)s: all shipped)")
    p.add_argument("--plot", type=Path, default=None, help="write the trade-off curve PNG here (needs --cloud)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default %(default)s)")
    p.add_argument("--data", type=Path, default=None,
                   help=f"directory of the IDX test files (default ${SAMPLE_DIR_ENV} or data/fashion-mnist-sample)")
    p.add_argument("--thresholds", type=Path, default=None,
                   help="thresholds file for the calibrated band (default: the router's, when readable here)")
    p.add_argument("--json", type=Path, default=None, help="write the numbers and per-image records here")


def load_test_images(directory: Path | None, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` test images (N, 28, 28) uint8 and labels (N,) int64."""
    directory = Path(directory or os.environ.get(SAMPLE_DIR_ENV) or DEFAULT_DATA)
    images_file, labels_file = directory / "t10k-images-idx3-ubyte.gz", directory / "t10k-labels-idx1-ubyte.gz"
    if not images_file.is_file() or not labels_file.is_file():
        raise FileNotFoundError(f"{directory} lacks {images_file.name} / {labels_file.name}; pass --data DIR "
                                "(the repository ships them in data/fashion-mnist-sample)")
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{directory}: images {images.shape} and labels {labels.shape} do not pair up")
    return images[:limit], labels[:limit].astype(np.int64)


# ------------------------------------------------------------------ running


@dataclass
class Record:
    """One image: its label and what each run answered (NO_ANSWER and an error when a request failed)."""

    label: int
    answer: int = NO_ANSWER  # the cascade's (router's) class
    edge_answer: int = NO_ANSWER  # the edge model's class, escalated or not
    tier: str = ""  # "edge" or "cloud": who answered in the cascade
    degraded: bool = False  # the router wanted the cloud, which did not answer in time
    confidence: float = math.nan  # edge confidence under the router's measure
    latency_ms: float = math.nan
    error: str = ""
    cloud_answer: int = NO_ANSWER  # the cloud replica's class when called directly (--cloud)
    cloud_latency_ms: float = math.nan
    cloud_error: str = ""


def classify_each(address: str, images: np.ndarray, concurrency: int, timeout_s: float,
                  desc: str) -> list[Prediction | str]:
    """One request per image to ``address``, ``concurrency`` in flight; a failed request gives its error text."""
    with EdgeClient(address, timeout_s=timeout_s) as client:
        def one(i: int) -> Prediction | str:
            try:
                return client.classify(images[i])[0]
            except RouterError as err:
                return f"{err.code.name}: {err.details}"

        pool = ThreadPoolExecutor(max(1, concurrency))
        try:
            return list(tqdm(pool.map(one, range(len(images))), total=len(images), desc=desc, unit="img",
                             file=sys.stderr, dynamic_ncols=True))
        finally:  # on Ctrl-C: drop the queued requests, let the running ones finish
            pool.shutdown(wait=True, cancel_futures=True)


def fill_cascade(records: list[Record], answers: list[Prediction | str]) -> None:
    for rec, p in zip(records, answers):
        if isinstance(p, str):
            rec.error = p
            continue
        if p.edge_class is None:
            raise ValueError("the router's answers lack edge_predicted_class: is --router a router "
                             "(not a cloud replica), and as new as this client?")
        rec.answer, rec.edge_answer, rec.tier, rec.degraded = p.class_index, p.edge_class, p.tier, p.degraded
        rec.confidence, rec.latency_ms = p.confidence, p.latency_ms


def fill_cloud(records: list[Record], answers: list[Prediction | str]) -> None:
    for rec, p in zip(records, answers):
        if isinstance(p, str):
            rec.cloud_error = p
        else:
            rec.cloud_answer, rec.cloud_latency_ms = p.class_index, p.latency_ms


# ------------------------------------------------------------------ the numbers


@dataclass
class Calibration:
    """The router's thresholds in force and, when its file is readable here, what tuning expected."""

    measure: str
    threshold: float
    version: str
    target: float  # escalation rate tuned for (0 when unknown, e.g. the built-in default)
    path: str = ""
    band: tuple[float, float, float] | None = None  # expected rate and its 95% interval
    expected_accuracy: float | None = None  # cascade accuracy on the calibration data


def read_calibration(t: pb.Thresholds, override: Path | None) -> Calibration:
    """The thresholds in force plus the band of ``override`` or of the router's file (when this host has it)."""
    cal = Calibration(t.measure, t.threshold, t.version, t.target_escalation, t.path)
    path = override or (Path(t.path) if t.path and Path(t.path).is_file() else None)
    if path is None:
        return cal
    try:
        cal.band = expected_band(path)
        cal.expected_accuracy = json.loads(path.read_text()).get("expected_accuracy", {}).get("cascade")
        cal.path = str(path)
    except (OSError, ValueError, AttributeError) as err:
        if override is not None:
            raise ValueError(f"--thresholds {override}: {err}") from None
    return cal


@dataclass
class Summary:
    """Everything the table shows."""

    n: int
    errors: int
    accuracy: dict[str, float | None]  # "edge-only", "cascade", "cloud-only" (None without --cloud)
    answered: dict[str, int]  # "edge" (degraded included), "cloud", "degraded"
    escalated: int  # cloud answers + degraded ones: the items the router wanted to send to the cloud
    rate: float
    rate_ci95: tuple[float, float]  # Wilson interval of the observed rate
    within_band: bool | None  # None without a calibrated band
    mflops: dict[str, float | None]  # per image: "edge-only", "cascade", "cloud-only"
    saved: dict[str, float | None]  # FLOPs saved against cloud-only, as a fraction
    latency_ms: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # tier -> (p50, p99, count)
    tier_accuracy: dict[str, float] = field(default_factory=dict)  # accuracy of the answers of one tier
    cloud_errors: int = 0


def _percentiles(values: list[float]) -> tuple[float, float, int]:
    v = np.array([x for x in values if math.isfinite(x)])
    return (float(np.percentile(v, 50)), float(np.percentile(v, 99)), int(v.size)) if v.size else (math.nan,) * 2 + (0,)


def summarize(records: list[Record], cal: Calibration, edge_flops: int, cloud_flops: int | None,
              with_cloud: bool) -> Summary:
    """The table's numbers from the per-image records (errors count as wrong answers)."""
    n = len(records)
    label = np.array([r.label for r in records])
    correct = {name: np.array([getattr(r, key) for r in records]) == label
               for name, key in (("edge-only", "edge_answer"), ("cascade", "answer"), ("cloud-only", "cloud_answer"))}
    accuracy = {name: float(c.mean()) if n else math.nan for name, c in correct.items()}
    if not with_cloud:
        accuracy["cloud-only"] = None
    tiers = {t: [i for i, r in enumerate(records) if r.tier == t and not r.degraded] for t in ("edge", "cloud")}
    tiers["degraded"] = [i for i, r in enumerate(records) if r.degraded]
    cloud_n, degraded = len(tiers["cloud"]), len(tiers["degraded"])
    answered_n = sum(not r.error for r in records)
    escalated = cloud_n + degraded
    mflops: dict[str, float | None] = {"edge-only": edge_flops / 1e6, "cascade": None, "cloud-only": None}
    saved: dict[str, float | None] = {k: None for k in mflops}
    if cloud_flops:
        mflops["cloud-only"] = cloud_flops / 1e6
        mflops["cascade"] = (edge_flops + cloud_n / max(n, 1) * cloud_flops) / 1e6
        saved = {k: 1.0 - v * 1e6 / cloud_flops for k, v in mflops.items()}
    latency = {f"cascade: {t}": _percentiles([records[i].latency_ms for i in idx]) for t, idx in tiers.items()}
    latency["cascade"] = _percentiles([r.latency_ms for r in records])
    latency["cloud-only"] = _percentiles([r.cloud_latency_ms for r in records])
    return Summary(
        n=n, errors=n - answered_n, accuracy=accuracy,
        answered={"edge": answered_n - cloud_n, "cloud": cloud_n, "degraded": degraded},
        escalated=escalated, rate=escalated / answered_n if answered_n else math.nan,
        rate_ci95=wilson(escalated, answered_n),
        within_band=None if cal.band is None else not outside_band(escalated, answered_n, cal.band),
        mflops=mflops, saved=saved, latency_ms=latency,
        tier_accuracy={t: float(correct["cascade"][idx].mean()) for t, idx in tiers.items() if idx},
        cloud_errors=sum(bool(r.cloud_error) for r in records) if with_cloud else 0)


# ------------------------------------------------------------------ output


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _latency(s: Summary, key: str) -> str:
    p50, p99, count = s.latency_ms.get(key, (math.nan, math.nan, 0))
    return f"{p50:.1f} / {p99:.1f}" if count else "—"


def caption(s: Summary, cal: Calibration) -> str:
    """The escalation rate against the calibration, and the counts that are not in the rows."""
    target = f"target {cal.target:.1%}" if cal.target else "no calibrated target (built-in default thresholds)"
    if cal.band is not None:
        verdict = "overlaps it: within band" if s.within_band else "[bold red]lies outside it: DRIFT[/]"
        target += f" (95% band {cal.band[1]:.1%}-{cal.band[2]:.1%}); this run's 95% interval " \
                  f"{s.rate_ci95[0]:.1%}-{s.rate_ci95[1]:.1%} {verdict}"
    return (f"escalation rate {_fmt(s.rate, '.1%')} ({s.escalated}/{s.n - s.errors}) vs calibrated {target}\n"
            f"thresholds {cal.measure} < {cal.threshold:.4g} escalates ({cal.version}); "
            f"cloud calls saved vs cloud-only: {s.n - s.answered['cloud']} of {s.n}; "
            f"degraded {s.answered['degraded']}; errors {s.errors}"
            + (f" (cloud-only: {s.cloud_errors})" if s.cloud_errors else ""))


def render(s: Summary, cal: Calibration, title: str) -> Table:
    """The one table: a row per run (edge-only, the cascade and its tiers, cloud-only)."""
    table = Table(title=title, caption=caption(s, cal), caption_justify="left", title_justify="left")
    for col in ("run", "accuracy", "cloud calls", "escalated", "MFLOPs / image", "FLOPs saved", "latency p50 / p99 ms"):
        table.add_column(col, justify="left" if col == "run" else "right", no_wrap=col == "run")
    table.add_row("edge-only", _fmt(s.accuracy["edge-only"], ".4f"), "0", "0.0%", _fmt(s.mflops["edge-only"], ".1f"),
                  _fmt(s.saved["edge-only"], ".1%"), "—")
    table.add_row("[bold]cascade (router)[/]", f"[bold]{_fmt(s.accuracy['cascade'], '.4f')}[/]",
                  str(s.answered["cloud"]), f"[bold]{_fmt(s.rate, '.1%')}[/]", _fmt(s.mflops["cascade"], ".1f"),
                  _fmt(s.saved["cascade"], ".1%"), _latency(s, "cascade"))
    for tier in ("edge", "cloud", "degraded"):
        count = s.latency_ms[f"cascade: {tier}"][2]
        if count or tier != "degraded":
            table.add_row(f"  └ {tier} answers: {count}", _fmt(s.tier_accuracy.get(tier), ".4f"), "", "", "", "",
                          _latency(s, f"cascade: {tier}"))
    cloud = s.accuracy["cloud-only"] is not None
    table.add_row("cloud-only (direct)", _fmt(s.accuracy["cloud-only"], ".4f"), str(s.n - s.cloud_errors) if cloud
                  else "—", "100.0%" if cloud else "—", _fmt(s.mflops["cloud-only"], ".1f"),
                  _fmt(s.saved["cloud-only"], ".1%"), _latency(s, "cloud-only"))
    return table


def plot_tradeoff(path: Path, records: list[Record], s: Summary, cal: Calibration) -> None:
    """Cascade accuracy against escalation rate for this run, with the measured and calibrated points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if not r.error and not r.cloud_error]
    label = np.array([r.label for r in ok])
    conf = np.array([r.confidence for r in ok])
    edge_ok = np.array([r.edge_answer for r in ok]) == label
    cloud_ok = np.array([r.cloud_answer for r in ok]) == label
    curve = tradeoff(conf, edge_ok, cloud_ok, cal.measure)
    fig, ax = plt.subplots(figsize=(7, 4.8))
    ax.plot(np.append(curve.escalation, 1.0), np.append(curve.accuracy, cloud_ok.mean()), lw=1.5,
            label=f"this run: escalate when {cal.measure} < t, t swept")
    ax.axhline(edge_ok.mean(), color="tab:orange", ls=":", lw=1.2, label=f"edge-only {edge_ok.mean():.4f}")
    ax.axhline(cloud_ok.mean(), color="tab:green", ls=":", lw=1.2, label=f"cloud-only {cloud_ok.mean():.4f}")
    ax.plot([s.rate], [s.accuracy["cascade"]], "r*", ms=15, label=f"measured through the router ({s.rate:.1%})")
    if cal.band is not None:
        rate, low, high = cal.band
        ax.axvspan(low, high, color="gray", alpha=0.2, label=f"calibrated 95% band {low:.1%}-{high:.1%}")
        if cal.expected_accuracy is not None:
            ax.plot([rate], [cal.expected_accuracy], "kD", ms=7,
                    label=f"calibrated point ({rate:.1%}, on calibration data)")
    ax.set_xlabel("escalation rate (fraction of images sent to the cloud)")
    ax.set_ylabel("cascade accuracy")
    ax.set_title(f"Accuracy vs escalation on {len(ok)} held-out Fashion-MNIST test images", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ the command


@dataclass
class DemoResult:
    """What ``run_demo`` measured (its summary is the table)."""

    summary: Summary
    calibration: Calibration
    records: list[Record]
    router_info: dict
    cloud_info: dict | None

    def to_json(self) -> dict:
        return {"summary": asdict(self.summary), "calibration": asdict(self.calibration),
                "router": self.router_info, "cloud": self.cloud_info,
                "records": [asdict(r) for r in self.records]}


def _info(client: EdgeClient) -> dict:
    i = client.info()
    return {"task": i.task, "checkpoint": i.checkpoint, "width": i.edge_width, "level": i.edge_level,
            "device": i.device, "flops_per_item": i.flops_per_item}


def run_demo(args: argparse.Namespace, console: Console) -> DemoResult:
    """Measure the cascade (and cloud-only with --cloud), print the table, write --plot and --json."""
    if args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    images, labels = load_test_images(args.data, args.limit)
    with EdgeClient(args.router, timeout_s=args.timeout) as client:
        router_info, thresholds = _info(client), client.thresholds()
    if router_info["task"] != "vision":
        raise ValueError(f"the router at {args.router} serves a {router_info['task']} model; the demo needs vision")
    cal = read_calibration(thresholds, args.thresholds)
    records = [Record(int(y)) for y in labels]
    fill_cascade(records, classify_each(args.router, images, args.concurrency, args.timeout, "cascade (router)"))
    cloud_info = None
    if args.cloud:
        with EdgeClient(args.cloud, timeout_s=args.timeout) as client:
            cloud_info = _info(client)
        fill_cloud(records, classify_each(args.cloud, images, args.concurrency, args.timeout, "cloud-only"))
    summary = summarize(records, cal, router_info["flops_per_item"],
                        cloud_info["flops_per_item"] if cloud_info else None, with_cloud=bool(args.cloud))
    title = (f"MatMamba cascade on {len(records)} held-out Fashion-MNIST test images, {args.concurrency} requests "
             f"in flight: edge width "
             f"{router_info['width']} (level {router_info['level']}) on {router_info['device']}"
             + (f", cloud width {cloud_info['width']} on {cloud_info['device']}" if cloud_info else ""))
    console.print(render(summary, cal, title))
    result = DemoResult(summary, cal, records, router_info, cloud_info)
    if args.plot is not None:
        if args.cloud:
            plot_tradeoff(args.plot, records, summary, cal)
            console.print(f"trade-off curve: {args.plot}")
        else:
            console.print("no trade-off curve: it needs the cloud-only answers (--cloud HOST:PORT)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_json(), indent=1))
    return result
