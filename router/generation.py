"""Generation split between the edge and the cloud, segment by segment (or speculatively).

``GenerateRequest.mode`` (default: the router's ``--generate-mode``) picks how: ``segment``, below,
or ``speculative``, where the edge drafts and the cloud verifies every token (router/speculative.py).

The edge generates ``k`` tokens at a time (``--segment-tokens``, default 8). A segment whose
confidence (the LM measure of the thresholds in force, e.g. its mean token log-probability) is
at or above the threshold is streamed as tier EDGE. A segment below it is discarded and the
cloud is asked to continue from the prompt plus the tokens accepted so far (cloud ``Generate``
with ``token_ids`` and ``max_tokens = k``); its tokens stream as tier CLOUD as they arrive. The
edge then continues from the new context (its state re-read from the accepted tokens).

When no cloud replica answers in time the discarded edge segment is kept after all and marked
``degraded``; when a cloud stream breaks after some tokens, those stay and the edge generates the
rest of the segment, marked ``degraded``. Text is decoded incrementally over all generated
tokens, so a character split between tokens (or tiers) is never broken.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
import numpy as np

from edge.client import FINISH_NAMES
from edge.results import SegmentOutput, SegmentRequest
from proto import matmamba_pb2 as pb
from proto.validate import GenerateInputs, RequestError, validate_generate

from .confidence import confidence
from .core import RouterCore, ThrottledWarning, new_request_id, record_items, served_by
from .escalation import EscalationError
from .traffic_log import GenerationTrace

log = logging.getLogger(__name__)
# What a partial UTF-8 character decodes to; text ending in it waits for the token completing it.
REPLACEMENT_CHAR = "\ufffd"
_warn_degraded = ThrottledWarning()


class IncrementalText:
    """Text of a growing token list, handed out piece by piece without splitting a character."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode, self._ids, self._emitted = decode, [], ""

    def push(self, tokens: Sequence[int]) -> str:
        """Add tokens; return the new text they complete ("" while a character is unfinished)."""
        self._ids.extend(tokens)
        text = self._decode(self._ids)
        return "" if text.endswith(REPLACEMENT_CHAR) else self._advance(text)

    def flush(self) -> str:
        """Whatever text is left (call once, at the end)."""
        return self._advance(self._decode(self._ids)) if self._ids else ""

    def _advance(self, text: str) -> str:
        piece = text[len(self._emitted):]  # a decoder that rewrote earlier text still only adds its tail
        self._emitted = text
        return piece


