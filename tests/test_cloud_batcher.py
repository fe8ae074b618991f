"""cloud/batcher.py on its own: which requests share a model call, in what order, and what is refused."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cloud.batcher import BatchKey, DynamicBatcher
from proto.validate import RequestError


class Recorder:
    """A run_batch that records each batch's payloads and echoes them back."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[tuple[BatchKey, list[str]]] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, key: BatchKey, payloads: Sequence[str]) -> list[str]:
        time.sleep(self.delay)
        with self.lock:
            self.batches.append((key, list(payloads)))
        return [p.upper() for p in payloads]


async def _run(recorder: Recorder, jobs: list[tuple[BatchKey, str, int]], **limits) -> list:
    with ThreadPoolExecutor(1) as executor:
        batcher = DynamicBatcher(recorder, executor, **limits)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(key, payload, size) for key, payload, size in jobs),
                                        return_exceptions=True)
        finally:
            await batcher.stop()


A, B = BatchKey("Classify", 64, (1, 28, 28)), BatchKey("Classify", 64, (1, 32, 32))


def test_same_key_requests_share_a_batch_in_order_and_keys_never_mix() -> None:
    recorder = Recorder()
    jobs = [(A, "a1", 1), (B, "b1", 1), (A, "a2", 2), (A, "a3", 1), (B, "b2", 3)]
    results = asyncio.run(_run(recorder, jobs, max_batch=8, max_wait_s=0.05, max_queue=16))
    assert [r.value for r in results] == ["A1", "B1", "A2", "A3", "B2"]
    assert recorder.batches == [(A, ["a1", "a2", "a3"]), (B, ["b1", "b2"])]
    assert [r.batch_size for r in results] == [4, 4, 4, 4, 4]


def test_a_batch_never_exceeds_max_batch_and_a_request_is_never_split() -> None:
    recorder = Recorder()
    jobs = [(A, "x", 3), (A, "y", 3), (A, "z", 3)]
    results = asyncio.run(_run(recorder, jobs, max_batch=4, max_wait_s=0.01, max_queue=16))
    assert [payloads for _, payloads in recorder.batches] == [["x"], ["y"], ["z"]]
    assert all(r.batch_size == 3 for r in results)


def test_more_than_max_queue_waiting_is_refused() -> None:
    recorder = Recorder(delay=0.2)
    jobs = [(A, f"r{i}", 1) for i in range(5)]
    results = asyncio.run(_run(recorder, jobs, max_batch=1, max_wait_s=0.0, max_queue=2))
    refused = [r for r in results if isinstance(r, RequestError)]
    assert refused and all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert sum(1 for r in results if not isinstance(r, Exception)) == 2  # the queue holds two


def test_a_failing_batch_fails_with_internal_and_the_next_one_runs() -> None:
    calls = []

    def flaky(key: BatchKey, payloads: Sequence[str]) -> list[str]:
        calls.append(list(payloads))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return list(payloads)

    async def scenario() -> tuple:
        with ThreadPoolExecutor(1) as executor:
            batcher = DynamicBatcher(flaky, executor, max_batch=4, max_wait_s=0.0, max_queue=8)
            batcher.start()
            first = await asyncio.gather(batcher.submit(A, "a", 1), return_exceptions=True)
            second = await batcher.submit(A, "b", 1)
            await batcher.stop()
            return first[0], second

    failed, ok = asyncio.run(scenario())
    assert isinstance(failed, RequestError) and failed.code == grpc.StatusCode.INTERNAL
    assert "out of memory" in failed.message and ok.value == "b"


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        DynamicBatcher(Recorder(), ThreadPoolExecutor(1), max_batch=0, max_wait_s=0.0, max_queue=1)


def test_a_request_finding_the_batcher_idle_runs_at_once_and_later_ones_batch_behind_it() -> None:
    recorder = Recorder(delay=0.2)

    async def scenario():
        with ThreadPoolExecutor(1) as executor:
            batcher = DynamicBatcher(recorder, executor, max_batch=8, max_wait_s=1.0, max_queue=16)
            batcher.start()
            try:
                first = asyncio.ensure_future(batcher.submit(A, "a", 1))
                await asyncio.sleep(0.05)  # "a" is running now
                later = [asyncio.ensure_future(batcher.submit(A, p, 1)) for p in "bcd"]
                return await first, await asyncio.gather(*later)
            finally:
                await batcher.stop()

    first, later = asyncio.run(scenario())
    assert first.value == "A" and first.batch_size == 1
    assert first.queue_s < 0.1  # did not wait max_wait_s (1 s) for company
    assert recorder.batches == [(A, ["a"]), (A, ["b", "c", "d"])]
    assert [r.value for r in later] == ["B", "C", "D"] and all(r.batch_size == 3 for r in later)
    assert all(r.queue_s > 0.5 for r in later)  # queued behind a running batch, they waited for company
