"""Load test: N concurrent edge clients for T seconds through router and cloud, on 127.0.0.1.

    python -m bench.load --out docs/results/reliability/load.json                  # 64 clients, 60 s
    python -m bench.load --clients 16 --seconds 10                                 # a quick run
    python -m bench.load --router-max-inflight 8 --cloud-max-queue 2 --seconds 20 \\
        --out docs/results/reliability/load-backpressure.json                      # small queue bounds

1. Starts one cloud replica (``python -m cloud``) and one router (``python -m router``, its own Ray
   cluster, one CPU edge worker) on free ports from ``--checkpoint`` (the shipped vision model), with
   the shipped thresholds (no ``--thresholds``: max softmax >= 0.8). ``--router HOST:PORT`` attaches
   to a running router instead (then memory is reported for the ``--pid NAME=PID`` given).
2. ``--clients`` asyncio clients, each with its own channel, send one Fashion-MNIST test image per
   request (random order), back to back, for ``--warmup-s`` (not counted) and then ``--seconds``,
   at most ``--max-requests`` in all. A client answered RESOURCE_EXHAUSTED or UNAVAILABLE waits
   ``--backoff-ms`` before its next request (what a polite client does).
3. Every second the resident memory (RSS, from /proc) of each process is sampled: the router, its
   Ray edge worker(s), Ray's own processes, the cloud replica.

Reports requests, answers by tier (edge, cloud, degraded edge), errors by status code, p50/p99/max
latency, the measured escalation rate, and each process's RSS at the start of the measured
window, at its end, its peak and its growth. JSON to ``--out`` (and a memory plot beside it with
``--plot``); a table on stdout. Linux only (/proc). Loops are bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.router_overhead import DEFAULT_CHECKPOINT, REPO_ROOT, free_port, machine
from proto import matmamba_pb2 as pb
from proto.tensors import to_tensor_msg

log = logging.getLogger("bench.load")

START_TIMEOUT_S = 240.0
SAMPLE_S = 1.0  # between memory samples
MIB = 1 << 20
BACKED_OFF = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


# ------------------------------------------------------------------ processes and their memory


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def router_processes(router_pid: int) -> dict[str, list[int]]:
    """The router's process tree by role: Ray edge worker actors, and Ray's own processes."""
    tree, stack, found = _children(), [router_pid], {"edge workers (Ray actors)": [], "ray (gcs, raylet, ...)": []}
    while stack:
        for child in tree.get(stack.pop(), []):
            stack.append(child)
            role = "edge workers (Ray actors)" if "EdgeWorker" in _cmdline(child) else "ray (gcs, raylet, ...)"
            found[role].append(child)
    return found


@dataclass
class MemoryWatch:
    """RSS samples of named groups of processes (a group's RSS is the sum over its processes)."""

    groups: dict[str, list[int]]
    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)

    def sample(self, t: float) -> None:
        self.samples.append((t, {name: sum(rss_bytes(p) for p in pids) for name, pids in self.groups.items()}))

    def report(self, start: float) -> dict[str, dict[str, float]]:
        """Per group: RSS (MiB) at the first sample at/after ``start``, at the end, peak, growth."""
        window = [s for t, s in self.samples if t >= start] or self.samples[-1:]
        out = {}
        for name in self.groups:
            first, last = window[0][name] / MIB, window[-1][name] / MIB
            peak = max(s[name] for s in window) / MIB
            out[name] = {"start_mib": round(first, 1), "end_mib": round(last, 1), "peak_mib": round(peak, 1),
                         "growth_mib": round(last - first, 1), "processes": len(self.groups[name])}
        return out


