"""The edge device client SDK: classify images and stream generations through the router.

No torch here (a test checks it): an edge device needs grpcio, numpy and, for image files, Pillow.

    from edge.client import EdgeClient

    with EdgeClient("127.0.0.1:50052") as client:
        for p in client.classify(image):            # uint8 (28, 28), (N, 1, 28, 28), or a file path
            print(p.label, p.tier, p.confidence)    # e.g. "Ankle boot edge 0.97"
        for chunk in client.generate("It is a truth", max_tokens=32):
            print(chunk.text, end="")               # chunk.tier says which model wrote it
        print(client.info().task)                   # "vision" or "lm"

Errors of the router arrive as :class:`RouterError` with the gRPC status code and its message.
A call the router answers UNAVAILABLE (restarting, draining, not reachable yet) or CANCELLED (a
call that reached a router as it shut down, before a handler took it: grpc/grpc#41785) is retried
with exponential backoff, at most ``retry.attempts`` times and never past the call's deadline
(``timeout_s`` covers every attempt); a generation only before its first chunk arrived.
``security=ChannelSecurity(ca=..., token=...)`` dials with TLS / mutual TLS / a bearer token
(docs/SECURITY.md).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc
from proto.ports import MAX_PORT, port_beyond_range
from proto.security import PLAINTEXT, ChannelSecurity
from proto.tensors import from_tensor_msg, to_tensor_msg

from .images import as_batch, load_image_file

DEFAULT_ROUTER = "127.0.0.1:50052"
TIER_NAMES = {pb.EDGE: "edge", pb.CLOUD: "cloud", pb.TIER_UNSPECIFIED: ""}
FINISH_NAMES = {pb.FINISH_REASON_EOS: "eos", pb.FINISH_REASON_LENGTH: "length"}
MIB = 1 << 20


class RouterError(RuntimeError):
    """The router refused or failed a call: ``code`` (grpc.StatusCode) and ``details`` (its message)."""

    def __init__(self, address: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"router at {address} answered {code.name}: {details}")
        self.code, self.details = code, details


@dataclass(frozen=True)
class RetryPolicy:
    """Retry of calls answered UNAVAILABLE: bounded in attempts and by the call's deadline."""

    attempts: int = 5  # tries in all, the first included; 1 = no retry
    initial_backoff_s: float = 0.1  # wait before the second try; doubles each time ...
    max_backoff_s: float = 2.0  # ... up to this (each wait is drawn in [backoff/2, backoff]: jitter)

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(f"need attempts >= 1 and 0 <= initial_backoff_s <= max_backoff_s, got {self}")

    def backoffs(self) -> Iterator[float]:
        """The waits between tries (attempts - 1 of them)."""
        backoff = self.initial_backoff_s
        for _ in range(self.attempts - 1):
            yield random.uniform(backoff / 2, backoff)
            backoff = min(2 * backoff, self.max_backoff_s)


NO_RETRY = RetryPolicy(attempts=1)
# CANCELLED: this client never cancels a call it retries, so the code comes from a server that shut
# down with the call received but not yet handled (grpc-core reports those CANCELLED, grpc/grpc#41785);
# every RPC retried here is idempotent, and a stream is retried only before its first chunk.
RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


@dataclass(frozen=True)
class Served:
    """How an answer was served (pb.ServedBy in Python terms)."""

    tier: str  # "edge" or "cloud"
    confidence: float  # the edge model's confidence, as compared with the threshold
    measure: str
    threshold: float
    degraded: bool  # the router wanted the cloud but no replica answered in time
    edge_ms: float
    cloud_ms: float
    request_id: str
    replica: str  # the cloud replica that answered; "" for edge answers
    width: int

    @classmethod
    def from_proto(cls, s: pb.ServedBy) -> Served:
        return cls(TIER_NAMES.get(s.tier, ""), s.confidence, s.confidence_measure, s.threshold, s.degraded,
                   s.edge_ms, s.cloud_ms, s.request_id, s.replica, s.width)


class _ServedShortcuts:
    """`tier`, `confidence` and `degraded` read straight from the item's `served` record."""

    served: Served

    @property
    def tier(self) -> str:
        return self.served.tier

    @property
    def confidence(self) -> float:
        return self.served.confidence

    @property
    def degraded(self) -> bool:
        return self.served.degraded


@dataclass(frozen=True)
class Prediction(_ServedShortcuts):
    """The answer for one image."""

    label: str  # class name ("" when the checkpoint has none)
    class_index: int
    probs: np.ndarray  # (num_classes,) float32
    served: Served
    latency_ms: float  # the whole request as this client saw it
    edge_class: int | None = None  # the edge model's answer before any escalation (None from a cloud replica)