class SegmentedGeneration:
    """One Generate call: the loop of edge segments, escalations and chunks."""

    MODE = "segment"

    def __init__(self, core: RouterCore, inputs: GenerateInputs, request_id: str, requested_width: int = 0) -> None:
        start = time.monotonic()
        self.core, self.inputs, self.request_id = core, inputs, request_id
        # One set of stages for the whole generation: a chain router's chain when the request names no
        # width, else that width alone. Each segment runs through them until one is confident.
        thresholds = core.thresholds.current
        self.stages = core.edge_stages(thresholds, requested_width, inputs.width)
        self.policy = self.stages[-1][1]  # the last stage: it judges what goes to the cloud
        self.judged = (inputs.width, self.policy, 0.0)  # (width, stage, edge ms) of the current segment
        self.context: list[int] = inputs.prompt_ids.tolist()
        self.produced = 0
        self.finish = pb.FINISH_REASON_UNSPECIFIED
        self.text = IncrementalText(core.tokenizer.decode) if core.tokenizer is not None else None
        self.session = new_request_id()
        self.sessions = {inputs.width: self.session}  # the worker's session per stage width (each its own state)
        self.worker = core.edge.pick()  # one worker for the whole generation: it keeps the recurrent states
        self.last: pb.ServedBy | None = None
        self._item: pb.ServedBy | None = None  # the metrics item (a segment, or a speculative round) being streamed
        # what the traffic log gets when the stream ends (None without --traffic-log)
        self.trace = (GenerationTrace(request_id, start, thresholds, self.policy, self.MODE, inputs.prompt_ids)
                      if core.traffic is not None else None)

    def _segment_request(self, max_new: int, width: int | None = None) -> SegmentRequest:
        i = self.inputs
        width = i.width if width is None else width
        session = self.sessions.setdefault(width, f"{self.session}@{width}")
        return SegmentRequest(session, np.asarray(self.context, dtype=np.int64), max_new, i.temperature,
                              i.top_k, i.top_p, i.seed, width)

    async def _edge_segment(self, max_new: int, width: int | None = None) -> SegmentOutput:
        return await self.core.edge.generate_segment(self._segment_request(max_new, width), self.worker)

    async def _judged_segment(self, max_new: int) -> tuple[SegmentOutput, float, bool]:
        """The next segment through the stages: (the last stage's segment, its confidence, escalate?)."""
        edge_ms = 0.0
        for width, stage in self.stages:
            seg = await self._edge_segment(max_new, width)
            edge_ms += seg.compute_ms
            conf = float(confidence(stage.measure, np.asarray([seg.logprobs]))[0])
            self.judged = (width, stage, edge_ms)
            if not conf < stage.threshold:
                return seg, conf, False
        return seg, conf, True

    def _served(self, tier: int, conf: float, seg: SegmentOutput, **extra) -> pb.ServedBy:
        width, stage, edge_ms = self.judged
        return served_by(self.core, stage, tier=tier, conf=conf, edge_ms=max(edge_ms, seg.compute_ms),
                         width=width, batch_size=1, request_id=self.request_id, **extra)

    def _accept(self, tokens: Sequence[int], logprobs: Sequence[float], served: pb.ServedBy) -> pb.GenerateChunk:
        """Append tokens to the generation and make their chunk."""
        self.context.extend(tokens)
        self.produced += len(tokens)
        if self.core.info.eos_id >= 0 and self.core.info.eos_id in tokens:
            self.finish = pb.FINISH_REASON_EOS
        self.last = served
        if self.trace is not None:
            self.trace.add(len(tokens), served)
        if self._item is None:
            self._item = pb.ServedBy()
            self._item.CopyFrom(served)
        else:  # a cloud segment streams as several chunks: one item, the cloud's if any chunk is
            item = self._item
            item.tier = pb.CLOUD if pb.CLOUD in (item.tier, served.tier) else item.tier
            item.degraded = item.degraded or served.degraded
            item.edge_ms, item.cloud_ms = max(item.edge_ms, served.edge_ms), max(item.cloud_ms, served.cloud_ms)
        text = self.text.push(tokens) if self.text is not None else ""
        return pb.GenerateChunk(token_ids=tokens, text=text, logprobs=logprobs, served_by=served)

    def _end_item(self) -> None:
        """Count the segment (or round) just streamed in the metrics: one item however many chunks it took."""
        if self._item is not None:
            record_items(self.core, "Generate", [self._item])
            self._item = None

    async def chunks(self) -> AsyncIterator[pb.GenerateChunk]:
        """The stream: chunks of accepted tokens, then a last chunk with the finish reason."""
        try:
            while self.produced < self.inputs.max_tokens and self.finish == pb.FINISH_REASON_UNSPECIFIED:
                k = min(self.core.segment_tokens, self.inputs.max_tokens - self.produced)
                seg, conf, escalate = await self._judged_segment(k)
                self.core.metrics.record_decisions("Generate", self.judged[1].measure, np.array([conf]),
                                                   np.array([escalate]))
                if self.trace is not None:
                    self.trace.begin(seg.logprobs, self.judged[2], escalated=escalate)
                if not escalate:
                    yield self._accept(seg.tokens, seg.logprobs, self._served(pb.EDGE, conf, seg))
                else:
                    async for chunk in self._cloud_segment(seg, conf, k):
                        yield chunk
                self._end_item()
            yield self._final()
        finally:
            self._end_item()
            for session in self.sessions.values():
                self.core.edge.end_session(self.worker, session)

    def _final(self) -> pb.GenerateChunk:
        finish = self.finish or pb.FINISH_REASON_LENGTH
        served = pb.ServedBy()
        if self.last is not None:
            served.CopyFrom(self.last)
        return pb.GenerateChunk(text=self.text.flush() if self.text is not None else "", served_by=served,
                                finish_reason=finish)

    def _cloud_request(self, k: int) -> pb.GenerateRequest:
        i = self.inputs
        seed = None if i.seed is None else i.seed + len(self.context)
        return pb.GenerateRequest(token_ids=pb.TokenIds(ids=self.context), max_tokens=k, temperature=i.temperature,
                                  top_k=i.top_k, top_p=i.top_p, seed=seed, request_id=self.request_id)

    async def _cloud_segment(self, seg: SegmentOutput, conf: float, k: int) -> AsyncIterator[pb.GenerateChunk]:
        """Stream the cloud's continuation of the context (k tokens), or fall back to the edge (degraded)."""
        got = 0
        try:
            async for chunk, replica, ms in self.core.cloud.stream("Generate", self._cloud_request(k)):
                tokens = list(chunk.token_ids)[:k - got]
                if not tokens:
                    continue
                got += len(tokens)
                served = self._served(pb.CLOUD, conf, seg, cloud_ms=ms, replica=replica)
                served.width, served.level = chunk.served_by.width, chunk.served_by.level
                yield self._accept(tokens, list(chunk.logprobs)[:len(tokens)], served)
            if got == 0:
                raise EscalationError("the cloud's continuation held no tokens")
        except EscalationError as err:
            async for chunk in self._degraded(seg, conf, k - got, err):
                yield chunk

    async def _degraded(self, seg: SegmentOutput, conf: float, missing: int,
                        err: EscalationError) -> AsyncIterator[pb.GenerateChunk]:
        """Fill ``missing`` tokens of a segment from the edge, marked degraded."""
        _warn_degraded("generation %s: keeping edge tokens (degraded): %s", self.request_id, err.reason)
        if missing <= 0 or self.finish != pb.FINISH_REASON_UNSPECIFIED:
            return
        if missing < len(seg.tokens) or err.partial:  # the context moved on: generate the rest anew
            width, stage, edge_ms = self.judged
            seg = await self._edge_segment(missing, width)
            self.judged = (width, stage, edge_ms + seg.compute_ms)
            if self.trace is not None:
                self.trace.items[-1]["edge_ms"] += seg.compute_ms
        yield self._accept(seg.tokens, seg.logprobs, self._served(pb.EDGE, conf, seg, degraded=True))


