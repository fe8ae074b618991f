"""The traffic log: one msgpack record per answered request, in rolling, size-bounded files.

    python -m router ... --traffic-log /var/log/matmamba/traffic [--traffic-log-max-mb 256] \\
        [--traffic-log-files 8] [--log-inputs] [--shadow-rate 0.05]

Files are ``DIR/traffic-NNNNNN.msgpack``: a plain concatenation of msgpack maps (no header, no
framing), readable with ``msgpack.Unpacker(open(path, "rb"))``. Record kinds (docs/ROUTER.md has
the field table):

- ``"request"``: one Classify or Score request as the router answered it: per item the
  confidence under every measure of the task, the escalation decision, tier, degraded flag,
  the edge answer (top-k with probabilities), the cloud answer when the cloud gave it, and
  timings; the thresholds in force, the checkpoint fingerprint and the shadow rate. A Generate
  stream gets one ``"request"`` record when it ends (finished, failed or cancelled): per segment
  (or speculative round) one item with its confidence under every LM measure, tier, token counts
  and timings (``GenerationTrace``);
- ``"shadow"``: the cloud's answer to a shadow escalation (router/shadow.py) of some kept
  items of a request, joined to it by ``key``.

Writing never blocks the event loop: ``submit`` puts the record on a bounded queue and returns
(a full queue drops the record and counts it); one writer thread serialises and writes.

**Durability (fsync policy).** Every record is handed to the kernel with one ``write`` call as
soon as the writer takes it from the queue (files are unbuffered): a router killed with
``kill -9`` loses only the records still queued (normally none, at most the queue's
``queue_records``), and never leaves half a record. ``fsync`` runs every ``fsync_records``
records or ``fsync_ms`` milliseconds, whichever comes first, and at rotation and close: an OS
crash or power cut loses at most that much, and a reader skips a torn last record.

**Rotation.** The log holds at most ``max_files`` files of at most ``max_bytes / max_files``
bytes each (a single record larger than that gets a file of its own); the oldest file is
deleted when a new one starts, so the directory stays within ``max_bytes``. A restarted router
starts a new file after the highest existing number and applies the same bound.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from proto import matmamba_pb2 as pb

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # "v" of every record
FILE_PATTERN = re.compile(r"^traffic-(\d{6,})\.msgpack$")
LOCK_NAME = ".lock"
MIB = 1 << 20
TOP_K = 3  # classes / next tokens kept per answer
_STOP = object()


@dataclass(frozen=True)
class LogSettings:
    """Where and how much to log (router flags in parentheses)."""

    directory: Path  # (--traffic-log)
    max_bytes: int = 256 * MIB  # whole log (--traffic-log-max-mb)
    max_files: int = 8  # files kept; each holds max_bytes / max_files (--traffic-log-files)
    log_inputs: bool = False  # store request inputs too (--log-inputs)
    max_input_bytes: int = 64 * 1024  # larger inputs are left out of the record (--log-inputs-max-kb)
    queue_records: int = 10_000  # records waiting for the writer; more are dropped and counted
    fsync_records: int = 200  # fsync after this many records ...
    fsync_ms: float = 1000.0  # ... or this long after the first unsynced one, whichever comes first

    def __post_init__(self) -> None:
        if self.max_files < 2:
            raise ValueError(f"--traffic-log-files must be at least 2 (one being written, one kept), "
                             f"got {self.max_files}")
        if self.max_bytes < self.max_files * 1024:
            raise ValueError(f"--traffic-log-max-mb is too small: {self.max_bytes} bytes for {self.max_files} files")
        if self.max_input_bytes < 0 or self.queue_records < 1 or self.fsync_records < 1 or self.fsync_ms <= 0:
            raise ValueError("input bound must be >= 0; queue size, fsync records and fsync ms must be positive")

    @property
    def file_bytes(self) -> int:
        return self.max_bytes // self.max_files


def log_files(directory: str | Path) -> list[Path]:
    """The log's files, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(directory).iterdir() if (m := FILE_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def read_records(directory: str | Path) -> Iterator[dict[str, Any]]:
    """Every record of the log, oldest first; a torn or corrupt tail of a file is skipped with a warning."""
    for path in log_files(directory):
        with open(path, "rb") as f:
            unpacker = msgpack.Unpacker(f, raw=False)
            try:
                yield from unpacker
            except (msgpack.UnpackException, ValueError) as err:
                log.warning("%s: unreadable data after offset %d (%s); skipping the rest of the file", path,
                            unpacker.tell(), err)


