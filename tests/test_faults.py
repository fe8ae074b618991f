"""Faults under load, with real processes on 127.0.0.1: dying replicas, a bad link, a restarting router, SIGTERM.

Every scenario keeps clients sending images the edge model doubts (each wants the cloud) and then
counts: every request sent got an answer (none lost, none hung past its deadline), and each answer
came from the tier the scenario allows. Cloud replicas are ``python -m cloud`` processes; the
router link faults go through bench.faultproxy. Routers run in the session's Ray cluster.
With ``RELIABILITY_OUT=DIR`` each scenario's counts go to DIR/faults.json (docs/RELIABILITY.md).
The SIGTERM drain of a lone router and of a lone cloud replica are in test_router_integration.py
and test_cloud_process.py; here a replica drains while a router escalates to it, and a router is
restarted (SIGTERM, drain, start again) while clients retry.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from bench.faultproxy import FaultProxy
from edge.client import NO_RETRY, EdgeClient, Prediction, RetryPolicy, RouterError
from matmamba import load_model
from matmamba.data import load_fashion_mnist
from matmamba.data.fashion_mnist import FMNIST_MEAN, FMNIST_STD
from router.server import RouterConfig, RouterThread

from .test_router_integration import EDGE_LEVEL, VISION, Process, cloud_process, free_port, wait_until

pytestmark = pytest.mark.slow

CLIENTS = 3  # concurrent client threads (a 2-core machine also runs the cloud replicas and the edge worker)
MAX_REQUESTS = 3000  # per load run: the loops are bounded in count as well as in time
CLIENT_TIMEOUT_S = 20.0  # a client's deadline per request
FIGURES: dict[str, dict] = {}  # scenario -> its counts (written with RELIABILITY_OUT)


@pytest.fixture(scope="module", autouse=True)
def write_figures() -> Iterator[None]:
    yield
    folder = os.environ.get("RELIABILITY_OUT")
    if folder and FIGURES:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "faults.json").write_text(json.dumps(FIGURES, indent=2) + "\n")


@pytest.fixture(scope="module")
def doubtful() -> np.ndarray:
    """Test images the edge model is unsure of (max softmax < 0.5, well below the 0.8 default threshold)."""
    images = load_fashion_mnist("test-sample")[0][:600].numpy()[:, None]  # (N, 1, 28, 28) uint8
    edge = load_model(VISION, mrl_level=EDGE_LEVEL)
    with torch.no_grad():
        conf = edge((torch.from_numpy(images).float() / 255 - FMNIST_MEAN) / FMNIST_STD,
                    mrl_level=EDGE_LEVEL).softmax(-1).amax(-1).numpy()
    picked = images[conf < 0.5]
    assert len(picked) >= 10
    return picked


@dataclass
class Answer:
    sent: float
    done: float
    prediction: Prediction | None
    error: RouterError | None = None

    @property
    def seconds(self) -> float:
        return self.done - self.sent


@dataclass
class Load:
    """CLIENTS threads sending one doubtful image per request until stopped (bounded by MAX_REQUESTS)."""

    address: str
    images: np.ndarray
    retry: RetryPolicy = NO_RETRY
    timeout_s: float = CLIENT_TIMEOUT_S  # no request may take longer (no hung requests)
    answers: list[Answer] = field(default_factory=list)
    sent: int = 0

    def __post_init__(self) -> None:
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def _client(self) -> None:
        with EdgeClient(self.address, timeout_s=self.timeout_s, retry=self.retry) as client:
            while not self._stop.is_set():
                with self._lock:
                    if self.sent >= MAX_REQUESTS:
                        return
                    i, self.sent = self.sent, self.sent + 1
                start = time.monotonic()
                try:
                    answer = Answer(start, 0.0, client.classify(self.images[i % len(self.images)][None])[0])
                except RouterError as err:
                    answer = Answer(start, 0.0, None, err)
                answer.done = time.monotonic()
                with self._lock:
                    self.answers.append(answer)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s + 10)

    def count(self, after: float = 0.0, tier: str | None = None, replica: str | None = None) -> int:
        with self._lock:
            return sum(a.done > after and a.prediction is not None and (tier is None or a.prediction.tier == tier)
                       and (replica is None or a.prediction.served.replica == replica) for a in self.answers)

    def between(self, start: float, end: float = float("inf")) -> list[Answer]:
        """Answers to requests sent after ``start`` and answered before ``end``."""
        with self._lock:
            return [a for a in self.answers if a.sent > start and a.done < end]

    def check_none_lost(self, scenario: str, **extra: float) -> None:
        """Every request answered, none past its deadline; records the scenario's figures."""
        assert not any(t.is_alive() for t in self._threads), "a client is still waiting: a hung request"
        assert len(self.answers) == self.sent > 0
        errors = [(a.error.code.name, a.error.details) for a in self.answers if a.error is not None]
        assert not errors, errors[:5]
        assert max(a.seconds for a in self.answers) < self.timeout_s
        kinds = [("degraded" if a.prediction.degraded else a.prediction.tier) for a in self.answers]
        FIGURES[scenario] = {"requests": self.sent, "answered": len(self.answers), "lost": self.sent - len(kinds),
                             "errors": len(errors), **{k: kinds.count(k) for k in ("edge", "cloud", "degraded")},
                             "max_latency_s": round(max(a.seconds for a in self.answers), 3),
                             **{k: round(v, 3) for k, v in extra.items()}}


