"""Micro-batching of concurrent requests inside an edge worker (asyncio; no torch).

Requests are grouped by a key (the method and everything that must match for their inputs to
be concatenated: width, image shape, sequence length, ...). The oldest waiting group runs as
soon as it holds ``max_batch`` items or its oldest request has waited ``max_wait_s``. Batches
run one at a time, and requests that arrive while one computes form the next batch. They run
either on a single-thread ``executor`` (the event loop keeps taking requests meanwhile) or, with
``executor=None``, on the event loop's own thread: no thread hand-off (~0.3 ms per batch on a
small CPU), and requests that arrive meanwhile wait in their socket until the batch is done.

    batcher = MicroBatcher(run, max_batch=32, max_wait_s=0.002, executor=None)
    result, timing = await batcher.submit(("classify", 48), images, size=len(images))

``run(key, payloads)`` gets the payloads of one batch in arrival order and returns one result
per payload. An exception in ``run`` fails every request of that batch (and no other).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

RunBatch = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


@dataclass(frozen=True)
class BatchTiming:
    """How one request was served: time queued before its batch ran, the batch's compute time and size."""

    queue_ms: float
    compute_ms: float
    batch_size: int  # items (not requests) in the batch


@dataclass
class _Pending:
    payload: Any
    size: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Groups concurrent ``submit`` calls into batches of at most ``max_batch`` items."""

    def __init__(self, run: RunBatch, *, max_batch: int, max_wait_s: float, executor: Executor | None) -> None:
        if max_batch <= 0:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._run, self.max_batch, self.max_wait_s, self._executor = run, max_batch, max_wait_s, executor
        self._queues: dict[Hashable, deque[_Pending]] = {}
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, key: Hashable, payload: Any, size: int = 1) -> tuple[Any, BatchTiming]:
        """Queue ``payload`` (``size`` items) under ``key``; returns (its result, its timing)."""
        if self._task is None or self._task.done():
            self._arrived = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")
        pending = _Pending(payload, size, asyncio.get_running_loop().create_future())
        self._queues.setdefault(key, deque()).append(pending)
        assert self._arrived is not None
        self._arrived.set()
        return await pending.future

    def _oldest_key(self) -> Hashable | None:
        waiting = [(q[0].enqueued, i, key) for i, (key, q) in enumerate(self._queues.items()) if q]
        return min(waiting)[2] if waiting else None

    def _items(self, key: Hashable) -> int:
        return sum(p.size for p in self._queues[key])

    async def _next_ready(self) -> Hashable:
        """Wait until some group is full or its oldest request has waited max_wait_s; return its key."""
        assert self._arrived is not None
        while True:
            key = self._oldest_key()
            if key is None:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            remaining = self._queues[key][0].enqueued + self.max_wait_s - time.monotonic()
            if remaining <= 0 or self._items(key) >= self.max_batch:
                return key
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                pass

    def _take(self, key: Hashable) -> list[_Pending]:
        """Pop requests of ``key`` in arrival order up to max_batch items (always at least one)."""
        queue, batch, items = self._queues[key], [], 0
        while queue and (not batch or items + queue[0].size <= self.max_batch):
            pending = queue.popleft()
            if not pending.future.cancelled():
                batch.append(pending)
                items += pending.size
        if not queue:
            del self._queues[key]
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key = await self._next_ready()
            batch = self._take(key)
            if not batch:
                continue
            start, payloads = time.monotonic(), [p.payload for p in batch]
            try:
                if self._executor is None:
                    results = self._run(key, payloads)
                else:
                    results = await loop.run_in_executor(self._executor, self._run, key, payloads)
            except Exception as err:  # the model failed on this batch: fail its requests, keep serving
                log.exception("batch %r of %d request(s) failed", key, len(batch))
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(err)
                continue
            self._resolve(batch, results, start)

    @staticmethod
    def _resolve(batch: list[_Pending], results: Sequence[Any], start: float) -> None:
        end = time.monotonic()
        items = sum(p.size for p in batch)
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                timing = BatchTiming((start - pending.enqueued) * 1e3, (end - start) * 1e3, items)
                pending.future.set_result((result, timing))
