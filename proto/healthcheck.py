"""``python -m proto.healthcheck HOST:PORT [--service NAME]``: exit 0 when the gRPC health service says SERVING.

The container health check of the cloud and router services in docker-compose.yml (the images
have no grpc_health_probe binary; this is the same check in Python). Exit status: 0 SERVING,
1 any other status, 2 no answer within ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING, NOT_SERVING, NO_ANSWER = 0, 1, 2


def check(address: str, service: str = "", timeout_s: float = 2.0) -> tuple[int, str]:
    """(exit status, what the server said) for ``service`` at ``address``."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout_s)
        except grpc.RpcError as err:
            return NO_ANSWER, f"{err.code().name}: {err.details()}"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return (SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING), name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m proto.healthcheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("address", help="HOST:PORT of a cloud replica or a router")
    p.add_argument("--service", default="", help='health service name (default "": the whole server)')
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer (default %(default)s)")
    args = p.parse_args(argv)
    status, said = check(args.address, args.service, args.timeout)
    print(f"{args.address} {args.service or '(server)'}: {said}")
    return status


if __name__ == "__main__":
    sys.exit(main())
