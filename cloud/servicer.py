"""The ``Inference`` servicer of a cloud replica: validation, batching, replies, per-RPC metrics.

Every RPC is validated with proto.validate before anything is queued; a RequestError becomes
the gRPC status it names, with its message. Classify and Score go through the dynamic batcher,
Generate through the generation pool, ModelInfo is answered from memory.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

import grpc
import numpy as np

import matmamba
from matmamba.devices import describe_device
from matmamba.flops import flops_per_item
from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc
from proto.handlers import MalformedRequest, add_servicer
from proto.tensors import to_tensor_msg
from proto.validate import (
    RequestError,
    check_request_id,
    require_task,
    validate_classify,
    validate_generate,
    validate_score,
)

from .batcher import BatchKey, BatchResult, DynamicBatcher
from .generation import GenerationPool, IncrementalDecoder
from .metrics import CloudMetrics
from .runner import ModelRunner
from .sessions import SessionTable
from .speculative import Session, Verifier, parse_draft

log = logging.getLogger(__name__)

MAX_SOFTMAX = "max_softmax"
MEAN_TOKEN_LOGPROB = "mean_token_logprob"
# Length of the request ids the server assigns (hex characters of a random UUID).
REQUEST_ID_CHARS = 16


def add_to_server(servicer: object, server: grpc.aio.Server, service_name: str = "Inference") -> None:
    """Register ``servicer`` for ``service_name``; unparsable requests reach it as MalformedRequest, which it
    answers INVALID_ARGUMENT."""
    add_servicer(service_name, servicer, server, refuse_malformed=False)


def _check_parsed(request: object) -> None:
    if isinstance(request, MalformedRequest):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def _finish(metrics: CloudMetrics, method: str, code: grpc.StatusCode, start: float, request_id: str) -> None:
    metrics.inflight.labels(method=method).dec()
    metrics.requests.labels(method=method, code=code.name).inc()
    log.debug("%s %s -> %s in %.1f ms", method, request_id or "-", code.name, (time.monotonic() - start) * 1e3)


async def _abort(context: grpc.aio.ServicerContext, err: Exception, method: str) -> NoReturn:
    """Turn an exception into the RPC's status (context.abort raises, ending the RPC).

    Refusals are logged at DEBUG (requests_total{code} counts them); unexpected errors with a traceback.
    """
    if isinstance(err, RequestError):
        log.debug("%s refused: %s", method, err)
        await context.abort(err.code, err.message)
    log.exception("%s failed", method, exc_info=err)
    await context.abort(grpc.StatusCode.INTERNAL, f"{method} failed on the server ({type(err).__name__}); see its log")
    raise AssertionError("unreachable: context.abort raises")


def unary_rpc(method: str) -> Callable:
    """Decorator: in-flight gauge, requests_total{method, code}, RequestError -> status code."""

    def wrap(handler: Callable) -> Callable:
        @functools.wraps(handler)
        async def rpc(self: CloudServicer, request, context: grpc.aio.ServicerContext):
            start, code = time.monotonic(), grpc.StatusCode.OK
            self.metrics.inflight.labels(method=method).inc()
            try:
                _check_parsed(request)
                return await handler(self, request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as err:
                code = err.code if isinstance(err, RequestError) else grpc.StatusCode.INTERNAL
                await _abort(context, err, method)
            finally:
                _finish(self.metrics, method, code, start, getattr(request, "request_id", ""))

        return rpc

    return wrap


def stream_rpc(method: str) -> Callable:
    """unary_rpc for a server-streaming handler (an async generator)."""

    def wrap(handler: Callable) -> Callable:
        @functools.wraps(handler)
        async def rpc(self: CloudServicer, request, context: grpc.aio.ServicerContext):
            start, code = time.monotonic(), grpc.StatusCode.OK
            self.metrics.inflight.labels(method=method).inc()
            try:
                _check_parsed(request)
                async for reply in handler(self, request, context):
                    yield reply
            except (asyncio.CancelledError, GeneratorExit):
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as err:
                code = err.code if isinstance(err, RequestError) else grpc.StatusCode.INTERNAL
                await _abort(context, err, method)
            finally:
                _finish(self.metrics, method, code, start, getattr(request, "request_id", ""))

        return rpc

    return wrap


def _level(d_model: int, width: int) -> int:
    """Nesting level d_model / width, or 0 for a width that is no whole level."""
    return d_model // width if d_model % width == 0 else 0


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The RPC's deadline as a time.monotonic() value; DEADLINE_EXCEEDED if it already passed."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    if remaining <= 0:
        raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the request was queued")
    return time.monotonic() + remaining


class CloudServicer(pb_grpc.InferenceServicer):
    """Answers Inference RPCs with a full-width (or --width) model; ``runner`` is set once loaded."""

    def __init__(self, metrics: CloudMetrics, *, max_batch: int, max_wait_s: float, max_queue: int,
                 max_generate: int, batch_executor, wait_when_idle: bool = False) -> None:
        self.metrics = metrics
        self.runner: ModelRunner | None = None
        self.replica = ""  # host:port, filled in by the server once bound
        self.batcher = DynamicBatcher(self._run_batch, batch_executor, max_batch=max_batch, max_wait_s=max_wait_s,
                                      max_queue=max_queue, metrics=metrics, wait_when_idle=wait_when_idle)
        self.generation: GenerationPool | None = None
        self._max_generate, self._max_queue = max_generate, max_queue

    def attach(self, runner: ModelRunner) -> None:
        """Start answering with ``runner`` (call on the event loop, after the model loaded)."""
        self.runner = runner
        self.generation = GenerationPool(runner, max_concurrent=self._max_generate, max_waiting=self._max_queue,
                                         metrics=self.metrics)
        self.batcher.start()

    def _ready(self) -> ModelRunner:
        if self.runner is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry in a few seconds")
        return self.runner

    def _run_batch(self, key: BatchKey, payloads: Sequence[np.ndarray]) -> Sequence:
        """Runs in the batch thread: dispatch a batch to the runner by method."""
        assert self.runner is not None
        if key.method == "Classify":
            return self.runner.classify_batch(key, payloads)
        return self.runner.score_batch(key, payloads)

    def _served_by(self, request_id: str, width: int, batch_size: int, start: float, confidence: float,
                   measure: str) -> pb.ServedBy:
        d_model = self._ready().config.d_model
        return pb.ServedBy(tier=pb.CLOUD, confidence=confidence, confidence_measure=measure, request_id=request_id,
                           cloud_ms=(time.monotonic() - start) * 1e3, width=width,
                           level=_level(d_model, width), batch_size=batch_size,
                           replica=self.replica)

    @unary_rpc("Classify")
    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyReply:
        start, runner = time.monotonic(), self._ready()
        inputs = validate_classify(request, runner.limits)
        request_id = inputs.request_id or uuid.uuid4().hex[:REQUEST_ID_CHARS]
        key = BatchKey("Classify", inputs.width, inputs.images.shape[1:])
        result: BatchResult = await self.batcher.submit(key, inputs.images, inputs.images.shape[0], _deadline(context))
        probs = result.value  # (N, classes) float32
        names = runner.preprocess.class_names
        results = []
        for row in probs:
            c = int(row.argmax())
            served = self._served_by(request_id, inputs.width, result.batch_size, start, float(row[c]), MAX_SOFTMAX)
            results.append(pb.ImageResult(predicted_class=c, label=names[c] if c < len(names) else "",
                                          served_by=served))
        return pb.ClassifyReply(probs=to_tensor_msg(probs), results=results)

    @unary_rpc("Score")
    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreReply:
        start, runner = time.monotonic(), self._ready()
        inputs = validate_score(request, runner.limits)
        request_id = inputs.request_id or uuid.uuid4().hex[:REQUEST_ID_CHARS]
        n, length = inputs.tokens.shape
        key = BatchKey("Score", inputs.width, (length, inputs.last_only))
        result: BatchResult = await self.batcher.submit(key, inputs.tokens, n, _deadline(context))
        logprobs, token_logprobs = result.value  # (N, L or 1, V), (N, L-1)
        served = [self._served_by(request_id, inputs.width, result.batch_size, start,
                                  float(row.mean()) if row.size else 0.0, MEAN_TOKEN_LOGPROB)
                  for row in token_logprobs]
        return pb.ScoreReply(logprobs=to_tensor_msg(logprobs), token_logprobs=to_tensor_msg(token_logprobs),
                             served_by=served)

    @stream_rpc("Generate")
    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateChunk]:
        runner = self._ready()
        encode = runner.tokenizer.encode if runner.tokenizer is not None else None
        inputs = validate_generate(request, runner.limits, encode)
        request_id = inputs.request_id or uuid.uuid4().hex[:REQUEST_ID_CHARS]
        _deadline(context)
        decoder = IncrementalDecoder(runner.tokenizer.decode) if runner.tokenizer is not None else None
        assert self.generation is not None
        start = time.monotonic()
        async for step in self.generation.stream(inputs):
            if step.token is None:
                text = decoder.flush() if decoder is not None else ""
                served = self._served_by(request_id, inputs.width, 1, start, 0.0, "")
                yield pb.GenerateChunk(text=text, served_by=served, finish_reason=step.finish_reason)
                return
            self.metrics.generated_tokens.inc()
            text = decoder.push(step.token) if decoder is not None else ""
            served = self._served_by(request_id, inputs.width, 1, start, step.logprob, MEAN_TOKEN_LOGPROB)
            yield pb.GenerateChunk(token_ids=[step.token], text=text, logprobs=[step.logprob], served_by=served)
            start = time.monotonic()

    @unary_rpc("ModelInfo")
    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoReply:
        return model_info(self._ready())


class SpeculativeServicer(pb_grpc.SpeculativeDecodingServicer):
    """OpenSession / Verify / CloseSession (cloud/speculative.py), on the model of ``cloud``.

    Model work runs in one dedicated thread, one round at a time, besides the batch thread.
    """

    def __init__(self, cloud: CloudServicer, *, max_sessions: int, ttl_s: float, max_draft: int) -> None:
        self.cloud, self.metrics, self.max_draft = cloud, cloud.metrics, max_draft
        self.sessions: SessionTable[Session] = SessionTable(max_sessions, ttl_s)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="cloud-verify")
        self._verifier: Verifier | None = None
        self.metrics.sessions.set_function(lambda: len(self.sessions))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _ready(self) -> tuple[ModelRunner, Verifier]:
        runner = self.cloud._ready()
        require_task(runner.limits, pb.LM, "speculative decoding")
        if self._verifier is None or self._verifier.runner is not runner:
            self._verifier = Verifier(runner)
        return runner, self._verifier

    async def _run(self, method: str, fn: Callable, *args, on_done: Callable[[], None] | None = None) -> object:
        """``fn(*args)`` in the verify thread. ``on_done`` runs when it has finished, even if the RPC was
        cancelled meanwhile (the thread cannot be stopped, so a session stays busy until then)."""
        start = time.monotonic()
        work = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        work.add_done_callback(lambda _: self.metrics.compute.labels(method=method).observe(time.monotonic() - start))
        if on_done is not None:
            work.add_done_callback(lambda _: on_done())
        return await asyncio.shield(work)

    @unary_rpc("OpenSession")
    async def OpenSession(self, request: pb.OpenSessionRequest, context) -> pb.OpenSessionReply:
        start = time.monotonic()
        runner, verifier = self._ready()
        encode = runner.tokenizer.encode if runner.tokenizer is not None else None
        inputs = validate_generate(request.generation, runner.limits, encode)
        request_id = inputs.request_id or uuid.uuid4().hex[:REQUEST_ID_CHARS]
        self.sessions.require_room()  # before any compute
        session, compute_ms = await self._run("OpenSession", verifier.open, inputs)
        sid = self.sessions.add(session)
        served = self.cloud._served_by(request_id, inputs.width, 1, start, 0.0, "")
        return pb.OpenSessionReply(session_id=sid, position=session.position, ttl_s=self.sessions.ttl_s,
                                   compute_ms=compute_ms, served_by=served)

    @unary_rpc("Verify")
    async def Verify(self, request: pb.VerifyRequest, context) -> pb.VerifyReply:
        start = time.monotonic()
        runner, verifier = self._ready()
        session = self.sessions.get(request.session_id)
        if session.busy:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               "another Verify of this session is running; send one round at a time")
        if request.position != session.position:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"the session holds {session.position} tokens but the request assumes "
                               f"{request.position} (a lost or repeated Verify); open a new session with the context")
        draft, draft_probs = parse_draft(request, session, runner.config.vocab_size, self.max_draft)
        session.busy = True
        try:
            verdict = await self._run("Verify", verifier.verify, session, draft, draft_probs,
                                      on_done=lambda: setattr(session, "busy", False))
        except Exception:  # its state may be half updated: never continue from it
            self.sessions.close(request.session_id, "was dropped after its Verify failed on the server")
            raise
        self.metrics.draft_tokens.labels(outcome="accepted").inc(verdict.accepted)
        self.metrics.draft_tokens.labels(outcome="rejected").inc(draft.size - verdict.accepted)
        request_id = check_request_id_or_new(request.request_id)
        served = self.cloud._served_by(request_id, session.width, 1, start, 0.0, "")
        served.draft_tokens, served.accepted_tokens = draft.size, verdict.accepted
        return pb.VerifyReply(accepted=verdict.accepted, next_token_id=verdict.next_token, logprobs=verdict.logprobs,
                              position=session.position, compute_ms=verdict.compute_ms, served_by=served)

    @unary_rpc("CloseSession")
    async def CloseSession(self, request: pb.CloseSessionRequest, context) -> pb.CloseSessionReply:
        return pb.CloseSessionReply(closed=self.sessions.close(request.session_id))


def check_request_id_or_new(request_id: str) -> str:
    """The caller's request id (validated), or a fresh one."""
    return check_request_id(request_id) or uuid.uuid4().hex[:REQUEST_ID_CHARS]


