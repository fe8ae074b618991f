"""The router's edge workers: ``edge.worker.EdgeWorker`` run as Ray actors, one per GPU or one on the CPU.

Resources are declared where the actors are made: ``num_gpus=1`` per GPU actor, ``num_cpus``
(``--edge-cpus``, default 1) for the CPU actor, whose torch then uses that many threads. Ray
restarts a worker that dies and re-runs the calls that were on it.

Classify and Score, the hot path, go to the worker with the fewest calls in flight over its
private Unix-socket endpoint (edge/endpoint.py) when the worker runs on this host, and as Ray
actor calls otherwise; generation segments are Ray actor calls to the one
worker that holds the generation's state.

    pool = EdgePool(EdgeSettings(Path("checkpoints/matmamba-vision-fmnist"), edge_level=4))
    info = await pool.start()                       # actors loaded and warm
    out = await pool.classify(images, width=0)      # ClassifyOutput
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray

from edge.endpoint import EndpointClient, EndpointError, WorkerFailedError
from edge.results import ClassifyOutput, EdgeInfo, ScoreOutput, SegmentOutput, SegmentRequest
from edge.worker import EdgeWorker

log = logging.getLogger(__name__)

# How long actors may take to start (a worker process imports torch and loads the checkpoint).
START_TIMEOUT_S = 300.0
# Ray restarts a worker that dies, and re-runs the calls it was running on the new one (every edge
# call is safe to repeat: batches have no side effects, and a generation segment carries its context).
RESTARTS = {"max_restarts": -1, "max_task_retries": 3}
# How long closing waits for the workers to remove their endpoint sockets.
CLOSE_TIMEOUT_S = 5.0


class EdgeUnavailableError(RuntimeError):
    """The edge worker is gone (its actor died and could not be restarted in time)."""


class EdgeFailedError(RuntimeError):
    """The edge worker raised on this request (a bug or an input it cannot handle)."""


@dataclass(frozen=True)
class EdgeSettings:
    """How to run the edge workers (router flags in parentheses)."""

    checkpoint: Path  # (--checkpoint)
    edge_level: int  # (--edge-level)
    max_batch: int = 32  # items per micro-batch (--max-batch)
    max_wait_ms: float = 2.0  # micro-batch wait after its first request (--max-wait-ms)
    cpus: int = 1  # CPUs (and torch threads) of the CPU actor (--edge-cpus)
    gpus: int | None = None  # GPU actors; None = one per GPU Ray sees (--edge-gpus)
    chain: tuple[int, ...] = ()  # a chain's levels (--edge-level 8,2): each width is warmed up at start


class _Worker:
    """One actor: its Ray handle, calls in flight, and its endpoint client when it runs on this host."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.outstanding = 0
        self.endpoint: EndpointClient | None = None
        self.reconnecting: asyncio.Task | None = None

    async def connect(self, info: EdgeInfo) -> None:
        """Open the worker's private endpoint when it runs on this host (else use Ray calls only)."""
        if info.host != socket.gethostname():
            log.info("edge worker on host %s: using Ray calls (its endpoint is local to it)", info.host)
            return
        address = await self.handle.start_endpoint.remote()
        await self.close()
        self.endpoint = await EndpointClient.connect(address)

    async def close(self) -> None:
        if self.endpoint is not None:
            await self.endpoint.close()
        self.endpoint = None


def _gpu_count(settings: EdgeSettings) -> int:
    if settings.gpus is not None:
        return settings.gpus
    return int(ray.cluster_resources().get("GPU", 0))


