"""Cloud tier benchmark: the bare model's batched forward vs the same model served over gRPC.

    python -m bench.cloud_bench --device cuda --workers 1,4,8 --out runs/cloud_bench.json  # GPU (docs/CLOUD.md)
    python -m bench.cloud_bench --device cpu --quick                                       # smoke check on CPU

Measures, for the vision checkpoint:

1. bare forward throughput (images/s) at batch sizes 1, 8, 32, 64, 128: device-resident normalised
   images, the server's precision (bf16 autocast on CUDA), synchronised, median over repetitions;
2. bare latency of one image (p50/p99 ms);
3. served throughput at saturation, for each server process count in ``--workers`` (a list: one
   `python -m cloud --workers N` after the other, in the same run): the server in a subprocess on
   127.0.0.1, loaded by ``--client-procs`` client processes (grpc.aio, ``--clients`` concurrent
   requests in all, spread over ``--connections`` TCP connections so that SO_REUSEPORT spreads them
   over the workers) sending ``--request-sizes`` images per request, median over repetitions, with
   the mean server batch size and each client process's CPU use (a client near 100 % of a core
   would be the bottleneck: the table flags it);
4. served latency at low load: one client, one image at a time (p50/p99 ms), on one worker.

Reports the added latency (served p50 - bare p50), served / bare throughput (against the bare
forward at the server's --max-batch, and against the best bare batch size) and each worker count's
throughput over one worker's. Every loop is bounded by a count and a time. JSON goes to --out
(rewritten after each worker count, so a run cut short keeps what it measured); a table is printed
last. Client processes import numpy, grpc and proto only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc
from proto.tensors import to_tensor_msg

log = logging.getLogger("cloud_bench")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "matmamba-vision-fmnist"
LISTENING = re.compile(r"listening on (\S+:\d+)")
SERVER_START_S = 180.0  # loading + Triton compilation of the warm-up batch on a fresh GPU machine
SERVING = {1: re.compile(r"serving "), "workers": re.compile(r"all \d+ workers serving")}
# A client process busier than this (CPU seconds per second) may be what limits the throughput.
CLIENT_BUSY = 0.9
MAX_BARE_ITERS = 5000  # per repetition, whatever the time budget
MAX_LATENCY_SAMPLES = 2000
RPC_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Plan:
    """How much to measure; --quick shrinks everything for a CPU smoke check."""

    batch_sizes: tuple[int, ...]
    reps: int  # repetitions of every throughput measurement (median reported)
    bare_seconds: float  # time budget of one bare repetition
    served_seconds: float  # time window of one served repetition
    latency_samples: int  # one-image requests / forwards for the latency percentiles
    request_sizes: tuple[int, ...]  # images per request at saturation
    clients: int  # concurrent requests at saturation, all client processes together
    client_procs: int
    connections: int  # TCP connections at saturation, all client processes together
    workers: tuple[int, ...]  # server process counts (python -m cloud --workers N), measured one after the other

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        workers, request_sizes = _ints(args.workers, "--workers"), _ints(args.request_sizes, "--request-sizes")
        if args.quick:
            return cls((1, 8), 1, 0.3, 2.0, 30, request_sizes, min(args.clients, 8), min(args.client_procs, 2),
                       min(args.connections, 8), workers)
        return cls(_ints(args.batch_sizes, "--batch-sizes"), args.reps, args.bare_seconds, args.served_seconds,
                   args.latency_samples, request_sizes, args.clients, args.client_procs, args.connections, workers)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"{flag} takes comma-separated positive integers, e.g. 1,4,8; got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"{flag} takes comma-separated positive integers, e.g. 1,4,8; got {text!r}")
    return values


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    arr = np.asarray(samples_ms, dtype=np.float64)
    if arr.size == 0:  # nothing finished inside the window (a window too short for the request size)
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "n": 0}
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)), "n": int(arr.size)}


# ------------------------------------------------------------------ bare model


def _bare_setup(checkpoint: Path, device: str):
    from cloud.runner import ModelRunner

    return ModelRunner.load(checkpoint, device=device)


def _pixels(runner, batch: int):
    """Random uint8 pixels (batch, C, H, W) on the runner's device."""
    import torch

    cfg = runner.config
    pixels = np.random.default_rng(batch).integers(0, 256, (batch, cfg.in_chans, cfg.image_size, cfg.image_size),
                                                   dtype=np.uint8)
    return torch.from_numpy(pixels).to(runner.device)


def _images(runner, batch: int):
    import torch

    with torch.inference_mode():
        return runner.prepare_images(_pixels(runner, batch))  # (batch, C, H, W) float32 on the device


