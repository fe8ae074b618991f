"""``python -m proto.healthcheck HOST:PORT [--service NAME]``: exit 0 when the gRPC health service says SERVING.

The container health check of the cloud and router services in docker-compose.yml (the images
have no grpc_health_probe binary; this is the same check in Python). A server started with TLS or
a bearer token (docs/SECURITY.md) is checked with the same --ca, --cert, --key, --token-file and
--tls-name flags as the edge client. Exit status: 0 SERVING, 1 any other status, 2 no answer
within ``--timeout`` seconds (or bad arguments).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .ports import MAX_PORT, port_beyond_range
from .security import PLAINTEXT, ChannelSecurity, add_channel_security_flags, channel_security_from_args

SERVING, NOT_SERVING, NO_ANSWER = 0, 1, 2


def check(address: str, service: str = "", timeout_s: float = 2.0,
          security: ChannelSecurity = PLAINTEXT) -> tuple[int, str]:
    """(exit status, what the server said) for ``service`` at ``address``."""
    with security.channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout_s)
        except grpc.RpcError as err:
            return NO_ANSWER, f"{err.code().name}: {err.details()}"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return (SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING), name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m proto.healthcheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("address", help="HOST:PORT of a cloud replica or a router")
    p.add_argument("--service", default="",
                   help='health service name (default "": the whole server; a router also has '
                        'matmamba.v1.Inference/cloud: a replica can take escalations)')
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer (default %(default)s)")
    add_channel_security_flags(p, what="the server")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    host, _, port = args.address.rpartition(":")
    if not host or not port.isdigit() or port_beyond_range(args.address):
        p.error(f"address must be HOST:PORT with a port in 0..{MAX_PORT}, got {args.address!r}")
    if not args.timeout > 0:
        p.error(f"--timeout must be a positive number of seconds, got {args.timeout}")
    try:
        security = channel_security_from_args(args)
        status, said = check(args.address, args.service, args.timeout, security)
    except ValueError as err:  # an unreadable CA, certificate, key or token file
        p.error(str(err))
    print(f"{args.address} {args.service or '(server)'}: {said}")
    return status


if __name__ == "__main__":
    sys.exit(main())
