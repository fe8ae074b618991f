"""The router process: edge workers on Ray, the edge-facing gRPC server, health, metrics, shutdown.

    python -m router --checkpoint checkpoints/matmamba-vision-fmnist --edge-level 4 \\
        --cloud 127.0.0.1:50051 --port 50052 --metrics-port 9100

Start-up: the edge actors load and warm up, the thresholds file is validated against the
checkpoint, every cloud replica is health-checked and its fingerprint compared once, then the
port opens with health SERVING. Health services: ``""`` and ``matmamba.v1.Inference`` (the
router answers, from the edge at least) and ``matmamba.v1.Inference/cloud`` (SERVING while some
replica with the router's checkpoint can take escalations; NOT_SERVING otherwise, reason in the
log and in ``router_replica_state``). SIGTERM / SIGINT: health NOT_SERVING, new RPCs refused,
in-flight RPCs drain for up to ``--grace`` seconds, actors are stopped, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from edge.results import EdgeInfo
from proto import matmamba_pb2 as pb
from proto.handlers import add_servicer
from proto.security import ChannelSecurity, ServerSecurity
from proto.validate import ModelLimits

from .admin import AdminServicer
from .core import RouterCore
from .edge_pool import EdgePool, EdgeSettings
from .escalation import EscalationSettings, Replica, ReplicaPool, split_dns_target
from .metrics import RouterMetrics
from .service import RouterServicer
from .shadow import ShadowSender, ShadowSettings, TrafficTap
from .thresholds import ThresholdsError, ThresholdStore
from .traffic_log import LogSettings, TrafficLog

log = logging.getLogger(__name__)

MIB = 1 << 20
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "matmamba.v1.Inference"
CLOUD_HEALTH_SERVICE = f"{INFERENCE_SERVICE}/cloud"
GENERATE_MODES = ("segment", "speculative")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class RouterConfig:
    """Everything ``python -m router`` takes (router/__main__.py documents each flag)."""

    checkpoint: Path
    edge_level: int  # the (first) edge stage's nesting level
    cloud: tuple[str, ...]  # cloud replica addresses, host:port
    edge_levels: tuple[int, ...] = ()  # a chain (--edge-level 8,2), first stage first; () = edge_level alone
    host: str = "127.0.0.1"
    port: int = 50052  # 0 = any free port (RouterServer.port)
    metrics_port: int | None = 9100  # None = no /metrics endpoint; 0 = any free port
    thresholds: Path | None = None  # None = the documented default of the task
    deadline_ms: float = 500.0
    max_batch: int = 32
    max_wait_ms: float = 2.0
    segment_tokens: int = 8
    generate_mode: str = "segment"  # or "speculative" (router/speculative.py)
    draft_tokens: int = 8  # speculative: most tokens drafted per round
    health_interval_ms: float = 1000.0
    thresholds_poll_ms: float = 1000.0  # how often the thresholds file is checked for changes; 0 = never
    breaker_failures: int = 3
    breaker_cooldown_ms: float = 5000.0
    cloud_connections: int = 1  # TCP connections per cloud replica (several for `python -m cloud --workers N`)
    edge_cpus: int = 1
    edge_gpus: int | None = None
    max_tokens: int = 512
    default_max_tokens: int = 64
    max_seq_len: int = 2048
    grace_s: float = 10.0
    traffic_log: Path | None = None  # directory of the traffic log; None = no log
    traffic_log_max_mb: float = 256.0
    traffic_log_files: int = 8
    log_inputs: bool = False  # store request inputs in the traffic log (privacy: off by default)
    log_inputs_max_kb: float = 64.0  # inputs of a request larger than this are left out of its record
    shadow_rate: float = 0.0  # share of kept items also sent to the cloud in the background
    shadow_max_inflight: int = 4
    max_inflight: int = 0  # RPCs served at once; more are refused RESOURCE_EXHAUSTED (0 = no limit)
    security: ServerSecurity = ServerSecurity()  # how clients must connect (TLS, mutual TLS, token)
    cloud_security: ChannelSecurity = ChannelSecurity()  # how the router dials its cloud replicas

    def __post_init__(self) -> None:
        for name in ("edge_level", "max_batch", "segment_tokens", "edge_cpus", "max_tokens", "max_seq_len",
                     "draft_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.grace_s < 0 or self.max_inflight < 0:
            raise ValueError("--max-wait-ms, --grace and --max-inflight must be >= 0")
        if self.generate_mode not in GENERATE_MODES:
            raise ValueError(f"--generate-mode must be one of {GENERATE_MODES}, got {self.generate_mode!r}")
        bad = [a for a in self.cloud if not a.rpartition(":")[0] or not a.rpartition(":")[2].isdigit()]
        if bad:
            raise ValueError(f"--cloud takes host:port addresses separated by commas; cannot read {bad}")
        for address in self.cloud:
            split_dns_target(address)  # ValueError for a malformed dns:///NAME:PORT
        self.escalation()  # validates the escalation flags
        self.shadow()
        self.traffic_log_settings()
        if self.log_inputs and self.traffic_log is None:
            raise ValueError("--log-inputs needs --traffic-log DIR (the inputs are stored in the traffic log)")
        if self.edge_levels and (self.edge_levels[0] != self.edge_level or
                                 any(a <= b for a, b in zip(self.edge_levels, self.edge_levels[1:]))):
            raise ValueError(f"--edge-level {self.edge_levels}: a chain's levels must decrease (narrow to wide)")

    @property
    def chain(self) -> tuple[int, ...]:
        """The edge levels, first stage first (one level without a chain)."""
        return self.edge_levels or (self.edge_level,)

    def escalation(self) -> EscalationSettings:
        """The escalation knobs of this config (validated)."""
        return EscalationSettings(deadline_s=self.deadline_ms / 1e3, breaker_failures=self.breaker_failures,
                                  breaker_cooldown_s=self.breaker_cooldown_ms / 1e3,
                                  health_interval_s=self.health_interval_ms / 1e3, channel=self.cloud_security,
                                  connections=self.cloud_connections)

    def shadow(self) -> ShadowSettings:
        """Shadow escalation knobs (validated)."""
        return ShadowSettings(rate=self.shadow_rate, max_inflight=self.shadow_max_inflight)

    def traffic_log_settings(self) -> LogSettings | None:
        """The traffic log's settings (validated), or None without --traffic-log."""
        if self.traffic_log is None:
            return None
        return LogSettings(self.traffic_log, max_bytes=int(self.traffic_log_max_mb * MIB),
                           max_files=self.traffic_log_files, log_inputs=self.log_inputs,
                           max_input_bytes=int(self.log_inputs_max_kb * 1024))

    def edge(self) -> EdgeSettings:
        """How to run the edge workers."""
        # The workers load the widest level of the chain; the narrower stages are slices of it.
        return EdgeSettings(self.checkpoint, min(self.chain), max_batch=self.max_batch, max_wait_ms=self.max_wait_ms,
                            cpus=self.edge_cpus, gpus=self.edge_gpus, chain=self.edge_levels)


