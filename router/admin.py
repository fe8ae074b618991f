"""The ``RouterAdmin`` servicer: read and reload the confidence thresholds while serving.

Failures leave the thresholds in force unchanged and answer the status the proto documents:
NOT_FOUND (no such file), INVALID_ARGUMENT (not a valid thresholds file, unknown measure),
FAILED_PRECONDITION (tuned for another checkpoint or edge level; or no path and no --thresholds).
"""

from __future__ import annotations

import logging

import grpc

from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc

from .metrics import RouterMetrics
from .thresholds import ThresholdsError, ThresholdStore

log = logging.getLogger(__name__)


class AdminServicer(pb_grpc.RouterAdminServicer):
    """ReloadThresholds and GetThresholds over the router's ThresholdStore."""

    def __init__(self, store: ThresholdStore, metrics: RouterMetrics) -> None:
        self.store, self.metrics = store, metrics

    async def ReloadThresholds(self, request: pb.ReloadThresholdsRequest,
                               context: grpc.aio.ServicerContext) -> pb.ReloadThresholdsReply:
        """Load ``request.path`` (or the --thresholds file); the old thresholds stay on any error."""
        try:
            loaded, previous = self.store.reload(request.path)  # a small local file: read inline
        except ThresholdsError as err:
            log.error("thresholds reload refused (keeping %s %s): %s", self.store.current.measure,
                      self.store.current.threshold, err.message)
            self.metrics.requests.labels(method="ReloadThresholds", tier="none", code=err.code.name).inc()
            await context.abort(err.code, err.message)
        self.metrics.set_thresholds(loaded)
        self.metrics.requests.labels(method="ReloadThresholds", tier="none", code="OK").inc()
        return pb.ReloadThresholdsReply(loaded=loaded.to_proto(), previous=previous.to_proto())

    async def GetThresholds(self, request: pb.GetThresholdsRequest,
                            context: grpc.aio.ServicerContext) -> pb.GetThresholdsReply:
        """The thresholds in force."""
        self.metrics.requests.labels(method="GetThresholds", tier="none", code="OK").inc()
        return pb.GetThresholdsReply(thresholds=self.store.current.to_proto())