def topk(dist: np.ndarray, k: int = TOP_K) -> list[list[float]]:
    """[[index, probability], ...] of the k largest entries of a probability row, largest first."""
    k = min(k, dist.shape[-1])
    idx = np.argpartition(dist, -k)[-k:]
    idx = idx[np.argsort(dist[idx])[::-1]]
    return [[int(i), float(dist[i])] for i in idx]


def next_token_probs(logprobs: np.ndarray) -> np.ndarray:
    """Score log-probabilities (N, L, V) -> (N, V) probabilities of the token after the last position."""
    return np.exp(logprobs[:, -1, :], dtype=np.float64)


def input_field(values: np.ndarray, max_bytes: int) -> dict[str, Any]:
    """A request's input as a record field: raw bytes with dtype and shape, or a note when too large."""
    if values.nbytes > max_bytes:
        return {"omitted": True, "bytes": int(values.nbytes)}
    array = np.ascontiguousarray(values)
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": array.tobytes()}


@dataclass
class Observed:
    """One answered Classify or Score request, as the traffic log and shadow escalation see it."""

    method: str  # "Classify" or "Score"
    request_id: str
    start: float  # time.monotonic() when the router took the request
    policy: Any  # the Thresholds in force
    conf_values: np.ndarray  # what confidence() reads: probs (N, C) or token log-probs (N, T)
    edge: np.ndarray  # (N, K) the edge's answer distribution: class probs or next-token probs
    answer: np.ndarray  # (N, K) the answer returned (cloud rows replaced)
    inputs: np.ndarray  # images (N, C, H, W) or tokens (N, L)
    escalated: np.ndarray  # (N,) bool: confidence < threshold
    served: list  # the items' pb.ServedBy


def request_record(obs: Observed, *, key: str, task: str, fingerprint: str, edge_level: int, shadow_rate: float,
                   shadow: dict[int, str], max_input_bytes: int | None) -> dict[str, Any]:
    """The "request" record of ``obs`` (docs/ROUTER.md: the traffic log); ``shadow`` maps item -> sent/dropped.

    ``max_input_bytes`` None leaves the inputs out (the router runs without --log-inputs).
    """
    from .confidence import MEASURES, confidence

    conf = {m.name: confidence(m.name, obs.conf_values).tolist() for m in MEASURES.values() if m.task == task}
    items = []
    for i, s in enumerate(obs.served):
        cloud = s.tier == pb.CLOUD
        items.append({"conf": {name: values[i] for name, values in conf.items()},
                      "escalated": bool(obs.escalated[i]), "tier": "cloud" if cloud else "edge",
                      "degraded": s.degraded, "edge": topk(obs.edge[i]),
                      "cloud": topk(obs.answer[i]) if cloud else None,
                      "edge_ms": s.edge_ms, "cloud_ms": s.cloud_ms, "replica": s.replica, "shadow": shadow.get(i)})
    record = _request_fields(obs.method, obs.request_id, obs.start, obs.policy, key=key, task=task,
                             fingerprint=fingerprint, edge_level=edge_level, shadow_rate=shadow_rate)
    record["items"] = items
    if max_input_bytes is not None:
        record["input"] = input_field(obs.inputs, max_input_bytes)
    return record