def _limits(config: RouterConfig, info: EdgeInfo) -> ModelLimits:
    """What the router accepts: the edge model's widths and inputs, at most --max-batch items per request."""
    if info.task == "vision":
        return ModelLimits.vision(num_classes=info.num_classes, channels=info.channels, image_size=info.image_size,
                                  patch_size=info.patch_size, supported_widths=info.widths,
                                  default_width=info.edge_width, max_batch=config.max_batch)
    return ModelLimits.lm(vocab_size=info.vocab_size, supported_widths=info.widths, default_width=info.edge_width,
                          max_batch=config.max_batch, max_seq_len=config.max_seq_len, max_tokens=config.max_tokens,
                          default_max_tokens=config.default_max_tokens)


def _tokenizer(checkpoint: Path):
    """The checkpoint's tokenizer (text prompts and streamed text), or None when it has none."""
    from matmamba.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(checkpoint)
    except FileNotFoundError:
        log.warning("%s has no tokenizer: Generate accepts token_ids prompts only and streams no text", checkpoint)
        return None


class RouterServer:
    """One router. Ray must be initialised (router.ray_setup.init_ray) before ``await start()``."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.health = health_aio.HealthServicer()
        self.edge = EdgePool(config.edge())
        self.core: RouterCore | None = None
        self.server: grpc.aio.Server | None = None
        self._watch: asyncio.Task | None = None
        self.port = 0
        self.metrics_port: int | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        """Edge actors, thresholds, cloud replicas, then the gRPC port (health SERVING)."""
        cfg = self.config
        info = await self.edge.start()
        missing = [k for k in cfg.chain if k not in info.levels]
        if missing:
            await self.edge.close()
            raise ValueError(f"--edge-level: {cfg.checkpoint} has no level {missing}; its levels are {info.levels}")
        try:
            store = ThresholdStore(task=info.task, fingerprint=info.fingerprint, edge_levels=cfg.chain,
                                   path=cfg.thresholds)
        except ThresholdsError as err:
            await self.edge.close()
            raise ValueError(f"--thresholds: {err.message}") from None
        self.metrics.set_thresholds(store.current)
        cloud = ReplicaPool(cfg.cloud, fingerprint=info.fingerprint, task=pb.VISION if info.task == "vision" else pb.LM,
                            settings=cfg.escalation(), on_change=self._replica_changed, on_round=self._cloud_health,
                            on_remove=lambda r: self.metrics.remove_replica(r.address),
                            on_call=self.metrics.record_cloud_call)
        tokenizer = _tokenizer(cfg.checkpoint) if info.task == "lm" else None
        self.core = RouterCore(info, _limits(cfg, info), self.edge, cloud, store, self.metrics, tokenizer,
                               cfg.segment_tokens, chain=cfg.chain, generate_mode=cfg.generate_mode,
                               draft_tokens=cfg.draft_tokens)
        self.core.traffic = self._traffic_tap(info, cloud)
        await cloud.start()
        self._bind()
        await self.server.start()
        for service in ("", INFERENCE_SERVICE):
            await self.health.set(service, SERVING)
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(cfg.host, cfg.metrics_port)
        if cfg.thresholds is not None and cfg.thresholds_poll_ms > 0:
            self._watch = asyncio.create_task(self._watch_thresholds(store, cfg.thresholds_poll_ms / 1e3))
        log.info("router serving %s at edge level %s (loaded width %d) on %s (%s); cloud %s; thresholds %s (%s)",
                 info.task, ",".join(map(str, cfg.chain)), info.edge_width, self.address, cfg.security.describe(),
                 ",".join(cfg.cloud) or "(none)",
                 ", ".join(f"level {s.edge_level}: {s.measure} >= {s.threshold}" for s in store.current.chain),
                 store.current.version)

    def _traffic_tap(self, info: EdgeInfo, cloud: ReplicaPool) -> TrafficTap | None:
        """The traffic log writer and shadow sender the flags ask for (None when neither)."""
        cfg, settings = self.config, self.config.traffic_log_settings()
        if settings is None and cfg.shadow_rate == 0:
            return None
        count = self.metrics.traffic_log_records.labels
        writer = None if settings is None else TrafficLog(
            settings, on_written=count(outcome="written").inc, on_dropped=count(outcome="dropped").inc,
            on_failed=count(outcome="failed").inc).start()
        shadow = ShadowSender(cfg.shadow(), cloud, self.metrics, writer) if cfg.shadow_rate > 0 else None
        inputs = settings.max_input_bytes if settings is not None and settings.log_inputs else None
        log.info("traffic log %s; shadow rate %g", settings.directory if settings else "off", cfg.shadow_rate)
        return TrafficTap(task=info.task, fingerprint=info.fingerprint, edge_level=info.edge_level, traffic_log=writer,
                          shadow=shadow, log_inputs_max_bytes=inputs)

    def _bind(self) -> None:
        size = 64 * MIB
        options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
                   ("grpc.so_reuseport", 0)]  # a port in use is an error, not a second silent listener
        security = self.config.security
        self.server = grpc.aio.server(options=options, interceptors=security.interceptors(),
                                      maximum_concurrent_rpcs=self.config.max_inflight or None)
        assert self.core is not None
        add_servicer("Inference", RouterServicer(self.core), self.server)  # bytes that do not parse: INVALID_ARGUMENT
        add_servicer("RouterAdmin", AdminServicer(self.core.thresholds, self.metrics), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        target = f"{self.config.host}:{self.config.port}"
        try:
            self.port = security.add_port(self.server, target)
        except RuntimeError as err:
            raise OSError(f"cannot listen on {target} ({err}); is the port in use? pick another with --port") from None
        if self.port == 0:
            raise OSError(f"cannot listen on {target}; is the port in use? pick another with --port")

    async def _watch_thresholds(self, store: ThresholdStore, interval_s: float) -> None:
        """Put a changed thresholds file in force (a bad one is logged and the old thresholds stay)."""
        while True:
            await asyncio.sleep(interval_s)
            if store.reload_if_changed() is not None:
                self.metrics.set_thresholds(store.current)

    def _replica_changed(self, replica: Replica) -> None:
        self.metrics.replica_outstanding.labels(replica=replica.address).set_function(lambda: replica.outstanding)
        self.metrics.set_replica_state(replica.address, replica.state.value)

    async def _cloud_health(self) -> None:
        assert self.core is not None
        await self.health.set(CLOUD_HEALTH_SERVICE, SERVING if self.core.cloud.available else NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new RPCs, drain in-flight ones for up to ``grace`` s, stop the actors."""
        grace = self.config.grace_s if grace is None else grace
        if self._watch is not None:
            self._watch.cancel()
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            log.info("draining in-flight requests (up to %.1f s)", grace)
            await self.server.stop(grace)
        if self.core is not None:
            if self.core.traffic is not None:
                await self.core.traffic.close()
            await self.core.cloud.close()
        await self.edge.close()
        self.metrics.close()
        log.info("router stopped")


