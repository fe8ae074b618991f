"""What every RPC of the router works with (:class:`RouterCore`) and how it describes one answer (ServedBy)."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from edge.results import EdgeInfo
from proto import matmamba_pb2 as pb
from proto.validate import ModelLimits

from .edge_pool import EdgePool
from .escalation import ReplicaPool
from .metrics import RouterMetrics
from .thresholds import Stage, Thresholds, ThresholdStore

log = logging.getLogger("router.service")

SERVER_VERSION = "0.1.0"  # reported in ModelInfoReply.server_version
TIERS = {pb.EDGE: "edge", pb.CLOUD: "cloud"}


def new_request_id() -> str:
    """A fresh request id (32 hex characters) for requests that came without one."""
    return uuid.uuid4().hex


@dataclass
class RouterCore:
    """What every RPC of the router works with."""

    info: EdgeInfo
    limits: ModelLimits
    edge: EdgePool
    cloud: ReplicaPool
    thresholds: ThresholdStore
    metrics: RouterMetrics
    tokenizer: Any = None  # LM checkpoints: encode(text) -> ids, decode(ids) -> text, eos_id
    segment_tokens: int = 8  # generation: tokens per edge segment judged as one
    chain: tuple[int, ...] = ()  # edge levels of a chain router, first stage first; () = one edge level
    traffic: Any = None  # router.shadow.TrafficTap when --traffic-log or --shadow-rate is set
    generate_mode: str = "segment"  # Generate requests that name no mode: "segment" or "speculative"
    draft_tokens: int = 8  # speculative generation: most tokens drafted per verification round

    def edge_stages(self, policy: Thresholds, requested_width: int, width: int) -> list[tuple[int, Stage]]:
        """(width, stage) of each edge stage an item runs through before the cloud.

        A chain router runs its chain for requests that name no width; a request naming a width
        runs that width alone, judged by the stage of its level (the first stage when none).
        """
        if len(self.chain) > 1 and requested_width == 0:
            return [(self.info.d_model // s.edge_level, s) for s in policy.chain]
        return [(width, policy.stage_for(self.level_of(width)))]

    def level_of(self, width: int) -> int:
        """Nesting level of ``width`` (d_model / width); 0 for width 0."""
        return self.info.d_model // width if width else 0


def served_by(core: RouterCore, policy: Thresholds | Stage, *, tier: int, conf: float, edge_ms: float, width: int,
              batch_size: int, request_id: str, cloud_ms: float = 0.0, degraded: bool = False,
              replica: str = "") -> pb.ServedBy:
    """The ServedBy of one item (see matmamba.proto for every field)."""
    return pb.ServedBy(tier=tier, confidence=conf, confidence_measure=policy.measure, threshold=policy.threshold,
                       edge_ms=edge_ms, cloud_ms=cloud_ms, degraded=degraded, request_id=request_id, width=width,
                       level=core.level_of(width), batch_size=batch_size, replica=replica)


def request_tier(served: list[pb.ServedBy]) -> str:
    """Metric label of a request: edge, cloud, mixed, or none (no items)."""
    tiers = {TIERS.get(s.tier, "none") for s in served}
    return tiers.pop() if len(tiers) == 1 else ("mixed" if tiers else "none")




def record_items(core: RouterCore, method: str, served: list[pb.ServedBy]) -> None:
    """Count answered items and their edge/cloud timings in the metrics."""
    for s in served:
        core.metrics.record_item(method, TIERS.get(s.tier, "none"), s.degraded, s.edge_ms, s.cloud_ms)


class ThrottledWarning:
    """WARNING at most once per ``interval_s`` (DEBUG in between), with a count of the quieter ones.

    A cloud outage degrades every escalation; one line per request would flood the log while the
    metrics (``router_degraded_total``) and the replica state changes already tell the story.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s, self._last, self._quiet = interval_s, -float("inf"), 0

    def __call__(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._quiet += 1
            log.debug(message, *args)
            return
        suffix = f" ({self._quiet} more like it in the last {self.interval_s:.0f} s)" if self._quiet else ""
        log.warning(message + suffix, *args)
        self._last, self._quiet = now, 0