def _sync(runner) -> None:
    import torch

    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)


def bare_throughput(runner, plan: Plan) -> dict[int, list[float]]:
    """images/s per batch size, one value per repetition."""
    import torch

    out: dict[int, list[float]] = {}
    for batch in plan.batch_sizes:
        x = _images(runner, batch)
        with torch.inference_mode(), runner.autocast():
            for _ in range(3):  # warm-up: kernels compiled and autotuned for this shape
                runner.model(x)
            _sync(runner)
            out[batch] = []
            for _ in range(plan.reps):
                iters, start = 0, time.perf_counter()
                while iters < MAX_BARE_ITERS and time.perf_counter() - start < plan.bare_seconds:
                    runner.model(x).float().softmax(-1)
                    iters += 1
                _sync(runner)
                out[batch].append(batch * iters / (time.perf_counter() - start))
        log.info("bare batch %d: %.0f images/s", batch, float(np.median(out[batch])))
    return out


def bare_graph_throughput(runner, plan: Plan) -> dict[int, list[float]]:
    """images/s per batch size of the server's CUDA-graph classify (uint8 pixels already on the device)."""
    out: dict[int, list[float]] = {}
    width = runner.limits.default_width
    for batch in plan.batch_sizes:
        x = _pixels(runner, batch)
        for _ in range(3):
            runner.classify_graphs(width, x)
        _sync(runner)
        out[batch] = []
        for _ in range(plan.reps):
            iters, start = 0, time.perf_counter()
            while iters < MAX_BARE_ITERS and time.perf_counter() - start < plan.bare_seconds:
                runner.classify_graphs(width, x)
                iters += 1
            _sync(runner)
            out[batch].append(batch * iters / (time.perf_counter() - start))
        log.info("bare CUDA-graph batch %d: %.0f images/s", batch, float(np.median(out[batch])))
    return out


def bare_graph_latency(runner, plan: Plan) -> list[float]:
    """Milliseconds per one-image CUDA-graph classify, probabilities copied back to the host."""
    x, samples = _pixels(runner, 1), []
    width = runner.limits.default_width
    deadline = time.perf_counter() + 30
    while len(samples) < plan.latency_samples and time.perf_counter() < deadline:
        start = time.perf_counter()
        runner.classify_graphs(width, x).cpu()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def bare_latency(runner, plan: Plan) -> list[float]:
    """Milliseconds per one-image forward (synchronised each time)."""
    import torch

    x, samples = _images(runner, 1), []
    with torch.inference_mode(), runner.autocast():
        for _ in range(3):
            runner.model(x)
        _sync(runner)
        deadline = time.perf_counter() + 30
        while len(samples) < plan.latency_samples and time.perf_counter() < deadline:
            start = time.perf_counter()
            runner.model(x).float().softmax(-1).cpu()
            _sync(runner)
            samples.append((time.perf_counter() - start) * 1e3)
    return samples


# ------------------------------------------------------------------ served model


class ServerProcess:
    """`python -m cloud --workers N` on 127.0.0.1, port chosen by the OS and read from its log."""

    def __init__(self, args: argparse.Namespace, workers: int = 1) -> None:
        cmd = [sys.executable, "-m", "cloud", "--checkpoint", str(args.checkpoint), "--port", "0",
               "--metrics-port", "-1", "--device", args.device, "--max-batch", str(args.max_batch),
               "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "100000", "--cpu-threads", str(args.cpu_threads),
               "--workers", str(workers)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stderr], daemon=True).start()
        self.address = self._wait(LISTENING).group(1)
        self._wait(SERVING[1] if workers == 1 else SERVING["workers"])

    def _wait(self, pattern: re.Pattern) -> re.Match:
        deadline, seen = time.monotonic() + SERVER_START_S, []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError("python -m cloud exited:\n" + "".join(seen)) from None
                continue
            seen.append(line)
            if match := pattern.search(line):
                return match
        raise TimeoutError(f"python -m cloud did not log {pattern.pattern!r} in {SERVER_START_S} s")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


async def _client_loop(stub, request, start: float, end: float, stats: dict[str, Any]) -> None:
    while time.time() < end:
        sent = time.perf_counter()
        reply = await stub.Classify(request, timeout=RPC_TIMEOUT_S)
        now = time.time()
        if start <= now <= end:
            stats["images"] += len(reply.results)
            stats["requests"] += 1
            stats["batch_items"] += reply.results[0].served_by.batch_size
            if len(stats["latency_ms"]) < MAX_LATENCY_SAMPLES:
                stats["latency_ms"].append((time.perf_counter() - sent) * 1e3)