def _request_fields(method: str, request_id: str, start: float, policy: Any, *, key: str, task: str,
                    fingerprint: str, edge_level: int, shadow_rate: float, stage: Any = None) -> dict[str, Any]:
    """The fields every "request" record has (docs/ROUTER.md: the traffic log).

    ``policy`` is the Thresholds in force; ``stage`` the chain stage that judged (default: the policy's own).
    """
    p, judge = policy, stage or policy
    return {"v": FORMAT_VERSION, "kind": "request", "key": key, "id": request_id, "t": time.time(),
            "method": method, "task": task, "fingerprint": fingerprint, "edge_level": edge_level,
            "thresholds": {"measure": judge.measure, "threshold": judge.threshold, "version": p.version,
                           "target": p.target_escalation, **({"chain": [s.edge_level for s in p.stages]}
                                                            if p.stages else {})},
            "shadow_rate": shadow_rate, "router_ms": (time.monotonic() - start) * 1e3}


def lm_confidences(token_logprobs: Sequence[float]) -> dict[str, float]:
    """A generated segment's confidence under every LM measure, from the edge's token log-probabilities."""
    from .confidence import LM, MEASURES, confidence

    values = np.asarray([token_logprobs], dtype=np.float64).reshape(1, -1)
    return {m.name: float(confidence(m.name, values)[0]) for m in MEASURES.values() if m.task == LM}


@dataclass
class GenerationTrace:
    """One Generate stream as the traffic log sees it: one item per segment (or speculative round).

    Filled on the event loop while the stream runs (a few dict updates per chunk, no I/O); the
    record is built from it once the stream has ended.
    """

    request_id: str
    start: float  # time.monotonic() when the router took the request
    policy: Any  # the Thresholds in force when the stream started
    stage: Any  # its Stage that judges what goes to the cloud (that of the generating width; a chain's last)
    mode: str  # "segment" or "speculative"
    prompt: np.ndarray  # (L,) prompt token ids
    items: list[dict[str, Any]] = field(default_factory=list)

    def begin(self, edge_logprobs: Sequence[float], edge_ms: float, *, escalated: bool | None = None,
              drafted: int | None = None) -> None:
        """A new segment (``escalated``: its decision) or speculative round (``drafted``: tokens drafted)."""
        item: dict[str, Any] = {"conf": lm_confidences(edge_logprobs), "tier": "edge", "degraded": False,
                                "tokens": 0, "cloud_tokens": 0, "chunks": 0, "edge_ms": edge_ms, "cloud_ms": 0.0}
        if drafted is None:
            item["escalated"] = bool(escalated)
        else:
            item.update(drafted=drafted, accepted=0)
        self.items.append(item)

    def add(self, tokens: int, served: pb.ServedBy) -> None:
        """A chunk of the current segment or round was streamed."""
        item = self.items[-1]
        item["tokens"] += tokens
        item["chunks"] += 1
        if served.tier == pb.CLOUD:
            item["tier"] = "cloud"
            item["cloud_tokens"] += tokens
        item["degraded"] = item["degraded"] or served.degraded
        item["cloud_ms"] = max(item["cloud_ms"], served.cloud_ms)


def generation_record(trace: GenerationTrace, *, key: str, task: str, fingerprint: str, edge_level: int,
                      outcome: str, finish: str, error: str, max_input_bytes: int | None) -> dict[str, Any]:
    """The "request" record of a Generate stream that ended with ``outcome`` (finished, failed, cancelled).

    No Generate item is ever shadowed, so its ``shadow_rate`` is 0.
    """
    record = _request_fields("Generate", trace.request_id, trace.start, trace.policy, key=key, task=task,
                             fingerprint=fingerprint, edge_level=edge_level, shadow_rate=0.0, stage=trace.stage)
    record.update(mode=trace.mode, outcome=outcome, finish=finish, error=error, items=trace.items)
    if max_input_bytes is not None:
        record["input"] = input_field(trace.prompt, max_input_bytes)
    return record


