"""Dynamic batching: requests of the same kind that arrive close together run as one model call.

Semantics (docs/CLOUD.md has the operator's version):

1. Each request is validated *before* it is queued, so a malformed request never joins a batch.
2. Requests go to a FIFO queue per :class:`BatchKey` (method, width, shape class): only requests
   whose inputs can be concatenated share a batch (e.g. images of the same H, W).
3. One worker coroutine serves all queues. It takes the queue whose head request is the oldest,
   waits until that queue holds ``max_batch`` items or ``max_wait_s`` has passed since the head
   arrived, then pops requests in order while their items fit in ``max_batch`` (a request is
   never split). A request that finds the batcher idle (nothing queued, no batch running) does
   not wait: it runs with whatever arrived in the same event-loop turn. Waiting for company pays
   only under load, and then requests queue up while the previous batch runs anyway
   (``wait_when_idle=True`` makes idle arrivals wait too).
4. Requests whose RPC was cancelled or whose deadline has passed are dropped at that moment,
   before any compute (the latter answered DEADLINE_EXCEEDED).
5. The batch runs in ``executor`` (a single thread, so the event loop never blocks and batches
   run one at a time); meanwhile new requests accumulate, which is what makes batches grow under
   load.
6. If the model raises, every request of that batch fails with INTERNAL and the error is
   logged; other batches are unaffected.
7. At most ``max_queue`` requests wait (all queues together); one more is refused at once with
   RESOURCE_EXHAUSTED instead of growing the queue.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

import grpc

from proto.validate import RequestError

from .metrics import CloudMetrics

log = logging.getLogger(__name__)

P = TypeVar("P")  # a request's payload (validated numpy inputs)
R = TypeVar("R")  # a request's share of the batch's output


class BatchKey(NamedTuple):
    """Requests with equal keys may share a model call."""

    method: str  # the RPC name: "Classify" or "Score" (also the metrics label)
    width: int  # model width the batch runs at
    shape: Hashable  # shape class, e.g. (C, H, W) for images or (L, last_only) for token sequences


@dataclass(frozen=True)
class BatchResult(Generic[R]):
    """What one request gets back from its batch."""

    value: R
    batch_size: int  # items in the model call this request ran in
    queue_s: float  # from submit to the start of the model call
    compute_s: float  # the model call's wall time


# Runs in the executor thread: (key, payloads of the batch's requests) -> one result per payload.
RunBatch = Callable[[BatchKey, Sequence[Any]], Sequence[Any]]


@dataclass
class _Pending:
    payload: Any
    size: int  # items this request contributes to the batch
    future: asyncio.Future
    enqueued: float  # time.monotonic() at submit
    deadline: float | None  # time.monotonic() after which the answer is useless


@dataclass
class _Queues:
    """FIFO queues by key, with running counts (so the worker never rescans a long queue)."""

    by_key: dict[BatchKey, collections.deque[_Pending]] = field(default_factory=dict)
    items_by_key: dict[BatchKey, int] = field(default_factory=dict)  # sum of sizes per queue
    waiting: int = 0  # requests in all queues

    def push(self, key: BatchKey, item: _Pending) -> None:
        self.by_key.setdefault(key, collections.deque()).append(item)
        self.items_by_key[key] = self.items_by_key.get(key, 0) + item.size
        self.waiting += 1

    def pop(self, key: BatchKey) -> _Pending:
        queue = self.by_key[key]
        item = queue.popleft()
        self.items_by_key[key] -= item.size
        self.waiting -= 1
        if not queue:
            del self.by_key[key], self.items_by_key[key]
        return item

    def oldest_key(self) -> BatchKey | None:
        heads = [(q[0].enqueued, k) for k, q in self.by_key.items()]
        return min(heads, key=lambda h: h[0])[1] if heads else None


class DynamicBatcher:
    """Batches submitted payloads per key and runs them with ``run_batch`` in ``executor``."""

    def __init__(self, run_batch: RunBatch, executor: Executor, *, max_batch: int, max_wait_s: float,
                 max_queue: int, metrics: CloudMetrics | None = None, wait_when_idle: bool = False) -> None:
        if max_batch <= 0 or max_queue <= 0 or max_wait_s < 0:
            raise ValueError(f"need max_batch > 0, max_queue > 0, max_wait_s >= 0; got {max_batch}, "
                             f"{max_queue}, {max_wait_s}")
        self._run_batch, self._executor = run_batch, executor
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.wait_when_idle = wait_when_idle
        self._metrics = metrics
        self._queues = _Queues()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        """Requests queued (not yet in a running batch)."""
        return self._queues.waiting

    def start(self) -> None:
        """Start the worker coroutine (call from the event loop that will submit)."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="dynamic-batcher")

    async def stop(self) -> None:
        """Stop the worker and fail whatever is still queued with UNAVAILABLE (after the server drained)."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        while (key := self._queues.oldest_key()) is not None:
            self._gauge(key.method, -1)
            self._fail(self._queues.pop(key), RequestError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down"))

    async def submit(self, key: BatchKey, payload: P, size: int, deadline: float | None = None) -> BatchResult:
        """Queue ``payload`` (``size`` items) and wait for its share of a batch.

        Raises RequestError: RESOURCE_EXHAUSTED when the queue is full, DEADLINE_EXCEEDED when
        the deadline passed while queued, INTERNAL when the model failed on the batch.
        """
        if self._worker is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the batcher is not running (server starting or stopping)")
        if self._queues.waiting >= self.max_queue:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the server's queue is full ({self._queues.waiting} requests waiting, --max-queue "
                               f"{self.max_queue}); retry with backoff or add replicas")
        item = _Pending(payload, size, asyncio.get_running_loop().create_future(), time.monotonic(), deadline)
        self._queues.push(key, item)
        self._gauge(key.method, +1)
        self._arrived.set()
        return await item.future

    # ------------------------------------------------------------------ the worker

    async def _work(self) -> None:
        idle = True  # nothing queued and no batch running: the next request runs without waiting
        while True:
            key = self._queues.oldest_key()
            if key is None:
                self._arrived.clear()
                await self._arrived.wait()
                await asyncio.sleep(0)  # requests submitted in the same loop turn join the first
                idle = True
                continue
            if not idle or self.wait_when_idle:
                await self._fill(key)
            idle = False
            batch = self._take(key)
            if batch:
                await self._execute(key, batch)

    async def _fill(self, key: BatchKey) -> None:
        """Wait until ``key``'s queue holds max_batch items or its head has waited max_wait_s."""
        while True:
            self._arrived.clear()
            queue = self._queues.by_key.get(key)
            if not queue:
                return
            remaining = queue[0].enqueued + self.max_wait_s - time.monotonic()
            if remaining <= 0 or self._queues.items_by_key[key] >= self.max_batch:
                return
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _take(self, key: BatchKey) -> list[_Pending]:
        """Pop requests in order while they fit in max_batch; drop cancelled and expired ones."""
        batch: list[_Pending] = []
        items, now = 0, time.monotonic()
        while key in self._queues.by_key:
            head = self._queues.by_key[key][0]
            if batch and items + head.size > self.max_batch:
                break
            item = self._queues.pop(key)
            self._gauge(key.method, -1)
            if item.future.done():  # the RPC was cancelled while queued
                continue
            if item.deadline is not None and now >= item.deadline:
                self._fail(item, RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                              f"the deadline passed after {now - item.enqueued:.3f} s in the queue, "
                                              "before the request was computed; allow a longer deadline"))
                continue
            batch.append(item)
            items += item.size
        return batch

    async def _execute(self, key: BatchKey, batch: list[_Pending]) -> None:
        start = time.monotonic()
        items = sum(p.size for p in batch)
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run_batch, key, [p.payload for p in batch])
        except Exception as err:  # the model failed: fail this batch only, keep serving
            log.exception("model call failed on a %s batch of %d requests (%d items, width %d)",
                          key.method, len(batch), items, key.width)
            for item in batch:
                self._fail(item, RequestError(grpc.StatusCode.INTERNAL,
                                              f"the model failed on the batch this request ran in "
                                              f"({type(err).__name__}: {err}); see the server log"))
            return
        compute_s = time.monotonic() - start
        self._observe(key.method, batch, items, start, compute_s)
        for item, value in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(BatchResult(value, items, start - item.enqueued, compute_s))

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _fail(item: _Pending, err: RequestError) -> None:
        if not item.future.done():
            item.future.set_exception(err)

    def _gauge(self, method: str, delta: int) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.labels(method=method).inc(delta)

    def _observe(self, method: str, batch: list[_Pending], items: int, start: float, compute_s: float) -> None:
        if self._metrics is None:
            return
        self._metrics.batch_size.labels(method=method).observe(items)
        self._metrics.compute.labels(method=method).observe(compute_s)
        for item in batch:
            self._metrics.queue_wait.labels(method=method).observe(start - item.enqueued)
