"""Escalation to cloud replicas over gRPC: balancing, health, deadlines, retry, circuit breakers.

``ReplicaPool`` holds one grpc.aio channel per replica address (``connections`` channels, each its
own TCP connection, with ``--cloud-connections``: see :class:`Replica`) and sends each escalation
to an eligible replica:

- **eligible** = its last health check said SERVING (``grpc.health.v1``, service ``""``), its
  ``ModelInfo`` names the router's own checkpoint fingerprint and task, and its circuit breaker
  lets a request through. A replica serving other weights is **refused** (state ``mismatch``,
  logged at ERROR) until a later check finds the right checkpoint there;
- **least outstanding requests**: among eligible replicas the one with the fewest escalations
  in flight, ties taken in turn;
- **deadline**: each escalation has ``deadline_s`` in all (``--deadline-ms``), retry included;
- **one retry on another replica** after a retryable failure (UNAVAILABLE, RESOURCE_EXHAUSTED,
  INTERNAL, UNKNOWN, CANCELLED) while time is left; a stream is retried only before its first item;
- **circuit breaker per replica**: open after ``breaker_failures`` consecutive transport failures
  (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, UNKNOWN), no requests while open, one probe request
  after ``breaker_cooldown_s`` (half-open); the probe's success closes it, its failure reopens it.

Health checks run every ``health_interval_s`` for every replica (also while the breaker is open).

**DNS targets**: an address ``dns:///NAME:PORT`` stands for every address NAME resolves to (in
docker-compose the service name ``cloud`` resolves to all ``--scale cloud=N`` replicas). It is
resolved again before each health round: new addresses become replicas, vanished ones are dropped
once no escalation is in flight on them; a failed lookup keeps the replicas already known.
When no replica answers in time :class:`EscalationError` is raised; the router then answers from
the edge with ``degraded = true``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc
from proto.security import ChannelSecurity

log = logging.getLogger(__name__)

MIB = 1 << 20
# The first try and one retry on another replica.
MAX_ATTEMPTS = 2
# Most TCP connections per replica (--cloud-connections): enough to spread over a replica's worker processes.
MAX_CONNECTIONS = 64
# Failures that say the replica (or the path to it) is broken: they count towards opening its breaker.
BREAKER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                           grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
# Failures worth trying once more on another replica (DEADLINE_EXCEEDED leaves no time to retry).
RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED})
# Reconnect quickly to a replica that came back (gRPC's default backoff grows to 120 s).
CHANNEL_BACKOFF_MS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                      ("grpc.max_reconnect_backoff_ms", 1000))


# Prefix of an address that names every replica its DNS name resolves to (gRPC's own target syntax).
DNS_SCHEME = "dns:///"
# Resolves (name, port) to "host:port" addresses.
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_dns(name: str, port: int) -> list[str]:
    """Every address ``name`` resolves to, as sorted unique "host:port" strings (IPv6 in brackets)."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    hosts = {info[4][0] for info in infos}
    return sorted(f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in hosts)


def split_dns_target(address: str) -> tuple[str, int] | None:
    """(name, port) of a ``dns:///NAME:PORT`` address, or None for a plain HOST:PORT."""
    if not address.startswith(DNS_SCHEME):
        return None
    name, _, port = address[len(DNS_SCHEME):].rpartition(":")
    if not name or not port.isdigit():
        raise ValueError(f"cannot read cloud address {address!r}; expected {DNS_SCHEME}NAME:PORT")
    return name, int(port)


class ReplicaState(enum.StrEnum):
    UNKNOWN = "unknown"  # not checked yet
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"  # health check failed, NOT_SERVING, or unreachable
    OPEN = "open"  # circuit breaker open after consecutive failures
    HALF_OPEN = "half_open"  # breaker cooled down: the next request is a probe
    MISMATCH = "mismatch"  # serves another checkpoint (or task): refused


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class EscalationSettings:
    """Knobs of escalation (router flags in parentheses)."""

    deadline_s: float = 0.5  # whole escalation, retry included (--deadline-ms)
    breaker_failures: int = 3  # consecutive failures that open a replica's breaker (--breaker-failures)
    breaker_cooldown_s: float = 5.0  # open time before a probe (--breaker-cooldown-ms)
    health_interval_s: float = 1.0  # between health checks of each replica (--health-interval-ms)
    health_timeout_s: float = 1.0  # deadline of one health check / ModelInfo call
    max_message_bytes: int = 64 * MIB
    channel: ChannelSecurity = ChannelSecurity()  # TLS / mutual TLS / token towards the replicas (--cloud-ca, ...)
    connections: int = 1  # TCP connections per replica, calls spread over them in turn (--cloud-connections)

    def __post_init__(self) -> None:
        if self.deadline_s <= 0 or self.breaker_cooldown_s < 0 or self.health_interval_s <= 0:
            raise ValueError("deadline and health interval must be positive and the breaker cooldown >= 0")
        if self.breaker_failures < 1:
            raise ValueError(f"breaker_failures must be >= 1, got {self.breaker_failures}")
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise ValueError(f"--cloud-connections must be in 1..{MAX_CONNECTIONS}, got {self.connections}")


