"""The cloud replica as a Ray Serve deployment behind Serve's gRPC ingress (optional path).

    python -m cloud.serve_app --checkpoint checkpoints/matmamba-vision-fmnist --grpc-port 9000 --replicas 2

Needs Ray Serve's extras (``pip install "ray[serve]==2.60.0"``, not part of ``make setup``:
see docs/CLOUD.md). Clients call the same ``matmamba.v1.Inference`` service on ``--grpc-port``
(a plain ``python -m cloud`` client works unchanged); Serve's proxy routes each call to a
replica, and every replica runs the same servicer, dynamic batcher and generation pool as
``python -m cloud``. Differences from ``python -m cloud``, all documented in docs/CLOUD.md:

- no per-replica Prometheus endpoint (use Ray's metrics); grpc.health.v1 ``Check`` is answered,
  ``Watch`` is not (UNIMPLEMENTED);
- deadlines are not forwarded through Serve's proxy, so queued requests are not dropped at
  their deadline (Serve's ``request_timeout_s`` applies instead);
- every call pays Serve's proxy hop (~3.4 ms measured here, DESIGN.md) on top of the server's.

Ray is started with the project's network-quiet recipe (``router.ray_setup.init_ray``: the one
function every ``ray.init`` of the project goes through).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2

from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from .server import ServerConfig

log = logging.getLogger(__name__)

# protoc builds the message classes with __module__ = "matmamba_pb2" (the module name it
# generated), but they are imported as proto.matmamba_pb2; pickle (Serve's proxy -> replica hop)
# looks classes up by __module__, so that name must import. Serve's proxy imports this module
# through GRPC_SERVICERS, and every replica imports it for CloudDeployment.
sys.modules.setdefault(pb.ClassifyRequest.__module__, pb)

APP_NAME = "matmamba-cloud"
REPO_ROOT = Path(__file__).resolve().parents[1]
# Servicer registration functions Serve's gRPC proxy imports (module path + function name).
GRPC_SERVICERS = ["cloud.serve_app.add_inference_servicer",
                  "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]


def add_inference_servicer(servicer: Any, server: Any) -> None:
    """The generated registration, reached through this module so that its import sets the pickle alias."""
    pb_grpc.add_InferenceServicer_to_server(servicer, server)


class _Aborted(Exception):
    """Raised by _ServeContext.abort after the status was set on Serve's gRPC context."""


class _ServeContext:
    """The part of grpc.aio.ServicerContext the servicer uses, over Serve's RayServegRPCContext."""

    def __init__(self, grpc_context: Any) -> None:
        self._context = grpc_context

    def time_remaining(self) -> float | None:
        return None  # Serve's proxy does not forward the client's deadline

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._context.set_code(code)
        self._context.set_details(details)
        raise _Aborted(details)