class TrafficLog:
    """The writer: ``submit`` from any thread (never blocks); a daemon thread writes, rotates and fsyncs.

    ``on_written(n)``, ``on_dropped(n)`` and ``on_failed(n)`` are called with record counts (metrics).
    """

    def __init__(self, settings: LogSettings, *, on_written: Callable[[int], None] | None = None,
                 on_dropped: Callable[[int], None] | None = None,
                 on_failed: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self.directory = Path(settings.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._take_lock()
        self._queue: queue.Queue = queue.Queue(maxsize=settings.queue_records)
        noop = lambda n: None
        self._on_written, self._on_dropped = on_written or noop, on_dropped or noop
        self._on_failed = on_failed or noop
        self.accepted = self.written = self.dropped = self.failed = 0
        self._file: Any = None
        self._size = 0
        self._index = max((int(FILE_PATTERN.match(p.name).group(1)) for p in log_files(self.directory)), default=0)
        self._unsynced, self._first_unsynced = 0, 0.0
        self._thread = threading.Thread(target=self._run, name="traffic-log", daemon=True)
        self._closed = False

    def _take_lock(self) -> Any:
        lock = open(self.directory / LOCK_NAME, "a")  # noqa: SIM115 (held open for the log's lifetime)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise ValueError(f"--traffic-log {self.directory} is in use by another router; give each router its "
                             "own directory") from None
        return lock

    def start(self) -> TrafficLog:
        self._thread.start()
        return self

    def submit(self, record: dict[str, Any]) -> bool:
        """Queue ``record`` for writing; False (and counted as dropped) when the queue is full or closed."""
        if self._closed:
            return False
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            self._on_dropped(1)
            return False
        self.accepted += 1
        return True

    @property
    def idle(self) -> bool:
        """Whether every accepted record has been written (or has failed)."""
        return self.written + self.failed >= self.accepted

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, fsync and close (waits up to ``timeout_s`` for the writer)."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=timeout_s)
            except queue.Full:
                log.error("traffic log writer is stuck; %d record(s) not written", self._queue.qsize())
            self._thread.join(timeout_s)
        self._lock_file.close()

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        try:
            while True:
                try:
                    record = self._queue.get(timeout=self._wait_s())
                except queue.Empty:
                    self._sync_if_due()
                    continue
                if record is _STOP:
                    break
                self._write(record)
                self._sync_if_due()
        finally:
            self._close_file()

    def _wait_s(self) -> float | None:
        if not self._unsynced:
            return None
        due = self._first_unsynced + self.settings.fsync_ms / 1e3
        return max(0.0, due - time.monotonic())

    def _write(self, record: dict[str, Any]) -> None:
        try:
            data = msgpack.packb(record, use_bin_type=True)
            if self._file is None or (self._size and self._size + len(data) > self.settings.file_bytes):
                self._rotate()
            self._file.write(data)  # unbuffered: one write() per record
        except Exception as err:  # a full disk, a bad value: count it, keep serving
            self.failed += 1
            self._on_failed(1)
            log.error("traffic log: record not written (%s: %s)", type(err).__name__, err)
            return
        self._size += len(data)
        self.written += 1
        self._on_written(1)
        if not self._unsynced:
            self._first_unsynced = time.monotonic()
        self._unsynced += 1

    def _sync_if_due(self) -> None:
        s = self.settings
        if self._unsynced and (self._unsynced >= s.fsync_records
                               or time.monotonic() - self._first_unsynced >= s.fsync_ms / 1e3):
            self._fsync()

    def _fsync(self) -> None:
        if self._file is not None and self._unsynced:
            try:
                os.fsync(self._file.fileno())
            except OSError as err:
                log.error("traffic log: fsync failed (%s)", err)
        self._unsynced = 0

    def _rotate(self) -> None:
        self._close_file()
        self._index += 1
        path = self.directory / f"traffic-{self._index:06d}.msgpack"
        self._file, self._size = open(path, "ab", buffering=0), 0  # noqa: SIM115 (closed by _close_file)
        for old in log_files(self.directory)[:-self.settings.max_files]:
            old.unlink(missing_ok=True)

    def _close_file(self) -> None:
        if self._file is not None:
            self._fsync()
            self._file.close()
            self._file = None
