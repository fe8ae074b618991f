"""Speculative generation across the tiers: the edge drafts, a cloud replica verifies (same weights).

Each round the edge worker drafts k tokens with the narrow submodel (``SegmentRequest(draft=True)``,
which also returns the distributions they were sampled from), and the cloud replica holding this
generation's session verifies them in one full-width forward pass (``SpeculativeDecoding.Verify``,
cloud/speculative.py). The accepted drafts stream as a chunk of tier EDGE, the token the cloud chose
after them (a correction, or a bonus token when every draft was accepted) as a chunk of tier CLOUD;
both carry ``draft_tokens`` / ``accepted_tokens`` of the round. Greedy output is token for token
the cloud's own greedy output; sampled output follows the cloud model's distribution.

- **k adapts** to the recent acceptance rate (``router.draft_length.DraftLength``).
- **the session** is opened lazily with the whole context on the least busy replica and pinned
  there; one that expired or lost track (NOT_FOUND, FAILED_PRECONDITION) is reopened with the
  whole context and the round retried once. It is closed when the generation ends.
- **the cloud unreachable** (no eligible replica, a failure or the deadline): the round's drafts
  are kept as they are, tier EDGE with ``degraded = true``, and the next round tries to open a
  session again, so generation goes on at the edge and returns to verified output when it can.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np

from edge.results import SegmentOutput, SegmentRequest
from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc
from proto.tensors import to_tensor_msg
from proto.validate import GenerateInputs

from .confidence import confidence
from .core import RouterCore, ThrottledWarning
from .draft_length import DraftLength
from .escalation import MAX_ATTEMPTS, RETRY_CODES, EscalationError, Replica, ReplicaPool
from .generation import SegmentedGeneration

log = logging.getLogger(__name__)

# Codes that mean the replica no longer has this session where we left it: reopen it.
SESSION_LOST = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION})
CLOSE_TIMEOUT_S = 1.0
_warn_degraded = ThrottledWarning()


class _CallFailed(Exception):
    """A SpeculativeDecoding RPC failed with ``code``."""

    def __init__(self, code: grpc.StatusCode | None, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason

    @property
    def session_lost(self) -> bool:
        """The replica no longer has the session where we left it (NOT_FOUND, FAILED_PRECONDITION)."""
        return self.code in SESSION_LOST


class CloudSession:
    """One generation's verifier session, on one replica, opened lazily with the whole context."""

    def __init__(self, pool: ReplicaPool, inputs: GenerateInputs, request_id: str) -> None:
        self.pool, self.inputs, self.request_id = pool, inputs, request_id
        self.replica: Replica | None = None
        self.session_id = ""
        self.position = 0
        self.open_ms = 0.0  # the last OpenSession's round trip, charged to the round that needed it

    async def _call(self, replica: Replica, method: str, request: object) -> object:
        """One RPC on ``replica`` within the escalation deadline, counted in its breaker."""
        replica.begin()
        code: grpc.StatusCode | None = None
        try:
            stub = pb_grpc.SpeculativeDecodingStub(replica.channel)
            reply = await getattr(stub, method)(request, timeout=self.pool.settings.deadline_s)
            code = grpc.StatusCode.OK
            return reply
        except grpc.aio.AioRpcError as err:
            code = err.code()
            raise _CallFailed(code, f"{replica.address} answered {code.name}: {err.details()}") from None
        finally:
            replica.finish(code)
            self.pool.refresh()

    async def _open(self, context: Sequence[int], remaining: int) -> None:
        """OpenSession with the whole context on the least busy replica (another one after a retryable failure)."""
        i = self.inputs
        seed = None if i.seed is None else i.seed + len(context)  # a reopened session gets a fresh random stream
        generation = pb.GenerateRequest(token_ids=pb.TokenIds(ids=context), max_tokens=remaining,
                                        temperature=i.temperature, top_k=i.top_k, top_p=i.top_p, seed=seed,
                                        request_id=self.request_id)
        tried: list[Replica] = []
        reason = "no healthy cloud replica serves this router's checkpoint"
        for _ in range(MAX_ATTEMPTS):
            replica = self.pool.pick(tried)
            if replica is None:
                break
            tried.append(replica)
            start = time.monotonic()
            try:
                reply = await self._call(replica, "OpenSession", pb.OpenSessionRequest(generation=generation))
            except _CallFailed as err:  # e.g. its session table is full (RESOURCE_EXHAUSTED): try another
                reason = err.reason
                if err.code not in RETRY_CODES:
                    break
                continue
            self.replica, self.session_id, self.position = replica, reply.session_id, reply.position
            self.open_ms = (time.monotonic() - start) * 1e3
            return
        raise EscalationError(reason)

    async def verify(self, context: Sequence[int], drafts: Sequence[int], probs: np.ndarray | None,
                     remaining: int) -> tuple[pb.VerifyReply, float]:
        """Verify ``drafts`` after ``context``; returns the reply and the round trip in ms (an open included)."""
        for attempt in range(2):
            self.open_ms = 0.0
            if self.replica is None:
                await self._open(context, remaining)
            assert self.replica is not None
            request = pb.VerifyRequest(session_id=self.session_id, position=self.position, draft_token_ids=drafts,
                                       request_id=self.request_id)
            if probs is not None:
                request.draft_probs.CopyFrom(to_tensor_msg(np.ascontiguousarray(probs, dtype=np.float32)))
            start = time.monotonic()
            try:
                reply: pb.VerifyReply = await self._call(self.replica, "Verify", request)
            except _CallFailed as err:
                self.replica = None
                if not err.session_lost or attempt:
                    raise EscalationError(err.reason) from None
                log.info("speculative session %s lost (%s); reopening it", self.session_id[:12], err.reason)
                continue
            self.position = reply.position
            return reply, self.open_ms + (time.monotonic() - start) * 1e3
        raise AssertionError("unreachable: the loop returns or raises")

    def close(self) -> None:
        """CloseSession in the background (the replica expires it anyway if this is lost)."""
        if self.replica is None:
            return
        stub = pb_grpc.SpeculativeDecodingStub(self.replica.channel)
        request = pb.CloseSessionRequest(session_id=self.session_id)
        self.replica = None

        async def close() -> None:
            try:
                await stub.CloseSession(request, timeout=CLOSE_TIMEOUT_S)
            except grpc.aio.AioRpcError as err:
                log.debug("CloseSession failed: %s", err.details())

        asyncio.get_running_loop().create_task(close())


