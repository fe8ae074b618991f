"""Scale-out of the cloud tier: throughput and p99 through the router with 1 and N cloud replicas, in one run.

    python -m bench.scale_bench --device cuda --replicas 1,2 --out runs/scale/scale-gpu.json           # 1 per GPU
    python -m bench.scale_bench --device cuda --replicas 1,2 --replicas-per-gpu 2 --out ...            # 1-GPU stand-in
    python -m bench.scale_bench --device cpu --replicas 1,2 --seconds 10 --out docs/results/scale/scale-cpu.json
    python -m bench.scale_bench --serve ...     # the Ray Serve deployment (cloud/serve_app.py) instead

All real processes on 127.0.0.1, as bench/load.py starts them (its ``Servers``):

1. max(``--replicas``) cloud replicas, ``python -m cloud`` each with its own gRPC and /metrics port.
   On CUDA replica i gets ``CUDA_VISIBLE_DEVICES`` = GPU i // ``--replicas-per-gpu`` (1: one replica
   per GPU; 2 on one GPU: the stand-in for two GPUs). Replica 0 starts alone (on a fresh GPU machine
   it compiles and autotunes the Triton kernels into the on-disk cache, on a quiet GPU), the rest
   then start together.
2. For each N in ``--replicas``: ``--routers`` router processes (``python -m router``, each starting
   its own network-quiet Ray cluster through router.ray_setup.init_ray, or joining ``--ray-address``)
   whose ``--cloud`` lists the first N replicas, with a thresholds file that escalates every image
   (:func:`escalate_all_thresholds`), so that all load reaches the cloud tier.
3. ``--client-procs`` client processes, each running ``--clients`` of bench/load.py's back-to-back
   client loops (one channel each, ``--images-per-request`` Fashion-MNIST test images per request),
   ``--warmup-s`` unmeasured, then ``--seconds`` measured (at most ``--max-requests`` requests in all).
   The cloud replicas' and routers' /metrics are read at the start and end of the measured window.

Reported per N: images/s and requests/s, p50/p99/max latency, answers by tier (per request from the
clients; per image from the routers' ``router_items_total``), degraded answers, errors by gRPC code
(there must be none), per-replica Classify calls and their share (least-outstanding balancing must
spread the work), each replica's busy fraction (``compute_seconds`` per second of window: near 1
means the cloud tier was the bottleneck, far below it means the load or the router was) and mean
batch; and the scaling ratio images/s(N) / images/s(smallest N). JSON to ``--out``, a markdown
table (machine, versions, date) to stdout and beside the JSON, a plot (throughput and p99 against
replicas) beside it. Exit code 1 when a request failed or was lost, or a replica got less than half
its fair share of the calls.

``--serve``: instead of separate replicas, ``python -m cloud.serve_app --replicas N`` (Ray Serve, one
port; ``--num-gpus`` 1 / ``--replicas-per-gpu``) per N, behind one router. Needs Ray Serve's extras
(docs/CLOUD.md); without them the run stops with a message saying so. Serve has no per-replica
/metrics, so no per-replica counts in that mode, and its gRPC proxy listens on all interfaces.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.load import Servers, Tally, client, summarize
from bench.plots import pyplot
from bench.router_overhead import DEFAULT_CHECKPOINT, REPO_ROOT, free_port, machine
from proto import matmamba_pb2 as pb
from proto.tensors import to_tensor_msg

log = logging.getLogger("bench.scale_bench")

# neg_entropy = sum_c p ln p is < 0 unless the edge softmax is exactly one-hot in float32 (every
# other class underflowed to 0: a logit gap over ~100), and the router escalates when
# confidence < threshold; 0 is the top of the measure's range, the highest threshold the file may hold.
ESCALATE_ALL = ("neg_entropy", 0.0)
DISTINCT_REQUESTS = 64  # different request payloads each client process cycles through
SCRAPE_TIMEOUT_S = 10.0


# ------------------------------------------------------------------ pure helpers


def parse_counts(text: str) -> tuple[int, ...]:
    """``--replicas 1,2,4`` -> (1, 2, 4): positive, increasing."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected replica counts such as 1,2; got {text!r}") from None
    if not counts or any(n < 1 for n in counts) or list(counts) != sorted(set(counts)):
        raise argparse.ArgumentTypeError(f"replica counts must be positive and increasing, such as 1,2; got {text!r}")
    return counts


