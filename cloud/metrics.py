"""Prometheus metrics of a cloud replica, in their own registry (so tests can run several servers).

With ``python -m cloud --workers N`` every worker process records into prometheus_client's
multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, set by the parent, cloud/workers.py) and the
parent serves the sum over workers on the one ``--metrics-port`` (``serve_multiprocess``): counters
and histograms add up, the gauges say how they combine (``multiprocess_mode``), same names and
labels as one process. ``model_info`` is a gauge (value 1, the model in its labels) rather than a
prometheus_client ``Info``, which multiprocess mode cannot export; the exposition is the same.

Names (all prefixed ``matmamba_cloud_``), with their labels:

| metric | type | labels | meaning |
| --- | --- | --- | --- |
| ``requests_total`` | counter | method, code | finished RPCs by gRPC status code name (OK, INVALID_ARGUMENT, ...) |
| ``batch_size`` | histogram | method | items (images / sequences) per model call |
| ``queue_wait_seconds`` | histogram | method | time a request waited in the batch queue before its batch ran |
| ``compute_seconds`` | histogram | method | wall time of one model call (a whole batch, or one generation) |
| ``queue_depth`` | gauge | method | requests waiting in the batch queue (or for a generation slot) |
| ``inflight_requests`` | gauge | method | RPCs being handled (queued, computing or streaming) |
| ``generated_tokens_total`` | counter | | tokens streamed by Generate |
| ``sessions`` | gauge | | speculative-decoding sessions held (``--max-sessions`` at most) |
| ``draft_tokens_total`` | counter | outcome | drafted tokens verified, ``accepted`` or ``rejected`` |
| ``model_info`` | gauge (1) | checkpoint, task, width, device, version | the served model |
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

log = logging.getLogger(__name__)

PREFIX = "matmamba_cloud"
# Batch sizes are counted in items; powers of two up to the largest --max-batch worth using.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Latency buckets from 100 us (a tiny CPU batch) to 10 s (a long generation).
SECONDS_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MODEL_LABELS = ("checkpoint", "task", "width", "device", "version")
# Gauges over worker processes: levels (queue depth, in flight, sessions) add up over the live
# workers; model_info is 1 in every worker with the same labels, so the largest value is that 1.
LEVEL = "livesum"


class CloudMetrics:
    """The replica's metrics; ``serve(host, port)`` exposes them at http://host:port/metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Finished RPCs by method and gRPC status code.",
                                ["method", "code"], registry=r)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Items per model call.", ["method"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "Seconds a request waited before its batch ran.",
                                    ["method"], buckets=SECONDS_BUCKETS, registry=r)
        self.compute = Histogram(f"{PREFIX}_compute_seconds", "Seconds per model call (one batch or generation).",
                                 ["method"], buckets=SECONDS_BUCKETS, registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting for the model.", ["method"], registry=r,
                                 multiprocess_mode=LEVEL)
        self.inflight = Gauge(f"{PREFIX}_inflight_requests", "RPCs being handled.", ["method"], registry=r,
                              multiprocess_mode=LEVEL)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens streamed by Generate.", registry=r)
        self.sessions = Gauge(f"{PREFIX}_sessions", "Speculative-decoding sessions held.", registry=r,
                              multiprocess_mode=LEVEL)
        self.draft_tokens = Counter(f"{PREFIX}_draft_tokens", "Drafted tokens verified, by outcome.", ["outcome"],
                                    registry=r)
        self.model = Gauge(f"{PREFIX}_model_info", "The served model.", MODEL_LABELS, registry=r,
                           multiprocess_mode="max")
        self.endpoint = MetricsEndpoint(self.registry)

    def describe_model(self, **labels: str) -> None:
        """Set ``model_info{checkpoint, task, width, device, version} 1``."""
        self.model.labels(**labels).set(1)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port (port 0 = any free)."""
        return self.endpoint.serve(host, port)

    def close(self) -> None:
        """Stop the HTTP endpoint (no-op when it was never started)."""
        self.endpoint.close()


class MetricsEndpoint:
    """``/metrics`` over HTTP for one registry, in a daemon thread."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, host: str, port: int) -> int:
        """Start serving; returns the bound port (port 0 = any free)."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_port)
        log.info("metrics at http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        """Stop the HTTP endpoint (no-op when it was never started)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def multiprocess_endpoint(directory: str) -> MetricsEndpoint:
    """An endpoint that serves the sum of the worker processes' metrics files in ``directory``."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return MetricsEndpoint(registry)
