"""``python -m router``: run the Ray-based router at an edge site (see docs/ROUTER.md)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from proto.security import (
    add_channel_security_flags,
    add_server_security_flags,
    channel_security_from_args,
    server_security_from_args,
)

from .ray_setup import apply_ray_env, init_ray

apply_ray_env()  # before .server imports ray, which reads part of its environment at import
from .server import RouterConfig, serve  # noqa: E402
from .thresholds import parse_levels  # noqa: E402

log = logging.getLogger("router")

DEFAULTS = RouterConfig(checkpoint=Path("."), edge_level=1, cloud=())


def build_parser() -> argparse.ArgumentParser:
    """The router's flags (see docs/ROUTER.md)."""
    d = DEFAULTS
    p = argparse.ArgumentParser(prog="python -m router", description="Answer from the narrow nested submodel at "
                                "the edge; escalate low-confidence inputs to full-width cloud replicas.")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory (the cloud's must match)")
    p.add_argument("--edge-level", required=True,
                   help="nesting level of the edge model (4 = d_model/4), or a chain of levels such as 8,2 "
                        "(level 8 first, then level 2, then the cloud)")
    p.add_argument("--cloud", required=True,
                   help="cloud replicas, HOST:PORT[,HOST:PORT...]; dns:///NAME:PORT = every address NAME resolves to, "
                        "looked up again each health round (docker-compose: dns:///cloud:50051)")
    p.add_argument("--host", default=d.host, help="listen address of gRPC and /metrics (default %(default)s)")
    p.add_argument("--port", type=int, default=d.port, help="gRPC port (default %(default)s)")
    p.add_argument("--metrics-port", type=int, default=d.metrics_port,
                   help="Prometheus /metrics port (default %(default)s; -1 = none)")
    p.add_argument("--thresholds", type=lambda s: Path(s) if s else None, default=None,
                   help="thresholds file (python -m router.tune); default or '': the task's documented default")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (host:port) instead of starting one ('' = start one)")
    p.add_argument("--deadline-ms", type=float, default=d.deadline_ms,
                   help="time an escalation may take, retry included, before the edge answer is returned "
                        "degraded (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help="items per edge micro-batch, and per request (default %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="how long a micro-batch waits for more requests after its first (default %(default)s)")
    p.add_argument("--segment-tokens", type=int, default=d.segment_tokens,
                   help="generation: tokens per edge segment judged and escalated as one (default %(default)s)")
    p.add_argument("--health-interval-ms", type=float, default=d.health_interval_ms,
                   help="between health checks of each cloud replica (default %(default)s)")
    p.add_argument("--thresholds-poll-ms", type=float, default=d.thresholds_poll_ms,
                   help="how often the --thresholds file is checked for changes; 0 = never (default %(default)s)")
    p.add_argument("--breaker-failures", type=int, default=d.breaker_failures,
                   help="consecutive failures that open a replica's circuit breaker (default %(default)s)")
    p.add_argument("--breaker-cooldown-ms", type=float, default=d.breaker_cooldown_ms,
                   help="how long an open breaker waits before a probe request (default %(default)s)")
    p.add_argument("--edge-cpus", type=int, default=d.edge_cpus,
                   help="CPUs (torch threads) of the edge worker when there is no GPU (default %(default)s)")
    p.add_argument("--edge-gpus", type=int, default=None,
                   help="GPU edge workers (default: one per GPU Ray sees; 0 = run on the CPU)")
    p.add_argument("--grace", type=float, default=d.grace_s,
                   help="seconds in-flight requests may drain on SIGTERM (default %(default)s)")
    p.add_argument("--traffic-log", type=Path, default=None,
                   help="append one msgpack record per request to rolling files in this directory (docs/ROUTER.md)")
    p.add_argument("--traffic-log-max-mb", type=float, default=d.traffic_log_max_mb,
                   help="disk the traffic log may use, all files together (default %(default)s)")
    p.add_argument("--traffic-log-files", type=int, default=d.traffic_log_files,
                   help="files the traffic log rotates through; the oldest is deleted (default %(default)s)")
    p.add_argument("--log-inputs", action="store_true",
                   help="also store request inputs (images, token ids) in the traffic log; off for privacy")
    p.add_argument("--log-inputs-max-kb", type=float, default=d.log_inputs_max_kb,
                   help="with --log-inputs: larger inputs of a request are left out (default %(default)s)")
    p.add_argument("--shadow-rate", type=float, default=d.shadow_rate,
                   help="share of confidently answered items also sent to the cloud in the background, to "
                        "estimate edge/cloud agreement (default %(default)s)")
    p.add_argument("--shadow-max-inflight", type=int, default=d.shadow_max_inflight,
                   help="shadow calls at once; more are dropped (default %(default)s)")
    p.add_argument("--max-inflight", type=int, default=d.max_inflight,
                   help="RPCs served at once; more are answered RESOURCE_EXHAUSTED (default %(default)s = no limit)")
    add_server_security_flags(p)
    add_channel_security_flags(p, prefix="cloud-", what="the cloud replicas")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ... (default %(default)s)")
    return p


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    """A validated RouterConfig from the parsed flags (ValueError names the bad flag)."""
    cloud = tuple(a.strip() for a in args.cloud.split(",") if a.strip())
    levels = parse_levels(str(args.edge_level))
    return RouterConfig(
        checkpoint=args.checkpoint, edge_level=levels[0], edge_levels=levels if len(levels) > 1 else (), cloud=cloud,
        host=args.host, port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port, thresholds=args.thresholds,
        deadline_ms=args.deadline_ms, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        segment_tokens=args.segment_tokens, health_interval_ms=args.health_interval_ms,
        thresholds_poll_ms=args.thresholds_poll_ms,
        breaker_failures=args.breaker_failures, breaker_cooldown_ms=args.breaker_cooldown_ms,
        edge_cpus=args.edge_cpus, edge_gpus=args.edge_gpus, grace_s=args.grace, traffic_log=args.traffic_log,
        traffic_log_max_mb=args.traffic_log_max_mb, traffic_log_files=args.traffic_log_files,
        log_inputs=args.log_inputs, log_inputs_max_kb=args.log_inputs_max_kb, shadow_rate=args.shadow_rate,
        shadow_max_inflight=args.shadow_max_inflight,
        max_inflight=args.max_inflight,
        security=server_security_from_args(args), cloud_security=channel_security_from_args(args, "cloud-"))


def main(argv: list[str] | None = None) -> int:
    """Start or join Ray, serve until SIGTERM/SIGINT, drain; exit 0, or 1 when it cannot serve."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if not config.checkpoint.is_dir():
        parser.error(f"--checkpoint {config.checkpoint} is not a directory")
    import ray

    info = init_ray(args.ray_address or None)
    try:
        asyncio.run(serve(config))
    except (OSError, ValueError, RuntimeError) as err:  # a bad checkpoint or thresholds file, a port in use
        log.error("cannot serve: %s", err)
        if info.started_here:
            log.error("Ray's logs are kept in %s", info.temp_dir)
        return 1
    finally:
        ray.shutdown()
    info.cleanup()  # a clean exit: the private temp dir (and Ray's logs in it) go
    return 0


if __name__ == "__main__":
    sys.exit(main())
