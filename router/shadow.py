"""Shadow escalation and the per-request tap that feeds the traffic log.

With ``--shadow-rate p`` every item the router answered from the edge (confidence at or above
the threshold) is, with probability p, also sent to the cloud **after** the reply has been
returned: the reply never waits for it. The cloud's answer is compared with the edge's
(top-1 class, or top-1 next token for Score), counted in ``router_shadow_compared_total`` /
``router_shadow_agreed_total`` and written to the traffic log as a ``"shadow"`` record, so that
edge/cloud agreement on kept items can be estimated without bias (each kept item had the same
chance p of being checked; router.retune weights the samples by 1/p).

Shadows are dropped first under load: at most ``max_inflight`` shadow calls run at once, and a
shadow that finds no free slot (or no eligible cloud replica) is not sent at all (counted in
``router_shadow_total{outcome="dropped"}`` and marked ``"dropped"`` in the log). Real
escalations have no such cap, so they never queue behind shadows in the router.

Generate streams are logged (``TrafficTap.observe_generation``) but never shadowed: a segment the
edge kept has already been streamed and has no single cloud answer to compare it with.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import dataclass

import numpy as np

from proto import matmamba_pb2 as pb
from proto.tensors import TensorFormatError, from_tensor_msg, to_tensor_msg

from .escalation import EscalationError, ReplicaPool
from .metrics import RouterMetrics
from .traffic_log import (
    FORMAT_VERSION,
    GenerationTrace,
    Observed,
    TrafficLog,
    generation_record,
    next_token_probs,
    request_record,
    topk,
)

log = logging.getLogger(__name__)

SENT, DROPPED = "sent", "dropped"


@dataclass(frozen=True)
class ShadowSettings:
    """Shadow escalation knobs (router flags in parentheses)."""

    rate: float = 0.0  # share of kept items also sent to the cloud (--shadow-rate)
    max_inflight: int = 4  # shadow calls at once; more are dropped (--shadow-max-inflight)
    seed: int | None = None  # sampling seed (tests); None = fresh entropy

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"--shadow-rate must be a fraction in [0, 1] (e.g. 0.05), got {self.rate}")
        if self.max_inflight < 1:
            raise ValueError(f"--shadow-max-inflight must be at least 1, got {self.max_inflight}")


def _cloud_dist(method: str, reply, rows: int) -> np.ndarray:
    """(rows, K) answer distribution of a cloud reply to a shadow request; EscalationError when malformed."""
    msg = reply.probs if method == "Classify" else reply.logprobs
    try:
        values = from_tensor_msg(msg, max_elements=len(msg.data) + 1)
    except TensorFormatError as err:
        raise EscalationError(f"the cloud's shadow answer is malformed: {err}") from None
    if values.ndim != (2 if method == "Classify" else 3) or values.shape[0] != rows:
        raise EscalationError(f"the cloud's shadow answer has shape {values.shape} for {rows} items")
    return values.astype(np.float64) if method == "Classify" else next_token_probs(values)


def _request(method: str, inputs: np.ndarray, request_id: str):
    if method == "Classify":
        return pb.ClassifyRequest(images=to_tensor_msg(inputs), request_id=request_id)
    return pb.ScoreRequest(tokens=to_tensor_msg(inputs), last_only=True, request_id=request_id)


def shadow_record(obs: Observed, rows: np.ndarray, key: str, rate: float, *, cloud: np.ndarray | None = None,
                  error: str = "", cloud_ms: float = 0.0, replica: str = "") -> dict:
    """The "shadow" record of items ``rows`` of ``obs``: the cloud's answers (cloud (n, K)) or the error."""
    record = {"v": FORMAT_VERSION, "kind": "shadow", "key": key, "id": obs.request_id, "t": time.time(),
              "method": obs.method, "items": rows.tolist(), "p": rate}
    if cloud is None:
        record["error"] = error
        return record
    agree = obs.edge[rows].argmax(-1) == cloud.argmax(-1)  # top-1 class, or top-1 next token
    record.update(cloud=[topk(row) for row in cloud], agree=agree.tolist(), cloud_ms=cloud_ms, replica=replica)
    return record