async def serve(config: RouterConfig) -> None:
    """Run a router until SIGTERM or SIGINT, then drain and return."""
    server = RouterServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except BaseException:
        await server.stop(0)
        raise
    await stop.wait()
    log.info("signal received: draining")
    await server.stop()


class RouterThread:
    """A RouterServer on its own event loop in a daemon thread (tests, benchmarks, notebooks).

    Ray must be initialised in this process first. ``start()`` returns once the router serves.
    """

    def __init__(self, config: RouterConfig) -> None:
        self.server = RouterServer(config)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._grace = 1.0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="router", daemon=True)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            await self.server.start()
        except BaseException as err:  # handed to the starting thread
            self._error = err
            self._ready.set()
            await self.server.stop(0)
            return
        self._ready.set()
        await self._stop.wait()
        await self.server.stop(self._grace)

    def begin(self) -> None:
        """Start the router's thread without waiting (start several routers at once, then ``wait``)."""
        self._thread.start()

    def wait(self, timeout_s: float = 300.0) -> RouterServer:
        """Wait until the router serves; re-raises its start-up error."""
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"the router did not start within {timeout_s} s")
        if self._error is not None:
            raise self._error
        return self.server

    def start(self, timeout_s: float = 300.0) -> RouterServer:
        """``begin`` then ``wait``."""
        self.begin()
        return self.wait(timeout_s)

    def stop(self, grace_s: float = 1.0) -> None:
        """Drain (up to ``grace_s``) and stop the router; returns when its thread ended."""
        self._grace = grace_s
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # its loop already closed: the thread is ending by itself
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=grace_s + 30)
