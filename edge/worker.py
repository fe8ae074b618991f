"""The edge worker: the narrow nested submodel of a checkpoint, micro-batched (a plain class).

The router runs it as a Ray actor (``ray.remote(num_gpus=1)(EdgeWorker)`` per GPU, or one CPU
actor); tests and benchmarks may use it directly. Only the weights the edge width needs are
read from the checkpoint (``load_model(dir, mrl_level=edge_level)``, partial loading).

    worker = EdgeWorker("checkpoints/matmamba-vision-fmnist", edge_level=4)  # warm_levels=(8,): a chain's stages
    out = await worker.classify(images_uint8, width=0)      # ClassifyOutput: probs (N, 10), edge_ms, batch
    seg = await worker.generate_segment(SegmentRequest("g1", prompt_ids, max_new=8))
    address = await worker.start_endpoint()                 # "unix:///tmp/mm-edge-XXXX/worker.sock"

Classify and Score requests are grouped into micro-batches (edge/batching.py) and run one batch
at a time on the worker's event loop thread. Besides Ray actor calls they are served on a private
Unix-socket endpoint (edge/endpoint.py), the router's fast path on the same host. Generation runs
one segment at a time on the same thread (on CUDA its decode steps replay a captured graph per
width); the worker keeps each generation's recurrent state
between segments, so a segment that continues the previous one costs only its own decode steps; a
context that extends what it read is read from there, and a draft segment (speculative generation)
keeps a checkpoint before each token, so a context keeping only some of its tokens resumes at the last
kept one. Any other context is re-read in one pass.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from matmamba import MatMambaLM, load_model
from matmamba.backbone import InferenceCache
from matmamba.cuda_graphs import BucketedForward, DecodeGraphs, ForwardGraphs
from matmamba.data.fashion_mnist import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD
from matmamba.devices import describe_device, resolve_device
from matmamba.flops import flops_per_item
from matmamba.generation import SamplingParams, sample_next, sampling_probs

from .batching import MicroBatcher
from .endpoint import WorkerEndpoint
from .results import ClassifyOutput, EdgeInfo, ScoreOutput, SegmentOutput, SegmentRequest

log = logging.getLogger(__name__)

# Generations whose state a worker keeps between segments; the least recently used is dropped
# (its next segment then re-reads its context, which is slower but still correct).
DEFAULT_MAX_SESSIONS = 256
# Length of the warm-up sequence (LM) run once at start-up.
WARMUP_TOKENS = 8
# A decode step on a session's live cache: the token (1,) -> the next logits (1, V).
Step = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Session:
    """A generation's state: the tokens it has read, its recurrent cache and the next-token logits."""

    ids: np.ndarray  # (L,) int64
    cache: InferenceCache
    logits: torch.Tensor  # (1, V)
    generator: torch.Generator | None
    # draft segments: position p -> (cache, logits) after reading ids[:p], for each token of the last segment
    checkpoints: dict[int, tuple[InferenceCache, torch.Tensor]] = field(default_factory=dict)


