"""A small async client for a cloud replica (numpy only, no torch): what the router escalates with.

    async with CloudClient("127.0.0.1:50051", timeout=2.0) as cloud:
        await cloud.wait_ready(timeout=30)
        out = await cloud.classify(images)            # images (N, C, H, W) uint8 or normalised float32
        out.probs                                     # (N, classes) float32
        out.predicted, out.labels, out.served_by      # (N,) int64, N names, N pb.ServedBy
        async for chunk in cloud.generate("It is a truth", max_tokens=32, temperature=0):
            print(chunk.text, end="")

``security=ChannelSecurity(ca=..., cert=..., key=..., token=...)`` dials a replica started with
TLS, mutual TLS or a bearer token (docs/SECURITY.md).

Failures are ``grpc.aio.AioRpcError`` with the server's status code and message (see
matmamba.proto: INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED, ...).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc
from proto.security import PLAINTEXT, ChannelSecurity
from proto.tensors import from_tensor_msg, to_tensor_msg

MIB = 1 << 20
# Replies are decoded with this cap on elements per tensor (the message size limit bounds it anyway).
MAX_REPLY_ELEMENTS = 1 << 31
# How often wait_ready polls the health service.
READY_POLL_S = 0.1


@dataclass(frozen=True)
class ClassifyResult:
    probs: np.ndarray  # (N, classes) float32
    predicted: np.ndarray  # (N,) int64
    labels: list[str]  # class names ("" when the checkpoint has none)
    served_by: list[pb.ServedBy]


@dataclass(frozen=True)
class ScoreResult:
    logprobs: np.ndarray  # (N, L, V) float32, or (N, 1, V) with last_only
    token_logprobs: np.ndarray  # (N, L-1) float32
    served_by: list[pb.ServedBy]


class CloudClient:
    """Async client of one replica. ``timeout`` (seconds) is every call's default deadline; None = none."""

    def __init__(self, address: str, *, timeout: float | None = 10.0, max_message_mb: int = 16,
                 security: ChannelSecurity = PLAINTEXT) -> None:
        size = max_message_mb * MIB
        self.address, self.timeout = address, timeout
        self._channel = security.aio_channel(
            address, options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)])
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> CloudClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def classify(self, images: np.ndarray, *, width: int = 0, request_id: str = "",
                       timeout: float | None = None) -> ClassifyResult:
        """Classify images (N, C, H, W): uint8 pixels, or float32 normalised with the model's mean/std."""
        request = pb.ClassifyRequest(images=to_tensor_msg(np.asarray(images)), width=width, request_id=request_id)
        reply = await self._stub.Classify(request, timeout=self._deadline(timeout))
        probs = from_tensor_msg(reply.probs, max_elements=MAX_REPLY_ELEMENTS)
        return ClassifyResult(probs, np.array([r.predicted_class for r in reply.results], dtype=np.int64),
                              [r.label for r in reply.results], [r.served_by for r in reply.results])

    async def score(self, tokens: np.ndarray, *, last_only: bool = False, width: int = 0, request_id: str = "",
                    timeout: float | None = None) -> ScoreResult:
        """Next-token log-probabilities of equal-length sequences, tokens (N, L) int64."""
        request = pb.ScoreRequest(tokens=to_tensor_msg(np.asarray(tokens, dtype=np.int64)), last_only=last_only,
                                  width=width, request_id=request_id)
        reply = await self._stub.Score(request, timeout=self._deadline(timeout))
        return ScoreResult(from_tensor_msg(reply.logprobs, max_elements=MAX_REPLY_ELEMENTS),
                           from_tensor_msg(reply.token_logprobs, max_elements=MAX_REPLY_ELEMENTS),
                           list(reply.served_by))

    async def generate(self, prompt: str | Sequence[int], *, max_tokens: int = 0, temperature: float | None = None,
                       top_k: int = 0, top_p: float = 0.0, seed: int | None = None, width: int = 0,
                       request_id: str = "", timeout: float | None = None) -> AsyncIterator[pb.GenerateChunk]:
        """Stream a generation; the last chunk has finish_reason set. Leaving the loop early cancels it."""
        request = pb.GenerateRequest(max_tokens=max_tokens, top_k=top_k, top_p=top_p, width=width,
                                     request_id=request_id)
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(int(i) for i in prompt)
        if temperature is not None:
            request.temperature = temperature
        if seed is not None:
            request.seed = seed
        call = self._stub.Generate(request, timeout=self._deadline(timeout))
        try:
            async for chunk in call:
                yield chunk
        finally:
            call.cancel()  # a no-op once the stream ended

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfoReply:
        return await self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=self._deadline(timeout))

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        """"SERVING", "NOT_SERVING", ... of grpc.health.v1 (raises AioRpcError when unreachable)."""
        reply = await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                         timeout=self._deadline(timeout))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll health until SERVING; TimeoutError after ``timeout`` seconds, naming the last status seen."""
        end, last = time.monotonic() + timeout, "unreachable"
        while time.monotonic() < end:
            try:
                last = await self.health(timeout=max(READY_POLL_S, end - time.monotonic()))
                if last == "SERVING":
                    return
            except grpc.aio.AioRpcError as err:
                last = f"unreachable ({err.code().name})"
            await asyncio.sleep(READY_POLL_S)
        raise TimeoutError(f"cloud replica {self.address} not SERVING after {timeout:.1f} s (last: {last})")
