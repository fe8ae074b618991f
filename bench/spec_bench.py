"""Cross-tier speculative decoding vs cloud-only decoding, at simulated round-trip times between the tiers.

    python -m bench.spec_bench --device cpu  --out docs/results/spec/spec_bench-cpu.json
    python -m bench.spec_bench --device cuda --out docs/results/spec/spec_bench-cuda.json
    python -m bench.spec_bench --device cpu --quick          # smoke check: 2 prompts, 16 tokens, RTT 0

Set-up (all real processes on 127.0.0.1): ``python -m cloud`` (full width, ``--device``) behind
``bench.faultproxy`` (each direction delayed by RTT / 2), and a router on Ray in this process whose
cloud is the proxy. The router's edge worker runs the checkpoint at level 1, so each request's
``width`` picks the drafting level (1, 2, 4, 8 = widths d_model / level); the cloud always
verifies at full width. For every RTT, the same prompts are decoded greedily

- **cloud-only**: ``Generate`` straight to the cloud through the proxy (a stream: one round trip
  per generation, then one forward pass per token on the cloud);
- **speculative, level L**: ``Generate(mode=SPECULATIVE, width=d_model/L)`` to the router, which
  drafts with the level-L submodel and verifies through the proxy (one round trip per round).

Reported per configuration: greedy output identical to cloud-only (it must be), acceptance rate
(accepted / drafted), cloud forward passes per generated token and cloud compute ms per generated
token (from the cloud's /metrics: ``compute_seconds`` of Generate, or of OpenSession + Verify),
end-to-end tokens/s (median over prompts of tokens / wall time of the whole stream), the
ratios to cloud-only at the same RTT, and where a round's time goes: medians over rounds (the first
of each generation left out: it also opens the session) of the wall time between two rounds' CLOUD
chunks at the client, the edge's drafting compute, the router's Verify round trip (transport, queue
and cloud compute) and the rest (the router's own work, the Ray call, the stream to the client).
JSON to ``--out``, a table to stdout, a plot beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.plots import pyplot
from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc

log = logging.getLogger("spec_bench")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "matmamba-lm-austen"
PROMPTS = ("It is a truth universally acknowledged", "Mr. Darcy", "Emma Woodhouse, handsome, clever, and rich",
           "The family of Dashwood had long been settled", "She was", "In the morning", "Captain Wentworth",
           "Sir Thomas returned", "Elizabeth could not", "Mrs. Bennet said", "Harriet", "Anne Elliot")
SERVER_START_S = 300.0  # loading + Triton compilation of the warm-up on a fresh GPU machine
RPC_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Plan:
    rtts_ms: tuple[float, ...] = (0.0, 20.0, 80.0)
    levels: tuple[int, ...] = (1, 2, 4, 8)
    prompts: int = 8
    tokens: int = 64
    draft_tokens: int = 8

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        if args.quick:
            return cls(rtts_ms=(0.0,), prompts=2, tokens=16, draft_tokens=args.draft_tokens)
        return cls(tuple(args.rtt_ms), tuple(args.levels), args.prompts, args.tokens, args.draft_tokens)


# ------------------------------------------------------------------ processes


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CloudProcess:
    """``python -m cloud`` on 127.0.0.1 with its /metrics endpoint."""

    def __init__(self, checkpoint: Path, device: str, precision: str, log_path: Path) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        args = ["--checkpoint", str(checkpoint), "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                "--device", device, "--precision", precision, "--max-sessions", "64", "--log-level", "WARNING"]
        self.log = open(log_path, "w")  # closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "cloud", *args], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.address = f"127.0.0.1:{self.port}"

    def wait_serving(self) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + SERVER_START_S
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the cloud exited with {self.proc.returncode}; see {self.log.name}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"the cloud did not serve within {SERVER_START_S} s")

    def compute(self) -> dict[str, tuple[float, float]]:
        """{method: (model calls, seconds)} from the cloud's compute_seconds histogram."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        out: dict[str, list[float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in ("matmamba_cloud_compute_seconds_count", "matmamba_cloud_compute_seconds_sum"):
                    entry = out.setdefault(s.labels["method"], [0.0, 0.0])
                    entry[0 if s.name.endswith("count") else 1] = s.value
        return {k: (v[0], v[1]) for k, v in out.items()}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _delta(after: dict, before: dict, methods: tuple[str, ...]) -> tuple[float, float]:
    calls = sum(after.get(m, (0, 0))[0] - before.get(m, (0, 0))[0] for m in methods)
    seconds = sum(after.get(m, (0, 0))[1] - before.get(m, (0, 0))[1] for m in methods)
    return calls, seconds