async def _load(address: str, clients: int, connections: int, images_per_request: int, start: float,
                end: float) -> dict[str, Any]:
    images = np.random.default_rng(0).integers(0, 256, (images_per_request, 1, 28, 28), dtype=np.uint8)
    request = pb.ClassifyRequest(images=to_tensor_msg(images))
    stats: dict[str, Any] = {"images": 0, "requests": 0, "batch_items": 0, "latency_ms": []}
    # Own subchannel pools: each channel is its own TCP connection, which the kernel gives to one worker.
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(connections)]
    try:
        stubs = [pb_grpc.InferenceStub(channel) for channel in channels]
        # connect before the window opens (ModelInfo: a Classify of many images would queue compute ahead of it)
        await asyncio.gather(*(stub.ModelInfo(pb.ModelInfoRequest(), timeout=RPC_TIMEOUT_S) for stub in stubs))
        await asyncio.sleep(max(0.0, start - time.time()))
        cpu = time.process_time()
        await asyncio.gather(*(_client_loop(stubs[i % connections], request, start, end, stats)
                               for i in range(clients)))
        stats["cpu_per_s"] = (time.process_time() - cpu) / max(time.time() - start, 1e-9)
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return stats


def load_worker(address: str, clients: int, connections: int, images_per_request: int, start: float,
                end: float) -> dict[str, Any]:
    """One client process: ``clients`` concurrent request loops over ``connections`` connections between
    wall-clock ``start`` and ``end``; also its CPU seconds per second while loading (``cpu_per_s``)."""
    return asyncio.run(_load(address, clients, connections, images_per_request, start, end))


