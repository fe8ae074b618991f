"""Request validation for the ``Inference`` service (numpy + proto only, no torch).

A server turns each request message into validated numpy inputs before it queues any
work, so one malformed request never reaches the model and never fails a batch:

    limits = ModelLimits.vision(num_classes=10, channels=1, image_size=28, patch_size=4,
                                supported_widths=(192, 96, 48, 24), default_width=192)
    try:
        inputs = validate_classify(request, limits)   # ClassifyInputs(images (N, C, H, W), width, ...)
    except RequestError as err:
        await context.abort(err.code, err.message)

Every check raises :class:`RequestError` with a gRPC status code (see matmamba.proto) and
a message that says what was expected and what came:

- ``INVALID_ARGUMENT``: malformed tensor (dtype, shape, byte length), NaN/Inf, empty
  input, image sides not multiples of the patch, token id out of range, bad sampling
  parameters, unsupported width, missing prompt;
- ``RESOURCE_EXHAUSTED``: batch, sequence, image or max_tokens over the server's limits;
- ``FAILED_PRECONDITION``: a method the checkpoint's task does not serve.

The router at the edge reuses this module, which is why it must never import torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from . import matmamba_pb2 as pb
from .tensors import TensorFormatError, dtype_name, from_tensor_msg

# Longest caller-supplied request id; ids end up in logs and in every ServedBy.
MAX_REQUEST_ID_CHARS = 128
# Image dtypes ClassifyRequest accepts (see ClassifyRequest.images in matmamba.proto).
IMAGE_DTYPES = (pb.UINT8, pb.FLOAT32)
# How many times the trained image side a request may send (the model runs at any
# multiple of the patch size; this bounds the work one request can ask for).
DEFAULT_MAX_IMAGE_SCALE = 4

Encoder = Callable[[str], Sequence[int]]  # a tokenizer's encode: text -> token ids


class RequestError(Exception):
    """A request the server refuses: a gRPC status code and a message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _too_large(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


@dataclass(frozen=True)
class ModelLimits:
    """What a server accepts. Build with :meth:`vision` or :meth:`lm` (or from ModelInfo)."""

    task: int  # pb.VISION or pb.LM
    supported_widths: tuple[int, ...]  # widths a request may name; 0 in a request = default_width
    default_width: int  # width used when a request leaves width = 0
    max_batch: int  # most images / sequences in one request
    # vision
    num_classes: int = 0
    channels: int = 0  # C of (N, C, H, W)
    image_size: int = 0  # trained side (H = W)
    patch_size: int = 0  # H and W must be multiples of it
    max_image_size: int = 0  # largest H or W accepted
    # language model
    vocab_size: int = 0  # token ids are 0..vocab_size-1
    max_seq_len: int = 0  # longest Score sequence, and prompt + max_tokens for Generate
    max_tokens: int = 0  # cap on GenerateRequest.max_tokens
    default_max_tokens: int = 0  # used when a request leaves max_tokens = 0
    max_reply_bytes: int = 0  # largest reply the server may send (Score with all positions); 0 = no check

    def __post_init__(self) -> None:
        if self.task not in (pb.VISION, pb.LM):
            raise ValueError(f"task must be matmamba_pb2.VISION or LM, got {self.task}")
        if self.max_batch <= 0:
            raise ValueError(f"max_batch must be positive, got {self.max_batch}")
        if self.default_width not in self.supported_widths:
            raise ValueError(f"default_width {self.default_width} is not in supported_widths {self.supported_widths}")

    @classmethod
    def vision(cls, *, num_classes: int, channels: int, image_size: int, patch_size: int,
               supported_widths: tuple[int, ...], default_width: int, max_batch: int = 64,
               max_image_size: int | None = None) -> ModelLimits:
        """Limits of an image classifier; ``max_image_size`` defaults to 4x the trained side."""
        biggest = max_image_size or image_size * DEFAULT_MAX_IMAGE_SCALE
        return cls(pb.VISION, tuple(supported_widths), default_width, max_batch, num_classes=num_classes,
                   channels=channels, image_size=image_size, patch_size=patch_size, max_image_size=biggest)

    @classmethod
    def lm(cls, *, vocab_size: int, supported_widths: tuple[int, ...], default_width: int, max_batch: int = 64,
           max_seq_len: int = 2048, max_tokens: int = 512, default_max_tokens: int = 64,
           max_reply_bytes: int = 0) -> ModelLimits:
        """Limits of a language model."""
        return cls(pb.LM, tuple(supported_widths), default_width, max_batch, vocab_size=vocab_size,
                   max_seq_len=max_seq_len, max_tokens=max_tokens,
                   default_max_tokens=min(default_max_tokens, max_tokens), max_reply_bytes=max_reply_bytes)

    @classmethod
    def from_model_info(cls, info: pb.ModelInfoReply, **overrides: int) -> ModelLimits:
        """Limits of the server that sent ``info`` (e.g. the router checking its cloud replicas)."""
        widths = tuple(info.supported_widths) or (info.served_width,)
        max_batch = info.max_batch_size or 64
        if info.task == pb.VISION:
            v = info.vision
            return cls.vision(num_classes=v.num_classes, channels=v.channels, image_size=v.image_size,
                              patch_size=v.patch_size, supported_widths=widths, default_width=info.served_width,
                              max_batch=max_batch, **overrides)
        if info.task == pb.LM:
            seq = info.lm.max_sequence_length or 2048
            return cls.lm(vocab_size=info.lm.vocab_size, supported_widths=widths, default_width=info.served_width,
                          max_batch=max_batch, max_seq_len=seq, **overrides)
        raise ValueError(f"ModelInfoReply has task {info.task}; expected VISION or LM")

    @property
    def task_name(self) -> str:
        return pb.Task.Name(self.task)


@dataclass(frozen=True)
class ClassifyInputs:
    """A validated ClassifyRequest."""

    images: np.ndarray  # (N, C, H, W), uint8 raw pixels or float32 normalised
    width: int
    request_id: str  # "" when the caller sent none


@dataclass(frozen=True)
class ScoreInputs:
    """A validated ScoreRequest."""

    tokens: np.ndarray  # (N, L) int64, every id in [0, vocab_size)
    width: int
    last_only: bool
    request_id: str


@dataclass(frozen=True)
class GenerateInputs:
    """A validated GenerateRequest, its prompt already tokenized."""

    prompt_ids: np.ndarray  # (L,) int64, L >= 1
    max_tokens: int  # >= 1
    temperature: float  # >= 0; 0 = greedy
    top_k: int  # >= 0; 0 = no top-k cut
    top_p: float  # in (0, 1]; 1 = no nucleus cut
    seed: int | None  # None = a fresh random seed
    width: int
    request_id: str


def require_task(limits: ModelLimits, task: int, method: str) -> None:
    """FAILED_PRECONDITION unless the server's task serves ``method``."""
    if limits.task != task:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{method} needs a {pb.Task.Name(task)} checkpoint; this server runs a {limits.task_name} checkpoint",
        )