def start_router(cloud: tuple[str, ...], **overrides) -> RouterThread:
    config = dict(checkpoint=VISION, edge_level=EDGE_LEVEL, cloud=cloud, port=0, metrics_port=None,
                  deadline_ms=4000, health_interval_ms=200, breaker_cooldown_ms=500, grace_s=1.0)
    router = RouterThread(RouterConfig(**{**config, **overrides}))
    router.start()
    return router


@dataclass
class Clouds:
    a: Process
    b: Process


@pytest.fixture(scope="module")
def clouds(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clouds]:
    tmp = tmp_path_factory.mktemp("faults")
    c = Clouds(cloud_process(VISION, tmp, "cloud-a").start(), cloud_process(VISION, tmp, "cloud-b").start())
    try:
        request.getfixturevalue("ray_cluster")
        c.a.wait_serving()
        c.b.wait_serving()
        yield c
    finally:
        c.a.kill()
        c.b.kill()


def ensure_up(*processes: Process) -> None:
    for p in processes:
        if p.proc is None or p.proc.poll() is not None:
            p.start()
    for p in processes:
        p.wait_serving()


# ------------------------------------------------------------------ cloud replicas die


def test_kill_9_one_of_two_replicas_mid_load_the_other_takes_over(clouds: Clouds, doubtful: np.ndarray) -> None:
    ensure_up(clouds.a, clouds.b)
    router = start_router((clouds.a.address, clouds.b.address))
    try:
        with Load(router.server.address, doubtful) as load:
            wait_until(lambda: min(load.count(replica=clouds.a.address), load.count(replica=clouds.b.address)) >= 5,
                       60, "both replicas answering")
            clouds.a.proc.kill()  # kill -9 with escalations in flight
            killed = time.monotonic()
            wait_until(lambda: load.count(after=killed + 1.0) >= 30, 60, "answers after the kill")
        load.check_none_lost("kill -9 one of two cloud replicas mid-load")
        wrong = [(a.prediction.tier, a.prediction.degraded) for a in load.answers
                 if a.prediction.tier != "cloud" or a.prediction.degraded]
        assert not wrong  # in-flight escalations on the dead replica were retried on the other one
        assert all(a.prediction.served.replica == clouds.b.address for a in load.between(killed + 1.0))
    finally:
        router.stop()
        clouds.a.proc.wait(timeout=10)


def test_all_replicas_killed_answers_degraded_and_escalation_resumes_within_5_s(
        clouds: Clouds, doubtful: np.ndarray) -> None:
    ensure_up(clouds.a, clouds.b)
    router = start_router((clouds.a.address, clouds.b.address), health_interval_ms=1000,
                          breaker_cooldown_ms=5000, deadline_ms=500)  # the shipped defaults
    try:
        with Load(router.server.address, doubtful) as load:
            wait_until(lambda: load.count(tier="cloud") >= 10, 60, "cloud answers before the kill")
            clouds.a.proc.kill()
            clouds.b.proc.kill()
            killed = time.monotonic()
            wait_until(lambda: load.count(after=killed + 2.0) >= 30, 60, "answers while every replica is down")
            down = load.between(killed + 2.0)
            clouds.a.start()
            clouds.b.start()
            clouds.a.wait_serving()
            serving = time.monotonic()
            wait_until(lambda: load.count(after=serving, tier="cloud") >= 1, 5.0,
                       "escalation to resume within 5 s of the restarted replica serving")
            resumed = min(a.done for a in load.between(0)
                          if a.done > serving and a.prediction is not None and a.prediction.tier == "cloud")
        load.check_none_lost("kill -9 every cloud replica, restart them", resume_after_restart_s=resumed - serving,
                             max_degraded_latency_s=max(a.seconds for a in down))
        assert down and all(a.prediction.tier == "edge" and a.prediction.degraded for a in down)
        assert all(a.seconds < 0.5 + 2.0 for a in down)  # the 500 ms deadline holds (edge compute aside)
        assert resumed - serving < 5.0
    finally:
        router.stop()