class CloudDeployment:
    """One Serve replica: a ModelRunner and a CloudServicer (batcher, generation pool) on Serve's event loop."""

    def __init__(self, config: ServerConfig) -> None:
        from .metrics import CloudMetrics
        from .runner import ModelRunner
        from .servicer import CloudServicer

        sys.modules.setdefault(pb.ClassifyRequest.__module__, pb)  # the pickle alias, however this class got here
        self.config = config
        self.runner = ModelRunner.load(config.checkpoint, width=config.width, device=config.device,
                                       **config.runner_kwargs())
        self.runner.warmup()
        self.servicer = CloudServicer(CloudMetrics(), max_batch=config.max_batch,
                                      max_wait_s=config.max_wait_ms / 1e3, max_queue=config.max_queue,
                                      max_generate=config.max_generate,
                                      batch_executor=ThreadPoolExecutor(1, thread_name_prefix="cloud-batch"),
                                      wait_when_idle=config.wait_when_idle)
        self.servicer.replica = f"ray-serve:{os.getpid()}"

    def _attach(self) -> None:
        if self.servicer.runner is None:  # the batcher must start inside Serve's event loop
            self.servicer.attach(self.runner)

    async def _unary(self, method: str, request: Any, grpc_context: Any, empty: Any) -> Any:
        self._attach()
        try:
            return await getattr(self.servicer, method)(request, _ServeContext(grpc_context))
        except _Aborted:
            return empty

    async def Classify(self, request: pb.ClassifyRequest, grpc_context=None) -> pb.ClassifyReply:
        return await self._unary("Classify", request, grpc_context, pb.ClassifyReply())

    async def Score(self, request: pb.ScoreRequest, grpc_context=None) -> pb.ScoreReply:
        return await self._unary("Score", request, grpc_context, pb.ScoreReply())

    async def ModelInfo(self, request: pb.ModelInfoRequest, grpc_context=None) -> pb.ModelInfoReply:
        return await self._unary("ModelInfo", request, grpc_context, pb.ModelInfoReply())

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> AsyncIterator[pb.GenerateChunk]:
        self._attach()
        # A stream carries its status with its messages: a refused request yields none, so the
        # status set on grpc_context reaches the client only through the raised _Aborted.
        async for chunk in self.servicer.Generate(request, _ServeContext(grpc_context)):
            yield chunk

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None):
        """grpc.health.v1 Check: SERVING once this replica's model is loaded and warm (it is, once constructed)."""
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context=None):
        await _ServeContext(grpc_context).abort(grpc.StatusCode.UNIMPLEMENTED,
                                                "health Watch is not served through Ray Serve; poll Check instead")
        yield  # unreachable; makes this the async generator Serve expects for a server-streaming method


def build_app(config: ServerConfig, replicas: int, num_gpus: float, max_ongoing_requests: int):
    """The Serve application: ``replicas`` copies of CloudDeployment, each with ``num_gpus`` GPUs."""
    from ray import serve

    deployment = serve.deployment(CloudDeployment, name="cloud", num_replicas=replicas,
                                  ray_actor_options={"num_gpus": num_gpus},
                                  max_ongoing_requests=max_ongoing_requests)
    return deployment.bind(config)


def start(config: ServerConfig, *, grpc_port: int, replicas: int, num_gpus: float,
          max_ongoing_requests: int) -> None:
    """Start Ray (network-quiet), Serve's gRPC proxy on 127.0.0.1:``grpc_port`` and the application."""
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    from router.ray_setup import init_ray  # the project's one ray.init recipe (DESIGN.md, Ray hygiene)

    init_ray()
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=0),
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS))
    serve.run(build_app(config, replicas, num_gpus, max_ongoing_requests), name=APP_NAME, route_prefix="/")
    log.info("Ray Serve gRPC ingress on 127.0.0.1:%d, %d replica(s) of %s", grpc_port, replicas, config.checkpoint)


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cloud.serve_app", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--grpc-port", type=int, default=9000, help="Serve's gRPC ingress port (default %(default)s)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (e.g. 1, or 0.5 to share one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--max-ongoing-requests", type=int, default=256,
                   help="requests Serve sends one replica at once (its batches form from these)")
    return p


async def _wait_for_signal() -> None:
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    await stopped.wait()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import ray.serve  # noqa: F401
    except ImportError as err:
        log.error("Ray Serve is not importable (%s); install its extras: pip install 'ray[serve]==2.60.0'", err)
        return 1
    from .server import ServerConfig

    config = ServerConfig(checkpoint=args.checkpoint, device=args.device, max_batch=args.max_batch,
                          max_wait_ms=args.max_wait_ms, metrics_port=None)
    start(config, grpc_port=args.grpc_port, replicas=args.replicas, num_gpus=args.num_gpus,
          max_ongoing_requests=args.max_ongoing_requests)
    try:
        asyncio.run(_wait_for_signal())
    finally:
        stop()
    return 0


if __name__ == "__main__":
    # Run main() from the importable module, not from __main__: Ray pickles a class defined in
    # __main__ by value, and the replicas would then never import cloud.serve_app (nor its alias).
    from cloud.serve_app import main as _main

    sys.exit(_main())
