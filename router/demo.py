"""``make demo``: the cascade end to end on this machine (CPU is enough; no GPU, no Docker), in about a minute.

    python -m router.demo [--limit N] [--concurrency C] [--tokens N] [--seed S] [--no-lm]
                          [--thresholds FILE] [--out DIR] [--grace S]

1. Vision: starts a cloud replica (``python -m cloud``) and the router (``python -m router``: the
   edge node, in a private Ray cluster it starts through router.ray_setup) as processes on free
   127.0.0.1 ports, from checkpoints/matmamba-vision-fmnist with the calibrated thresholds
   (docs/results/tune/thresholds-fmnist-level4.json), and waits until both report SERVING.
2. Runs the edge device client's demo in this process, exactly as ``python -m edge demo --router ...
   --cloud ...`` would (edge/demo.py): the held-out test images through the router, then straight to
   the cloud replica; one table; the trade-off curve in OUT/tradeoff.png and every answer in
   OUT/results.json.
3. Cross-checks the table with the servers' own counters (/metrics): the router's escalations
   and the cloud replica's Classify requests.
4. Stops both (SIGTERM, then waits; the router stops its Ray cluster), then does the same with
   checkpoints/matmamba-lm-austen and streams a short generation through that router, each token
   marked by the tier that wrote it.

Everything it starts runs in its own session and is stopped on the way out, also on Ctrl-C,
SIGTERM or an error: SIGTERM, up to ``--grace`` seconds, then SIGKILL of whatever is left in that
session (Ray's processes included). Server logs: OUT/logs/. Exit status: 0; 1 when a server
failed to start, a request failed, the cross-check disagreed or a server did not stop cleanly;
2 for bad arguments; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from edge import demo as edge_demo
from edge.__main__ import build_parser as edge_cli
from edge.client import EdgeClient, RouterError
from edge.streaming import legend, stream_generation

log = logging.getLogger("router.demo")

REPO_ROOT = Path(__file__).resolve().parents[1]
VISION = REPO_ROOT / "checkpoints" / "matmamba-vision-fmnist"
LM = REPO_ROOT / "checkpoints" / "matmamba-lm-austen"
THRESHOLDS = REPO_ROOT / "docs" / "results" / "tune" / "thresholds-fmnist-level4.json"
EDGE_LEVEL = 4
PROMPT = "It is a truth universally acknowledged"
LOCAL = "127.0.0.1"
SERVING = health_pb2.HealthCheckResponse.SERVING
CLOUD_HEALTH = "matmamba.v1.Inference/cloud"  # the router's health service for "a replica can take escalations"
START_TIMEOUT_S = 180.0
LEFTOVER_WAIT_S = 5.0  # how long a stopped server's session may take to empty before SIGKILL
CONSOLE_WIDTH = 110  # when stdout is not a terminal (a file, a pipe)


class DemoError(RuntimeError):
    """A server did not start or the demo could not go on; the message says what to look at."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