# ------------------------------------------------------------------ one generation


@dataclass
class Generation:
    tokens: list[int]
    seconds: float
    drafted: int = 0
    accepted: int = 0
    # per verification round after the first (the first also opens the session and reads the prompt):
    # (wall ms between this round's CLOUD chunk and the previous one's, edge drafting ms, Verify round trip ms)
    rounds: list[tuple[float, float, float]] = field(default_factory=list)


def generate(address: str, prompt: list[int], tokens: int, **fields) -> Generation:
    """Stream one greedy generation."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_tokens=tokens, temperature=0.0, **fields)
        start = time.perf_counter()
        gen, last = Generation([], 0.0), None
        for chunk in stub.Generate(request, timeout=RPC_TIMEOUT_S):
            gen.tokens += list(chunk.token_ids)
            s = chunk.served_by
            if s.tier == pb.CLOUD and s.draft_tokens:  # one CLOUD chunk per verification round
                gen.drafted, gen.accepted = gen.drafted + s.draft_tokens, gen.accepted + s.accepted_tokens
                now = time.perf_counter()
                if last is not None:
                    gen.rounds.append(((now - last) * 1e3, s.edge_ms, s.cloud_ms))
                last = now
            if s.degraded:
                raise RuntimeError("a degraded answer: the cloud was not reached; raise --deadline-ms")
        gen.seconds = time.perf_counter() - start
        return gen


def first_difference(output: list[int], reference: list[int]) -> int | None:
    """Index of the first token where output and reference differ (or one ends early); None when equal."""
    if output == reference:
        return None
    return next((i for i, (a, b) in enumerate(zip(output, reference)) if a != b), min(len(output), len(reference)))


def measure(name: str, address: str, cloud: CloudProcess, prompts: list[list[int]], plan: Plan,
            methods: tuple[str, ...], reference: list[list[int]] | None, progress, **fields) -> dict[str, Any]:
    before = cloud.compute()
    outputs, seconds, drafted, accepted, rounds = [], [], 0, 0, []
    for prompt in prompts:
        gen = generate(address, prompt, plan.tokens, **fields)
        outputs.append(gen.tokens)
        seconds.append(gen.seconds)
        drafted, accepted, rounds = drafted + gen.drafted, accepted + gen.accepted, rounds + gen.rounds
        progress()
    calls, cloud_s = _delta(cloud.compute(), before, methods)
    generated = sum(len(o) for o in outputs)
    if reference is None:  # cloud-only: one prompt pass, then one pass per token after the first
        calls = sum(len(o) for o in outputs)
    return {
        "name": name, "outputs": outputs, "identical": reference is None or outputs == reference,
        "first_difference": None if reference is None else [first_difference(o, r) for o, r in zip(outputs, reference)],
        "tokens_per_s_median": float(np.median([len(o) / s for o, s in zip(outputs, seconds)])),
        "seconds": seconds, "generated": generated, "drafted": drafted, "accepted": accepted,
        "acceptance": accepted / drafted if drafted else None,
        "cloud_passes_per_token": calls / generated, "cloud_ms_per_token": cloud_s * 1e3 / generated,
        "round_ms": _round_split(rounds),
    }


def _round_split(rounds: list[tuple[float, float, float]]) -> dict[str, float] | None:
    """Medians over rounds of a round's wall time, edge drafting, the Verify round trip, and the rest."""
    if not rounds:
        return None
    wall, edge, verify = (np.array(column) for column in zip(*rounds))
    return {"rounds": len(rounds), "wall": float(np.median(wall)), "edge": float(np.median(edge)),
            "verify": float(np.median(verify)), "rest": float(np.median(wall - edge - verify))}