class Servers:
    """The cloud replica and router this run started (or nothing, when attached)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.procs, self.tmp = args, {}, Path(tempfile.mkdtemp(prefix="load-"))

    def _start(self, name: str, module: str, flags: list[str]) -> subprocess.Popen:
        log_file = self.tmp / f"{name}.log"
        with open(log_file, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", module, *flags], cwd=REPO_ROOT, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def start(self) -> str:
        """Cloud and router on free ports; returns the router's address once both serve."""
        a = self.args
        cloud, router = free_port(), free_port()
        self._start("cloud", "cloud", ["--checkpoint", str(a.checkpoint), "--port", str(cloud), "--metrics-port",
                                       "-1", "--cpu-threads", "1", "--max-queue", str(a.cloud_max_queue),
                                       "--log-level", "WARNING"])
        self._start("router", "router", ["--checkpoint", str(a.checkpoint), "--edge-level", str(a.edge_level),
                                         "--cloud", f"127.0.0.1:{cloud}", "--port", str(router), "--metrics-port",
                                         "-1", "--edge-cpus", "1", "--max-inflight", str(a.router_max_inflight),
                                         "--log-level", "WARNING"])
        for name, port in (("cloud", cloud), ("router", router)):
            self._wait(name, f"127.0.0.1:{port}")
        return f"127.0.0.1:{router}"

    def _wait(self, name: str, address: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.procs[name].poll() is not None:
                    raise RuntimeError(f"{name} exited with {self.procs[name].returncode}; see {self.tmp}/{name}.log")
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return
                except grpc.RpcError:
                    time.sleep(0.2)
        raise TimeoutError(f"{name} did not serve within {START_TIMEOUT_S} s; see {self.tmp}/{name}.log")

    def groups(self) -> dict[str, list[int]]:
        """Process groups to watch: router, its Ray processes by role, cloud (or the --pid ones)."""
        if not self.procs:
            return {name: [int(pid)] for name, pid in (p.split("=", 1) for p in self.args.pid)}
        router = self.procs["router"].pid
        return {"router": [router], **router_processes(router), "cloud": [self.procs["cloud"].pid]}

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every started process, wait for the drain; their exit codes."""
        for proc in self.procs.values():
            proc.terminate()
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = None
        return codes


# ------------------------------------------------------------------ clients


@dataclass
class Tally:
    """What the clients saw in the measured window."""

    latencies_ms: list[float] = field(default_factory=list)
    tiers: Counter = field(default_factory=Counter)  # edge, cloud, degraded
    errors: Counter = field(default_factory=Counter)  # status code name -> count
    sent: int = 0


async def client(address: str, requests: list[bytes], seed: int, window: tuple[float, float], tally: Tally,
                 args: argparse.Namespace) -> None:
    """Back-to-back one-image requests until the window ends (or --max-requests were sent in all)."""
    start, end = window
    rng = np.random.default_rng(seed)
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary("/matmamba.v1.Inference/Classify", response_deserializer=pb.ClassifyReply.FromString)
        while time.monotonic() < end and tally.sent < args.max_requests:
            counted = time.monotonic() >= start
            tally.sent += counted
            t0 = time.perf_counter()
            try:
                reply = await call(requests[rng.integers(len(requests))], timeout=args.timeout_s)
            except grpc.aio.AioRpcError as err:
                if counted:
                    tally.errors[err.code().name] += 1
                if err.code() in BACKED_OFF:
                    await asyncio.sleep(args.backoff_ms / 1e3)
                continue
            if counted:
                served = reply.results[0].served_by
                tally.latencies_ms.append((time.perf_counter() - t0) * 1e3)
                tally.tiers["degraded" if served.degraded else ("cloud" if served.tier == pb.CLOUD else "edge")] += 1


async def drive(address: str, requests: list[bytes], watch: MemoryWatch, args: argparse.Namespace) -> tuple:
    """Run the clients and the memory sampler; (tally, measured-window start, its length in s)."""
    now = time.monotonic()
    start, end = now + args.warmup_s, now + args.warmup_s + args.seconds
    tally = Tally()
    clients = [asyncio.create_task(client(address, requests, i, (start, end), tally, args))
               for i in range(args.clients)]
    while time.monotonic() < end:
        watch.sample(time.monotonic())
        await asyncio.sleep(SAMPLE_S)
    await asyncio.gather(*clients)
    watch.sample(time.monotonic())
    return tally, start, time.monotonic() - start


def summarize(tally: Tally, seconds: float) -> dict[str, object]:
    lat = np.asarray(tally.latencies_ms) if tally.latencies_ms else np.zeros(1)
    answered = sum(tally.tiers.values())
    return {"requests": tally.sent, "answered": answered, "errors": dict(tally.errors),
            "lost": tally.sent - answered - sum(tally.errors.values()),
            "answers_by_tier": dict(tally.tiers),
            "escalation_rate": round((tally.tiers["cloud"] + tally.tiers["degraded"]) / max(answered, 1), 4),
            "answers_per_s": round(answered / seconds, 1),
            "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2),
                           "p99": round(float(np.percentile(lat, 99)), 2), "max": round(float(lat.max()), 2)}}


def plot(watch: MemoryWatch, start: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    t = np.array([s[0] for s in watch.samples]) - start
    for name in watch.groups:
        ax.plot(t, [s[1][name] / MIB for s in watch.samples], label=name)
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="seconds (0 = end of warm-up)", ylabel="RSS (MiB)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result["summary"]
    table = Table(title=f"{result['config']['clients']} clients, {result['config']['seconds']} s")
    for column in ("requests", "edge", "cloud", "degraded", "errors", "lost", "esc. rate", "p50 ms", "p99 ms",
                   "max ms", "answers/s"):
        table.add_column(column)
    tiers = s["answers_by_tier"]
    table.add_row(str(s["requests"]), *(str(tiers.get(k, 0)) for k in ("edge", "cloud", "degraded")),
                  json.dumps(s["errors"]), str(s["lost"]), f"{s['escalation_rate']:.1%}",
                  *(str(s["latency_ms"][k]) for k in ("p50", "p99", "max")), str(s["answers_per_s"]))
    memory = Table(title="resident memory (MiB) over the measured window")
    for column in ("process", "start", "end", "peak", "growth"):
        memory.add_column(column)
    for name, m in result["memory"].items():
        memory.add_row(f"{name} ({m['processes']})", *(str(m[k]) for k in ("start_mib", "end_mib", "peak_mib",
                                                                             "growth_mib")))
    console = Console(width=140)
    console.print(table)
    console.print(memory)


def load_requests(n: int) -> list[bytes]:
    from matmamba.data import load_fashion_mnist

    images = load_fashion_mnist("test-sample")[0][:n].numpy()  # (n, 28, 28) uint8
    return [pb.ClassifyRequest(images=to_tensor_msg(image[None, None])).SerializeToString() for image in images]


def run(args: argparse.Namespace) -> dict[str, object]:
    servers = Servers(args)
    address = args.router or servers.start()
    exit_codes: dict = {}
    try:
        requests = load_requests(args.images)
        watch = MemoryWatch(servers.groups())
        tally, start, seconds = asyncio.run(drive(address, requests, watch, args))
    finally:
        if not args.router:
            exit_codes = servers.stop()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"machine": machine(), "config": config, "measured_seconds": round(seconds, 2),
              "summary": summarize(tally, seconds), "memory": watch.report(start),
              "exit_codes_after_sigterm": exit_codes,
              "memory_samples_mib": [[round(t - start, 2), {k: round(v / MIB, 1) for k, v in s.items()}]
                                     for t, s in watch.samples]}
    if args.plot:
        plot(watch, start, args.plot, f"RSS under load: {args.clients} clients")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--edge-level", type=int, default=4)
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default %(default)s)")
    p.add_argument("--seconds", type=float, default=60.0, help="measured window (default %(default)s)")
    p.add_argument("--warmup-s", type=float, default=5.0, help="unmeasured load first (default %(default)s)")
    p.add_argument("--max-requests", type=int, default=500_000, help="bound on requests in all")
    p.add_argument("--timeout-s", type=float, default=30.0, help="each request's deadline (default %(default)s)")
    p.add_argument("--backoff-ms", type=float, default=50.0,
                   help="a client's pause after RESOURCE_EXHAUSTED / UNAVAILABLE (default %(default)s)")
    p.add_argument("--images", type=int, default=2000, help="test images sent in random order (default %(default)s)")
    p.add_argument("--router-max-inflight", type=int, default=0, help="router --max-inflight (0 = no limit)")
    p.add_argument("--cloud-max-queue", type=int, default=1024, help="cloud --max-queue (default %(default)s)")
    p.add_argument("--router", default=None, help="attach to this router instead of starting processes")
    p.add_argument("--pid", action="append", default=[], help="NAME=PID to watch when attached (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    p.add_argument("--plot", type=Path, default=None, help="write a memory-over-time plot (PNG) here")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.router and not args.router.startswith("127.0.0.1:"):
        raise SystemExit("--router must be on 127.0.0.1 (this load test stays on this host)")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    result = run(args)
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print_table(result)


if __name__ == "__main__":
    main()