class EdgeWorker:
    """The narrow submodel at ``edge_level`` of ``checkpoint``, serving micro-batched requests."""

    def __init__(self, checkpoint: str | Path, edge_level: int, *, max_batch: int = 32, max_wait_ms: float = 2.0,
                 device: str = "auto", num_threads: int | None = None,
                 max_sessions: int = DEFAULT_MAX_SESSIONS, warm_levels: Sequence[int] = (),
                 cuda_graphs: bool = True) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = resolve_device(device)
        self.model = load_model(checkpoint, mrl_level=edge_level, device=self.device)
        self.is_lm = isinstance(self.model, MatMambaLM)
        self.edge_level = edge_level
        self.tokenizer = getattr(self.model, "tokenizer", None)
        self._bf16 = self.device.type == "cuda"  # as the cloud and evaluation: bf16 autocast on CUDA only
        self._mean_std = self._normalisation()
        # On CUDA, uint8 image batches replay a captured graph per bucket size (a narrow model is
        # launch-bound: eager one-image calls cost ~11 ms on an H100, most of it kernel launches).
        graphs = cuda_graphs and self._bf16
        self._graphs = BucketedForward(ForwardGraphs(self._classify_probs, autocast_dtype=torch.bfloat16),
                                       max_batch) if graphs and not self.is_lm else None
        # An LM's generation segments (drafts included) decode through one captured step per width: a session's
        # state is copied into the graph's cache for the segment and back after it (see _decoding).
        self._steps = DecodeGraphs(self.model, autocast_dtype=torch.bfloat16, slots_per_key=1) \
            if graphs and self.is_lm else None
        # Batches run on the event loop's thread (no executor): see edge/batching.py for why.
        self._batcher = MicroBatcher(self.run_batch, max_batch=max_batch, max_wait_s=max_wait_ms / 1e3,
                                     executor=None)
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._max_sessions = max_sessions
        self._info = self._describe()
        self._endpoint: WorkerEndpoint | None = None
        block = self.model.config.block
        for width in dict.fromkeys([self._info.edge_width, *(block.width_for_level(k) for k in warm_levels)]):
            self._warmup(width)
        report = self.model.load_report
        log.info("edge worker: %s level %d (width %d) on %s; read %.1f of %.1f MB in %.2f s", checkpoint,
                 edge_level, self._info.edge_width, self._info.device, report.bytes_read / 1e6,
                 report.file_bytes / 1e6, report.seconds)

    # ------------------------------------------------------------------ description

    def _normalisation(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.is_lm:
            return None
        shape = (1, -1, 1, 1)  # per channel over (N, C, H, W)
        channels = self.model.config.in_chans
        mean = torch.full((channels,), FMNIST_MEAN, device=self.device).view(shape)
        std = torch.full((channels,), FMNIST_STD, device=self.device).view(shape)
        return mean, std

    def _describe(self) -> EdgeInfo:
        cfg, report = self.model.config, self.model.load_report
        width = cfg.block.width_for_level(self.edge_level)
        common = dict(fingerprint=self.model.fingerprint or "", d_model=cfg.d_model, n_layer=cfg.n_layer,
                      levels=tuple(sorted(cfg.block.levels)), edge_level=self.edge_level, edge_width=width,
                      device=describe_device(self.device), flops_per_item=flops_per_item(cfg, width),
                      load_seconds=report.seconds, bytes_read=report.bytes_read, file_bytes=report.file_bytes,
                      host=socket.gethostname())
        if self.is_lm:
            tok = self.tokenizer
            return EdgeInfo(task="lm", vocab_size=cfg.vocab_size, eos_id=tok.eos_id if tok is not None else -1,
                            tokenizer=tok.kind if tok is not None else "", **common)
        fmnist = cfg.n_classes == len(FMNIST_CLASSES) and cfg.in_chans == 1
        return EdgeInfo(task="vision", num_classes=cfg.n_classes, class_names=FMNIST_CLASSES if fmnist else (),
                        image_size=cfg.image_size, channels=cfg.in_chans, patch_size=cfg.patch_size,
                        mean=(FMNIST_MEAN,) * cfg.in_chans, std=(FMNIST_STD,) * cfg.in_chans, **common)

    def info(self) -> EdgeInfo:
        """What this worker runs (task, fingerprint, widths, device, input format)."""
        return self._info

    def _width(self, width: int) -> int:
        return width or self._info.edge_width

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self._bf16 else contextlib.nullcontext()

    def _warmup(self, width: int) -> None:
        """One tiny batch at ``width`` (the first call at a width may compile or autotune kernels)."""
        if self.is_lm:
            self.score_batch(width, False, [np.zeros((1, WARMUP_TOKENS), dtype=np.int64)])
            if self._steps is not None:
                self._steps.warmup(1, widths=width)
        else:
            size, channels = self._info.image_size, self._info.channels
            for n in self._graphs.buckets if self._graphs is not None else (1,):  # every graph, captured now
                self.classify_batch(width, [np.zeros((n, channels, size, size), dtype=np.uint8)])

    # ------------------------------------------------------------------ batched compute

    def run_batch(self, key: tuple, payloads: Sequence[np.ndarray]) -> list:
        """The micro-batcher's entry point: key = ("classify", width, ...) or ("score", width, L, last_only)."""
        if key[0] == "classify":
            return self.classify_batch(key[1], payloads)
        return self.score_batch(key[1], key[3], payloads)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> the model's normalised float input; float input is taken as normalised already."""
        if images.dtype != torch.uint8:
            return images
        mean, std = self._mean_std
        return (images.float() / 255.0 - mean) / std

    def _classify_probs(self, width: int, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (n, C, H, W) on the device -> probabilities (n, classes) float32 (what the graphs capture)."""
        return self.model(self._normalise(images), widths=width).float().softmax(-1)

    @torch.inference_mode()
    def classify_batch(self, width: int, payloads: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Images of several requests, each (n_i, C, H, W) uint8 or normalised float32 -> probs (n_i, classes)."""
        splits = np.cumsum([p.shape[0] for p in payloads])[:-1]
        if self._graphs is not None and all(p.dtype == np.uint8 for p in payloads) \
                and self._graphs.fits(int(sum(p.shape[0] for p in payloads))):
            return np.split(self._graphs(self._width(width), list(payloads)), splits)
        # Arrays that came through Ray's object store are read-only: copy those (torch needs writable memory).
        parts = [self._normalise(torch.from_numpy(np.require(p, requirements="CW")).to(self.device)) for p in payloads]
        with self._autocast():
            logits = self.model(torch.cat(parts), widths=self._width(width))  # (sum n_i, classes)
        probs = logits.float().softmax(-1).cpu().numpy()
        return np.split(probs, splits)

    @torch.inference_mode()
    def score_batch(self, width: int, last_only: bool,
                    payloads: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Token ids of several requests, each (n_i, L) -> per request (logprobs, token_logprobs)."""
        ids = torch.from_numpy(np.concatenate(payloads)).to(self.device)  # (B, L)
        with self._autocast():
            logits = self.model(ids, widths=self._width(width))  # (B, L, V)
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, L, V)
        token = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, L-1)
        kept = logp[:, -1:] if last_only else logp
        cuts = np.cumsum([p.shape[0] for p in payloads])[:-1]
        return list(zip(np.split(kept.cpu().numpy(), cuts), np.split(token.cpu().numpy(), cuts)))

    # ------------------------------------------------------------------ requests (event loop)

    async def classify(self, images: np.ndarray, width: int = 0) -> ClassifyOutput:
        """Classify images (N, C, H, W) (uint8 pixels or normalised float32) at ``width`` (0 = edge width)."""
        key = ("classify", self._width(width), images.dtype.str, images.shape[1:])
        probs, timing = await self._batcher.submit(key, images, size=images.shape[0])
        return ClassifyOutput(probs, timing.queue_ms + timing.compute_ms, timing.batch_size)

    async def score(self, tokens: np.ndarray, width: int = 0, last_only: bool = True) -> ScoreOutput:
        """Next-token log-probabilities of token ids (N, L) at ``width`` (0 = edge width)."""
        key = ("score", self._width(width), tokens.shape[1], bool(last_only))
        (logprobs, token_logprobs), timing = await self._batcher.submit(key, tokens, size=tokens.shape[0])
        return ScoreOutput(logprobs, token_logprobs, timing.queue_ms + timing.compute_ms, timing.batch_size)

    async def generate_segment(self, request: SegmentRequest) -> SegmentOutput:
        """Generate one segment of up to ``request.max_new`` tokens after ``request.context``.

        Runs on the event loop's thread, like the micro-batches: one computation at a time.
        """
        return self._generate(request)

    async def start_endpoint(self) -> str:
        """Serve Classify and Score on a private Unix socket (the router's fast path); returns its address.

        Idempotent: a second call returns the address of the endpoint already running.
        """
        if self._endpoint is None:
            self._endpoint = await WorkerEndpoint.start(self)
        return self._endpoint.address

    async def stop_endpoint(self) -> None:
        """Close the private endpoint and remove its socket (before the worker is stopped)."""
        if self._endpoint is not None:
            await self._endpoint.stop()
            self._endpoint = None

    def end_session(self, session: str) -> None:
        """Forget a generation's state (the router calls it when the generation ends)."""
        self._sessions.pop(session, None)

    # ------------------------------------------------------------------ generation

    def _resume(self, session: _Session, context: np.ndarray) -> bool:
        """Bring ``session`` to ``context`` when they share a prefix it can start from: everything it has read,
        or the position of one of its checkpoints; the rest of the context is read in one pass."""
        ids, start = session.ids, None
        if context.size >= ids.size and np.array_equal(context[:ids.size], ids):
            start = ids.size
        else:
            for pos in sorted(session.checkpoints, reverse=True):
                if pos <= context.size and np.array_equal(context[:pos], ids[:pos]):
                    cache, logits = session.checkpoints[pos]
                    session.cache.copy_(cache)
                    session.logits, start = logits, pos
                    break
        if start is None:
            return False
        session.checkpoints.clear()
        if start < context.size:
            rest = torch.from_numpy(np.array(context[start:]))[None].to(self.device)  # (1, n)
            self.model.check_ids(rest)
            if rest.shape[1] == 1:  # one token (the cloud's, after a verification) is one recurrent step
                with self._decoding(session.cache) as (_, step):
                    session.logits = step(rest[:, 0])  # (1, V)
            else:
                with self._autocast():
                    session.logits = self.model.forward_unchecked(rest, session.cache.widths, session.cache)[:, -1]
        session.ids = context
        return True

    def _session_for(self, request: SegmentRequest) -> tuple[_Session, bool]:
        """The session continuing ``request.context`` (see _resume), or a new one that read it in one pass."""
        session = self._sessions.get(request.session)
        if session is not None and self._resume(session, np.asarray(request.context, dtype=np.int64)):
            return session, True
        ids = torch.from_numpy(np.array(request.context, dtype=np.int64))[None].to(self.device)  # (1, L), a copy
        cache = self.model.allocate_cache(1, widths=self._width(request.width))
        with self._autocast():
            logits = self.model(ids, cache=cache)[:, -1]  # (1, V)
        generator = None
        if request.seed is not None:  # a new seed per context length: segments never repeat a random stream
            generator = torch.Generator(device=self.device).manual_seed(request.seed + len(request.context))
        session = _Session(np.asarray(request.context, dtype=np.int64), cache, logits, generator)
        self._sessions[request.session] = session
        self._sessions.move_to_end(request.session)
        while len(self._sessions) > self._max_sessions:
            self._sessions.popitem(last=False)
        return session, False

    @contextlib.contextmanager
    def _decoding(self, cache: InferenceCache) -> Iterator[tuple[InferenceCache, Step]]:
        """(the live cache, step(token) -> next logits) for a segment's decode steps on ``cache``. Eager: ``cache``
        itself and ``model.step``. With CUDA graphs: the captured step's own cache, holding a copy of ``cache``
        that goes back into it at the end, and a replay per step (one launch instead of a few per layer; the
        logits are copied out of the graph's buffer, so a checkpoint may keep them)."""
        if self._steps is None:
            def eager(token: torch.Tensor) -> torch.Tensor:
                with self._autocast():
                    return self.model.step(token, cache)
            yield cache, eager
            return
        slot = self._steps.acquire(cache.widths, cache.batch_size)
        try:
            slot.cache.copy_(cache)

            def replay(token: torch.Tensor) -> torch.Tensor:
                logits = slot.advance(token).clone()
                slot.cache.seqlen += 1
                return logits
            yield slot.cache, replay
            cache.copy_(slot.cache)
        finally:
            self._steps.release(slot)

    @torch.inference_mode()
    def _generate(self, request: SegmentRequest) -> SegmentOutput:
        start = time.perf_counter()
        session, reused = self._session_for(request)
        params = SamplingParams(request.temperature, request.top_k, request.top_p)
        eos_id = self._info.eos_id if request.stop_at_eos and self._info.eos_id >= 0 else None
        tokens: list[int] = []
        logprobs: list[float] = []
        probs: list[torch.Tensor] = []
        with self._decoding(session.cache) as (cache, step):
            for _ in range(request.max_new):
                if request.draft:
                    session.checkpoints[session.ids.size + len(tokens)] = (cache.clone(), session.logits)
                    if not params.greedy:
                        probs.append(sampling_probs(session.logits, params)[0])
                token = sample_next(session.logits, params, session.generator)  # (1,)
                tokens.append(int(token[0]))
                logprobs.append(float(F.log_softmax(session.logits.float(), -1)[0, tokens[-1]]))
                if tokens[-1] == eos_id:
                    break
                session.logits = step(token)  # (1, V)
        eos = bool(tokens) and tokens[-1] == eos_id
        session.ids = np.concatenate([session.ids, np.asarray(tokens, dtype=np.int64)])
        if eos:
            self.end_session(request.session)
        drawn = torch.stack(probs).cpu().numpy() if probs else None  # (n, V)
        return SegmentOutput(tokens, logprobs, eos, (time.perf_counter() - start) * 1e3, reused, drawn)