def test_sigterm_on_a_replica_drains_its_escalations_and_the_router_moves_on(
        clouds: Clouds, doubtful: np.ndarray) -> None:
    ensure_up(clouds.a, clouds.b)
    router = start_router((clouds.a.address, clouds.b.address))
    try:
        with Load(router.server.address, doubtful) as load:
            wait_until(lambda: load.count(replica=clouds.a.address) >= 5, 60, "replica a answering")
            clouds.a.proc.send_signal(signal.SIGTERM)
            assert clouds.a.proc.wait(timeout=30) == 0  # drained and exited cleanly
            stopped = time.monotonic()
            wait_until(lambda: load.count(after=stopped) >= 20, 60, "answers after the drain")
        load.check_none_lost("SIGTERM one of two replicas under load (drain)")
        assert all(a.prediction.tier == "cloud" and not a.prediction.degraded for a in load.answers)
        assert all(a.prediction.served.replica == clouds.b.address for a in load.between(stopped + 0.5))
    finally:
        router.stop()


# ------------------------------------------------------------------ a slow, stalling or resetting link


def test_slow_stalling_and_resetting_link_deadlines_hold_and_answers_degrade(
        clouds: Clouds, doubtful: np.ndarray) -> None:
    ensure_up(clouds.b)
    deadline_s = 0.5
    with FaultProxy(clouds.b.address) as proxy:
        router = start_router((proxy.address,), deadline_ms=deadline_s * 1e3, health_interval_ms=200,
                              breaker_cooldown_ms=500)
        try:
            with Load(router.server.address, doubtful) as load:
                wait_until(lambda: load.count(tier="cloud") >= 5, 60, "cloud answers through the proxy")
                proxy.set_delay(40)  # a slow link: 80 ms more per round trip, still within the deadline
                slow = time.monotonic()
                wait_until(lambda: load.count(after=slow + 0.5, tier="cloud") >= 10, 30, "answers over a slow link")
                phases = {"slow": load.between(slow + 0.5)}
                for name, fault in (("late", lambda: proxy.set_delay(2000)), ("stall", proxy.stall),
                                    ("reset", lambda: (proxy.refuse(True), proxy.reset()))):
                    proxy.set_delay(0)
                    proxy.resume()
                    proxy.refuse(False)
                    fault()
                    begun = time.monotonic()
                    wait_until(lambda b=begun: load.count(after=b + 1.0) >= 15, 60, f"answers during {name}")
                    phases[name] = load.between(begun + 1.0)
                proxy.refuse(False)
                proxy.resume()
                proxy.set_delay(0)
                healed = time.monotonic()
                wait_until(lambda: load.count(after=healed, tier="cloud") >= 5, 15, "escalation after the link heals")
            late = max(a.seconds for name in ("late", "stall", "reset") for a in phases[name])
            load.check_none_lost("slow / late / stalled / reset router-cloud link", max_faulted_latency_s=late)
        finally:
            router.stop()
    slow_ms = [a.prediction.served.cloud_ms for a in phases["slow"] if a.prediction.tier == "cloud"]
    assert slow_ms and np.median(slow_ms) >= 80  # the added round-trip time shows in cloud_ms
    for name in ("late", "stall", "reset"):
        answers = phases[name]
        assert answers and all(a.prediction.tier == "edge" and a.prediction.degraded for a in answers), name
        assert max(a.seconds for a in answers) < deadline_s + 2.0, name  # the deadline holds (edge time aside)


# ------------------------------------------------------------------ the router restarts


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_router_restart_while_clients_retry(ray_cluster, clouds: Clouds, doubtful: np.ndarray, tmp_path: Path,
                                            how: str) -> None:
    ensure_up(clouds.b)
    port = free_port()
    args = ["--checkpoint", str(VISION), "--edge-level", str(EDGE_LEVEL), "--cloud", clouds.b.address,
            "--port", str(port), "--metrics-port", "-1", "--ray-address", ray_cluster.address, "--grace", "5"]
    router = Process("router", args, port, tmp_path / "router.log").start().wait_serving()
    retry = RetryPolicy(attempts=60, initial_backoff_s=0.1, max_backoff_s=0.5)  # covers a restart (~10 s here)
    try:
        with Load(router.address, doubtful, retry=retry, timeout_s=90.0) as load:
            wait_until(lambda: load.count() >= 10, 60, "answers before the restart")
            router.proc.send_signal(getattr(signal, how))  # SIGTERM drains; SIGKILL drops what was in flight
            code = router.proc.wait(timeout=60)
            down = time.monotonic()
            with EdgeClient(router.address, retry=NO_RETRY, timeout_s=2) as impatient:
                with pytest.raises(RouterError) as err:
                    impatient.classify(doubtful[:1])
            assert err.value.code == grpc.StatusCode.UNAVAILABLE  # what the retrying clients are riding out
            router.start().wait_serving()
            up = time.monotonic()
            wait_until(lambda: load.count(after=up) >= 10, 60, "answers after the restart")
        load.check_none_lost(f"router {how} + restart while clients retry", router_down_s=up - down)
        spanning = [a for a in load.answers if a.sent < up - 1.0 and a.done > up]
        assert spanning, "some request was sent while the router was down and answered after it came back"
        assert up - down > 1.0
        if how == "SIGTERM":
            assert code == 0 and "draining" in router.log.read_text()
        else:
            assert code == -signal.SIGKILL
    finally:
        router.kill()