class ShadowSender:
    """Samples kept items, sends them to the cloud in the background (bounded), compares and logs."""

    def __init__(self, settings: ShadowSettings, cloud: ReplicaPool, metrics: RouterMetrics,
                 traffic_log: TrafficLog | None) -> None:
        self.settings, self.cloud, self.metrics, self.log = settings, cloud, metrics, traffic_log
        self.rng = np.random.default_rng(settings.seed)
        self.inflight = 0
        self.peak_inflight = 0  # most shadow calls ever in flight at once
        self._tasks: set[asyncio.Task] = set()

    def pick(self, kept: np.ndarray) -> np.ndarray:
        """Indices of kept items chosen for a shadow (each with probability ``rate``)."""
        if self.settings.rate <= 0 or not kept.any():
            return np.empty(0, dtype=np.int64)
        return np.flatnonzero(kept & (self.rng.random(kept.shape[0]) < self.settings.rate))

    def admit(self, method: str) -> bool:
        """Take a slot for one shadow call, or count it dropped (no slot free, or no eligible replica)."""
        if self.inflight >= self.settings.max_inflight or not self.cloud.available:
            self.metrics.shadow.labels(method=method, outcome=DROPPED).inc()
            return False
        self.inflight += 1
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        self.metrics.shadow.labels(method=method, outcome=SENT).inc()
        self.metrics.shadow_inflight.set(self.inflight)
        return True

    def launch(self, obs: Observed, rows: np.ndarray, key: str) -> None:
        """Run the shadow call of ``rows`` (a slot was admitted) as a background task."""
        task = asyncio.get_running_loop().create_task(self._run(obs, rows, key), name=f"shadow-{key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, obs: Observed, rows: np.ndarray, key: str) -> None:
        method, outcome = obs.method, "failed"
        try:
            answer = await self.cloud.unary(method, _request(method, obs.inputs[rows], obs.request_id))
            cloud = _cloud_dist(method, answer.reply, rows.size)
        except EscalationError as err:
            record = shadow_record(obs, rows, key, self.settings.rate, error=err.reason)
        except Exception as err:  # never let a shadow disturb serving
            log.exception("shadow escalation of request %s failed", obs.request_id)
            record = shadow_record(obs, rows, key, self.settings.rate, error=f"{type(err).__name__}: {err}")
        else:
            record = shadow_record(obs, rows, key, self.settings.rate, cloud=cloud, cloud_ms=answer.cloud_ms,
                                   replica=answer.replica)
            self.metrics.record_shadow(method, np.array(record["agree"], dtype=bool))
            outcome = "answered"
        finally:
            self.inflight -= 1
            self.metrics.shadow_inflight.set(self.inflight)
        self.metrics.shadow.labels(method=method, outcome=outcome).inc()
        if self.log is not None:
            self.log.submit(record)

    async def close(self) -> None:
        """Cancel shadow calls still running (at shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class TrafficTap:
    """What the router does after answering a request: pick shadows, write the request record."""

    def __init__(self, *, task: str, fingerprint: str, edge_level: int, traffic_log: TrafficLog | None,
                 shadow: ShadowSender | None, log_inputs_max_bytes: int | None) -> None:
        self.task, self.fingerprint, self.edge_level = task, fingerprint, edge_level
        self.log, self.shadow, self.max_input_bytes = traffic_log, shadow, log_inputs_max_bytes
        self._boot = secrets.token_hex(4)  # keys unique across restarts of the router
        self._seq = itertools.count()

    def _key(self) -> str:
        return f"{self._boot}-{next(self._seq)}"

    def observe(self, obs: Observed) -> None:
        """Called on the event loop once the answer is ready; does no I/O and never waits."""
        key = self._key()
        rows = self.shadow.pick(~obs.escalated) if self.shadow is not None else np.empty(0, dtype=np.int64)
        sent = bool(rows.size) and self.shadow.admit(obs.method)
        limit = self.shadow.cloud.max_batch if sent else 0
        over = rows[limit:] if limit else rows[:0]  # more than the cloud takes in one call: not sent
        rows = rows[:limit] if limit else rows
        if self.log is not None:
            marks = dict.fromkeys(rows.tolist(), SENT if sent else DROPPED) | dict.fromkeys(over.tolist(), DROPPED)
            rate = self.shadow.settings.rate if self.shadow is not None else 0.0
            self.log.submit(request_record(obs, key=key, task=self.task, fingerprint=self.fingerprint,
                                           edge_level=self.edge_level, shadow_rate=rate, shadow=marks,
                                           max_input_bytes=self.max_input_bytes))
        if sent:
            self.shadow.launch(obs, rows, key)

    def observe_generation(self, trace: GenerationTrace, outcome: str, finish: str = "", error: str = "") -> None:
        """Called on the event loop when a Generate stream ends: queue its record (no shadow for Generate)."""
        if self.log is not None:
            self.log.submit(generation_record(trace, key=self._key(), task=self.task,
                                              fingerprint=self.fingerprint, edge_level=self.edge_level,
                                              outcome=outcome, finish=finish, error=error,
                                              max_input_bytes=self.max_input_bytes))

    async def close(self) -> None:
        if self.shadow is not None:
            await self.shadow.close()
        if self.log is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.log.close)
