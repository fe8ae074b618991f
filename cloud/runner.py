"""The model side of a cloud replica: loading, limits, and the batched compute functions.

Everything here runs in worker threads (never on the event loop) under ``torch.inference_mode()``.
``ModelRunner`` is independent of gRPC, so the Ray Serve deployment and the benchmark reuse it.

    runner = ModelRunner.load("checkpoints/matmamba-vision-fmnist", device="auto")
    probs = runner.classify_batch(BatchKey("Classify", 192, (1, 28, 28)), [images_uint8])  # [(N, 10)]
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import matmamba
from matmamba.cuda_graphs import BucketedForward, ChunkGraphs, DecodeGraphs, ForwardGraphs, graph_buckets
from matmamba.data.fashion_mnist import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD
from matmamba.devices import describe_device, resolve_device, use_ieee_fp32
from proto import matmamba_pb2 as pb
from proto.validate import GenerateInputs, ModelLimits

from .batcher import BatchKey
from .speculative import greedy_round

log = logging.getLogger(__name__)

# Fashion-MNIST is the one vision data set checkpoints are trained on (matmamba.train vision);
# a 1-channel, 10-class checkpoint is taken to be one. See VisionPreprocess.for_config.
FMNIST_CHANNELS = 1
# Length of the warm-up Score sequence and tokens of the warm-up generation.
WARMUP_TOKENS = 8
WARMUP_NEW_TOKENS = 2
# Precision choices: "auto" = bf16 autocast on CUDA (as training and evaluation), fp32 on CPU.
PRECISIONS = ("auto", "fp32", "bf16")
# CUDA-graph decode slots per served width: concurrent generations beyond this wait for a free one
# (the GPU runs their steps one after another anyway). All are captured at warm-up.
DECODE_SLOTS = 4
# Speculative verification reads the pending token plus k drafts from a session's cache: CUDA graphs of
# those chunk lengths (drafts up to 16) are captured at warm-up for the default width; others run eager.
VERIFY_GRAPH_LENGTHS = range(1, 18)


@dataclass(frozen=True)
class VisionPreprocess:
    """How raw uint8 pixels become model inputs, and the class names."""

    mean: tuple[float, ...]  # per channel, of pixel / 255
    std: tuple[float, ...]
    class_names: tuple[str, ...]  # empty when unknown

    @classmethod
    def for_config(cls, config: matmamba.MatMambaVisionConfig) -> VisionPreprocess:
        """Fashion-MNIST statistics for 1-channel 10-class checkpoints; otherwise the same per channel, no names."""
        c = config.in_chans
        fmnist = c == FMNIST_CHANNELS and config.n_classes == len(FMNIST_CLASSES)
        if not fmnist:
            log.warning("checkpoint is not 1-channel/10-class: normalising uint8 pixels with Fashion-MNIST "
                        "mean/std and serving no class names")
        return cls((FMNIST_MEAN,) * c, (FMNIST_STD,) * c, FMNIST_CLASSES if fmnist else ())




def served_widths(config, max_width: int) -> tuple[int, ...]:
    """The level widths d_model / k that fit in ``max_width``, plus ``max_width`` itself, widest first."""
    widths = {config.d_model // k for k in config.block.levels if config.d_model // k <= max_width}
    widths.add(max_width)
    return tuple(sorted(widths, reverse=True))


def _split(array: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    return np.split(array, np.cumsum(sizes)[:-1])


class ModelRunner:
    """A loaded checkpoint and the functions the batcher runs on it."""

    def __init__(self, model: torch.nn.Module, device: torch.device, *, width: int | None = None,
                 precision: str = "auto", max_batch: int = 64, max_seq_len: int = 2048, max_tokens: int = 512,
                 default_max_tokens: int = 64, max_reply_bytes: int = 0, cuda_graphs: bool = True) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.model, self.device, self.config = model, device, model.config
        self.width = width if width is not None else self.config.d_model
        self.bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
        if device.type == "cuda" and not self.bf16:  # fp32 means fp32: a verified chunk equals the steps it replaces
            use_ieee_fp32()
        self.is_lm = isinstance(model, matmamba.MatMambaLM)
        self.tokenizer = getattr(model, "tokenizer", None)
        self.widths = served_widths(self.config, self.width)
        self.preprocess = None if self.is_lm else VisionPreprocess.for_config(self.config)
        self.limits = self._limits(max_batch, max_seq_len, max_tokens, default_max_tokens, max_reply_bytes)
        self._mean_std: tuple[torch.Tensor, torch.Tensor] | None = None
        # CUDA graphs (one launch per forward or decode step): on CUDA unless cuda_graphs=False.
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        autocast_dtype = torch.bfloat16 if self.bf16 else None
        self.classify_graphs = ForwardGraphs(self._classify_probs, autocast_dtype=autocast_dtype) \
            if self.cuda_graphs and not self.is_lm else None
        self._decode_graphs = DecodeGraphs(model, autocast_dtype=autocast_dtype, slots_per_key=DECODE_SLOTS) \
            if self.cuda_graphs and self.is_lm else None
        self.chunk_graphs = ChunkGraphs(model, autocast_dtype=autocast_dtype) if self.cuda_graphs and self.is_lm \
            else None
        # greedy verification rounds, whole (forward, acceptance, rollback) in one replay each
        self.round_graphs = ChunkGraphs(model, autocast_dtype=autocast_dtype, body=greedy_round) \
            if self.chunk_graphs is not None else None
        self.buckets = graph_buckets(max_batch)
        self._bucketed = BucketedForward(self.classify_graphs, max_batch) if self.classify_graphs is not None else None

    @classmethod
    def load(cls, checkpoint: str | Path, *, width: int | None = None, device: str = "auto",
             **kwargs) -> ModelRunner:
        """Load ``checkpoint`` (only what ``width`` needs when given) onto ``device``; kwargs as __init__."""
        resolved = resolve_device(device)
        model = matmamba.load_model(checkpoint, width=width, device=resolved)
        log.info("loaded %s (%s) at width %s on %s in %.2f s", checkpoint, model.config.model_type,
                 width or model.config.d_model, describe_device(resolved), model.load_report.seconds)
        return cls(model, resolved, width=width, **kwargs)

    def _limits(self, max_batch: int, max_seq_len: int, max_tokens: int, default_max_tokens: int,
                max_reply_bytes: int) -> ModelLimits:
        cfg = self.config
        if self.is_lm:
            return ModelLimits.lm(vocab_size=cfg.vocab_size, supported_widths=self.widths, default_width=self.width,
                                  max_batch=max_batch, max_seq_len=max_seq_len, max_tokens=max_tokens,
                                  default_max_tokens=default_max_tokens, max_reply_bytes=max_reply_bytes)
        return ModelLimits.vision(num_classes=cfg.n_classes, channels=cfg.in_chans, image_size=cfg.image_size,
                                  patch_size=cfg.patch_size, supported_widths=self.widths,
                                  default_width=self.width, max_batch=max_batch)

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint or ""

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when enabled (CUDA by default), else a no-op."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------------------ vision

    def prepare_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (n, C, H, W) pixels or float32 normalised images -> float32 (n, C, H, W) on the device."""
        x = (torch.from_numpy(images) if isinstance(images, np.ndarray) else images).to(self.device)
        if x.dtype != torch.uint8:
            return x
        if self._mean_std is None:
            shape = (1, -1, 1, 1)  # broadcast per channel over (n, C, H, W)
            self._mean_std = (torch.tensor(self.preprocess.mean, device=self.device).view(shape),
                              torch.tensor(self.preprocess.std, device=self.device).view(shape))
        mean, std = self._mean_std
        return (x.to(torch.float32) / 255.0 - mean) / std

    def _classify_probs(self, width: int, images: torch.Tensor) -> torch.Tensor:
        """uint8 or normalised float images (n, C, H, W) on the device -> probabilities (n, classes) float32."""
        logits = self.model(self.prepare_images(images), widths=width)
        return logits.float().softmax(-1)

    def _graphable(self, payloads: Sequence[np.ndarray]) -> bool:
        cfg = self.config
        return (self.classify_graphs is not None and all(p.dtype == np.uint8 for p in payloads)
                and payloads[0].shape[1:] == (cfg.in_chans, cfg.image_size, cfg.image_size))

    @torch.inference_mode()
    def classify_batch(self, key: BatchKey, payloads: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Images of several requests, each (n_i, C, H, W) -> probabilities per request, (n_i, classes) float32.

        On CUDA, uint8 images of the configured size run as one CUDA-graph replay for the smallest
        bucket that holds them: one copy into a page-locked buffer, one host-to-device copy, one
        replay, one device-to-host copy.
        """
        sizes = [p.shape[0] for p in payloads]
        n = sum(sizes)
        if self._graphable(payloads) and self._bucketed.fits(n):
            return _split(self._bucketed(key.width, list(payloads)), sizes)
        x = torch.cat([torch.from_numpy(p) for p in payloads]).to(self.device)  # (sum n_i, C, H, W)
        with self.autocast():
            probs = self._classify_probs(key.width, x)
        return _split(probs.cpu().numpy(), sizes)

    # ------------------------------------------------------------------ language model

    @torch.inference_mode()
    def score_batch(self, key: BatchKey, payloads: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Token ids of several requests, each (n_i, L) -> per request (logprobs, token_logprobs).

        logprobs: (n_i, L, V), or (n_i, 1, V) for the last position when the key says last_only;
        token_logprobs: (n_i, L-1), log p(tokens[:, t+1] | tokens[:, :t+1]).
        """
        last_only = bool(key.shape[1])
        ids = torch.from_numpy(np.concatenate(payloads)).to(self.device)  # (B, L)
        with self.autocast():
            logits = self.model(ids, widths=key.width)  # (B, L, V)
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, L, V)
        token = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, L-1)
        kept = logp[:, -1:] if last_only else logp
        sizes = [p.shape[0] for p in payloads]
        return list(zip(_split(kept.cpu().numpy(), sizes), _split(token.cpu().numpy(), sizes)))

    def generate(self, inputs: GenerateInputs, stop: threading.Event,
                 emit: Callable[[int, float], None]) -> int:
        """Generate for one prompt, calling ``emit(token, logprob)`` per new token, until EOS, max_tokens or ``stop``.

        Returns the pb.FinishReason (FINISH_REASON_UNSPECIFIED when stopped early).
        """
        eos = self.tokenizer.eos_id if self.tokenizer is not None else None
        for token, logprob in self._steps(inputs, eos):
            emit(token, logprob)
            if token == eos:
                return pb.FINISH_REASON_EOS
            if stop.is_set():
                return pb.FINISH_REASON_UNSPECIFIED
        return pb.FINISH_REASON_LENGTH

    def _steps(self, inputs: GenerateInputs, eos: int | None) -> Iterator[tuple[int, float]]:
        ids = torch.from_numpy(inputs.prompt_ids)[None].to(self.device)  # (1, L)
        generator = None
        if inputs.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(inputs.seed)
        # CUDA graphs run their own autocast (see matmamba.cuda_graphs); the eager path uses ours.
        decode = self._decode_graphs or self.model
        with torch.inference_mode(), (contextlib.nullcontext() if self._decode_graphs else self.autocast()):
            stream = decode.generate_stream(ids, inputs.max_tokens, widths=inputs.width,
                                            temperature=inputs.temperature, top_k=inputs.top_k,
                                            top_p=inputs.top_p, eos_id=eos, generator=generator)
            for token, logprob in stream:  # (1,), (1,)
                yield int(token[0]), float(logprob[0])

    # ------------------------------------------------------------------ warm-up and description

    def warmup(self) -> None:
        """Run a batch per served method at the default width (kernels compiled, caches built).

        Vision: batches of 1 and of max_batch images (on CUDA: every graph bucket); LM: one Score of
        WARMUP_TOKENS tokens and a WARMUP_NEW_TOKENS-token greedy generation (on CUDA: DECODE_SLOTS decode
        graphs captured per served width, and per VERIFY_GRAPH_LENGTHS chunk length a verification forward graph
        and a whole greedy round graph).
        """
        width = self.limits.default_width
        if self.is_lm:
            ids = np.zeros((1, WARMUP_TOKENS), dtype=np.int64)
            self.score_batch(BatchKey("Score", width, (WARMUP_TOKENS, True)), [ids])
            prompt = GenerateInputs(ids[0], WARMUP_NEW_TOKENS, 0.0, 0, 1.0, None, width, "warmup")
            self.generate(prompt, threading.Event(), lambda token, logprob: None)
            if self._decode_graphs is not None:  # every graph now: a capture must not overlap other GPU work
                for w in self.widths:
                    self._decode_graphs.warmup(1, widths=w, slots=DECODE_SLOTS)
            if self.chunk_graphs is not None:
                spec = self.model.backbone.resolve_widths(widths=width)
                self.chunk_graphs.warmup(spec, VERIFY_GRAPH_LENGTHS)
                self.round_graphs.warmup(spec, VERIFY_GRAPH_LENGTHS)
        else:
            cfg = self.config
            batches = self.buckets if self.cuda_graphs else sorted({1, self.limits.max_batch})
            for batch in batches:
                images = np.zeros((batch, cfg.in_chans, cfg.image_size, cfg.image_size), dtype=np.uint8)
                self.classify_batch(BatchKey("Classify", width, images.shape[1:]), [images])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
