"""The cloud replica: a grpc.aio server with Inference, grpc.health.v1 and Prometheus metrics.

    python -m cloud --checkpoint checkpoints/matmamba-vision-fmnist --port 50051 --metrics-port 9101

Start-up: the port is bound first with health NOT_SERVING (Inference answers UNAVAILABLE), then
the checkpoint loads and one warm-up batch runs per method, then health turns SERVING.
SIGTERM / SIGINT: health NOT_SERVING, new RPCs refused, in-flight RPCs drain for up to
``--grace`` seconds (``server.stop(grace)``), then the process exits 0.

As one of ``--workers N`` (cloud/workers.py) the server shares its port with the other workers
(``reuse_port``) and, once warm, waits for the parent's word before turning SERVING, so that no
health check says SERVING before every worker is warm.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

import matmamba
from matmamba.devices import describe_device
from proto import matmamba_pb2 as pb
from proto.security import ServerSecurity

from .metrics import CloudMetrics
from .runner import ModelRunner
from .servicer import CloudServicer, SpeculativeServicer, add_to_server

if TYPE_CHECKING:
    from .workers import ParentLink

log = logging.getLogger(__name__)

MIB = 1 << 20
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "matmamba.v1.Inference"
# Health is reported for the whole server ("") and for the Inference service by name.
HEALTH_SERVICES = ("", INFERENCE_SERVICE)


@dataclass
class ServerConfig:
    """Everything `python -m cloud` takes (see cloud/__main__.py for the flags)."""

    checkpoint: Path | None = None  # checkpoint directory; None when a runner is passed in
    host: str = "127.0.0.1"  # listen address; 0.0.0.0 to accept other hosts (e.g. in a container)
    port: int = 50051  # gRPC port; 0 = any free port (see CloudServer.port)
    metrics_port: int | None = 9101  # Prometheus /metrics port on the same host; 0 = any free; None = off
    width: int | None = None  # serve a narrower nested width; None = full width (d_model)
    device: str = "auto"  # auto (CUDA when available), cpu, cuda, cuda:1, ...
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16
    cpu_threads: int = 0  # torch intra-op threads; 0 = torch's default (see docs/CLOUD.md, CPU serving)
    max_batch: int = 64  # most items per model call, and per request
    max_wait_ms: float = 2.0  # how long a batch waits for more requests after its first
    wait_when_idle: bool = False  # also wait max_wait_ms when the request found the server idle
    max_queue: int = 1024  # requests that may wait for the model; more are refused (RESOURCE_EXHAUSTED)
    max_message_mb: int = 16  # largest request or reply message
    max_generate: int = 4  # generations running at once
    max_tokens: int = 512  # cap on GenerateRequest.max_tokens
    default_max_tokens: int = 64  # max_tokens when a request leaves it 0
    max_seq_len: int = 2048  # longest Score sequence, and prompt + max_tokens
    grace_s: float = 10.0  # how long in-flight RPCs may drain on shutdown
    security: ServerSecurity = ServerSecurity()  # TLS / mutual TLS / bearer token (default: plaintext, none)
    max_sessions: int = 256  # speculative-decoding sessions held at once (about 0.8 MB each for the shipped LM)
    session_ttl_s: float = 60.0  # a session idle this long is dropped
    max_draft_tokens: int = 32  # most drafted tokens one Verify may carry
    reuse_port: bool = False  # share the port with sibling worker processes (SO_REUSEPORT; --workers N)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_message_mb", "max_generate", "max_tokens", "max_seq_len",
                     "max_sessions", "session_ttl_s", "max_draft_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.grace_s < 0:
            raise ValueError("--max-wait-ms and --grace must be >= 0")

    def runner_kwargs(self) -> dict:
        """Arguments of ModelRunner.__init__ that come from this config."""
        return dict(precision=self.precision, max_batch=self.max_batch, max_seq_len=self.max_seq_len,
                    max_tokens=self.max_tokens, default_max_tokens=self.default_max_tokens,
                    max_reply_bytes=self.max_message_mb * MIB)


def host_port(host: str, port: int) -> str:
    """host:port as gRPC targets write it (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class CloudServer:
    """One replica. ``await start()`` binds, loads, warms up; ``await stop()`` drains.

    ``runner`` may be passed in (tests wrap a model they built); otherwise ``config.checkpoint`` loads.
    """

    def __init__(self, config: ServerConfig, runner: ModelRunner | None = None) -> None:
        if runner is None and config.checkpoint is None:
            raise ValueError("give a checkpoint directory (--checkpoint) or a ModelRunner")
        self.config, self._runner = config, runner
        self.metrics = CloudMetrics()
        self.health = health_aio.HealthServicer()
        self._batch_executor = ThreadPoolExecutor(1, thread_name_prefix="cloud-batch")
        self.servicer = CloudServicer(self.metrics, max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1e3,
                                      max_queue=config.max_queue, max_generate=config.max_generate,
                                      batch_executor=self._batch_executor, wait_when_idle=config.wait_when_idle)
        self.speculative = SpeculativeServicer(self.servicer, max_sessions=config.max_sessions,
                                               ttl_s=config.session_ttl_s, max_draft=config.max_draft_tokens)
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port: int | None = None

    @property
    def address(self) -> str:
        """host:port clients dial."""
        return host_port(self.config.host, self.port)

    async def _set_health(self, status: int) -> None:
        for service in HEALTH_SERVICES:
            await self.health.set(service, status)

    def _bind(self) -> None:
        size = self.config.max_message_mb * MIB
        # Alone, a port in use is an error, not a second silent listener; as a worker, the parent has
        # checked the port and holds it, and the workers share it.
        options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
                   ("grpc.so_reuseport", int(self.config.reuse_port))]
        security = self.config.security
        self.server = grpc.aio.server(options=options, interceptors=security.interceptors())
        add_to_server(self.servicer, self.server)
        add_to_server(self.speculative, self.server, "SpeculativeDecoding")
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        target = host_port(self.config.host, self.config.port)
        try:
            self.port = security.add_port(self.server, target)
        except RuntimeError as err:
            raise OSError(f"cannot listen on {target} ({err}); is the port in use? pick another with --port") from None
        if self.port == 0:
            raise OSError(f"cannot listen on {target}; is the port in use? pick another with --port")

    async def start(self, before_serving: Callable[[], Awaitable[None]] | None = None) -> None:
        """Bind and serve (health NOT_SERVING), load the model and warm up, then health SERVING.

        ``before_serving`` is awaited between the warm-up and SERVING (a worker waits for its siblings).
        """
        self._bind()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        self.servicer.replica = self.address
        log.info("listening on %s, %s (health NOT_SERVING until warm)", self.address,
                 self.config.security.describe())
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.host, self.config.metrics_port)
        runner = self._runner or await asyncio.to_thread(self._load)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._batch_executor, runner.warmup)
        self._runner = runner
        self.servicer.attach(runner)
        self.metrics.describe_model(checkpoint=runner.fingerprint[:12], task=runner.limits.task_name,
                                    width=str(runner.width), device=describe_device(runner.device),
                                    version=matmamba.__version__)
        if before_serving is not None:
            await before_serving()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s at width %d on %s", runner.limits.task_name, runner.width,
                 describe_device(runner.device))

    def _load(self) -> ModelRunner:
        if self.config.cpu_threads:
            torch.set_num_threads(self.config.cpu_threads)
        return ModelRunner.load(self.config.checkpoint, width=self.config.width, device=self.config.device,
                                **self.config.runner_kwargs())

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new RPCs, let in-flight ones finish within ``grace`` seconds."""
        grace = self.config.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            log.info("draining (up to %.1f s)", grace)
            await self.server.stop(grace)
        await self.servicer.batcher.stop()
        if self.servicer.generation is not None:
            self.servicer.generation.shutdown()
        self.speculative.shutdown()
        self._batch_executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()
        log.info("stopped")


async def serve(config: ServerConfig, parent: ParentLink | None = None) -> None:
    """Run a replica until SIGTERM or SIGINT (or, as a worker, until its parent is gone), then drain and return."""
    server = CloudServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if parent is not None:
        await parent.open(on_gone=stop.set)
    starting = asyncio.create_task(server.start(parent.warm if parent is not None else None))
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting in done:
        if starting.exception() is not None:
            await server.stop(0)
            raise starting.exception()
        if parent is not None:
            await parent.serving()
        await stopping
    else:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
    log.info("signal received")
    await server.stop()