def _encoder(core: RouterCore) -> Callable[[str], list[int]] | None:
    return core.tokenizer.encode if core.tokenizer is not None else None


async def generate_chunks(core: RouterCore, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateChunk]:
    """Validate a GenerateRequest and stream its chunks (FAILED_PRECONDITION on a vision router)."""
    if core.info.task != "lm":
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"Generate needs an LM checkpoint; this router runs a {core.limits.task_name} checkpoint")
    inputs = validate_generate(request, core.limits, encode=_encoder(core))
    speculative = request.mode == pb.SPECULATIVE or (request.mode == pb.GENERATE_MODE_DEFAULT
                                                     and core.generate_mode == "speculative")
    if speculative:
        from .speculative import SpeculativeGeneration  # it builds on SegmentedGeneration

        kind = SpeculativeGeneration
    else:
        kind = SegmentedGeneration
    generation = kind(core, inputs, inputs.request_id or new_request_id(), request.width)
    outcome, finish, error = "failed", "", ""
    try:
        async for chunk in generation.chunks():
            if chunk.finish_reason:
                finish = FINISH_NAMES.get(chunk.finish_reason, "")
            yield chunk
        outcome = "finished"
    except (asyncio.CancelledError, GeneratorExit):  # the client went away
        outcome = "cancelled"
        raise
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        raise
    finally:
        if generation.trace is not None:
            try:
                core.traffic.observe_generation(generation.trace, outcome, finish, error)
            except Exception:  # the log must never fail the stream
                log.exception("traffic log: no record for generation %s", generation.request_id)
