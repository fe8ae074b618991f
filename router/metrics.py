"""Prometheus metrics of the router, in their own registry, served at http://HOST:PORT/metrics.

All names start with ``router_``. Labels: ``method`` is Classify, Score or Generate; ``tier`` is
``edge``, ``cloud``, ``mixed`` (items of one request answered by both) or ``none`` (an error).

| metric | type | labels | meaning |
| --- | --- | --- | --- |
| ``router_requests_total`` | counter | method, tier, code | finished RPCs by gRPC status code name |
| ``router_items_total`` | counter | method, tier, degraded | answered items (images, sequences, generation segments) |
| ``router_escalations_total`` | counter | method | items whose confidence was below the threshold |
| ``router_escalation_rate`` | gauge | method | fraction escalated over the last ``WINDOW`` routing decisions |
| ``router_escalation_window_items`` | gauge | method | routing decisions in that window (for its interval) |
| ``router_degraded_total`` | counter | method | escalations answered by the edge (no replica answered in time) |
| ``router_confidence`` | histogram | method, measure | edge confidence of every item |
| ``router_edge_seconds`` | histogram | method | edge time per item (``ServedBy.edge_ms``: micro-batch wait + compute) |
| ``router_cloud_seconds`` | histogram | method | cloud round trip per escalation (``ServedBy.cloud_ms``) |
| ``router_request_seconds`` | histogram | method | whole RPC as the router saw it |
| ``router_inflight_requests`` | gauge | method | RPCs being handled |
| ``router_replica_state`` | gauge | replica, state | 1 for each replica's current state, 0 for the others |
| ``router_replica_outstanding`` | gauge | replica | escalations in flight per replica |
| ``router_cloud_calls_total`` | counter | replica, code | finished cloud calls by status (``ABANDONED``: cancelled) |
| ``router_thresholds_info`` | info | measure, threshold, version, is_default, path | the policy in force |
| ``router_escalation_expected`` | gauge | bound | calibrated rate (bound=rate), its 95% band (low, high) |
| ``router_escalation_drift`` | gauge | method | 1 while the window's 95% interval misses the band, else 0 |
| ``router_traffic_log_records_total`` | counter | outcome | log records: written, dropped (queue full), failed |
| ``router_shadow_total`` | counter | method, outcome | shadow escalations: sent, dropped, answered, failed |
| ``router_shadow_inflight`` | gauge | | shadow calls in flight |
| ``router_shadow_compared_total`` | counter | method | kept items compared with a shadow cloud answer |
| ``router_shadow_agreed_total`` | counter | method | of those, items where edge and cloud top-1 agree |
| ``router_shadow_agreement`` | gauge | method | agreement over the last ``WINDOW`` shadow comparisons |
| ``router_shadow_window_items`` | gauge | method | comparisons in that window (for its interval) |

Drift: once the window holds at least ``MIN_DRIFT_DECISIONS`` decisions, the window's escalation
rate is compared with the band of the thresholds in force (``expected_escalation`` of a tuned
file): when the rate's own 95 % Wilson interval lies wholly outside the band,
``router_escalation_drift`` is 1 and a WARNING is logged (once per change; an INFO line when the
rate is back). Without a band (the built-in default) there is no drift signal. A chain router
counts an item as escalated when it reaches the cloud.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from wsgiref.simple_server import WSGIServer

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from edge.calibration import wilson

from .thresholds import Thresholds

log = logging.getLogger(__name__)

# Routing decisions the escalation-rate gauge looks back over (per method).
WINDOW = 1000
# Decisions the window must hold before the drift gauge judges it (fewer say too little).
MIN_DRIFT_DECISIONS = 100
# Replica states (router/escalation.py ReplicaState values), one gauge series each.
REPLICA_STATES = ("unknown", "healthy", "unhealthy", "open", "half_open", "mismatch")
# Confidence buckets: log-probabilities (LM measures, neg_entropy) below 0, probabilities in [0, 1].
CONFIDENCE_BUCKETS = (-10.0, -6.0, -5.0, -4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, -0.25, -0.1, 0.0,
                      0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0)
# Latency buckets from 0.25 ms (a cached edge answer) to 10 s (a long generation).
SECONDS_BUCKETS = (2.5e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 7.5e-3, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)


class EscalationWindow:
    """Fraction of escalations (or of any yes/no outcome) among the last ``size`` routing decisions."""

    def __init__(self, size: int = WINDOW) -> None:
        self._decisions: deque[bool] = deque(maxlen=size)
        self._escalated = 0

    def add(self, escalated: bool) -> None:
        if len(self._decisions) == self._decisions.maxlen and self._decisions[0]:
            self._escalated -= 1
        self._decisions.append(escalated)
        self._escalated += int(escalated)

    @property
    def rate(self) -> float:
        return self._escalated / len(self._decisions) if self._decisions else 0.0

    @property
    def size(self) -> int:
        return len(self._decisions)

    @property
    def escalated(self) -> int:
        return self._escalated


class RouterMetrics:
    """The router's metrics; ``serve(host, port)`` exposes them."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("router_requests", "Finished RPCs.", ["method", "tier", "code"], registry=r)
        self.items = Counter("router_items", "Answered items.", ["method", "tier", "degraded"], registry=r)
        self.escalations = Counter("router_escalations", "Items below the confidence threshold.", ["method"],
                                   registry=r)
        self.escalation_rate = Gauge("router_escalation_rate", f"Escalated fraction of the last {WINDOW} decisions.",
                                     ["method"], registry=r)
        self.escalation_window = Gauge("router_escalation_window_items", "Routing decisions in the escalation-rate "
                                       "window.", ["method"], registry=r)
        self.degraded = Counter("router_degraded", "Escalations answered by the edge (cloud down or late).",
                                ["method"], registry=r)
        self.confidence = Histogram("router_confidence", "Edge confidence per item.", ["method", "measure"],
                                    buckets=CONFIDENCE_BUCKETS, registry=r)
        self.edge_seconds = Histogram("router_edge_seconds", "Edge time per item (batch wait + compute).",
                                      ["method"], buckets=SECONDS_BUCKETS, registry=r)
        self.cloud_seconds = Histogram("router_cloud_seconds", "Cloud round trip per escalation.", ["method"],
                                       buckets=SECONDS_BUCKETS, registry=r)
        self.request_seconds = Histogram("router_request_seconds", "Whole RPC as seen by the router.", ["method"],
                                         buckets=SECONDS_BUCKETS, registry=r)
        self.inflight = Gauge("router_inflight_requests", "RPCs being handled.", ["method"], registry=r)
        self.replica_state = Gauge("router_replica_state", "1 for the replica's current state.", ["replica", "state"],
                                   registry=r)
        self.replica_outstanding = Gauge("router_replica_outstanding", "Escalations in flight per replica.",
                                         ["replica"], registry=r)
        self.cloud_calls = Counter("router_cloud_calls", "Finished cloud calls by status code.", ["replica", "code"],
                                   registry=r)
        self.thresholds = Info("router_thresholds", "The confidence policy in force.", registry=r)
        self.expected = Gauge("router_escalation_expected", "Calibrated escalation rate (bound=rate) and its "
                              "95% band (bound=low, high), from the thresholds file.", ["bound"], registry=r)
        self.drift = Gauge("router_escalation_drift", "1 while the windowed escalation rate is outside the "
                           "calibrated band.", ["method"], registry=r)
        self._band: tuple[float, float, float] | None = None  # from the thresholds file, when it has one
        self._drifting: dict[str, bool] = {}
        self.traffic_log_records = Counter("router_traffic_log_records", "Traffic log records by outcome.",
                                           ["outcome"], registry=r)
        self.shadow = Counter("router_shadow", "Shadow escalations by outcome.", ["method", "outcome"], registry=r)
        self.shadow_inflight = Gauge("router_shadow_inflight", "Shadow calls in flight.", registry=r)
        self.shadow_compared = Counter("router_shadow_compared", "Kept items compared with a shadow cloud answer.",
                                       ["method"], registry=r)
        self.shadow_agreed = Counter("router_shadow_agreed", "Shadow-compared items whose edge and cloud top-1 agree.",
                                     ["method"], registry=r)
        self.shadow_agreement = Gauge("router_shadow_agreement",
                                      f"Agreement over the last {WINDOW} shadow comparisons.", ["method"], registry=r)
        self.shadow_window = Gauge("router_shadow_window_items", "Shadow comparisons in the agreement window.",
                                   ["method"], registry=r)
        self._agreement: dict[str, EscalationWindow] = {}
        self._windows: dict[str, EscalationWindow] = {}
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def record_decisions(self, method: str, measure: str, conf: np.ndarray, escalated: np.ndarray) -> None:
        """One routing decision per item: confidence histogram, escalation counter and sliding rate."""
        window = self._windows.setdefault(method, EscalationWindow())
        histogram = self.confidence.labels(method=method, measure=measure)
        for value, up in zip(conf.tolist(), escalated.tolist()):
            histogram.observe(value)
            window.add(bool(up))
        count = int(np.count_nonzero(escalated))
        if count:
            self.escalations.labels(method=method).inc(count)
        self.escalation_rate.labels(method=method).set(window.rate)
        self.escalation_window.labels(method=method).set(window.size)
        self._judge_drift(method, window)

    def _judge_drift(self, method: str, window: EscalationWindow) -> None:
        """Set ``router_escalation_drift`` (and log when it flips) from the window's Wilson interval."""
        if self._band is None or window.size < MIN_DRIFT_DECISIONS:
            return
        low, high = wilson(window.escalated, window.size)
        outside = high < self._band[1] or low > self._band[2]
        if outside != self._drifting.get(method, False):
            if outside:
                log.warning("escalation drift (%s): %.1f%% of the last %d decisions escalated, calibrated band "
                            "%.1f%% - %.1f%%; re-tune the thresholds (python -m router.tune)", method,
                            100 * window.rate, window.size, 100 * self._band[1], 100 * self._band[2])
            else:
                log.info("escalation rate (%s) back within the calibrated band: %.1f%%", method, 100 * window.rate)
        self._drifting[method] = outside
        self.drift.labels(method=method).set(1.0 if outside else 0.0)

    def record_shadow(self, method: str, agree: np.ndarray) -> None:
        """Shadow comparisons of kept items: counters and the sliding agreement window."""
        window = self._agreement.setdefault(method, EscalationWindow())
        for value in agree.tolist():
            window.add(bool(value))
        self.shadow_compared.labels(method=method).inc(agree.size)
        self.shadow_agreed.labels(method=method).inc(int(np.count_nonzero(agree)))
        self.shadow_agreement.labels(method=method).set(window.rate)
        self.shadow_window.labels(method=method).set(window.size)

    def record_item(self, method: str, tier: str, degraded: bool, edge_ms: float, cloud_ms: float) -> None:
        """One answered item and its timings."""
        self.items.labels(method=method, tier=tier, degraded=str(degraded).lower()).inc()
        if degraded:
            self.degraded.labels(method=method).inc()
        if edge_ms:
            self.edge_seconds.labels(method=method).observe(edge_ms / 1e3)
        if cloud_ms:
            self.cloud_seconds.labels(method=method).observe(cloud_ms / 1e3)

    def record_cloud_call(self, replica: str, code: object) -> None:
        """One finished cloud call; ``code`` a grpc.StatusCode, or None when it was abandoned."""
        self.cloud_calls.labels(replica=replica, code=getattr(code, "name", "ABANDONED")).inc()

    def set_replica_state(self, replica: str, state: str) -> None:
        """Set ``router_replica_state`` of ``replica``: 1 for ``state``, 0 for the others."""
        for name in REPLICA_STATES:
            self.replica_state.labels(replica=replica, state=name).set(1.0 if name == state else 0.0)

    def remove_replica(self, replica: str) -> None:
        """Drop the series of a replica the router no longer knows (its DNS name stopped resolving to it)."""
        for gauge, labels in [(self.replica_outstanding, (replica,))] + [
                (self.replica_state, (replica, name)) for name in REPLICA_STATES]:
            try:
                gauge.remove(*labels)
            except KeyError:  # never reported
                pass

    def set_thresholds(self, thresholds: Thresholds) -> None:
        """Publish the policy in force as ``router_thresholds_info``."""
        self.thresholds.info({"measure": thresholds.measure, "threshold": repr(thresholds.threshold),
                              "version": thresholds.version, "is_default": str(thresholds.is_default).lower(),
                              "path": thresholds.path})
        self._band = thresholds.band
        self.drift.clear()  # a new policy: judged afresh
        self._drifting.clear()
        if thresholds.band is None:
            self.expected.clear()
        else:
            for bound, value in zip(("rate", "low", "high"), thresholds.band):
                self.expected.labels(bound=bound).set(value)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics endpoint in a daemon thread; returns the bound port (0 = any free port)."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_port)
        log.info("metrics at http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