def served_saturation(address: str, plan: Plan, images_per_request: int, pool: ProcessPoolExecutor) -> dict:
    """images/s per repetition at saturation, plus latency, the mean server batch size and the clients' CPU use."""
    per_proc = max(1, plan.clients // plan.client_procs)
    conns = max(1, plan.connections // plan.client_procs)
    reps, latency, batch_items, requests, client_cpu = [], [], 0, 0, []
    for _ in range(plan.reps):
        start = time.time() + 1.0  # time for the processes to connect
        end = start + plan.served_seconds
        jobs = [pool.submit(load_worker, address, per_proc, conns, images_per_request, start, end)
                for _ in range(plan.client_procs)]
        stats = [job.result(timeout=plan.served_seconds + 120) for job in jobs]
        reps.append(sum(s["images"] for s in stats) / plan.served_seconds)
        latency += [ms for s in stats for ms in s["latency_ms"]]
        batch_items += sum(s["batch_items"] for s in stats)
        requests += sum(s["requests"] for s in stats)
        client_cpu += [s["cpu_per_s"] for s in stats]
    log.info("served %d image(s)/request x %d clients on %d connections: %.0f images/s (busiest client %.0f%% CPU)",
             images_per_request, per_proc * plan.client_procs, conns * plan.client_procs, float(np.median(reps)),
             100 * max(client_cpu))
    return {"images_per_s": reps, "images_per_s_median": float(np.median(reps)),
            "clients": per_proc * plan.client_procs, "connections": conns * plan.client_procs,
            "mean_server_batch": batch_items / max(requests, 1), "client_cpu_per_s_max": max(client_cpu),
            **percentiles(latency)}


def served_latency(address: str, plan: Plan) -> list[float]:
    """Milliseconds per one-image Classify, one request at a time (sync grpcio client)."""
    images = np.zeros((1, 1, 28, 28), dtype=np.uint8)
    request = pb.ClassifyRequest(images=to_tensor_msg(images))
    samples: list[float] = []
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for _ in range(5):
            stub.Classify(request, timeout=RPC_TIMEOUT_S)
        deadline = time.perf_counter() + 60
        while len(samples) < plan.latency_samples and time.perf_counter() < deadline:
            start = time.perf_counter()
            stub.Classify(request, timeout=RPC_TIMEOUT_S)
            samples.append((time.perf_counter() - start) * 1e3)
    return samples


# ------------------------------------------------------------------ report


def environment(device: str) -> dict[str, str]:
    import torch

    from matmamba.devices import describe_device, resolve_device

    return {"device": describe_device(resolve_device(device)), "torch": torch.__version__, "grpc": grpc.__version__,
            "python": platform.python_version(), "cpus": str(os.cpu_count())}


def summarise(result: dict[str, Any], max_batch: int) -> dict[str, Any]:
    """Added latency at low load; served / bare throughput and the scaling over one worker, per request size."""
    bare = {int(b): float(np.median(v)) for b, v in result["bare_throughput"].items()}
    if "bare_graph_throughput" in result:  # the faster bare path is the reference
        graphed = {int(b): float(np.median(v)) for b, v in result["bare_graph_throughput"].items()}
        bare = {b: max(v, graphed[b]) for b, v in bare.items()}
    reference = max_batch if max_batch in bare else max(bare)  # the batch the server forms at most
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for workers, by_size in result["served"].items():
        ratios[workers] = {}
        for name, s in by_size.items():
            ratios[workers][name] = {f"vs_bare_batch_{reference}": s["images_per_s_median"] / bare[reference],
                                     "vs_best_bare": s["images_per_s_median"] / max(bare.values())}
            one = result["served"].get("1", {}).get(name)
            if one is not None and one["images_per_s_median"] > 0:
                ratios[workers][name]["vs_1_worker"] = s["images_per_s_median"] / one["images_per_s_median"]
    bare_p50 = min(result["bare_latency"]["p50_ms"], result.get("bare_graph_latency", {}).get("p50_ms", np.inf))
    added = result["served_latency"]["p50_ms"] - bare_p50
    out = {"added_latency_p50_ms": added, "bare_p50_ms_reference": bare_p50, "throughput_ratio": ratios}
    if "served_latency_low_wait" in result:
        out["added_latency_p50_ms_low_wait"] = result["served_latency_low_wait"]["p50_ms"] - bare_p50
    return out


def table(result: dict[str, Any]) -> str:
    env, rows = result["environment"], []
    rows.append(f"cloud bench on {env['device']} ({env['cpus']} CPUs, torch {env['torch']}, grpc {env['grpc']}), "
                f"server --max-batch {result['config']['max_batch']} --max-wait-ms {result['config']['max_wait_ms']}")
    rows.append(f"{'measurement':<48} {'images/s':>10} {'p50 ms':>8} {'p99 ms':>8}  vs bare  vs 1 worker")
    for batch, values in result["bare_throughput"].items():
        rows.append(f"{'bare forward, batch ' + str(batch):<48} {np.median(values):>10.0f}")
    lat = result["bare_latency"]
    rows.append(f"{'bare forward, 1 image':<48} {'':>10} {lat['p50_ms']:>8.2f} {lat['p99_ms']:>8.2f}")
    for batch, values in result.get("bare_graph_throughput", {}).items():
        rows.append(f"{'bare CUDA graph, batch ' + str(batch):<48} {np.median(values):>10.0f}")
    if "bare_graph_latency" in result:
        lat = result["bare_graph_latency"]
        rows.append(f"{'bare CUDA graph, 1 image':<48} {'':>10} {lat['p50_ms']:>8.2f} {lat['p99_ms']:>8.2f}")
    busy = []
    for workers, by_size in result["served"].items():
        for name, s in by_size.items():
            ratio = result["summary"]["throughput_ratio"][workers][name]
            label = f"served {workers} worker(s), {name} (batch ~{s['mean_server_batch']:.0f})"
            scaling = f"{ratio['vs_1_worker']:>11.2f}" if "vs_1_worker" in ratio else ""
            rows.append(f"{label:<48} {s['images_per_s_median']:>10.0f} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f}"
                        f"  {ratio['vs_best_bare']:>7.2f}{scaling}")
            if s["client_cpu_per_s_max"] > CLIENT_BUSY:
                busy.append(f"{workers} worker(s) {name}: {100 * s['client_cpu_per_s_max']:.0f}%")
    lat = result["served_latency"]
    rows.append(f"{'served, 1 client, 1 image':<48} {'':>10} {lat['p50_ms']:>8.2f} {lat['p99_ms']:>8.2f}")
    if "served_latency_low_wait" in result:
        lat = result["served_latency_low_wait"]
        label = f"served, 1 client, --max-wait-ms {result['config']['latency_max_wait_ms']:g}"
        rows.append(f"{label:<48} {'':>10} {lat['p50_ms']:>8.2f} {lat['p99_ms']:>8.2f}")
    summary = result["summary"]
    rows.append("vs bare: served / best bare batched forward; vs 1 worker: served / served with 1 worker")
    rows.append(f"added latency p50 (served - bare, 1 image): {summary['added_latency_p50_ms']:.2f} ms")
    if "added_latency_p50_ms_low_wait" in summary:
        rows.append(f"added latency p50 at --max-wait-ms {result['config']['latency_max_wait_ms']:g}: "
                    f"{summary['added_latency_p50_ms_low_wait']:.2f} ms")
    if busy:
        rows.append(f"WARNING: a client process used more than {100 * CLIENT_BUSY:.0f}% of a core, so the clients may "
                    "limit these: " + "; ".join(busy) + " (add --client-procs if cores are free)")
    return "\n".join(rows)


def measure_served(args: argparse.Namespace, plan: Plan, result: dict[str, Any]) -> None:
    """Low-load latency on one worker, then saturation for every worker count; result["served"][str(n)]."""
    result["served"], result["server_exit_code"] = {}, 0
    with ProcessPoolExecutor(plan.client_procs, mp_context=get_context("spawn")) as pool:
        for workers in plan.workers:
            server = ServerProcess(args, workers)
            try:
                if workers == 1:
                    result["served_latency"] = percentiles(served_latency(server.address, plan))
                result["served"][str(workers)] = {f"{n}img/req": served_saturation(server.address, plan, n, pool)
                                                  for n in plan.request_sizes}
            finally:
                result["server_exit_code"] = max(result["server_exit_code"], server.stop())
            save(args.out, result)
    if "served_latency" not in result:  # --workers without 1: low-load latency on one worker all the same
        server = ServerProcess(args)
        try:
            result["served_latency"] = percentiles(served_latency(server.address, plan))
        finally:
            result["server_exit_code"] = max(result["server_exit_code"], server.stop())


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan.from_args(args)
    result: dict[str, Any] = {"environment": environment(args.device), "plan": asdict(plan),
                              "config": {"checkpoint": str(args.checkpoint), "max_batch": args.max_batch,
                                         "max_wait_ms": args.max_wait_ms, "quick": args.quick,
                                         "latency_max_wait_ms": args.latency_max_wait_ms}}
    if args.cpu_threads:
        import torch

        torch.set_num_threads(args.cpu_threads)
    runner = _bare_setup(args.checkpoint, args.device)
    result["bare_throughput"] = bare_throughput(runner, plan)
    result["bare_latency"] = percentiles(bare_latency(runner, plan))
    if runner.classify_graphs is not None:
        result["bare_graph_throughput"] = bare_graph_throughput(runner, plan)
        result["bare_graph_latency"] = percentiles(bare_graph_latency(runner, plan))
    del runner
    measure_served(args, plan, result)
    if args.latency_max_wait_ms is not None and args.latency_max_wait_ms != args.max_wait_ms:
        server = ServerProcess(argparse.Namespace(**{**vars(args), "max_wait_ms": args.latency_max_wait_ms}))
        try:
            result["served_latency_low_wait"] = percentiles(served_latency(server.address, plan))
        finally:
            result["server_exit_code"] = max(result["server_exit_code"], server.stop())
    result["summary"] = summarise(result, args.max_batch)
    save(args.out, result)
    return result


def save(out: Path | None, result: dict[str, Any]) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny plan for a CPU smoke check")
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    p.add_argument("--batch-sizes", default="1,8,32,64,128", help="bare forward batch sizes")
    p.add_argument("--workers", default="1",
                   help="server process counts to measure one after the other, e.g. 1,4,8 (default %(default)s)")
    p.add_argument("--request-sizes", default="1,8,64", help="images per request at saturation (default %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="repetitions per throughput measurement (median)")
    p.add_argument("--bare-seconds", type=float, default=1.0, help="time budget of one bare repetition")
    p.add_argument("--served-seconds", type=float, default=3.0, help="window of one served repetition")
    p.add_argument("--latency-samples", type=int, default=500, help="one-image requests for p50/p99")
    p.add_argument("--clients", type=int, default=128, help="concurrent requests at saturation (all processes)")
    p.add_argument("--client-procs", type=int, default=4, help="client processes generating the load")
    p.add_argument("--connections", type=int, default=64,
                   help="TCP connections at saturation, all client processes together (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=128, help="the server's --max-batch")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="the server's --max-wait-ms")
    p.add_argument("--latency-max-wait-ms", type=float, default=0.0,
                   help="also measure low-load latency on a server with this --max-wait-ms (default %(default)s: "
                        "no batching window); omit with a negative value")
    p.add_argument("--cpu-threads", type=int, default=0, help="torch threads, bare and served (0 = default)")
    return p


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (e.g. `timeout`): unwind, so that the servers drain and the client processes end."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminated)
    args = build_parser().parse_args(argv)
    if args.latency_max_wait_ms is not None and args.latency_max_wait_ms < 0:
        args.latency_max_wait_ms = None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run(args)
    if args.out is not None:
        log.info("wrote %s", args.out)
    print(table(result))
    return 0 if result["server_exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