def model_info(runner: ModelRunner) -> pb.ModelInfoReply:
    """Describe the served model (ModelInfoReply; see matmamba.proto)."""
    cfg, limits = runner.config, runner.limits
    widths = list(limits.supported_widths)  # widest first, so levels ascend
    reply = pb.ModelInfoReply(
        task=limits.task, d_model=cfg.d_model, n_layer=cfg.n_layer, served_width=limits.default_width,
        served_level=_level(cfg.d_model, limits.default_width),
        supported_levels=[_level(cfg.d_model, w) for w in widths], supported_widths=widths,
        tier=pb.CLOUD, checkpoint_sha256=runner.fingerprint, server_version=matmamba.__version__,
        device=describe_device(runner.device), max_batch_size=limits.max_batch,
        flops_per_item=flops_per_item(cfg, limits.default_width),
    )
    if limits.task == pb.VISION:
        pre = runner.preprocess
        reply.vision.CopyFrom(pb.VisionInfo(num_classes=cfg.n_classes, class_names=pre.class_names,
                                            image_size=cfg.image_size, channels=cfg.in_chans,
                                            patch_size=cfg.patch_size, mean=pre.mean, std=pre.std))
    else:
        tok = runner.tokenizer
        reply.lm.CopyFrom(pb.LanguageInfo(vocab_size=cfg.vocab_size, tokenizer=tok.kind if tok is not None else "",
                                          eos_token_id=tok.eos_id if tok is not None else -1,
                                          max_sequence_length=limits.max_seq_len))
    return reply
