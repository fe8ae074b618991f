"""The router's edge-facing ``Inference`` servicer: validate, answer at the edge, escalate the doubtful.

For every item (image, sequence) the edge answer's confidence is compared with the threshold
in force; items below it are sent, together, to a cloud replica (router/escalation.py) and
their answers replace the edge answers. When no replica answers in time the edge answer is
returned with ``degraded = true``. Bad input is refused with the status proto/validate.py
names (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, FAILED_PRECONDITION) before any work is queued.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np

from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc
from proto.tensors import TensorFormatError, from_tensor_msg, to_tensor_msg
from proto.validate import RequestError, validate_classify, validate_score

from .confidence import confidence, should_escalate
from .core import (
    SERVER_VERSION,
    RouterCore,
    ThrottledWarning,
    new_request_id,
    record_items,
    request_tier,
    served_by,
)
from .edge_pool import EdgeFailedError, EdgeUnavailableError
from .escalation import EscalationError
from .generation import generate_chunks
from .traffic_log import Observed, next_token_probs

log = logging.getLogger(__name__)


def status_of(err: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message an exception of a handler becomes."""
    if isinstance(err, RequestError):
        return err.code, err.message
    if isinstance(err, EdgeUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, f"{err}; retry shortly (the router restarts failed edge workers)"
    if isinstance(err, EdgeFailedError):
        log.error("%s: %s", method, err)
        return grpc.StatusCode.INTERNAL, f"{err}; see the router log"
    log.error("%s failed", method, exc_info=err)
    return grpc.StatusCode.INTERNAL, f"{method} failed in the router ({type(err).__name__}); see the router log"


def unary_rpc(method: str) -> Callable:
    """Decorator: in-flight gauge, latency, requests_total{method, tier, code}; exceptions -> status codes.

    The handler returns (reply, list of the reply's ServedBy).
    """

    def wrap(handler: Callable) -> Callable:
        @functools.wraps(handler)
        async def rpc(self: RouterServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            metrics, start = self.core.metrics, time.monotonic()
            code, tier = grpc.StatusCode.OK, "none"
            metrics.inflight.labels(method=method).inc()
            try:
                reply, served = await handler(self, request, context)
                tier = request_tier(served)
                return reply
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as err:
                code, message = status_of(err, method)
                await context.abort(code, message)
            finally:
                metrics.inflight.labels(method=method).dec()
                metrics.requests.labels(method=method, tier=tier, code=code.name).inc()
                metrics.request_seconds.labels(method=method).observe(time.monotonic() - start)

        return rpc

    return wrap


def stream_rpc(method: str) -> Callable:
    """unary_rpc for a server-streaming handler (an async generator of chunks with a served_by)."""

    def wrap(handler: Callable) -> Callable:
        @functools.wraps(handler)
        async def rpc(self: RouterServicer, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
            metrics, start = self.core.metrics, time.monotonic()
            code, served = grpc.StatusCode.OK, []
            metrics.inflight.labels(method=method).inc()
            try:
                async for chunk in handler(self, request, context):
                    served.append(chunk.served_by)
                    yield chunk
            except (asyncio.CancelledError, GeneratorExit):  # the client went away
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as err:
                code, message = status_of(err, method)
                await context.abort(code, message)
            finally:
                metrics.inflight.labels(method=method).dec()
                metrics.requests.labels(method=method, tier=request_tier(served), code=code.name).inc()
                metrics.request_seconds.labels(method=method).observe(time.monotonic() - start)

        return rpc

    return wrap


def _mask(rows: np.ndarray, n: int) -> np.ndarray:
    """Boolean (n,) mask with ``rows`` set."""
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return mask


def _chunks(rows: np.ndarray, size: int) -> list[np.ndarray]:
    """``rows`` cut into pieces of at most ``size`` (0 = one piece)."""
    if size <= 0 or rows.size <= size:
        return [rows]
    return [rows[i:i + size] for i in range(0, rows.size, size)]


def _decode(msg: pb.Tensor, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A cloud reply tensor of the expected shape, or EscalationError (the reply is then not used)."""
    try:
        array = from_tensor_msg(msg, max_elements=int(np.prod(shape)))
    except TensorFormatError as err:
        raise EscalationError(f"the cloud's {what} is malformed: {err}") from None
    if array.shape != shape:
        raise EscalationError(f"the cloud's {what} has shape {array.shape}, expected {shape}")
    return array


class RouterServicer(pb_grpc.InferenceServicer):
    """Classify, Score, Generate and ModelInfo at the edge site."""

    def __init__(self, core: RouterCore) -> None:
        self.core = core
        self._warn_degraded = ThrottledWarning()

    # ------------------------------------------------------------------ Classify

    @unary_rpc("Classify")
    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext):
        """Edge answer per image; images below the threshold answered by the cloud (or degraded).

        A chain router asks its edge stages in turn: each image goes on until a stage is confident.
        """
        core, start = self.core, time.monotonic()
        inputs = validate_classify(request, core.limits)
        rid, policy = inputs.request_id or new_request_id(), core.thresholds.current
        n = inputs.images.shape[0]
        probs = np.zeros((n, core.info.num_classes), dtype=np.float32)
        served: list[pb.ServedBy] = [pb.ServedBy() for _ in range(n)]

        async def run(rows: np.ndarray, width: int):
            edge = await core.edge.classify(inputs.images if rows.size == n else inputs.images[rows], width)
            probs[rows] = edge.probs
            return edge.probs, edge

        up = await self._edge_chain("Classify", run, core.edge_stages(policy, request.width, inputs.width), n,
                                    rid, served)
        edge_probs = probs.copy()  # each item's answer from the last edge stage it reached
        escalated = [rows for rows in _chunks(up, core.cloud.max_batch) if rows.size]
        await asyncio.gather(*(self._escalate_images(inputs.images[rows], rows, rid, probs, served)
                               for rows in escalated))
        record_items(core, "Classify", served)
        if core.traffic is not None:
            core.traffic.observe(Observed("Classify", rid, start, policy, edge_probs, edge_probs, probs,
                                          inputs.images, _mask(up, n), served))
        names = core.info.class_names
        results = [pb.ImageResult(predicted_class=int(k), label=names[k] if k < len(names) else "", served_by=s,
                                  edge_predicted_class=int(e))
                   for k, e, s in zip(probs.argmax(-1).tolist(), edge_probs.argmax(-1).tolist(), served)]
        return pb.ClassifyReply(probs=to_tensor_msg(probs), results=results), served

    async def _edge_chain(self, method: str, run: Callable, stages: list, n: int, rid: str,
                          served: list[pb.ServedBy]) -> np.ndarray:
        """Run the edge stages over the items still in doubt; fill ``served``; return the rows for the cloud.

        ``run(rows, width)`` computes the rows at ``width``, stores their answers and returns
        (the values the stage's measure reads, the edge output with edge_ms and batch_size).
        """
        core, rows = self.core, np.arange(n)
        final_conf = np.zeros(n)
        for width, stage in stages:
            values, edge = await run(rows, width)
            conf = confidence(stage.measure, values)
            final_conf[rows] = conf
            for row, c in zip(rows.tolist(), conf.tolist()):
                served[row] = served_by(core, stage, tier=pb.EDGE, conf=c, edge_ms=edge.edge_ms + served[row].edge_ms,
                                        width=width, batch_size=edge.batch_size, request_id=rid)
            rows = rows[should_escalate(conf, stage.threshold)]
            if rows.size == 0:
                break
        up = np.zeros(n, dtype=bool)
        up[rows] = True
        core.metrics.record_decisions(method, stages[0][1].measure, final_conf, up)
        return rows

    async def _escalate_images(self, images: np.ndarray, rows: np.ndarray, rid: str, probs: np.ndarray,
                               served: list[pb.ServedBy]) -> None:
        """Ask the cloud about ``images`` (the rows ``rows`` of the request); update probs/served in place."""
        request = pb.ClassifyRequest(images=to_tensor_msg(images), request_id=rid)
        try:
            answer = await self.core.cloud.unary("Classify", request)
            cloud = _decode(answer.reply.probs, (rows.size, probs.shape[1]), "probabilities")
            if len(answer.reply.results) != rows.size:
                raise EscalationError(f"the cloud answered {len(answer.reply.results)} results for {rows.size}")
        except EscalationError as err:
            self._degrade(served, rows, err)
            return
        probs[rows] = cloud
        for row, result in zip(rows.tolist(), answer.reply.results):
            self._to_cloud(served[row], result.served_by, answer.replica, answer.cloud_ms)

    # ------------------------------------------------------------------ Score

    @unary_rpc("Score")
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext):
        """Edge log-probabilities per sequence; doubtful sequences scored by the cloud (or degraded)."""
        core, start = self.core, time.monotonic()
        inputs = validate_score(request, core.limits)
        rid, policy = inputs.request_id or new_request_id(), core.thresholds.current
        n = inputs.tokens.shape[0]
        arrays: list[np.ndarray] = []
        served: list[pb.ServedBy] = [pb.ServedBy() for _ in range(n)]

        async def run(rows: np.ndarray, width: int):
            edge = await core.edge.score(inputs.tokens if rows.size == n else inputs.tokens[rows], width,
                                         inputs.last_only)
            if not arrays:
                arrays.extend(np.zeros((n, *a.shape[1:]), dtype=a.dtype) for a in (edge.logprobs, edge.token_logprobs))
            arrays[0][rows], arrays[1][rows] = edge.logprobs, edge.token_logprobs
            return edge.token_logprobs, edge

        up = await self._edge_chain("Score", run, core.edge_stages(policy, request.width, inputs.width), n, rid,
                                    served)
        logprobs, token_logprobs = arrays
        if core.traffic is not None:  # the edge's own answers, before the cloud overwrites escalated rows
            edge_next, edge_token_lp = next_token_probs(logprobs), token_logprobs.copy()
        escalated = [rows for rows in _chunks(up, core.cloud.max_batch) if rows.size]
        await asyncio.gather(*(self._escalate_tokens(inputs.tokens[rows], rows, inputs.last_only, rid,
                                                     (logprobs, token_logprobs), served) for rows in escalated))
        record_items(core, "Score", served)
        if core.traffic is not None:
            core.traffic.observe(Observed("Score", rid, start, policy, edge_token_lp, edge_next,
                                          next_token_probs(logprobs), inputs.tokens, _mask(up, n), served))
        reply = pb.ScoreReply(logprobs=to_tensor_msg(logprobs), token_logprobs=to_tensor_msg(token_logprobs),
                              served_by=served)
        return reply, served

    async def _escalate_tokens(self, tokens: np.ndarray, rows: np.ndarray, last_only: bool, rid: str,
                               arrays: tuple[np.ndarray, np.ndarray], served: list[pb.ServedBy]) -> None:
        logprobs, token_logprobs = arrays
        request = pb.ScoreRequest(tokens=to_tensor_msg(tokens), last_only=last_only, request_id=rid)
        try:
            answer = await self.core.cloud.unary("Score", request)
            cloud_lp = _decode(answer.reply.logprobs, (rows.size, *logprobs.shape[1:]), "logprobs")
            cloud_tok = _decode(answer.reply.token_logprobs, (rows.size, *token_logprobs.shape[1:]),
                                "token_logprobs")
            if len(answer.reply.served_by) != rows.size:
                raise EscalationError(f"the cloud answered {len(answer.reply.served_by)} sequences for {rows.size}")
        except EscalationError as err:
            self._degrade(served, rows, err)
            return
        logprobs[rows], token_logprobs[rows] = cloud_lp, cloud_tok
        for row, theirs in zip(rows.tolist(), answer.reply.served_by):
            self._to_cloud(served[row], theirs, answer.replica, answer.cloud_ms)

    # ------------------------------------------------------------------ shared

    @staticmethod
    def _to_cloud(mine: pb.ServedBy, theirs: pb.ServedBy, replica: str, cloud_ms: float) -> None:
        """Turn an edge ServedBy into the cloud's: tier, replica, timing and the cloud's width/batch."""
        mine.tier, mine.replica, mine.cloud_ms = pb.CLOUD, replica, cloud_ms
        mine.width, mine.level, mine.batch_size = theirs.width, theirs.level, theirs.batch_size

    def _degrade(self, served: list[pb.ServedBy], rows: np.ndarray, err: EscalationError) -> None:
        self._warn_degraded("answering %d item(s) of request %s from the edge (degraded): %s", rows.size,
                            served[int(rows[0])].request_id, err.reason)
        for row in rows.tolist():
            served[row].degraded = True

    # ------------------------------------------------------------------ Generate, ModelInfo

    @stream_rpc("Generate")
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        """Segments from the edge, doubtful ones from the cloud (router/generation.py)."""
        async for chunk in generate_chunks(self.core, request):
            yield chunk

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfoReply:
        """The edge model's description (tier EDGE)."""
        self.core.metrics.requests.labels(method="ModelInfo", tier="edge", code="OK").inc()
        return model_info(self.core)


def model_info(core: RouterCore) -> pb.ModelInfoReply:
    """The router's ModelInfo: the edge model's description, tier EDGE."""
    info = core.info
    widths = info.widths
    reply = pb.ModelInfoReply(
        task=pb.VISION if info.task == "vision" else pb.LM, d_model=info.d_model, n_layer=info.n_layer,
        served_width=info.edge_width, served_level=info.edge_level,
        supported_levels=sorted(info.d_model // w for w in widths),
        supported_widths=sorted(widths, reverse=True), tier=pb.EDGE, checkpoint_sha256=info.fingerprint,
        server_version=SERVER_VERSION, device=info.device, max_batch_size=core.limits.max_batch,
        flops_per_item=info.flops_per_item)
    if info.task == "vision":
        reply.vision.CopyFrom(pb.VisionInfo(num_classes=info.num_classes, class_names=info.class_names,
                                            image_size=info.image_size, channels=info.channels,
                                            patch_size=info.patch_size, mean=info.mean, std=info.std))
    else:
        reply.lm.CopyFrom(pb.LanguageInfo(vocab_size=info.vocab_size, tokenizer=info.tokenizer,
                                          eos_token_id=info.eos_id, max_sequence_length=core.limits.max_seq_len))
    return reply