class SpeculativeGeneration(SegmentedGeneration):
    """One Generate call in speculative mode (see the module docstring)."""

    MODE = "speculative"

    def __init__(self, core: RouterCore, inputs: GenerateInputs, request_id: str, requested_width: int = 0) -> None:
        super().__init__(core, inputs, request_id, inputs.width)  # drafts at one width: a chain's widest by default
        self.draft_length = DraftLength(core.draft_tokens)
        self.cloud = CloudSession(core.cloud, inputs, request_id)

    async def chunks(self) -> AsyncIterator[pb.GenerateChunk]:
        """Rounds of drafts and verification, then a last chunk with the finish reason."""
        try:
            while self.produced < self.inputs.max_tokens and self.finish == pb.FINISH_REASON_UNSPECIFIED:
                remaining = self.inputs.max_tokens - self.produced
                seg = await self._draft(min(self.draft_length.k, remaining - 1))
                async for chunk in self._round(seg, remaining):
                    yield chunk
                self._end_item()
            yield self._final()
        finally:
            self._end_item()
            self.cloud.close()
            self.core.edge.end_session(self.worker, self.session)

    def _served(self, tier: int, conf: float, seg: SegmentOutput, *, draft_tokens: int = 0, accepted_tokens: int = 0,
                **extra) -> pb.ServedBy:
        served = super()._served(tier, conf, seg, **extra)
        served.draft_tokens, served.accepted_tokens = draft_tokens, accepted_tokens
        return served

    async def _draft(self, k: int) -> SegmentOutput:
        i = self.inputs
        request = SegmentRequest(self.session, np.asarray(self.context, dtype=np.int64), k, i.temperature, i.top_k,
                                 i.top_p, i.seed, i.width, draft=True)
        return await self.core.edge.generate_segment(request, self.worker)

    async def _round(self, seg: SegmentOutput, remaining: int) -> AsyncIterator[pb.GenerateChunk]:
        conf = float(confidence(self.policy.measure, np.asarray([seg.logprobs]))[0]) if seg.tokens else 0.0
        if self.trace is not None:
            self.trace.begin(seg.logprobs, seg.compute_ms, drafted=len(seg.tokens))
        try:
            reply, cloud_ms = await self.cloud.verify(self.context, seg.tokens, seg.probs, remaining)
        except EscalationError as err:
            _warn_degraded("generation %s: keeping edge drafts (degraded): %s", self.request_id, err.reason)
            if not seg.tokens:  # nothing drafted (one token left): the edge writes it
                seg = await self._draft(1)
            yield self._accept(seg.tokens, seg.logprobs, self._served(pb.EDGE, conf, seg, degraded=True))
            return
        n = reply.accepted
        self.draft_length.update(len(seg.tokens), n)
        if self.trace is not None:
            self.trace.items[-1]["accepted"] = n
        if n:  # log-probabilities are the cloud's (the distribution the output follows)
            served = self._served(pb.EDGE, conf, seg, cloud_ms=cloud_ms, replica=reply.served_by.replica,
                                  draft_tokens=len(seg.tokens), accepted_tokens=n)
            yield self._accept(seg.tokens[:n], list(reply.logprobs[:n]), served)
        if self.finish == pb.FINISH_REASON_UNSPECIFIED:  # an accepted end-of-sequence token ends it here
            served = self._served(pb.CLOUD, conf, seg, cloud_ms=cloud_ms, replica=reply.served_by.replica,
                                  draft_tokens=len(seg.tokens), accepted_tokens=n)
            served.width, served.level = reply.served_by.width, reply.served_by.level
            yield self._accept([reply.next_token_id], [reply.logprobs[n]], served)
