"""Prometheus metrics of a cloud replica, in their own registry (so tests can run several servers).

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
| ``model`` | info | checkpoint, task, width, device, version | the served model |
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

log = logging.getLogger(__name__)

PREFIX = "matmamba_cloud"
# Batch sizes are counted in items; powers of two up to the largest --max-batch worth using.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Latency buckets from 100 us (a tiny CPU batch) to 10 s (a long generation).
SECONDS_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting for the model.", ["method"], registry=r)
        self.inflight = Gauge(f"{PREFIX}_inflight_requests", "RPCs being handled.", ["method"], registry=r)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens streamed by Generate.", registry=r)
        self.sessions = Gauge(f"{PREFIX}_sessions", "Speculative-decoding sessions held.", registry=r)
        self.draft_tokens = Counter(f"{PREFIX}_draft_tokens", "Drafted tokens verified, by outcome.", ["outcome"],
                                    registry=r)
        self.model = Info(f"{PREFIX}_model", "The served model.", registry=r)
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port (port 0 = any free)."""
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