class EscalationError(Exception):
    """No cloud replica answered in time; ``partial`` when a stream failed after its first item."""

    def __init__(self, reason: str, *, partial: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.partial = partial


class CircuitBreaker:
    """Closed -> open after ``failures`` consecutive failures -> half-open after ``cooldown_s`` -> one probe."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures, self.cooldown_s, self._clock = failures, cooldown_s, clock
        self.consecutive = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self.cooldown_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def available(self) -> bool:
        """Whether a request may go through now (closed, or half-open with no probe in flight)."""
        state = self.state
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self._probing)

    def begin(self) -> None:
        """A request starts; in half-open it is the probe."""
        if self.state is BreakerState.HALF_OPEN:
            self._probing = True

    def success(self) -> None:
        self.consecutive, self._opened_at, self._probing = 0, None, False

    def failure(self) -> None:
        self.consecutive += 1
        if self._probing or self.consecutive >= self.failures:
            self._opened_at = self._clock()
        self._probing = False

    def abandon(self) -> None:
        """A request ended without a verdict (cancelled by its caller): free the probe slot."""
        self._probing = False


@dataclass(frozen=True)
class CloudAnswer:
    """A replica's reply and how long the round trip took."""

    reply: Any
    replica: str
    cloud_ms: float


class Replica:
    """One cloud replica: its channels and stubs, breaker, health and outstanding escalations.

    With ``settings.connections`` > 1 it opens that many channels, each its own TCP connection, and
    Inference calls take them in turn: a replica running ``python -m cloud --workers N`` gets its
    connections spread over its worker processes by the kernel (SO_REUSEPORT), and so its calls.
    Health checks and speculative sessions use the first connection (a session lives in one worker).
    """

    def __init__(self, address: str, settings: EscalationSettings) -> None:
        self.address = address
        size = settings.max_message_bytes
        options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
                   ("grpc.enable_retries", 0), *CHANNEL_BACKOFF_MS]
        if settings.connections > 1:  # channels to one target share a connection unless each has its own pool
            options.append(("grpc.use_local_subchannel_pool", 1))
        self.channels = [settings.channel.aio_channel(address, options=options) for _ in range(settings.connections)]
        self.channel = self.channels[0]
        self._stubs = [pb_grpc.InferenceStub(channel) for channel in self.channels]
        self._turn = 0
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown_s)
        self.outstanding = 0
        self.healthy: bool | None = None  # None until the first check
        self.reason = "not checked yet"
        self.mismatch = ""  # why its ModelInfo is refused; "" when it matches
        self.max_batch = 0  # its ModelInfo.max_batch_size (0 = unknown or no limit)

    @property
    def state(self) -> ReplicaState:
        if self.healthy is None:
            return ReplicaState.UNKNOWN
        if not self.healthy:
            return ReplicaState.UNHEALTHY
        if self.mismatch:
            return ReplicaState.MISMATCH
        breaker = self.breaker.state
        if breaker is BreakerState.OPEN:
            return ReplicaState.OPEN
        return ReplicaState.HALF_OPEN if breaker is BreakerState.HALF_OPEN else ReplicaState.HEALTHY

    @property
    def eligible(self) -> bool:
        return bool(self.healthy) and not self.mismatch and self.breaker.available()

    @property
    def stub(self) -> pb_grpc.InferenceStub:
        """The Inference stub of the next connection in turn."""
        self._turn = (self._turn + 1) % len(self._stubs)
        return self._stubs[self._turn]

    def begin(self) -> None:
        self.outstanding += 1
        self.breaker.begin()

    def finish(self, code: grpc.StatusCode | None) -> None:
        """An attempt ended with ``code`` (None: cancelled by our caller, no verdict)."""
        self.outstanding -= 1
        if code is None:
            self.breaker.abandon()
        elif code in BREAKER_CODES:
            self.breaker.failure()
        else:  # OK, or an answer such as INVALID_ARGUMENT: the replica is alive
            self.breaker.success()


