"""router/escalation.py: breakers, least-outstanding balancing, retry, deadlines, health and fingerprints.

The replicas here are tiny fake ``Inference`` servers of this test on 127.0.0.1 (real gRPC, scripted
answers), so each failure mode can be produced on demand.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc
from proto.tensors import to_tensor_msg
from router.escalation import (
    BreakerState,
    CircuitBreaker,
    EscalationError,
    EscalationSettings,
    ReplicaPool,
    ReplicaState,
    resolve_dns,
)

FP = "ab" * 32
FAST = EscalationSettings(deadline_s=1.0, breaker_failures=2, breaker_cooldown_s=0.2, health_interval_s=60.0)


class FakeReplica(pb_grpc.InferenceServicer):
    """A scripted replica: answers after ``delay_s``, or fails with ``fail``; counts calls."""

    def __init__(self, fingerprint: str = FP, task: int = pb.VISION) -> None:
        self.fingerprint, self.task = fingerprint, task
        self.delay_s = 0.0
        self.fail: grpc.StatusCode | None = None
        self.stream_fail_after: int | None = None  # Generate: fail after this many chunks
        self.calls = 0
        self.inflight = 0
        self.peers: list[str] = []  # the client end of the connection each Classify came on
        self.health = health_aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> FakeReplica:
        self.server = grpc.aio.server()
        pb_grpc.add_InferenceServicer_to_server(self, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()
        return self

    async def stop(self) -> None:
        assert self.server is not None
        await self.server.stop(0)

    async def Classify(self, request, context):
        self.calls += 1
        self.peers.append(context.peer())
        self.inflight += 1
        try:
            await asyncio.sleep(self.delay_s)
            if self.fail is not None:
                await context.abort(self.fail, "scripted failure")
            n = request.images.shape[0]
            probs = np.full((n, 10), 0.1, dtype=np.float32)
            return pb.ClassifyReply(probs=to_tensor_msg(probs), results=[pb.ImageResult() for _ in range(n)])
        finally:
            self.inflight -= 1

    async def Generate(self, request, context):
        self.calls += 1
        for i in range(request.max_tokens):
            if self.stream_fail_after is not None and i >= self.stream_fail_after:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted stream failure")
            yield pb.GenerateChunk(token_ids=[i], logprobs=[-0.1])
        yield pb.GenerateChunk(finish_reason=pb.FINISH_REASON_LENGTH)

    async def ModelInfo(self, request, context):
        return pb.ModelInfoReply(task=self.task, checkpoint_sha256=self.fingerprint, max_batch_size=64)


def _request(n: int = 1) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(images=to_tensor_msg(np.zeros((n, 1, 28, 28), np.uint8)))


def run_with(replicas: list[FakeReplica], body: Callable[[ReplicaPool], Awaitable[None]],
             settings: EscalationSettings = FAST) -> None:
    """Start the fake replicas and a pool over them, run ``body(pool)``, stop everything."""

    async def main() -> None:
        for r in replicas:
            await r.start()
        pool = ReplicaPool([r.address for r in replicas], fingerprint=FP, task=pb.VISION, settings=settings)
        await pool.start()
        try:
            await body(pool)
        finally:
            await pool.close()
            for r in replicas:
                await r.stop()

    asyncio.run(main())


# ------------------------------------------------------------------ circuit breaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_probes_after_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=3, cooldown_s=5.0, clock=clock)
    breaker.failure()
    breaker.failure()
    breaker.success()  # not consecutive any more
    breaker.failure()
    breaker.failure()
    assert breaker.state is BreakerState.CLOSED and breaker.available()
    breaker.failure()
    assert breaker.state is BreakerState.OPEN and not breaker.available()
    clock.now = 4.9
    assert not breaker.available()
    clock.now = 5.0
    assert breaker.state is BreakerState.HALF_OPEN and breaker.available()
    breaker.begin()  # the probe
    assert not breaker.available()  # one probe at a time
    breaker.failure()  # the probe failed: open again, for a whole cooldown
    assert breaker.state is BreakerState.OPEN
    clock.now = 10.0
    breaker.begin()
    breaker.success()
    assert breaker.state is BreakerState.CLOSED and breaker.consecutive == 0


def test_an_abandoned_probe_frees_the_probe_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown_s=1.0, clock=clock)
    breaker.failure()
    clock.now = 1.0
    breaker.begin()
    breaker.abandon()
    assert breaker.available() and breaker.state is BreakerState.HALF_OPEN


# ------------------------------------------------------------------ pool over fake replicas


def test_least_outstanding_requests_balancing() -> None:
    a, b = FakeReplica(), FakeReplica()
    a.delay_s = b.delay_s = 0.2

    async def body(pool: ReplicaPool) -> None:
        answers = await asyncio.gather(*(pool.unary("Classify", _request()) for _ in range(6)))
        assert sorted(x.replica for x in answers).count(a.address) == 3  # 3 + 3: never 4 in flight on one
        a.delay_s, b.delay_s = 0.5, 0.0
        slow = asyncio.ensure_future(pool.unary("Classify", _request()))  # ties go in turn
        await asyncio.sleep(0.05)
        fast = [await pool.unary("Classify", _request()) for _ in range(3)]
        assert all(x.replica == b.address for x in fast)  # a has one outstanding, b none
        await slow

    run_with([a, b], body)


def test_calls_take_a_replicas_connections_in_turn() -> None:
    a = FakeReplica()

    async def body(pool: ReplicaPool) -> None:
        for _ in range(8):
            await pool.unary("Classify", _request())
        assert sorted(Counter(a.peers).values()) == [2, 2, 2, 2]  # 4 TCP connections (client ports), in turn

    run_with([a], body, dataclasses.replace(FAST, connections=4))
    for bad in (0, 65):
        with pytest.raises(ValueError, match="--cloud-connections"):
            dataclasses.replace(FAST, connections=bad)


def test_one_retry_on_another_replica() -> None:
    a, b = FakeReplica(), FakeReplica()
    a.fail = grpc.StatusCode.UNAVAILABLE

    async def body(pool: ReplicaPool) -> None:
        answers = [await pool.unary("Classify", _request()) for _ in range(4)]
        assert all(x.replica == b.address for x in answers)
        assert a.calls <= 2  # its breaker opened after 2 failures: no more calls to it
        assert pool.replicas[0].state is ReplicaState.OPEN

    run_with([a, b], body)


def test_no_retry_after_an_answer_that_another_replica_would_repeat() -> None:
    a, b = FakeReplica(), FakeReplica()
    a.fail = b.fail = grpc.StatusCode.INVALID_ARGUMENT

    async def body(pool: ReplicaPool) -> None:
        with pytest.raises(EscalationError, match="INVALID_ARGUMENT"):
            await pool.unary("Classify", _request())
        assert a.calls + b.calls == 1
        assert all(r.breaker.state is BreakerState.CLOSED for r in pool.replicas)  # it answered: it is alive

    run_with([a, b], body)


def test_breaker_half_open_probe_closes_it_again() -> None:
    a = FakeReplica()
    a.fail = grpc.StatusCode.INTERNAL

    async def body(pool: ReplicaPool) -> None:
        for _ in range(2):
            with pytest.raises(EscalationError):
                await pool.unary("Classify", _request())
        replica = pool.replicas[0]
        assert replica.state is ReplicaState.OPEN and not pool.available
        with pytest.raises(EscalationError, match="no healthy cloud replica"):
            await pool.unary("Classify", _request())  # refused without a call
        assert a.calls == 2
        a.fail = None
        await asyncio.sleep(FAST.breaker_cooldown_s)
        assert replica.state is ReplicaState.HALF_OPEN
        await pool.unary("Classify", _request())  # the probe
        assert replica.state is ReplicaState.HEALTHY

    run_with([a], body)


def test_the_deadline_bounds_the_whole_escalation() -> None:
    a, b = FakeReplica(), FakeReplica()
    a.delay_s = b.delay_s = 2.0
    settings = EscalationSettings(deadline_s=0.2, breaker_failures=5, health_interval_s=60.0)

    async def body(pool: ReplicaPool) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(EscalationError, match="DEADLINE_EXCEEDED"):
            await pool.unary("Classify", _request())
        assert loop.time() - start < 1.0
        assert a.calls + b.calls == 1  # no time was left for a retry

    run_with([a, b], body, settings)


def test_a_replica_with_other_weights_is_refused() -> None:
    good, other = FakeReplica(), FakeReplica(fingerprint="cd" * 32)
    lm = FakeReplica(task=pb.LM)
    changes: list[tuple[str, ReplicaState]] = []

    async def main() -> None:
        for r in (good, other, lm):
            await r.start()
        pool = ReplicaPool([good.address, other.address, lm.address], fingerprint=FP, task=pb.VISION,
                           settings=FAST, on_change=lambda r: changes.append((r.address, r.state)))
        await pool.start()
        states = [r.state for r in pool.replicas]
        assert states == [ReplicaState.HEALTHY, ReplicaState.MISMATCH, ReplicaState.MISMATCH]
        assert "cdcdcdcdcdcd" in pool.replicas[1].mismatch and "LM model" in pool.replicas[2].mismatch
        for _ in range(4):
            assert (await pool.unary("Classify", _request())).replica == good.address
        assert other.calls == lm.calls == 0
        await pool.close()
        for r in (good, other, lm):
            await r.stop()

    asyncio.run(main())
    assert (other.address, ReplicaState.MISMATCH) in changes


def test_health_checks_follow_a_replica_going_down_and_back() -> None:
    a = FakeReplica()

    async def body(pool: ReplicaPool) -> None:
        assert pool.available
        await a.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await pool.check_all()
        assert pool.replicas[0].state is ReplicaState.UNHEALTHY and not pool.available
        with pytest.raises(EscalationError):
            await pool.unary("Classify", _request())
        assert a.calls == 0
        await a.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await pool.check_all()
        assert pool.available

    run_with([a], body)


def test_an_unreachable_replica_is_unhealthy() -> None:
    async def main() -> None:
        pool = ReplicaPool(["127.0.0.1:1"], fingerprint=FP, task=pb.VISION, settings=FAST)
        await pool.start()
        assert pool.replicas[0].state is ReplicaState.UNHEALTHY and "UNAVAILABLE" in pool.replicas[0].reason
        with pytest.raises(EscalationError):
            await pool.unary("Classify", _request())
        await pool.close()

    asyncio.run(main())


def _generate(n: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]), max_tokens=n)


def test_a_stream_is_retried_only_before_its_first_item() -> None:
    a, b = FakeReplica(), FakeReplica()
    a.stream_fail_after = 0  # fails before any chunk

    async def body(pool: ReplicaPool) -> None:
        for _ in range(2):
            items = [(c.token_ids[:], r) async for c, r, _ in pool.stream("Generate", _generate(3))]
            assert [r for _, r in items] == [b.address] * 4
        a.stream_fail_after, b.stream_fail_after = None, 2  # a has an open breaker now: b streams, then breaks
        got = []
        with pytest.raises(EscalationError) as info:
            async for chunk, _, _ in pool.stream("Generate", _generate(5)):
                got.append(list(chunk.token_ids))
        assert info.value.partial and got == [[0], [1]]

    run_with([a, b], body)


# ------------------------------------------------------------------ DNS targets (docker-compose --scale)


def test_a_dns_target_follows_the_addresses_its_name_resolves_to() -> None:
    """``dns:///cloud:P`` becomes one replica per address, re-resolved each round (scale up, scale down)."""
    a, b = FakeReplica(), FakeReplica()
    answer: list[str] = []  # what the (scripted) DNS says ``cloud`` resolves to; OSError when None

    async def resolver(name: str, port: int) -> list[str]:
        assert (name, port) == ("cloud", 50051)
        if answer == ["fail"]:
            raise OSError("Name or service not known")
        return list(answer)

    async def main() -> None:
        await a.start()
        await b.start()
        removed: list[str] = []
        answer[:] = [a.address]
        pool = ReplicaPool(["dns:///cloud:50051"], fingerprint=FP, task=pb.VISION, settings=FAST,
                           resolver=resolver, on_remove=lambda r: removed.append(r.address))
        await pool.start()
        try:
            assert [r.address for r in pool.replicas] == [a.address] and pool.available
            answer[:] = [a.address, b.address]  # --scale cloud=2
            await pool.check_all()
            assert {r.address for r in pool.replicas} == {a.address, b.address}
            answers = await asyncio.gather(*(pool.unary("Classify", _request()) for _ in range(4)))
            assert {x.replica for x in answers} == {a.address, b.address}
            answer[:] = ["fail"]  # a failed lookup keeps the replicas known
            await pool.check_all()
            assert len(pool.replicas) == 2
            answer[:] = [b.address]  # --scale cloud=1
            await pool.check_all()
            assert [r.address for r in pool.replicas] == [b.address] and removed == [a.address]
            assert (await pool.unary("Classify", _request())).replica == b.address
        finally:
            await pool.close()
            await a.stop()
            await b.stop()

    asyncio.run(main())


def test_a_dns_target_resolves_a_real_name() -> None:
    async def main() -> None:
        assert "127.0.0.1:50051" in await resolve_dns("localhost", 50051)

    asyncio.run(main())


def test_a_malformed_dns_target_is_refused() -> None:
    with pytest.raises(ValueError, match="dns:///NAME:PORT"):
        ReplicaPool(["dns:///cloud"], fingerprint=FP, task=pb.VISION)