def session_members(sid: int) -> list[int]:
    """Pids of the processes in session ``sid`` (Linux /proc), e.g. a server and the Ray processes it started."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[3]) == sid:
            members.append(int(stat.parent.name))
    return members


def health(address: str, service: str = "") -> int | None:
    """The health status of ``service`` at ``address``, or None when nothing answers."""
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=1.0).status
        except grpc.RpcError:
            return None


@dataclass
class Server:
    """A ``python -m MODULE`` server process on 127.0.0.1, in its own session, its output in a log file."""

    name: str
    module: str
    args: list[str]
    port: int
    metrics_port: int
    log_path: Path
    proc: subprocess.Popen | None = None
    leftovers: int = 0  # processes of its session still alive after it exited (killed)

    @property
    def address(self) -> str:
        return f"{LOCAL}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOCAL}:{self.metrics_port}/metrics"

    def start(self) -> Server:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", self.module, *self.args], cwd=REPO_ROOT, env=env,
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        return self

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise DemoError(f"the {self.name} exited with status {self.proc.returncode} while starting; "
                            f"the end of {self.log_path}:\n{tail}")

    def wait_serving(self, deadline: float, service: str = "") -> None:
        while health(self.address, service) != SERVING:
            self.check_alive()
            if time.monotonic() > deadline:
                raise DemoError(f"the {self.name} on {self.address} did not report SERVING"
                                f"{' for ' + service if service else ''} in time; see {self.log_path}")
            time.sleep(0.2)

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; then empty its session. The exit status (None: never ran)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("the %s did not stop within %.0f s of SIGTERM; killing it", self.name, grace_s)
                self.proc.kill()
                self.proc.wait()
        self._empty_session()
        return self.proc.returncode

    def _empty_session(self) -> None:
        """Wait briefly for the processes the server started (Ray's) to go, then SIGKILL the rest."""
        assert self.proc is not None
        deadline = time.monotonic() + LEFTOVER_WAIT_S
        while (left := session_members(self.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.leftovers += 1
        if left:
            log.warning("killed %d process(es) the %s left behind: %s", len(left), self.name, left)


@dataclass
class Servers:
    """Every server the demo started, stopped together (routers first, so they drain before their clouds go)."""

    items: list[Server] = field(default_factory=list)

    def pair(self, checkpoint: Path, out: Path, tag: str, thresholds: Path | None) -> tuple[Server, Server]:
        """Start a cloud replica and a router for ``checkpoint``; returns them once both are SERVING."""
        cport, rport = free_port(), free_port()
        cloud = Server(f"{tag} cloud replica", "cloud", [], cport, free_port(), out / "logs" / f"{tag}-cloud.log")
        cloud.args = ["--checkpoint", str(checkpoint), "--host", LOCAL, "--port", str(cport),
                      "--metrics-port", str(cloud.metrics_port)]
        router = Server(f"{tag} router", "router", [], rport, free_port(), out / "logs" / f"{tag}-router.log")
        router.args = ["--checkpoint", str(checkpoint), "--edge-level", str(EDGE_LEVEL), "--cloud", cloud.address,
                       "--host", LOCAL, "--port", str(rport), "--metrics-port", str(router.metrics_port)]
        if thresholds is not None:
            router.args += ["--thresholds", str(thresholds)]
        for server in (cloud, router):
            self.items.append(server)
            server.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        cloud.wait_serving(deadline)
        router.wait_serving(deadline)
        router.wait_serving(deadline, CLOUD_HEALTH)  # the router has seen the replica healthy: no degraded answers
        return cloud, router

    def stop(self, grace_s: float) -> dict[str, int | None]:
        """Stop every server, routers first; their exit statuses by name."""
        order = sorted(self.items, key=lambda s: s.module != "router")
        statuses = {s.name: s.stop(grace_s) for s in order}
        self.items = []
        return statuses


def read_counter(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of counter ``name`` (e.g. "router_escalations_total") matching ``labels``."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


# ------------------------------------------------------------------ the two parts


def run_vision(args: argparse.Namespace, servers: Servers, console: Console) -> dict:
    """Part 1: the cascade on held-out Fashion-MNIST images (the table, the curve) and the cross-check."""
    with console.status(f"starting a cloud replica and the router for {VISION.relative_to(REPO_ROOT)} ..."):
        start = time.monotonic()
        cloud, router = servers.pair(VISION, args.out, "vision", args.thresholds)
    console.print(f"cloud replica {cloud.address} and router {router.address} (edge level {EDGE_LEVEL}, Ray inside) "
                  f"SERVING after {time.monotonic() - start:.1f} s; logs in {args.out / 'logs'}")
    argv = ["demo", "--router", router.address, "--cloud", cloud.address, "--limit", str(args.limit),
            "--concurrency", str(args.concurrency), "--plot", str(args.out / "tradeoff.png"),
            "--json", str(args.out / "results.json")]
    console.print(f"edge device client: python -m edge {' '.join(argv)}", highlight=False)
    result = edge_demo.run_demo(edge_cli().parse_args(argv), console)
    check = cross_check(result, cloud, router)
    low, high = check["expected_cloud_requests"]
    console.print(f"cross-check with the servers' own /metrics: router escalations {check['router_escalations']:.0f} "
                  f"(table: {check['table_escalated']}); cloud replica Classify requests {check['cloud_requests']:.0f} "
                  f"(table: {low}" + (f"-{high}, degraded ones may have reached it" if high > low else "")
                  + ", cloud answers + cloud-only): "
                  + ("[green]consistent[/]" if check["consistent"] else "[bold red]MISMATCH[/]"), highlight=False)
    saved = json.loads((args.out / "results.json").read_text())
    saved["cross_check"] = check
    (args.out / "results.json").write_text(json.dumps(saved, indent=1))
    return {"errors": result.summary.errors + result.summary.cloud_errors, "cross_check": check}


def cross_check(result: edge_demo.DemoResult, cloud: Server, router: Server) -> dict:
    """The table's escalations and cloud calls against the router's and the cloud replica's own counters.

    The replica counts every escalation that reached it plus the direct cloud-only requests; a degraded
    escalation may or may not have reached it before the router's deadline passed.
    """
    s = result.summary
    escalations = read_counter(router.metrics_url, "router_escalations_total", method="Classify")
    requests = read_counter(cloud.metrics_url, "matmamba_cloud_requests_total", method="Classify")
    direct = s.n - s.cloud_errors
    low, high = s.answered["cloud"] + direct, s.escalated + direct
    return {"router_escalations": escalations, "table_escalated": s.escalated, "cloud_requests": requests,
            "expected_cloud_requests": [low, high],
            "consistent": escalations == s.escalated and low <= requests <= high}


def run_lm(args: argparse.Namespace, servers: Servers, console: Console) -> dict:
    """Part 2: a short generation streamed through an LM router, each token marked by its tier."""
    with console.status(f"starting a cloud replica and the router for {LM.relative_to(REPO_ROOT)} ..."):
        start = time.monotonic()
        _, router = servers.pair(LM, args.out, "lm", None)
    console.print(f"LM router {router.address} SERVING after {time.monotonic() - start:.1f} s "
                  "(built-in thresholds: mean token log-probability of each 8-token segment >= -4.0)")
    color = console.is_terminal
    console.print(legend(color), markup=False, highlight=False)
    console.file.write(PROMPT)
    with EdgeClient(router.address, timeout_s=60.0) as client:
        result = stream_generation(client, PROMPT, console.file, color, max_tokens=args.tokens, temperature=1.0,
                                   seed=args.seed)
    console.print(result.summary(), highlight=False)
    return {"tokens": dict(result.counts), "finish": result.finish}


def stop_all(servers: Servers, grace_s: float, console: Console) -> bool:
    """Stop every server (SIGINT ignored meanwhile, so a second Ctrl-C cannot cut the cleanup short).

    True when each exited 0 and left no process behind (the router's Ray cluster went with it).
    """
    stopping = list(servers.items)
    if not stopping:
        return True
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        statuses = servers.stop(grace_s)
    finally:
        signal.signal(signal.SIGINT, previous)
    leftovers = sum(s.leftovers for s in stopping)
    console.print("stopped " + ", ".join(f"{s.name} (pid {s.proc.pid if s.proc else '-'}, exit {statuses[s.name]})"
                                         for s in stopping)
                  + (f"; killed {leftovers} process(es) left behind" if leftovers
                     else "; Ray stopped with its router, no process left"), highlight=False)
    return leftovers == 0 and all(code == 0 for code in statuses.values())


# ------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m router.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=2000, help="test images (default %(default)s: all shipped)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default %(default)s)")
    p.add_argument("--tokens", type=int, default=48, help="tokens of the LM generation (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the generation (default %(default)s)")
    p.add_argument("--no-lm", action="store_true", help="skip the LM generation")
    p.add_argument("--thresholds", type=Path, default=THRESHOLDS,
                   help=f"the router's thresholds file (default {THRESHOLDS.relative_to(REPO_ROOT)})")
    p.add_argument("--out", type=Path, default=Path("runs") / "demo",
                   help="where the curve, the results and the logs go (default %(default)s)")
    p.add_argument("--grace", type=float, default=15.0, help="seconds a server may take to stop (default %(default)s)")
    return p


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run both parts; the servers are stopped whatever happens."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.thresholds.is_file():
        parser.error(f"--thresholds {args.thresholds} does not exist; write one with `python -m router.tune`")
    for flag, value in (("--limit", args.limit), ("--concurrency", args.concurrency), ("--tokens", args.tokens)):
        if value < 1:  # said before any server starts
            parser.error(f"{flag} must be at least 1, got {value}")
    if not args.grace >= 0:
        parser.error(f"--grace must be >= 0 seconds, got {args.grace}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(width=None if sys.stdout.isatty() else CONSOLE_WIDTH, soft_wrap=True)
    signal.signal(signal.SIGTERM, _interrupt)
    servers, start, wall, status = Servers(), time.monotonic(), time.time(), 0
    try:
        console.rule("[bold]MatMamba split inference[/]: one checkpoint, a narrow edge model and the full cloud model")
        vision = run_vision(args, servers, console)
        clean = stop_all(servers, args.grace, console)
        status = 1 if vision["errors"] or not vision["cross_check"]["consistent"] or not clean else 0
        if not args.no_lm:
            console.rule("[bold]Streaming a generation through the router[/] (MatMamba-LM, Jane Austen)")
            run_lm(args, servers, console)
            status = status or (0 if stop_all(servers, args.grace, console) else 1)
    except KeyboardInterrupt:
        console.print("interrupted: stopping the servers")
        status = 130
    except (DemoError, RouterError, OSError, ValueError) as err:
        console.print(f"[bold red]demo failed:[/] {err}", highlight=False)
        status = 1
    finally:
        if not stop_all(servers, args.grace, console):
            status = status or 1
    written = [str(f) for f in (args.out / "tradeoff.png", args.out / "results.json")
               if f.is_file() and f.stat().st_mtime >= wall]
    console.print(f"demo finished in {time.monotonic() - start:.0f} s (exit {status})"
                  + (f"; wrote {', '.join(written)}" if written else ""), highlight=False)
    return status


if __name__ == "__main__":
    sys.exit(main())