def placement(replicas: int, device: str, gpus: int, per_gpu: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each replica (None on the CPU): replica i on GPU i // per_gpu."""
    if device == "cpu":
        return [None] * replicas
    if per_gpu < 1:
        raise ValueError(f"--replicas-per-gpu must be at least 1, got {per_gpu}")
    if replicas > gpus * per_gpu:
        raise ValueError(f"{replicas} replicas need {-(-replicas // per_gpu)} GPUs at {per_gpu} per GPU, but "
                         f"{gpus} GPU(s) are visible: lower --replicas or raise --replicas-per-gpu")
    return [str(i // per_gpu) for i in range(replicas)]


def escalate_all_thresholds(checkpoint: Path, edge_level: int) -> dict[str, Any]:
    """A thresholds file (router/thresholds.py) that sends every image to the cloud tier.

    It names the checkpoint's fingerprint (from its config.json, when it records one), so the
    router's origin check passes, and the edge level the router runs.
    """
    config = json.loads((checkpoint / "config.json").read_text())
    measure, threshold = ESCALATE_ALL
    data = {"measure": measure, "threshold": threshold, "edge_level": edge_level,
            "version": "scale-bench-escalate-all", "target_escalation": 1.0}
    if config.get("fingerprint"):
        data["checkpoint_fingerprint"] = config["fingerprint"]
    return data


def merge_tallies(tallies: list[Tally]) -> Tally:
    """One Tally of several client processes' tallies."""
    merged = Tally()
    for t in tallies:
        merged.latencies_ms += t.latencies_ms
        merged.tiers.update(t.tiers)
        merged.errors.update(t.errors)
        merged.sent += t.sent
    return merged


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A Prometheus text page as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def delta(after: dict, before: dict, name: str, **labels: str) -> float:
    """Change of the sum of the samples called ``name`` whose labels include ``labels``."""
    def total(page: dict) -> float:
        return sum(v for (n, ls), v in page.items() if n == name and labels.items() <= dict(ls).items())

    return total(after) - total(before)


def replica_figures(before: dict, after: dict, seconds: float) -> dict[str, float]:
    """One replica over the window: Classify calls answered OK, busy fraction, mean batch (from its /metrics)."""
    batches = delta(after, before, "matmamba_cloud_batch_size_count", method="Classify")
    return {"classify_ok": delta(after, before, "matmamba_cloud_requests_total", method="Classify", code="OK"),
            "classify_failed": (delta(after, before, "matmamba_cloud_requests_total", method="Classify")
                                - delta(after, before, "matmamba_cloud_requests_total", method="Classify", code="OK")),
            "busy": round(delta(after, before, "matmamba_cloud_compute_seconds_sum", method="Classify") / seconds, 3),
            "mean_batch": round(delta(after, before, "matmamba_cloud_batch_size_sum", method="Classify")
                                / max(batches, 1), 1)}


def balance(calls: list[float]) -> dict[str, Any]:
    """Shares of the replicas' calls; ``spread`` when every replica got at least half its fair share."""
    total = sum(calls)
    shares = [c / total if total else 0.0 for c in calls]
    return {"shares": [round(s, 3) for s in shares],
            "spread": bool(total) and min(shares) >= 0.5 / len(calls)}


def router_items(before: dict, after: dict) -> dict[str, float]:
    """Images the routers answered in the window, by tier (edge, cloud, degraded)."""
    out = {"edge": 0.0, "cloud": 0.0, "degraded": 0.0}
    for (name, labels), value in after.items():
        if name != "router_items_total":
            continue
        ls = dict(labels)
        key = "degraded" if ls.get("degraded") == "true" else ls.get("tier", "")
        if key in out:
            out[key] += value - before.get((name, labels), 0.0)
    return out


def cloud_calls(before: dict, after: dict) -> dict[str, float]:
    """A router's finished cloud calls in the window, as {"REPLICA CODE": count} (router_cloud_calls_total)."""
    out = {}
    for (name, labels), value in after.items():
        if name == "router_cloud_calls_total":
            ls = dict(labels)
            out[f"{ls.get('replica', '')} {ls.get('code', '')}"] = value - before.get((name, labels), 0.0)
    return out


def run_summary(tally: Tally, seconds: float, images_per_request: int) -> dict[str, Any]:
    """bench/load.py's summary of the measured window, plus images/s and requests/s."""
    s = summarize(tally, seconds)
    s["requests_per_s"] = s.pop("answers_per_s")
    s["images_per_s"] = round(s["answered"] * images_per_request / seconds, 1)
    return s


def scaling(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per replica count, the medians over rounds of images/s, requests/s, p50 and p99, and their ratios
    to the smallest count of the run (the base)."""
    counts = sorted({r["replicas"] for r in runs})
    med: dict[int, dict[str, Any]] = {}
    for n in counts:
        mine = [r["summary"] for r in runs if r["replicas"] == n]
        med[n] = {"rounds": len(mine), "images_per_s_by_round": [s["images_per_s"] for s in mine],
                  **{f"{key}_median": round(float(np.median([get(s) for s in mine])), 2) for key, get in (
                      ("images_per_s", lambda s: s["images_per_s"]), ("requests_per_s", lambda s: s["requests_per_s"]),
                      ("p50_ms", lambda s: s["latency_ms"]["p50"]), ("p99_ms", lambda s: s["latency_ms"]["p99"]))}}
    base = med[counts[0]]
    for n, m in med.items():
        m["throughput_ratio"] = round(m["images_per_s_median"] / base["images_per_s_median"], 3) \
            if base["images_per_s_median"] else None
        m["p99_ratio"] = round(m["p99_ms_median"] / base["p99_ms_median"], 3) if base["p99_ms_median"] else None
        m["ideal"] = n / counts[0]
    return {str(n): m for n, m in med.items()}


def failures(result: dict[str, Any]) -> list[str]:
    """What went wrong in a run (empty when nothing did): errors, lost requests, a replica left idle."""
    problems = []
    for r in result["runs"]:
        s, n = r["summary"], r["replicas"]
        if s["errors"]:
            problems.append(f"{n} replica(s): errors {s['errors']}")
        if s["lost"]:
            problems.append(f"{n} replica(s): {s['lost']} requests lost")
        if not s["answered"]:
            problems.append(f"{n} replica(s): no answers")
        if r.get("balance") and not r["balance"]["spread"]:
            problems.append(f"{n} replica(s): the work was not spread, shares {r['balance']['shares']}")
    return problems


# ------------------------------------------------------------------ processes


@contextmanager
def visible_devices(value: str | None) -> Iterator[None]:
    """Processes started inside see only GPU ``value`` (None: the environment unchanged)."""
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT_S) as reply:
        return samples(reply.read().decode())


class Clouds:
    """The cloud replicas of the run: ``python -m cloud`` processes (bench/load.py's Servers)."""

    def __init__(self, args: argparse.Namespace, gpus: list[str | None]) -> None:
        self.servers, self.args, self.gpus = Servers(args), args, gpus
        self.ports = [(free_port(), free_port()) for _ in gpus]  # (gRPC, metrics)

    def addresses(self, n: int) -> list[str]:
        return [f"127.0.0.1:{port}" for port, _ in self.ports[:n]]

    def metrics_ports(self, n: int) -> list[int]:
        return [metrics for _, metrics in self.ports[:n]]

    def _start(self, i: int) -> None:
        a, (port, metrics) = self.args, self.ports[i]
        flags = ["--checkpoint", str(a.checkpoint), "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
                 str(metrics), "--device", a.device, "--max-batch", str(a.cloud_max_batch), "--max-wait-ms",
                 str(a.cloud_max_wait_ms), "--cpu-threads", str(a.cloud_cpu_threads), "--log-level", "WARNING"]
        with visible_devices(self.gpus[i]):
            self.servers._start(f"cloud{i}", "cloud", flags)

    def start(self) -> None:
        """Replica 0 alone (kernels compiled once, on a quiet GPU), then the others together."""
        self._start(0)
        self.servers._wait("cloud0", self.addresses(1)[0])
        for i in range(1, len(self.gpus)):
            self._start(i)
        for i, address in enumerate(self.addresses(len(self.gpus))[1:], start=1):
            self.servers._wait(f"cloud{i}", address)
        log.info("%d cloud replica(s) serving (GPUs %s)", len(self.gpus), self.gpus)

    def stop(self) -> dict[str, int | None]:
        return self.servers.stop()


class ServeCloud:
    """``python -m cloud.serve_app --replicas N``: N Ray Serve replicas behind one gRPC port."""

    def __init__(self, args: argparse.Namespace, replicas: int) -> None:
        self.servers, self.port = Servers(args), free_port()
        num_gpus = 0.0 if args.device == "cpu" else 1.0 / args.replicas_per_gpu
        self.servers._start("serve", "cloud.serve_app", [
            "--checkpoint", str(args.checkpoint), "--grpc-port", str(self.port), "--replicas", str(replicas),
            "--num-gpus", str(num_gpus), "--device", args.device, "--max-batch", str(args.cloud_max_batch),
            "--max-wait-ms", str(args.cloud_max_wait_ms)])
        self.servers._wait("serve", self.address)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_routers(args: argparse.Namespace, cloud: list[str], thresholds: Path, gpus: int) -> tuple[Servers, list]:
    """``--routers`` routers over ``cloud``; returns their Servers and [(gRPC address, metrics port)]."""
    servers, routers = Servers(args), []
    for r in range(args.routers):
        port, metrics = free_port(), free_port()
        flags = ["--checkpoint", str(args.checkpoint), "--edge-level", str(args.edge_level), "--cloud", ",".join(cloud),
                 "--port", str(port), "--metrics-port", str(metrics), "--thresholds", str(thresholds),
                 "--deadline-ms", str(args.deadline_ms), "--max-batch", str(args.router_max_batch),
                 "--edge-cpus", str(args.edge_cpus), "--edge-gpus", str(args.edge_gpus), "--log-level", "WARNING"]
        if args.ray_address:
            flags += ["--ray-address", args.ray_address]
        with visible_devices(str(r % gpus) if args.edge_gpus else None):
            servers._start(f"router{r}", "router", flags)
        routers.append((f"127.0.0.1:{port}", metrics))
    for r, (address, _) in enumerate(routers):
        servers._wait(f"router{r}", address)
    return servers, routers


# ------------------------------------------------------------------ clients


def load_requests(images_per_request: int, count: int = DISTINCT_REQUESTS) -> list[bytes]:
    """``count`` serialized ClassifyRequests of consecutive Fashion-MNIST test-sample images."""
    from matmamba.data import load_fashion_mnist

    images = load_fashion_mnist("test-sample")[0].numpy()  # (2000, 28, 28) uint8
    out = []
    for i in range(count):
        idx = np.arange(i * images_per_request, (i + 1) * images_per_request) % len(images)
        out.append(pb.ClassifyRequest(images=to_tensor_msg(images[idx][:, None])).SerializeToString())
    return out


def client_process(address: str, requests: list[bytes], clients: int, seed: int, window: tuple[float, float],
                   opts: dict[str, float]) -> Tally:
    """One client process: ``clients`` of bench/load.py's client loops against ``address`` in ``window``.

    ``window`` is on time.monotonic(), which on Linux is one clock for every process of the host.
    """
    tally, args = Tally(), argparse.Namespace(**opts)

    async def main() -> None:
        await asyncio.gather(*(client(address, requests, seed + i, window, tally, args) for i in range(clients)))

    asyncio.run(main())
    return tally


def _ready(_: int) -> int:
    """A no-op task that holds its process a moment, so that every pool process starts (and imports) at once."""
    time.sleep(0.5)
    return os.getpid()


# ------------------------------------------------------------------ one configuration


def add_up(figures: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise sum of several routers' figures."""
    out: dict[str, float] = {}
    for f in figures:
        for key, value in f.items():
            out[key] = out.get(key, 0.0) + value
    return out


def measure(args: argparse.Namespace, pool: ProcessPoolExecutor, requests: list[bytes], routers: list,
            cloud_metrics: list[int]) -> dict[str, Any]:
    """Drive ``routers`` from the client processes; the window's client summary and /metrics deltas."""
    opts = {"max_requests": max(1, args.max_requests // args.client_procs), "timeout_s": args.timeout_s,
            "backoff_ms": args.backoff_ms}
    start = time.monotonic() + 1.0 + args.warmup_s
    end = start + args.seconds
    jobs = [pool.submit(client_process, routers[p % len(routers)][0], requests, args.clients, 1000 * p,
                        (start, end), opts) for p in range(args.client_procs)]
    time.sleep(max(0.0, start - time.monotonic()))
    clouds_before, routers_before = [scrape(port) for port in cloud_metrics], [scrape(m) for _, m in routers]
    time.sleep(max(0.0, end - time.monotonic()))
    clouds_after, routers_after = [scrape(port) for port in cloud_metrics], [scrape(m) for _, m in routers]
    seconds = time.monotonic() - start
    tally = merge_tallies([job.result(timeout=args.seconds + args.timeout_s + 120) for job in jobs])
    pairs = list(zip(routers_before, routers_after))
    out: dict[str, Any] = {"measured_seconds": round(seconds, 2), "load_average_1min": round(os.getloadavg()[0], 2),
                           "summary": run_summary(tally, seconds, args.images_per_request),
                           "router_images_by_tier": add_up([router_items(b, a) for b, a in pairs]),
                           "router_cloud_calls": add_up([cloud_calls(b, a) for b, a in pairs])}
    if cloud_metrics:
        out["replica_figures"] = [replica_figures(b, a, seconds) for b, a in zip(clouds_before, clouds_after)]
        out["balance"] = balance([r["classify_ok"] for r in out["replica_figures"]])
    return out


# ------------------------------------------------------------------ the run


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "grpc": grpc.__version__}
    for package in ("torch", "ray", "numpy", "protobuf"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "absent"
    return out


def serve_importable() -> str:
    """"" when Ray Serve imports in this interpreter, else the reason it does not."""
    import subprocess

    check = subprocess.run([sys.executable, "-c", "import ray.serve"], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=120)
    return "" if check.returncode == 0 else (check.stderr.strip().splitlines() or ["import failed"])[-1]


def one_configuration(args: argparse.Namespace, pool: ProcessPoolExecutor, requests: list[bytes], n: int,
                      cloud: list[str], cloud_metrics: list[int], thresholds: Path, gpus: int) -> dict[str, Any]:
    log.info("%d replica(s): starting %d router(s) over %s", n, args.routers, ",".join(cloud))
    servers, routers = start_routers(args, cloud, thresholds, gpus)
    try:
        run = {"replicas": n, "cloud": cloud, **measure(args, pool, requests, routers, cloud_metrics)}
    finally:
        run_codes = servers.stop()
    run["router_exit_codes"] = run_codes
    s = run["summary"]
    log.info("%d replica(s): %.0f images/s, p99 %.1f ms, errors %s", n, s["images_per_s"], s["latency_ms"]["p99"],
             s["errors"] or "none")
    return run


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    gpus = torch.cuda.device_count() if args.device != "cpu" else 0
    places = placement(args.replicas[-1], args.device, gpus, args.replicas_per_gpu)
    tmp = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    thresholds = escalate_all_thresholds(args.checkpoint, args.edge_level)
    (tmp / "thresholds.json").write_text(json.dumps(thresholds, indent=2) + "\n")
    requests = load_requests(args.images_per_request)
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
        "versions": versions(), "mode": "serve" if args.serve else "replicas", "placement": places,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "thresholds": thresholds, "runs": []}
    with ProcessPoolExecutor(args.client_procs, mp_context=get_context("spawn")) as pool:
        list(pool.map(_ready, range(args.client_procs)))  # the client processes exist and have imported
        order = [n for _ in range(args.rounds) for n in args.replicas]  # 1, 2, 1, 2, ...: side by side
        if args.serve:
            for i, n in enumerate(order):
                serve = ServeCloud(args, n)
                try:
                    result["runs"].append(one_configuration(args, pool, requests, n, [serve.address], [],
                                                            tmp / "thresholds.json", max(gpus, 1)))
                finally:
                    result.setdefault("cloud_exit_codes", {})[f"{n} (run {i})"] = serve.servers.stop()
        else:
            clouds = Clouds(args, places)
            try:
                clouds.start()
                for n in order:
                    result["runs"].append(one_configuration(args, pool, requests, n, clouds.addresses(n),
                                                            clouds.metrics_ports(n), tmp / "thresholds.json",
                                                            max(gpus, 1)))
            finally:
                result["cloud_exit_codes"] = clouds.stop()
    result["scaling"] = scaling(result["runs"])
    result["failures"] = failures(result)
    return result


# ------------------------------------------------------------------ report


def _slash(by_tier: dict[str, float]) -> str:
    return " / ".join(f"{by_tier.get(k, 0):.0f}" for k in ("edge", "cloud", "degraded"))


def table(result: dict[str, Any]) -> str:
    m, v, c = result["machine"], result["versions"], result["config"]
    lines = [f"Scale-out of the cloud tier ({result['mode']}) on {m['gpu'] or m['cpu']} ({m['cores']} cores), "
             f"{result['date']}; Python {v['python']}, torch {v['torch']}, grpc {v['grpc']}, ray {v['ray']}.",
             f"Device {c['device']}, {c['replicas_per_gpu']} replica(s) per GPU; {c['routers']} router(s), edge level "
             f"{c['edge_level']}, every image escalated; {c['client_procs']} client processes x {c['clients']} "
             f"clients, {c['images_per_request']} images per request; {c['warmup_s']:g} s warm-up + "
             f"{c['seconds']:g} s measured per row; {c.get('rounds', 1)} round(s), replica counts alternating.", "",
             "| replicas | images/s (median) | images/s by round | requests/s | vs first row | p50 ms | p99 ms |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for n, x in result["scaling"].items():
        rounds = " / ".join(f"{r:,.0f}" for r in x["images_per_s_by_round"])
        lines.append(f"| {n} | {x['images_per_s_median']:,.0f} | {rounds} | {x['requests_per_s_median']:,.1f} | "
                     f"{x['throughput_ratio']:.2f}x (ideal {x['ideal']:g}x) | {x['p50_ms_median']} | "
                     f"{x['p99_ms_median']} |")
    lines += ["", "| run | replicas | images/s | p99 ms | requests edge / cloud / degraded | images edge / cloud / "
              "degraded (routers) | errors | Classify calls per replica (share) | replica busy | mean batch | "
              "load avg |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(result["runs"]):
        s = r["summary"]
        reps, shares = r.get("replica_figures", []), r.get("balance", {}).get("shares", [])
        calls = " / ".join(f"{x['classify_ok']:.0f} ({sh:.0%})" for x, sh in zip(reps, shares)) or "n/a (Serve)"
        busy = " / ".join(f"{x['busy']:.0%}" for x in reps) or "n/a"
        batch = " / ".join(str(x["mean_batch"]) for x in reps) or "n/a"
        errors = json.dumps(s["errors"]) if s["errors"] else "none"
        lines.append(f"| {i + 1} | {r['replicas']} | {s['images_per_s']:,.0f} | {s['latency_ms']['p99']} | "
                     f"{_slash(s['answers_by_tier'])} | {_slash(r['router_images_by_tier'])} | {errors} (lost "
                     f"{s['lost']}) | {calls} | {busy} | {batch} | {r.get('load_average_1min', '')} |")
    lines.append("")
    lines.append("Failures: " + ("; ".join(result["failures"]) if result["failures"] else "none."))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return

    med = result["scaling"]
    n = [int(k) for k in med]
    rate = [med[k]["images_per_s_median"] for k in med]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(n, rate, marker="o", label="median over rounds")
    left.scatter([r["replicas"] for r in result["runs"]], [r["summary"]["images_per_s"] for r in result["runs"]],
                 s=12, color="tab:blue", alpha=0.4, label="each round")
    left.plot(n, [rate[0] * k / n[0] for k in n], ls="--", color="grey", label="linear from the first point")
    left.set(xlabel="cloud replicas", ylabel="images/s through the router", title="throughput", xticks=n,
             ylim=(0, max(rate[0] * n[-1] / n[0], *rate, *(r["summary"]["images_per_s"] for r in result["runs"]))
                   * 1.1))
    left.legend(fontsize=8)
    right.plot(n, [med[k]["p99_ms_median"] for k in med], marker="o", color="tab:red", label="p99")
    right.plot(n, [med[k]["p50_ms_median"] for k in med], marker="o", color="tab:orange", label="p50")
    right.set(xlabel="cloud replicas", ylabel="request latency (ms), median over rounds",
              title="latency under the same load", xticks=n)
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"cloud tier scale-out ({result['mode']}) on {m['gpu'] or m['cpu']}, {result['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.scale_bench", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="a vision checkpoint")
    p.add_argument("--replicas", type=parse_counts, default=(1, 2), help="replica counts, increasing (default 1,2)")
    p.add_argument("--device", default="auto", help="auto (cuda when torch sees one), cpu or cuda")
    p.add_argument("--replicas-per-gpu", type=int, default=1, help="replicas sharing one GPU (2 = one-GPU stand-in)")
    p.add_argument("--serve", action="store_true", help="Ray Serve deployment (cloud/serve_app.py) instead")
    p.add_argument("--routers", type=int, default=1, help="router processes, each over the same replicas")
    p.add_argument("--ray-address", default="", help="routers join this Ray cluster (default: each starts its own)")
    p.add_argument("--edge-level", type=int, default=8, help="the routers' edge level (8: the cheapest edge pass)")
    p.add_argument("--edge-cpus", type=int, default=1, help="router --edge-cpus (CPU edge workers)")
    p.add_argument("--edge-gpus", type=int, default=None, help="router --edge-gpus (default 1 on cuda, 0 on cpu)")
    p.add_argument("--router-max-batch", type=int, default=64, help="router --max-batch (default %(default)s)")
    p.add_argument("--deadline-ms", type=float, default=30000.0,
                   help="router --deadline-ms: long, so that queueing under saturation does not degrade answers")
    p.add_argument("--cloud-max-batch", type=int, default=128, help="cloud --max-batch (default %(default)s)")
    p.add_argument("--cloud-max-wait-ms", type=float, default=2.0, help="cloud --max-wait-ms (default %(default)s)")
    p.add_argument("--cloud-cpu-threads", type=int, default=1, help="cloud --cpu-threads (CPU replicas)")
    p.add_argument("--images-per-request", type=int, default=16, help="images per Classify (default %(default)s)")
    p.add_argument("--client-procs", type=int, default=4, help="client processes (default %(default)s)")
    p.add_argument("--clients", type=int, default=16, help="concurrent client loops per process (default %(default)s)")
    p.add_argument("--warmup-s", type=float, default=5.0, help="unmeasured load before each window")
    p.add_argument("--seconds", type=float, default=20.0, help="measured window per replica count and round")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every replica count this many times, alternating (medians reported)")
    p.add_argument("--max-requests", type=int, default=500_000, help="bound on measured requests per replica count")
    p.add_argument("--timeout-s", type=float, default=60.0, help="each request's deadline (default %(default)s)")
    p.add_argument("--backoff-ms", type=float, default=50.0, help="a client's pause after RESOURCE_EXHAUSTED")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "scale" / "scale.json",
                   help="JSON result; the markdown table (.md) and the plot (.png) go beside it")
    p.add_argument("--replot", action="store_true", help="only redraw the plot and table of an existing --out")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the device-dependent defaults; SystemExit with a message for settings that cannot run."""
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be auto, cpu or cuda (replicas are placed with CUDA_VISIBLE_DEVICES), "
                         f"got {args.device!r}")
    if args.edge_gpus is None:
        args.edge_gpus = 1 if args.device == "cuda" else 0
    if args.images_per_request > min(args.router_max_batch, args.cloud_max_batch):
        raise SystemExit("--images-per-request must be at most --router-max-batch and --cloud-max-batch")
    for name in ("routers", "client_procs", "clients", "images_per_request", "rounds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if args.ray_address and not args.ray_address.startswith("127.0.0.1:"):
        raise SystemExit("--ray-address must be on 127.0.0.1 (this benchmark stays on this host)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.replot:
        result = json.loads(args.out.read_text())
        result["scaling"] = scaling(result["runs"])
    else:
        args = resolve(args)
        if args.serve and (why := serve_importable()):
            print(f"--serve skipped: Ray Serve does not import here ({why}); install its extras "
                  "(pip install 'ray[serve]==2.60.0', see docs/CLOUD.md) to run this mode")
            return 0
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        result = run(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    args.out.with_suffix(".md").write_text(text + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(text)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