class EdgePool:
    """The edge actors and least-outstanding dispatch over them."""

    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        self.workers: list[_Worker] = []
        self.info: EdgeInfo | None = None

    def _make_actors(self) -> list[Any]:
        s = self.settings
        kwargs = dict(max_batch=s.max_batch, max_wait_ms=s.max_wait_ms, warm_levels=s.chain)
        gpus = _gpu_count(s)
        if gpus:
            actor = ray.remote(num_gpus=1, num_cpus=1, **RESTARTS)(EdgeWorker)
            log.info("starting %d edge worker(s), one per GPU", gpus)
            return [actor.remote(str(s.checkpoint), s.edge_level, device="cuda", **kwargs) for _ in range(gpus)]
        actor = ray.remote(num_cpus=s.cpus, **RESTARTS)(EdgeWorker)
        log.info("starting one CPU edge worker (%d thread(s))", s.cpus)
        return [actor.remote(str(s.checkpoint), s.edge_level, device="cpu", num_threads=s.cpus, **kwargs)]

    async def start(self) -> EdgeInfo:
        """Start the actors and wait until every one has loaded its model; returns what they run."""
        self.workers = [_Worker(handle) for handle in self._make_actors()]
        try:
            infos = await asyncio.wait_for(asyncio.gather(*(w.handle.info.remote() for w in self.workers)),
                                           START_TIMEOUT_S)
            if len({i.fingerprint for i in infos}) != 1:
                raise EdgeUnavailableError("edge workers loaded different checkpoints; check --checkpoint")
            await asyncio.gather(*(w.connect(i) for w, i in zip(self.workers, infos)))
        except ray.exceptions.RayError as err:
            await self.close()
            raise EdgeUnavailableError(f"the edge worker could not start: {_cause(err)}") from None
        except BaseException:
            await self.close()
            raise
        self.info = infos[0]
        return self.info

    def pick(self) -> int:
        """Index of the worker with the fewest calls in flight."""
        return min(range(len(self.workers)), key=lambda i: self.workers[i].outstanding)

    async def classify(self, images: np.ndarray, width: int) -> ClassifyOutput:
        """Edge probabilities of images (N, C, H, W) at ``width`` (0 = the edge width)."""
        out = await self._batched("classify", images, width, False)
        if isinstance(out, ClassifyOutput):  # it came over Ray
            return out
        (probs,), edge_ms, batch = out
        return ClassifyOutput(probs, edge_ms, batch)

    async def score(self, tokens: np.ndarray, width: int, last_only: bool) -> ScoreOutput:
        """Edge log-probabilities of token ids (N, L) at ``width``."""
        out = await self._batched("score", tokens, width, last_only)
        if isinstance(out, ScoreOutput):
            return out
        (logprobs, token_logprobs), edge_ms, batch = out
        return ScoreOutput(logprobs, token_logprobs, edge_ms, batch)

    async def _batched(self, op: str, x: np.ndarray, width: int, last_only: bool) -> Any:
        """``op`` on the least busy worker: over its endpoint (raw result) or as a Ray call (its dataclass)."""
        worker = self.workers[self.pick()]
        worker.outstanding += 1
        try:
            endpoint = worker.endpoint
            if endpoint is not None and endpoint.closed:
                self._reconnect(worker)
            elif endpoint is not None:
                try:
                    return await endpoint.call(op, x, width=width, last_only=last_only)
                except EndpointError as err:  # the actor died or restarted: Ray knows where it is now
                    log.warning("edge worker endpoint: %s; using Ray calls until it is back", err)
                    self._reconnect(worker)
                except WorkerFailedError as err:
                    raise EdgeFailedError(str(err)) from None
            args = (x, width) if op == "classify" else (x, width, last_only)
            return await self._ray_call(worker, op, *args)
        finally:
            worker.outstanding -= 1

    def _reconnect(self, worker: _Worker) -> None:
        async def again() -> None:
            try:
                assert self.info is not None
                await worker.connect(self.info)
            except ray.exceptions.RayError as err:
                log.warning("edge worker endpoint not reopened: %s", _cause(err))

        if worker.reconnecting is None or worker.reconnecting.done():
            worker.reconnecting = asyncio.get_running_loop().create_task(again())

    async def _ray_call(self, worker: _Worker, method: str, *args: Any) -> Any:
        try:
            return await getattr(worker.handle, method).remote(*args)
        except ray.exceptions.RayTaskError as err:
            raise EdgeFailedError(f"the edge worker failed: {_cause(err)}") from None
        except ray.exceptions.RayError as err:
            raise EdgeUnavailableError(f"the edge worker is unavailable: {_cause(err)}") from None

    async def generate_segment(self, request: SegmentRequest, worker: int) -> SegmentOutput:
        """One generation segment on ``worker`` (the one holding the generation's state)."""
        w = self.workers[worker]
        w.outstanding += 1
        try:
            return await self._ray_call(w, "generate_segment", request)
        finally:
            w.outstanding -= 1

    def end_session(self, worker: int, session: str) -> None:
        """Let ``worker`` forget a finished generation (fire and forget)."""
        if worker < len(self.workers):
            self.workers[worker].handle.end_session.remote(session)

    async def close(self) -> None:
        """Close the endpoints (their sockets are removed), then stop the actors."""
        stops = [w.handle.stop_endpoint.remote() for w in self.workers if w.endpoint is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*stops), CLOSE_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError) as err:
            log.warning("edge worker endpoints not closed cleanly: %s", err)
        for worker in self.workers:
            await worker.close()
            ray.kill(worker.handle)
        self.workers = []


def _cause(err: Exception) -> str:
    """The useful line of a Ray error (the worker's exception, not Ray's wrapping)."""
    cause = getattr(err, "cause", None)
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(err).strip().splitlines()[-1]
