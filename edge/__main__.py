"""``python -m edge``: the edge device command line (no torch).

    python -m edge classify IMAGE... --router HOST:PORT     # PNG/JPEG, .npy files, or directories of them
    python -m edge generate "PROMPT" --router HOST:PORT [--max-tokens N]
    python -m edge info --router HOST:PORT
    python -m edge demo --router HOST:PORT [--cloud HOST:PORT] [--limit N] [--plot FILE]

classify prints one line per image (label, tier, confidence, latency) and a summary: answers per
tier, the escalation rate (cloud answers plus degraded ones), and p50/p99 latency. generate
streams the text; tokens written by the cloud are shown in color on a terminal and between
``[[`` and ``]]`` otherwise (degraded edge tokens: yellow, or ``{{ }}``). demo measures the cascade
on the shipped held-out Fashion-MNIST test images and prints one table (edge/demo.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TextIO

import numpy as np
from rich.console import Console

from proto.ports import MAX_PORT, port_beyond_range
from proto.security import add_channel_security_flags, channel_security_from_args

from . import demo
from .client import DEFAULT_ROUTER, EdgeClient, Prediction, RouterError
from .images import expand_paths, load_images
from .streaming import stream_generation

log = logging.getLogger("edge")


def build_parser() -> argparse.ArgumentParser:
    """The CLI: classify, generate, info and demo, each with --router, --timeout and the TLS / token flags."""
    p = argparse.ArgumentParser(prog="python -m edge", description="Call a MatMamba router from an edge device.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("classify", help="classify images through the router")
    c.add_argument("images", nargs="+", help="PNG/JPEG or .npy files, or directories of them")
    c.add_argument("--concurrency", type=int, default=4, help="requests in flight (default %(default)s)")
    g = sub.add_parser("generate", help="stream a generation through the router")
    g.add_argument("prompt", help="the text prompt")
    g.add_argument("--max-tokens", type=int, default=0, help="most new tokens (default 0: the router's default, 64)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for a reproducible generation")
    g.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="mark cloud tokens with color (auto: when stdout is a terminal) or brackets")
    sub.add_parser("info", help="describe the model the router serves")
    d = sub.add_parser("demo", help="measure the cascade on held-out Fashion-MNIST test images (one table)")
    demo.add_arguments(d)
    for command in sub.choices.values():
        command.add_argument("--router", default=DEFAULT_ROUTER, help="router address HOST:PORT (%(default)s)")
        command.add_argument("--timeout", type=float, default=30.0,
                             help="seconds per call, retries of UNAVAILABLE included (%(default)s)")
        add_channel_security_flags(command, what="the router")
    return p


def connect(args: argparse.Namespace) -> EdgeClient:
    """A client of --router with --timeout and the TLS / token flags."""
    return EdgeClient(args.router, timeout_s=args.timeout, security=channel_security_from_args(args))


@dataclass
class ClassifyRow:
    """One image's line of output: its name and prediction, or the error that came instead."""

    name: str
    prediction: Prediction | None
    error: str = ""


def _classify_one(client: EdgeClient, name: str, image: np.ndarray) -> ClassifyRow:
    try:
        return ClassifyRow(name, client.classify(image)[0])
    except RouterError as err:
        return ClassifyRow(name, None, f"{err.code.name}: {err.details}")


def format_row(row: ClassifyRow, width: int) -> str:
    """One output line: name, label, tier (and degraded), confidence, latency."""
    if row.prediction is None:
        return f"{row.name:<{width}}  ERROR {row.error}"
    p = row.prediction
    tier = p.tier + (" (degraded)" if p.degraded else "")
    return (f"{row.name:<{width}}  {p.label or p.class_index:<12} {tier:<16} "
            f"conf {p.confidence:6.3f}  {p.latency_ms:8.1f} ms")


def summarize(rows: list[ClassifyRow]) -> str:
    """Counts per tier, the escalation rate and latency percentiles of the answered rows."""
    answered = [r.prediction for r in rows if r.prediction is not None]
    tiers = Counter(p.tier for p in answered)
    degraded = sum(p.degraded for p in answered)
    escalated = tiers["cloud"] + degraded
    lines = [f"{len(rows)} image(s): {tiers['edge']} edge ({degraded} degraded), {tiers['cloud']} cloud, "
             f"{len(rows) - len(answered)} error(s)"]
    if answered:
        latency = np.array([p.latency_ms for p in answered])
        lines.append(f"escalation rate {escalated / len(answered):.1%} ({escalated}/{len(answered)}); "
                     f"latency p50 {np.percentile(latency, 50):.1f} ms, p99 {np.percentile(latency, 99):.1f} ms")
    return "\n".join(lines)


def run_classify(args: argparse.Namespace, out: TextIO) -> int:
    """Classify every image (one request each, --concurrency in flight); exit 1 if any failed."""
    files = expand_paths(args.images)  # a missing file is said before the router is called
    with connect(args) as client:
        size = client.info().image_size or None
        items = load_images(files, size=size)
        width = min(max(len(name) for name, _ in items), 60)
        rows: list[ClassifyRow] = []
        with ThreadPoolExecutor(max(1, args.concurrency)) as pool:
            for row in pool.map(lambda item: _classify_one(client, *item), items):
                rows.append(row)
                print(format_row(row, width), file=out, flush=True)
    print(summarize(rows), file=out)
    return 1 if any(r.prediction is None for r in rows) else 0


def run_generate(args: argparse.Namespace, out: TextIO) -> int:
    """Stream a generation to ``out``; a summary of tokens per tier goes to stderr."""
    color = args.color == "always" or (args.color == "auto" and out.isatty())
    with connect(args) as client:
        result = stream_generation(client, args.prompt, out, color, max_tokens=args.max_tokens,
                                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(result.summary(), file=sys.stderr)
    return 0


def run_info(args: argparse.Namespace, out: TextIO) -> int:
    """Print the served model and the health of the router's cloud."""
    with connect(args) as client:
        info = client.info()
        cloud = client.health("matmamba.v1.Inference/cloud")
    print(f"task {info.task}, checkpoint {info.checkpoint[:12]}..., edge width {info.edge_width} "
          f"(level {info.edge_level}) on {info.device}; cloud {cloud}", file=out)
    return 0


def run_demo(args: argparse.Namespace, out: TextIO) -> int:
    """The demo table (edge/demo.py); exit 1 if any request failed."""
    result = demo.run_demo(args, Console(file=out))
    return 1 if result.summary.errors or result.summary.cloud_errors else 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors are logged and give exit status 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if port_beyond_range(args.router):
        parser.error(f"--router {args.router}: a port must be in 0..{MAX_PORT}")
    if not args.timeout > 0:
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if getattr(args, "concurrency", 1) < 1:
        parser.error(f"--concurrency must be at least 1, got {args.concurrency}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    commands = {"classify": run_classify, "generate": run_generate, "info": run_info, "demo": run_demo}
    try:
        return commands[args.command](args, sys.stdout)
    except (RouterError, OSError, ValueError, TypeError) as err:
        log.error("%s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