# ------------------------------------------------------------------ run


def environment(device: str) -> dict[str, str]:
    import torch

    from matmamba.devices import describe_device, resolve_device

    return {"device": describe_device(resolve_device(device)), "torch": torch.__version__, "grpc": grpc.__version__,
            "python": platform.python_version(), "cpus": str(os.cpu_count()), "host": platform.node()}


class _Bar:
    """A rich progress bar, or a log line per configuration where rich is not installed (the GPU device)."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        try:
            from rich.progress import Progress
        except ImportError:
            self._progress = None
        else:
            self._progress = Progress()

    def __enter__(self) -> _Bar:
        if self._progress is not None:
            self._progress.__enter__()
            self._task = self._progress.add_task("generations", total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def advance(self) -> None:
        self.done += 1
        if self._progress is not None:
            self._progress.advance(self._task)
        else:
            log.warning("generation %d of %d", self.done, self.total)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.faultproxy import FaultProxy
    from matmamba.data.tokenizer import load_tokenizer
    from router.ray_setup import init_ray
    from router.server import RouterConfig, RouterThread

    plan = Plan.from_args(args)
    tokenizer = load_tokenizer(args.checkpoint)
    prompts = [tokenizer.encode(t) for t in PROMPTS[:plan.prompts]]
    d_model = json.loads((args.checkpoint / "config.json").read_text())["block"]["d_model"]
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    cloud_log = Path(tempfile.mkdtemp(prefix="spec-bench-")) / "cloud.log"  # named in the error if it fails
    cloud = CloudProcess(args.checkpoint, args.device, args.precision, cloud_log)
    proxy = FaultProxy(cloud.address).start()
    cuda = args.device.startswith("cuda")
    ray_info = init_ray(num_cpus=4, num_gpus=1 if cuda else 0)
    router = RouterThread(RouterConfig(checkpoint=args.checkpoint, edge_level=1, cloud=(proxy.address,), port=0,
                                       metrics_port=None, deadline_ms=args.deadline_ms, generate_mode="speculative",
                                       draft_tokens=plan.draft_tokens, edge_gpus=1 if cuda else 0))
    result: dict[str, Any] = {"environment": environment(args.device), "plan": asdict(plan),
                              "checkpoint": str(args.checkpoint), "runs": []}
    try:
        cloud.wait_serving()
        router.start()
        address = router.server.address
        for level in plan.levels:  # warm-up: every width, both paths (the GPU compiles kernels per shape)
            generate(address, prompts[0], plan.tokens, width=d_model // level)
        generate(proxy.address, prompts[0], plan.tokens)
        total = len(plan.rtts_ms) * (1 + len(plan.levels)) * len(prompts)
        with _Bar(total) as bar:
            step = bar.advance
            for rtt in plan.rtts_ms:
                proxy.set_delay(up_ms=rtt / 2, down_ms=rtt / 2)
                base = measure("cloud-only", proxy.address, cloud, prompts, plan, ("Generate",), None, step)
                runs = [dict(base, rtt_ms=rtt, level=None)]
                for level in plan.levels:
                    spec = measure(f"speculative L{level}", address, cloud, prompts, plan,
                                   ("OpenSession", "Verify"), base["outputs"], step, width=d_model // level)
                    runs.append(dict(spec, rtt_ms=rtt, level=level))
                for r in runs:
                    r["speedup_vs_cloud_only"] = r["tokens_per_s_median"] / base["tokens_per_s_median"]
                    r["cloud_ms_ratio_vs_cloud_only"] = r["cloud_ms_per_token"] / base["cloud_ms_per_token"]
                    r["cloud_passes_ratio_vs_cloud_only"] = (r["cloud_passes_per_token"]
                                                             / base["cloud_passes_per_token"])
                    del r["outputs"]
                result["runs"] += runs
    finally:
        router.stop()
        proxy.stop()
        cloud.stop()
        import ray

        ray.shutdown()
        ray_info.cleanup()
    return result


def table(result: dict[str, Any]) -> str:
    env, plan = result["environment"], result["plan"]
    rows = [f"speculative decoding bench on {env['device']} ({env['cpus']} CPUs, torch {env['torch']}); "
            f"{plan['prompts']} prompts x {plan['tokens']} greedy tokens, draft up to {plan['draft_tokens']}",
            "| RTT ms | mode | identical | acceptance | cloud passes/token | cloud ms/token | tokens/s | "
            "vs cloud-only: tokens/s | cloud ms | round ms: wall = edge + verify + rest |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        acc = "" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        split = r.get("round_ms")
        rounds = "" if split is None else \
            f"{split['wall']:.1f} = {split['edge']:.1f} + {split['verify']:.1f} + {split['rest']:.1f}"
        rows.append(f"| {r['rtt_ms']:g} | {r['name']} | {'yes' if r['identical'] else 'NO'} | {acc} | "
                    f"{r['cloud_passes_per_token']:.3f} | {r['cloud_ms_per_token']:.2f} | "
                    f"{r['tokens_per_s_median']:.1f} | {r['speedup_vs_cloud_only']:.2f}x | "
                    f"{r['cloud_ms_ratio_vs_cloud_only']:.2f}x | {rounds} |")
    return "\n".join(rows)


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(dict.fromkeys(r["name"] for r in result["runs"]))
    for name in names:
        runs = [r for r in result["runs"] if r["name"] == name]
        left.plot([r["rtt_ms"] for r in runs], [r["tokens_per_s_median"] for r in runs], marker="o", label=name)
    left.set(xlabel="simulated round-trip time between tiers (ms)", ylabel="end-to-end tokens/s (median)",
             title="throughput of one generation")
    left.legend()
    first = [r for r in result["runs"] if r["rtt_ms"] == result["runs"][0]["rtt_ms"]]
    bars = right.bar([r["name"].replace("speculative ", "") for r in first], [r["cloud_ms_per_token"] for r in first])
    right.bar_label(bars, [f"{r['cloud_passes_per_token']:.2f} passes/token" for r in first], fontsize=8)
    right.set(ylabel="cloud compute ms per generated token", title=f"cloud cost (RTT {first[0]['rtt_ms']:g} ms)")
    fig.suptitle(result["environment"]["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.spec_bench", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cloud and edge worker both)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="the cloud's --precision (auto = bf16 autocast on CUDA, fp32 on CPU)")
    p.add_argument("--rtt-ms", type=float, nargs="+", default=list(Plan.rtts_ms))
    p.add_argument("--levels", type=int, nargs="+", default=list(Plan.levels))
    p.add_argument("--prompts", type=int, default=Plan.prompts, help=f"at most {len(PROMPTS)}")
    p.add_argument("--tokens", type=int, default=Plan.tokens, help="greedy tokens per generation")
    p.add_argument("--draft-tokens", type=int, default=Plan.draft_tokens, help="router --draft-tokens")
    p.add_argument("--deadline-ms", type=float, default=30000.0, help="router --deadline-ms (long: no degraded runs)")
    p.add_argument("--quick", action="store_true", help="2 prompts, 16 tokens, RTT 0 only")
    p.add_argument("--replot", action="store_true", help="only redraw the plot and table of an existing --out")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "spec" / "spec_bench-cpu.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replot:
        result = json.loads(args.out.read_text())
        plot(result, args.out.with_suffix(".png"))
        print(table(result))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.prompts > len(PROMPTS):
        raise SystemExit(f"--prompts: at most {len(PROMPTS)}")
    result = run(args)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    text = table(result)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0 if all(r["identical"] for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
