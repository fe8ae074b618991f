"""edge/batching.py: concurrent requests become micro-batches, bounded by size and wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from edge.batching import MicroBatcher


class Recorder:
    """A batch function that records its batches and answers payload * 10."""

    def __init__(self, fail_on: object = None, delay_s: float = 0.0) -> None:
        self.batches: list[tuple[Hashable, list[int]]] = []
        self.fail_on, self.delay_s = fail_on, delay_s

    def __call__(self, key: Hashable, payloads: Sequence[int]) -> list[int]:
        self.batches.append((key, list(payloads)))
        time.sleep(self.delay_s)
        if self.fail_on in payloads:
            raise RuntimeError("model failed")
        return [p * 10 for p in payloads]


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_a_batch_and_get_their_own_results() -> None:
    run = Recorder()

    async def main():
        batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.05, executor=ThreadPoolExecutor(1))
        return await asyncio.gather(*(batcher.submit("k", i) for i in range(5)))

    results = _run(main())
    assert [r for r, _ in results] == [0, 10, 20, 30, 40]
    assert run.batches == [("k", [0, 1, 2, 3, 4])]
    assert all(t.batch_size == 5 and t.queue_ms >= 0 and t.compute_ms >= 0 for _, t in results)


def test_batches_hold_at_most_max_batch_items_and_keys_never_mix() -> None:
    run = Recorder()

    async def main():
        batcher = MicroBatcher(run, max_batch=4, max_wait_s=0.02, executor=ThreadPoolExecutor(1))
        jobs = [batcher.submit("a", i, size=2) for i in range(5)] + [batcher.submit("b", 100 + i) for i in range(3)]
        return await asyncio.gather(*jobs)

    results = _run(main())
    assert [r for r, _ in results] == [0, 10, 20, 30, 40, 1000, 1010, 1020]
    assert all(len(p) * (2 if k == "a" else 1) <= 4 for k, p in run.batches)
    assert sorted(p for k, ps in run.batches if k == "a" for p in ps) == [0, 1, 2, 3, 4]
    assert [ps for k, ps in run.batches if k == "b"] == [[100, 101, 102]]


def test_a_full_batch_does_not_wait_and_a_lone_request_waits_at_most_max_wait() -> None:
    async def main():
        batcher = MicroBatcher(Recorder(), max_batch=2, max_wait_s=5.0, executor=ThreadPoolExecutor(1))
        start = time.monotonic()
        await asyncio.gather(batcher.submit("k", 1), batcher.submit("k", 2))
        full = time.monotonic() - start
        quick = MicroBatcher(Recorder(), max_batch=64, max_wait_s=0.03, executor=ThreadPoolExecutor(1))
        start = time.monotonic()
        await quick.submit("k", 1)
        return full, time.monotonic() - start

    full, lone = _run(main())
    assert full < 1.0  # did not wait for the 5 s max_wait
    assert 0.025 <= lone < 1.0


def test_requests_arriving_during_a_batch_form_the_next_one() -> None:
    run = Recorder(delay_s=0.05)

    async def main():
        batcher = MicroBatcher(run, max_batch=16, max_wait_s=0.0, executor=ThreadPoolExecutor(1))
        first = asyncio.ensure_future(batcher.submit("k", 0))
        await asyncio.sleep(0.01)  # the first batch is computing now
        rest = [batcher.submit("k", i) for i in range(1, 4)]
        return await asyncio.gather(first, *rest)

    _run(main())
    assert [p for _, p in run.batches] == [[0], [1, 2, 3]]


def test_a_failing_batch_fails_only_its_own_requests() -> None:
    run = Recorder(fail_on=3)

    async def main():
        batcher = MicroBatcher(run, max_batch=2, max_wait_s=0.01, executor=ThreadPoolExecutor(1))
        return await asyncio.gather(*(batcher.submit("k", i) for i in range(4)), return_exceptions=True)

    results = _run(main())
    assert [r[0] for r in results[:2]] == [0, 10]
    assert all(isinstance(r, RuntimeError) for r in results[2:])


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(Recorder(), max_batch=0, max_wait_s=0, executor=ThreadPoolExecutor(1))
    with pytest.raises(ValueError, match="max_wait_s"):
        MicroBatcher(Recorder(), max_batch=1, max_wait_s=-1, executor=ThreadPoolExecutor(1))