@dataclass(frozen=True)
class Chunk(_ServedShortcuts):
    """A piece of a generation; all its tokens come from one tier."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    served: Served
    finish_reason: str | None  # "eos" or "length" on the last chunk, else None


@dataclass(frozen=True)
class RouterInfo:
    """What the router serves (pb.ModelInfoReply in Python terms; ``raw`` holds the message)."""

    task: str  # "vision" or "lm"
    checkpoint: str  # sha256 fingerprint
    d_model: int
    edge_width: int
    edge_level: int
    device: str
    max_batch: int
    class_names: tuple[str, ...]
    image_size: int
    flops_per_item: int  # forward FLOPs per image (vision) or token (LM) at edge_width; 0 = not reported
    raw: pb.ModelInfoReply

    @classmethod
    def from_proto(cls, info: pb.ModelInfoReply) -> RouterInfo:
        vision = info.vision if info.HasField("vision") else pb.VisionInfo()
        return cls("vision" if info.task == pb.VISION else "lm", info.checkpoint_sha256, info.d_model,
                   info.served_width, info.served_level, info.device, info.max_batch_size,
                   tuple(vision.class_names), vision.image_size, info.flops_per_item, info)


class EdgeClient:
    """A connection to the router (``address`` = HOST:PORT). Thread-safe; close it, or use ``with``."""

    def __init__(self, address: str = DEFAULT_ROUTER, *, timeout_s: float = 30.0, retry: RetryPolicy = RetryPolicy(),
                 security: ChannelSecurity = PLAINTEXT) -> None:
        if port_beyond_range(address):
            raise ValueError(f"router address {address!r}: a port must be in 0..{MAX_PORT}")
        self.address, self.timeout_s, self.retry = address, timeout_s, retry
        options = [("grpc.max_receive_message_length", 64 * MIB), ("grpc.max_send_message_length", 64 * MIB),
                   ("grpc.enable_retries", 0),  # retries are ours (RetryPolicy), bounded by the deadline
                   ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
        self._channel = security.channel(address, options=options)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._admin = pb_grpc.RouterAdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._info: RouterInfo | None = None

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _retrying(self, attempt: Callable[[float], Any], timeout_s: float | None) -> Any:
        """``attempt(seconds left)`` until it returns, retrying UNAVAILABLE within the policy and deadline."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        backoffs = self.retry.backoffs()
        while True:
            try:
                return attempt(deadline - time.monotonic())
            except grpc.RpcError as err:
                wait = next(backoffs, None) if err.code() in RETRY_CODES else None
                if wait is None or time.monotonic() + wait >= deadline:
                    raise RouterError(self.address, err.code(), err.details() or "") from None
                time.sleep(wait)

    def _call(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        return self._retrying(lambda left: method(request, timeout=left), timeout_s)

    def info(self) -> RouterInfo:
        """The served model (cached after the first call)."""
        if self._info is None:
            self._info = RouterInfo.from_proto(self._call(self._stub.ModelInfo, pb.ModelInfoRequest(), None))
        return self._info

    def health(self, service: str = "") -> str:
        """Health status name of ``service`` ("" = the router; "matmamba.v1.Inference/cloud" = its cloud)."""
        reply = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), None)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def classify(self, images: np.ndarray | str | Path, *, request_id: str = "",
                 timeout_s: float | None = None) -> list[Prediction]:
        """Classify uint8 pixels (H, W), (N, H, W), (N, C, H, W), or an image / .npy file; one Prediction each."""
        if isinstance(images, str | Path):
            batch = load_image_file(images, size=self.info().image_size or None)
        else:
            batch = as_batch(images)
        request = pb.ClassifyRequest(images=to_tensor_msg(np.ascontiguousarray(batch)), request_id=request_id)
        start = time.perf_counter()
        reply = self._call(self._stub.Classify, request, timeout_s)
        latency = (time.perf_counter() - start) * 1e3
        probs = from_tensor_msg(reply.probs, max_elements=len(reply.probs.data))
        return [Prediction(r.label, r.predicted_class, probs[i], Served.from_proto(r.served_by), latency,
                           r.edge_predicted_class if r.HasField("edge_predicted_class") else None)
                for i, r in enumerate(reply.results)]

    def generate(self, prompt: str | Sequence[int], *, max_tokens: int = 0, temperature: float | None = None,
                 top_k: int = 0, top_p: float = 0.0, seed: int | None = None, request_id: str = "",
                 timeout_s: float | None = None) -> Iterator[Chunk]:
        """Stream a generation: text (or token ids) in, Chunks out; the last has ``finish_reason`` set."""
        request = pb.GenerateRequest(max_tokens=max_tokens, top_k=top_k, top_p=top_p, request_id=request_id,
                                     temperature=temperature, seed=seed)
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(int(t) for t in prompt)
        deadline = time.monotonic() + (timeout_s or self.timeout_s)

        def first(left: float) -> tuple[Any, Any]:  # a stream and its first chunk (retried as one)
            stream = self._stub.Generate(request, timeout=left)
            try:
                return stream, next(stream, None)
            except grpc.RpcError:
                stream.cancel()
                raise

        stream, chunk = self._retrying(first, deadline - time.monotonic())
        try:
            while chunk is not None:
                yield Chunk(chunk.text, tuple(chunk.token_ids), tuple(chunk.logprobs),
                            Served.from_proto(chunk.served_by), FINISH_NAMES.get(chunk.finish_reason))
                chunk = next(stream, None)
        except grpc.RpcError as err:
            raise RouterError(self.address, err.code(), err.details() or "") from None
        finally:
            stream.cancel()

    def thresholds(self) -> pb.Thresholds:
        """The confidence policy in force (RouterAdmin.GetThresholds)."""
        return self._call(self._admin.GetThresholds, pb.GetThresholdsRequest(), None).thresholds

    def reload_thresholds(self, path: str = "") -> pb.ReloadThresholdsReply:
        """Make the router load a thresholds file on its host ("" = re-read its --thresholds file)."""
        return self._call(self._admin.ReloadThresholds, pb.ReloadThresholdsRequest(path=path), None)