def resolve_width(width: int, limits: ModelLimits) -> int:
    """The width a request runs at: ``limits.default_width`` for 0, else one of the supported widths."""
    if width == 0:
        return limits.default_width
    if width not in limits.supported_widths:
        raise _invalid(
            f"width {width} is not served here; supported widths are {list(limits.supported_widths)} "
            "(or 0 for the server's default)"
        )
    return width


def check_request_id(request_id: str) -> str:
    """The caller's request id, at most MAX_REQUEST_ID_CHARS printable characters."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise _invalid(f"request_id has {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS} are accepted")
    if not request_id.isprintable():
        raise _invalid("request_id contains control characters; use printable text (e.g. a UUID)")
    return request_id


def _header_shape(msg: pb.Tensor, what: str, present: bool) -> tuple[int, ...]:
    """The tensor's shape, before its data is decoded; negative dimensions are refused."""
    if not present:
        raise _invalid(f"{what} is missing: set it to a Tensor (see proto/tensors.py to_tensor_msg)")
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise _invalid(f"{what}: tensor shape {list(shape)} has a negative dimension; every dimension must be >= 0")
    return shape


def _decode(msg: pb.Tensor, what: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode a tensor whose shape was already checked against the limits."""
    try:
        return from_tensor_msg(msg, max_elements=math.prod(shape))
    except TensorFormatError as err:
        raise _invalid(f"{what}: {err}") from None


def _check_batch(n: int, what: str, limits: ModelLimits) -> None:
    if n == 0:
        raise _invalid(f"{what} is empty (N = 0); send at least one item")
    if n > limits.max_batch:
        raise _too_large(f"{what} holds {n} items; at most {limits.max_batch} per request (split it)")


def _check_image_shape(shape: tuple[int, ...], limits: ModelLimits) -> None:
    c, p = limits.channels, limits.patch_size
    if len(shape) != 4:
        raise _invalid(f"images must have shape (N, {c}, H, W); got shape {list(shape)}")
    n, ch, h, w = shape
    _check_batch(n, "images", limits)
    if ch != c:
        raise _invalid(f"images must have {c} channel(s) in dimension 1 (N, {c}, H, W); got shape {list(shape)}")
    if h == 0 or w == 0 or h % p or w % p:
        raise _invalid(f"image sides must be positive multiples of the patch size {p} "
                       f"(e.g. {limits.image_size}x{limits.image_size}); got {h}x{w}")
    if max(h, w) > limits.max_image_size:
        raise _too_large(f"images are {h}x{w}; the largest side accepted is {limits.max_image_size}")


def validate_classify(request: pb.ClassifyRequest, limits: ModelLimits) -> ClassifyInputs:
    """ClassifyRequest -> images (N, C, H, W) uint8 or finite float32, width, request id."""
    require_task(limits, pb.VISION, "Classify")
    request_id = check_request_id(request.request_id)
    width = resolve_width(request.width, limits)
    msg = request.images
    if request.HasField("images") and msg.dtype not in IMAGE_DTYPES:
        raise _invalid(f"images must be UINT8 (raw pixels) or FLOAT32 (normalised); got {dtype_name(msg.dtype)}")
    shape = _header_shape(msg, "images", request.HasField("images"))
    _check_image_shape(shape, limits)
    images = _decode(msg, "images", shape)
    if images.dtype == np.float32 and not np.isfinite(images).all():
        bad = int((~np.isfinite(images)).sum())
        raise _invalid(f"images hold {bad} NaN or infinite value(s); send finite normalised pixels")
    return ClassifyInputs(images, width, request_id)


def _check_token_ids(tokens: np.ndarray, what: str, limits: ModelLimits) -> None:
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= limits.vocab_size:
        bad = lo if lo < 0 else hi
        raise _invalid(f"{what} hold id {bad}; every id must be in [0, {limits.vocab_size}) (the vocabulary)")


def _check_reply_size(n: int, length: int, last_only: bool, limits: ModelLimits) -> None:
    positions = 1 if last_only else length
    reply = n * positions * limits.vocab_size * np.dtype(np.float32).itemsize
    if limits.max_reply_bytes and not last_only and reply > limits.max_reply_bytes:
        raise _too_large(f"log-probabilities for all {length} positions of {n} sequence(s) take {reply:,} bytes, "
                         f"over the {limits.max_reply_bytes:,}-byte message limit; set last_only or send fewer")


def validate_score(request: pb.ScoreRequest, limits: ModelLimits) -> ScoreInputs:
    """ScoreRequest -> tokens (N, L) int64 in range, width, last_only, request id."""
    require_task(limits, pb.LM, "Score")
    request_id = check_request_id(request.request_id)
    width = resolve_width(request.width, limits)
    msg = request.tokens
    if request.HasField("tokens") and msg.dtype != pb.INT64:
        raise _invalid(f"tokens must be INT64; got {dtype_name(msg.dtype)}")
    shape = _header_shape(msg, "tokens", request.HasField("tokens"))
    if len(shape) != 2:
        raise _invalid(f"tokens must have shape (N, L); got shape {list(shape)}")
    n, length = shape
    _check_batch(n, "tokens", limits)
    if length == 0:
        raise _invalid("tokens have length L = 0; send at least one token per sequence")
    if length > limits.max_seq_len:
        raise _too_large(f"sequences have {length} tokens; at most {limits.max_seq_len} are accepted")
    tokens = _decode(msg, "tokens", shape)
    _check_token_ids(tokens, "tokens", limits)
    _check_reply_size(n, length, request.last_only, limits)
    return ScoreInputs(tokens, width, request.last_only, request_id)


def _sampling(request: pb.GenerateRequest) -> tuple[float, int, float]:
    """(temperature, top_k, top_p) with the proto's defaults applied, validated."""
    temperature = request.temperature if request.HasField("temperature") else 1.0
    if not math.isfinite(temperature) or temperature < 0:
        raise _invalid(f"temperature must be a finite number >= 0 (0 = greedy); got {temperature}")
    if request.top_k < 0:
        raise _invalid(f"top_k must be >= 0 (0 = no top-k cut); got {request.top_k}")
    top_p = request.top_p
    if not math.isfinite(top_p) or not 0 <= top_p <= 1:
        raise _invalid(f"top_p must be in (0, 1], or 0 for no nucleus cut; got {top_p}")
    return temperature, request.top_k, top_p if top_p > 0 else 1.0


def _max_tokens(request: pb.GenerateRequest, limits: ModelLimits) -> int:
    if request.max_tokens < 0:
        raise _invalid(f"max_tokens must be >= 0 (0 = the server's default {limits.default_max_tokens}); "
                       f"got {request.max_tokens}")
    if request.max_tokens > limits.max_tokens:
        raise _too_large(f"max_tokens {request.max_tokens} is over this server's limit of {limits.max_tokens}")
    return request.max_tokens or limits.default_max_tokens


def _prompt_ids(request: pb.GenerateRequest, encode: Encoder | None) -> np.ndarray:
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise _invalid("the prompt is missing: set either text or token_ids")
    if kind == "text":
        if not request.text:
            raise _invalid("the text prompt is empty; send at least one character")
        if encode is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               "this server has no tokenizer for text prompts; send token_ids instead")
        ids = np.asarray(encode(request.text), dtype=np.int64)
        if ids.size == 0:
            raise _invalid(f"the text prompt {request.text[:40]!r} encodes to no tokens; send other text")
        return ids
    if not request.token_ids.ids:
        raise _invalid("token_ids is empty; send at least one token id")
    return np.asarray(request.token_ids.ids, dtype=np.int64)


def validate_generate(request: pb.GenerateRequest, limits: ModelLimits,
                      encode: Encoder | None = None) -> GenerateInputs:
    """GenerateRequest -> prompt ids (L,), sampling parameters, width, request id.

    ``encode`` (text -> list of ids) tokenizes a text prompt; None refuses text prompts.
    """
    require_task(limits, pb.LM, "Generate")
    request_id = check_request_id(request.request_id)
    width = resolve_width(request.width, limits)
    temperature, top_k, top_p = _sampling(request)
    max_tokens = _max_tokens(request, limits)
    ids = _prompt_ids(request, encode)
    _check_token_ids(ids, "prompt token ids", limits)
    if ids.size + max_tokens > limits.max_seq_len:
        raise _too_large(f"prompt ({ids.size} tokens) + max_tokens ({max_tokens}) is over the longest sequence "
                         f"accepted, {limits.max_seq_len} tokens; shorten the prompt or ask for fewer tokens")
    seed = request.seed if request.HasField("seed") else None
    return GenerateInputs(ids, max_tokens, temperature, top_k, top_p, seed, width, request_id)