def _mismatch(info: pb.ModelInfoReply, fingerprint: str, task: int) -> str:
    """Why a replica's ModelInfo is refused, or "" when it runs the router's checkpoint."""
    if info.checkpoint_sha256 != fingerprint:
        theirs = info.checkpoint_sha256[:12] or "(none)"
        return (f"it serves checkpoint {theirs}..., this router runs {fingerprint[:12]}... (different weights); "
                "start the replica with the router's --checkpoint")
    if info.task != task:
        return f"it serves a {pb.Task.Name(info.task)} model, this router a {pb.Task.Name(task)} model"
    return ""


class ReplicaPool:
    """All cloud replicas of the router, health-checked in the background (see the module docstring)."""

    def __init__(self, addresses: Sequence[str], *, fingerprint: str, task: int,
                 settings: EscalationSettings | None = None,
                 on_change: Callable[[Replica], None] | None = None,
                 on_round: Callable[[], Awaitable[None]] | None = None,
                 on_remove: Callable[[Replica], None] | None = None,
                 resolver: Resolver = resolve_dns,
                 on_call: Callable[[str, grpc.StatusCode | None], None] | None = None) -> None:
        self.settings = settings or EscalationSettings()
        self.fingerprint, self.task = fingerprint, task
        self._names = [t for t in map(split_dns_target, addresses) if t is not None]
        self.replicas = [Replica(a, self.settings) for a in addresses if split_dns_target(a) is None]
        self._fixed = {r.address for r in self.replicas}
        self._on_change, self._on_round, self._on_remove, self._resolver = on_change, on_round, on_remove, resolver
        self._on_call = on_call
        self._reported: dict[str, ReplicaState] = {}
        self._turn = 0
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Check every replica once (so the first requests can escalate), then keep checking."""
        await self.check_all()
        self._task = asyncio.get_running_loop().create_task(self._health_loop(), name="replica-health")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*(c.close() for r in self.replicas for c in r.channels), return_exceptions=True)

    @property
    def available(self) -> bool:
        """Whether some replica could take an escalation now."""
        return any(r.eligible for r in self.replicas)

    @property
    def max_batch(self) -> int:
        """Smallest max_batch_size the healthy matching replicas reported (0 = no limit known)."""
        limits = [r.max_batch for r in self.replicas if r.healthy and not r.mismatch and r.max_batch]
        return min(limits) if limits else 0

    # ------------------------------------------------------------------ health

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            try:
                await self.check_all()
            except Exception:  # keep checking whatever one round did
                log.exception("replica health round failed")

    async def check_all(self) -> None:
        """Re-resolve DNS targets, one health round over every replica, then report changes and call ``on_round``."""
        await self._resolve()
        await asyncio.gather(*(self._check(r) for r in self.replicas))
        self.refresh()
        if self._on_round is not None:
            await self._on_round()

    async def _check(self, replica: Replica) -> None:
        """Health (service "") then ModelInfo; updates the replica's health and mismatch reason."""
        timeout = self.settings.health_timeout_s
        try:
            health = await replica.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            if health.status != health_pb2.HealthCheckResponse.SERVING:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
                replica.healthy, replica.reason = False, f"health check answered {status}"
                return
            info = await replica.stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            replica.healthy, replica.reason = False, f"{err.code().name}: {err.details()}"
            return
        replica.healthy, replica.reason = True, ""
        replica.mismatch = _mismatch(info, self.fingerprint, self.task)
        replica.max_batch = info.max_batch_size

    async def _resolve(self) -> None:
        """Add a replica per new address of the DNS targets; drop idle ones whose address is gone."""
        if not self._names:
            return
        wanted = set(self._fixed)
        for name, port in self._names:
            try:
                wanted.update(await self._resolver(name, port))
            except OSError as err:  # e.g. no replica running right now: keep what is known
                log.warning("cannot resolve cloud name %s (%s); keeping the %d replicas known", name, err,
                            len(self.replicas))
                return
        known = {r.address for r in self.replicas}
        for address in sorted(wanted - known):
            log.info("cloud replica %s added (DNS)", address)
            self.replicas.append(Replica(address, self.settings))
        for replica in [r for r in self.replicas if r.address not in wanted and r.outstanding == 0]:
            log.info("cloud replica %s removed (no longer in DNS)", replica.address)
            self.replicas.remove(replica)
            self._reported.pop(replica.address, None)
            await asyncio.gather(*(c.close() for c in replica.channels), return_exceptions=True)
            if self._on_remove is not None:
                self._on_remove(replica)

    def refresh(self) -> None:
        """Log and report every replica whose state changed since the last call."""
        for replica in self.replicas:
            state = replica.state
            if self._reported.get(replica.address) == state:
                continue
            self._reported[replica.address] = state
            self._log_state(replica, state)
            if self._on_change is not None:
                self._on_change(replica)

    def _log_state(self, replica: Replica, state: ReplicaState) -> None:
        if state is ReplicaState.MISMATCH:
            log.error("refusing to escalate to cloud replica %s: %s", replica.address, replica.mismatch)
        elif state is ReplicaState.UNHEALTHY:
            log.warning("cloud replica %s is unhealthy (%s)", replica.address, replica.reason)
        elif state is ReplicaState.OPEN:
            log.warning("circuit breaker for %s opened after %d consecutive failures; probing again in %.1f s",
                        replica.address, replica.breaker.consecutive, self.settings.breaker_cooldown_s)
        else:
            log.info("cloud replica %s is %s", replica.address, state.value)

    # ------------------------------------------------------------------ balancing and calls

    def pick(self, exclude: Sequence[Replica] = ()) -> Replica | None:
        """The eligible replica with the fewest outstanding escalations (ties in turn), or None."""
        n = len(self.replicas)
        candidates = [(r.outstanding, (i - self._turn) % n, r) for i, r in enumerate(self.replicas)
                      if r.eligible and r not in exclude]
        if not candidates:
            return None
        self._turn = (self._turn + 1) % n
        return min(candidates, key=lambda c: c[:2])[2]

    def _end(self, replica: Replica, code: grpc.StatusCode | None) -> None:
        replica.finish(code)
        if self._on_call is not None:  # every finished cloud call, by status (None: abandoned)
            self._on_call(replica.address, code)
        self.refresh()

    @staticmethod
    def _failed(replica: Replica, err: grpc.aio.AioRpcError) -> str:
        reason = f"{replica.address} answered {err.code().name}: {err.details()}"
        log.warning("escalation to %s", reason)
        return reason

    def _attempts(self) -> Iterator[tuple[Replica, float]]:
        """(replica, seconds left) for each try: at most MAX_ATTEMPTS distinct replicas within the deadline."""
        deadline = time.monotonic() + self.settings.deadline_s
        tried: list[Replica] = []
        for _ in range(MAX_ATTEMPTS):
            replica, remaining = self.pick(tried), deadline - time.monotonic()
            if replica is None or remaining <= 0:
                return
            tried.append(replica)
            yield replica, remaining

    async def unary(self, method: str, request: Any) -> CloudAnswer:
        """Call ``method`` (e.g. "Classify") on a replica; EscalationError when none answers in time."""
        reason = "no healthy cloud replica serves this router's checkpoint"
        for replica, remaining in self._attempts():
            start = time.monotonic()
            replica.begin()
            code: grpc.StatusCode | None = None
            try:
                reply = await getattr(replica.stub, method)(request, timeout=remaining)
                code = grpc.StatusCode.OK
                return CloudAnswer(reply, replica.address, (time.monotonic() - start) * 1e3)
            except grpc.aio.AioRpcError as err:
                code = err.code()
                reason = self._failed(replica, err)
                if code not in RETRY_CODES:
                    break
            finally:
                self._end(replica, code)
        raise EscalationError(reason)

    async def stream(self, method: str, request: Any) -> AsyncIterator[tuple[Any, str, float]]:
        """Yield (item, replica, ms since the call started) from a server-streaming ``method``.

        Retried on another replica only before the first item; EscalationError(partial=True)
        when the stream breaks after it.
        """
        reason = "no healthy cloud replica serves this router's checkpoint"
        for replica, remaining in self._attempts():
            start, got_any = time.monotonic(), False
            replica.begin()
            code: grpc.StatusCode | None = None
            call = getattr(replica.stub, method)(request, timeout=remaining)
            try:
                async for item in call:
                    got_any = True
                    yield item, replica.address, (time.monotonic() - start) * 1e3
                code = grpc.StatusCode.OK
                return
            except grpc.aio.AioRpcError as err:
                code = err.code()
                reason = self._failed(replica, err)
                if got_any or code not in RETRY_CODES:
                    raise EscalationError(reason, partial=got_any) from None
            finally:
                call.cancel()
                self._end(replica, code)
        raise EscalationError(reason)
