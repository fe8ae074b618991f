"""Streaming text generation: one worker thread per running generation, at most ``max_concurrent`` at once.

Generations are not batched across requests: each runs its own prompt pass and recurrent
decode steps in a thread of a dedicated pool, and hands every new token to the event loop as
soon as it exists. When the client cancels (or the deadline passes) gRPC cancels the handler,
which sets a stop flag that the thread checks after every token, so the thread ends within one
decode step and its slot frees.

    pool = GenerationPool(runner, max_concurrent=4, max_waiting=1024, metrics=metrics)
    async for step in pool.stream(inputs):   # Step(token, logprob), ..., Step(None, 0.0, finish_reason)
        ...
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from proto import matmamba_pb2 as pb
from proto.validate import GenerateInputs, RequestError

from .metrics import CloudMetrics
from .runner import ModelRunner

log = logging.getLogger(__name__)

METHOD = "Generate"  # the RPC name, as the metrics label it
# What a partial UTF-8 character decodes to; text ending in it is held back until the character completes.
REPLACEMENT_CHAR = "\ufffd"
_DONE = object()  # end-of-stream marker on a generation's token queue


@dataclass(frozen=True)
class Step:
    """One event of a generation stream."""

    token: int | None  # the new token id; None on the final step
    logprob: float  # its log-probability at temperature 1 (0.0 on the final step)
    finish_reason: int = pb.FINISH_REASON_UNSPECIFIED  # set on the final step only


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces without splitting multi-byte characters.

    Each push decodes the whole sequence so far and returns the new suffix. While the decoded text
    ends in U+FFFD (a token ended inside a UTF-8 character) nothing is returned; the piece comes with
    the token that completes the character. ``flush`` returns whatever is left at the end.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token: int) -> str:
        """Add one token id; return the text it completes (may be "")."""
        self._ids.append(token)
        text = self._decode(self._ids)
        if text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """The text not yet returned, replacement characters included (call once, at the end)."""
        return self._advance(self._decode(self._ids)) if self._ids else ""

    def _advance(self, text: str) -> str:
        if not text.startswith(self._emitted):
            # A tokenizer whose decode of a longer sequence rewrites earlier text: emit only the new tail.
            log.debug("decoded text changed before position %d; emitting the tail only", len(self._emitted))
        piece = text[len(self._emitted):]
        self._emitted = text
        return piece


class GenerationPool:
    """Runs generations in worker threads, bounded by ``max_concurrent`` with ``max_waiting`` queued."""

    def __init__(self, runner: ModelRunner, *, max_concurrent: int, max_waiting: int,
                 metrics: CloudMetrics | None = None) -> None:
        if max_concurrent <= 0:
            raise ValueError(f"max_concurrent must be positive, got {max_concurrent}")
        self.runner, self.max_concurrent, self.max_waiting = runner, max_concurrent, max_waiting
        self._metrics = metrics
        self._executor = ThreadPoolExecutor(max_concurrent, thread_name_prefix="cloud-generate")
        self._slots: asyncio.Semaphore | None = None  # made on first use, inside the serving event loop
        self._waiting = 0
        self.running = 0

    def shutdown(self) -> None:
        """Stop the worker threads once their generations end (their stop flags are set by then)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _acquire(self) -> float:
        """Wait for a free slot; returns the seconds waited. RESOURCE_EXHAUSTED when too many wait."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrent)
        if self._slots.locked() and self._waiting >= self.max_waiting:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{self.max_concurrent} generations are running and {self._waiting} are waiting "
                               f"(--max-generate {self.max_concurrent}, --max-queue {self.max_waiting}); retry later")
        start = time.monotonic()
        self._waiting += 1
        self._gauge(+1)
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
            self._gauge(-1)
        return time.monotonic() - start

    async def stream(self, inputs: GenerateInputs) -> AsyncIterator[Step]:
        """Yield one Step per new token as soon as it exists, then a final Step with the finish reason."""
        waited = await self._acquire()
        loop, queue, stop = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        emit = lambda token, logprob: loop.call_soon_threadsafe(queue.put_nowait, Step(token, logprob))
        start = time.monotonic()
        self.running += 1
        work = loop.run_in_executor(self._executor, self.runner.generate, inputs, stop, emit)
        work.add_done_callback(lambda done: self._finished(done, queue, start))
        if self._metrics is not None:
            self._metrics.queue_wait.labels(method=METHOD).observe(waited)
        try:
            while (step := await queue.get()) is not _DONE:
                yield step
            yield Step(None, 0.0, _finish_reason(work))
        finally:
            stop.set()

    def _finished(self, work: asyncio.Future, queue: asyncio.Queue, start: float) -> None:
        """Runs on the event loop once the worker thread returned: free the slot, end the stream."""
        self.running -= 1
        assert self._slots is not None
        self._slots.release()
        queue.put_nowait(_DONE)
        if not work.cancelled() and work.exception() is not None:
            log.error("generation failed", exc_info=work.exception())
        if self._metrics is not None:
            self._metrics.compute.labels(method=METHOD).observe(time.monotonic() - start)

    def _gauge(self, delta: int) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.labels(method=METHOD).inc(delta)


def _finish_reason(work: asyncio.Future) -> int:
    """The finished worker's pb.FinishReason; a failure in the thread becomes INTERNAL."""
    if work.cancelled():
        raise RequestError(grpc.StatusCode.UNAVAILABLE, "the server shut down before this generation ran")
    err = work.exception()
    if err is not None:
        raise RequestError(grpc.StatusCode.INTERNAL,
                           f"the model failed while generating ({type(err).__name__}: {err}); see the server log")
    return work.result()
