"""The bounded, expiring table of speculative-decoding sessions a cloud replica holds.

A session is whatever the verifier keeps between calls (cloud/speculative.py: the recurrent
state of the full-width model, constant size). The table never loses one silently:

- ``add`` refuses with RESOURCE_EXHAUSTED when ``max_sessions`` are open (after dropping the
  expired ones), saying how to free room;
- ``get`` of a session that expired, was closed, or never existed here is NOT_FOUND with a
  message that says which of the three (the ids of recently ended sessions are remembered);
- a session idle for more than ``ttl_s`` seconds expires; expiry is checked on every call, so
  no background task is needed and memory stays bounded by ``max_sessions``.

    table = SessionTable(max_sessions=256, ttl_s=60.0)
    sid = table.add(state)          # a fresh id
    state = table.get(sid)          # refreshes its idle timer
    table.close(sid)
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import grpc

from proto.validate import RequestError

T = TypeVar("T")
# How many ended sessions (per allowed open session) are remembered to explain a NOT_FOUND.
ENDED_MEMORY_FACTOR = 4


class SessionTable(Generic[T]):
    """At most ``max_sessions`` sessions, each dropped after ``ttl_s`` seconds without a call."""

    def __init__(self, max_sessions: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_sessions <= 0:
            raise ValueError(f"--max-sessions must be positive, got {max_sessions}")
        if not ttl_s > 0:
            raise ValueError(f"--session-ttl-s must be positive, got {ttl_s}")
        self.max_sessions, self.ttl_s, self._clock = max_sessions, ttl_s, clock
        self._open: OrderedDict[str, tuple[T, float]] = OrderedDict()  # id -> (session, last use), oldest first
        self._ended: OrderedDict[str, str] = OrderedDict()  # id -> why it ended ("expired", "closed")
        self.expired_total = 0

    def __len__(self) -> int:
        """Sessions held now, expired ones not yet dropped included (safe to read from another thread)."""
        return len(self._open)

    def expire(self) -> int:
        """Drop the sessions idle for more than ttl_s; returns how many went."""
        now, dropped = self._clock(), 0
        while self._open:
            sid, (_, last) = next(iter(self._open.items()))
            if now - last <= self.ttl_s:
                break
            del self._open[sid]
            self._remember(sid, f"expired after {self.ttl_s:g} s without a call (--session-ttl-s)")
            dropped += 1
        self.expired_total += dropped
        return dropped

    def require_room(self) -> None:
        """RESOURCE_EXHAUSTED unless one more session fits (after dropping the expired ones)."""
        self.expire()
        if len(self._open) >= self.max_sessions:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"this replica holds {len(self._open)} speculative sessions, its limit "
                               f"(--max-sessions {self.max_sessions}); close finished sessions (CloseSession), "
                               f"wait for idle ones to expire ({self.ttl_s:g} s), or use another replica")

    def add(self, session: T) -> str:
        """Store a new session; returns its id. RESOURCE_EXHAUSTED when the table is full."""
        self.require_room()
        sid = uuid.uuid4().hex
        self._open[sid] = (session, self._clock())
        return sid

    def get(self, sid: str) -> T:
        """The session ``sid`` (its idle timer restarts); NOT_FOUND saying why when it is gone."""
        self.expire()
        entry = self._open.get(sid)
        if entry is None:
            why = self._ended.get(sid, "is unknown on this replica (it may have restarted, or it was opened on "
                                       "another replica)")
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"session {sid[:12] or '(empty)'} {why}; open a new session with the whole context")
        self._open[sid] = (entry[0], self._clock())
        self._open.move_to_end(sid)
        return entry[0]

    def close(self, sid: str, why: str = "was closed (CloseSession)") -> bool:
        """Drop ``sid``; True when it was open. ``why`` completes the NOT_FOUND message of later calls."""
        entry = self._open.pop(sid, None)
        if entry is None:
            return False
        self._remember(sid, why)
        return True

    def _remember(self, sid: str, why: str) -> None:
        self._ended[sid] = why
        while len(self._ended) > ENDED_MEMORY_FACTOR * self.max_sessions:
            self._ended.popitem(last=False)
