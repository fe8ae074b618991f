"""``python -m cloud --checkpoint DIR --port 50051 --metrics-port 9101``: run one cloud replica.

``--workers N`` runs it as N server processes on one port (cloud/workers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from proto.ports import port_range_error
from proto.security import add_server_security_flags, server_security_from_args

from .server import ServerConfig, serve
from .workers import ParentLink, run_workers

log = logging.getLogger("cloud")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# With several processes every line names its process: the parent's pid or a worker's.
LOG_FORMAT_WORKERS = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

DEFAULTS = ServerConfig()
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cloud", description="Serve a MatMamba checkpoint over gRPC "
                                "(Inference + grpc.health.v1) with dynamic batching and Prometheus metrics.")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory (config.json + weights)")
    p.add_argument("--host", default=DEFAULTS.host, help="listen address (default %(default)s; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=DEFAULTS.port, help="gRPC port (default %(default)s; 0 = any)")
    p.add_argument("--metrics-port", type=int, default=DEFAULTS.metrics_port,
                   help="Prometheus /metrics port (default %(default)s; -1 = no metrics endpoint)")
    p.add_argument("--width", type=int, default=None, help="serve this nested width (default: full d_model)")
    p.add_argument("--device", default=DEFAULTS.device, help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--precision", default=DEFAULTS.precision, choices=("auto", "fp32", "bf16"),
                   help="auto = bf16 autocast on CUDA, fp32 on CPU (default %(default)s)")
    p.add_argument("--cpu-threads", type=int, default=DEFAULTS.cpu_threads,
                   help="torch intra-op threads (CPU serving); 0 = torch's default")
    p.add_argument("--max-batch", type=int, default=DEFAULTS.max_batch,
                   help="most items per model call and per request (default %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=DEFAULTS.max_wait_ms,
                   help="how long a batch waits for more requests after its first (default %(default)s)")
    p.add_argument("--wait-when-idle", action="store_true",
                   help="wait --max-wait-ms for company even when a request finds the server idle "
                        "(default: it runs at once)")
    p.add_argument("--max-queue", type=int, default=DEFAULTS.max_queue,
                   help="requests that may wait; more get RESOURCE_EXHAUSTED (default %(default)s)")
    p.add_argument("--max-message-mb", type=int, default=DEFAULTS.max_message_mb,
                   help="largest request or reply in MiB (default %(default)s)")
    p.add_argument("--max-generate", type=int, default=DEFAULTS.max_generate,
                   help="generations running at once (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=DEFAULTS.max_tokens,
                   help="cap on a generation's max_tokens (default %(default)s)")
    p.add_argument("--default-max-tokens", type=int, default=DEFAULTS.default_max_tokens,
                   help="max_tokens when a request leaves it 0 (default %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=DEFAULTS.max_seq_len,
                   help="longest Score sequence and prompt + max_tokens (default %(default)s)")
    p.add_argument("--max-sessions", type=int, default=DEFAULTS.max_sessions,
                   help="speculative-decoding sessions held at once; more get RESOURCE_EXHAUSTED (default %(default)s)")
    p.add_argument("--session-ttl-s", type=float, default=DEFAULTS.session_ttl_s,
                   help="seconds without a call after which a session is dropped (default %(default)s)")
    p.add_argument("--max-draft-tokens", type=int, default=DEFAULTS.max_draft_tokens,
                   help="most drafted tokens one Verify may carry (default %(default)s)")
    p.add_argument("--grace", type=float, default=DEFAULTS.grace_s,
                   help="seconds in-flight RPCs may drain on SIGTERM (default %(default)s)")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes sharing --port through SO_REUSEPORT, each with the model and its own "
                        "batcher; metrics summed on --metrics-port (default %(default)s)")
    p.add_argument("--control-fd", type=int, default=None, help=argparse.SUPPRESS)  # set by the parent for a worker
    add_server_security_flags(p)
    p.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO", metavar="LEVEL",
                   help=f"{', '.join(LOG_LEVELS)}; DEBUG logs every request (default %(default)s)")
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        checkpoint=args.checkpoint, host=args.host, port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port, width=args.width, device=args.device,
        precision=args.precision, cpu_threads=args.cpu_threads, max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms, wait_when_idle=args.wait_when_idle, max_queue=args.max_queue,
        max_message_mb=args.max_message_mb,
        max_generate=args.max_generate, max_tokens=args.max_tokens, default_max_tokens=args.default_max_tokens,
        max_seq_len=args.max_seq_len, grace_s=args.grace, max_sessions=args.max_sessions,
        session_ttl_s=args.session_ttl_s, max_draft_tokens=args.max_draft_tokens,
        security=server_security_from_args(args), reuse_port=args.control_fd is not None,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    several = args.workers > 1 or args.control_fd is not None
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT_WORKERS if several else LOG_FORMAT)
    for flag, port, lowest in (("--port", args.port, 0), ("--metrics-port", args.metrics_port, -1)):
        if error := port_range_error(flag, port, lowest):
            parser.error(error)
    try:
        config = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.workers > 1:
        return run_workers(argv, config, args.workers)
    try:
        asyncio.run(serve(config, None if args.control_fd is None else ParentLink(args.control_fd)))
    except (OSError, ValueError) as err:  # a missing or bad checkpoint, a port in use, no CUDA device
        log.error("cannot serve: %s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
