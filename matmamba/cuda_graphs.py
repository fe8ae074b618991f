"""CUDA graphs for the small-batch paths: a captured graph replays every kernel of a decode
step (or of a whole forward) with one launch, so narrow widths stop paying Python and launch costs.

    graphs = DecodeGraphs(model)                                    # a MatMambaLM on CUDA
    ids = graphs.generate(prompt, 64, mrl_level=4, temperature=0)   # = model.generate(...), token for token

    forward = ForwardGraphs(lambda width, x: model(x, widths=width).softmax(-1))
    probs = forward(192, images)    # one graph per (key, shape, dtype); the result is the graph's buffer
    rows = BucketedForward(forward, max_batch=32)(192, [host_images])  # host arrays in, host rows out
    chunks = ChunkGraphs(model)
    logits = chunks(ids, cache)     # = model(ids, cache=cache, keep_states=True), one launch; cache.rewind works
    rounds = ChunkGraphs(model, body=fn)  # any fn(model, ids, widths, cache) -> tensor, e.g. a verification round

Decoding: each (widths, batch) gets a recurrent cache allocated once and a graph of one
`model.step` on it. The prompt runs through the eager parallel forward into that cache, then
every new token is one replay. Graphs are pooled: concurrent generations (threads) each take a
free one, and a new one is captured when none is free.

Autocast: pass `autocast_dtype` (e.g. torch.bfloat16) instead of calling under `torch.autocast`;
warm-up, capture and prefill then run under autocast with its weight-cast cache off (a cached
cast would be freed when the caller's autocast exits, and the graph would read freed memory).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .backbone import InferenceCache, WidthSpec
from .generation import SamplingParams, sample_stream

# Eager runs before a capture: Triton autotuning and the blocks' slice caches happen here.
WARMUP_RUNS = 2


def _autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype, cache_enabled=False)


def capture(fn: Callable[[], object], autocast_dtype: torch.dtype | None = None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Warm ``fn`` up on a side stream, then capture one call of it. Returns the graph and fn's outputs
    (the graph's static buffers: each replay rewrites them)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), _autocast(autocast_dtype):
        for _ in range(WARMUP_RUNS):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads may allocate or launch while this one captures.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"), _autocast(autocast_dtype):
        out = fn()
    return graph, out


# ---------------------------------------------------------------- decoding


@dataclass
class _DecodeSlot:
    """One captured decode step: its cache, its input token buffer and its logits buffer."""

    cache: InferenceCache
    token: torch.Tensor  # (batch,) int64: the token the next replay consumes
    logits: torch.Tensor  # (batch, vocab): written by each replay
    graph: torch.cuda.CUDAGraph

    def advance(self, token: torch.Tensor) -> torch.Tensor:
        """Replay the step on ``token`` (batch,); returns the logits buffer."""
        self.token.copy_(token)
        self.graph.replay()
        return self.logits

    def reset(self) -> None:
        for state in self.cache.states:
            state.conv.zero_()
            state.ssm.zero_()
        self.cache.seqlen = 0


class DecodeGraphs:
    """CUDA-graph decoding for a MatMambaLM: same tokens as its eager `generate_stream`, one launch a token.

    ``slots_per_key`` caps the graphs (and caches) per (widths, batch): a generation that finds all
    of them busy waits for one. Capture graphs while no other thread uses the GPU (``warmup`` at
    start-up): work on the legacy default stream during a capture invalidates it.
    """

    def __init__(self, model: torch.nn.Module, *, autocast_dtype: torch.dtype | None = None,
                 slots_per_key: int | None = None) -> None:
        device = model.lm_head.weight.device
        if device.type != "cuda":
            raise ValueError(f"DecodeGraphs needs the model on a CUDA device, it is on {device}")
        if slots_per_key is not None and slots_per_key <= 0:
            raise ValueError(f"slots_per_key must be positive (or None for no cap), got {slots_per_key}")
        self.model, self.device, self.autocast_dtype = model, device, autocast_dtype
        self.slots_per_key = slots_per_key
        self._free: dict[tuple[tuple[int, ...], int], list[_DecodeSlot]] = {}
        self._count: dict[tuple[tuple[int, ...], int], int] = {}  # slots captured per key
        self._cond = threading.Condition()

    @property
    def captured(self) -> int:
        """Graphs captured so far."""
        return sum(self._count.values())

    @torch.inference_mode()
    def _capture_slot(self, widths: tuple[int, ...], batch: int) -> _DecodeSlot:
        cache = self.model.backbone.allocate_cache(batch, widths, self.device)
        token = torch.zeros(batch, dtype=torch.int64, device=self.device)
        graph, logits = capture(lambda: self.model.step(token, cache), self.autocast_dtype)
        return _DecodeSlot(cache, token, logits, graph)

    def acquire(self, widths: tuple[int, ...], batch: int) -> _DecodeSlot:
        """A free slot for (widths, batch): a captured one, a new capture, or (at the cap) the next released."""
        key = (widths, batch)
        with self._cond:
            while not self._free.get(key):
                if self.slots_per_key is None or self._count.get(key, 0) < self.slots_per_key:
                    self._count[key] = self._count.get(key, 0) + 1
                    break
                self._cond.wait()
            else:
                return self._free[key].pop()
        try:
            return self._capture_slot(widths, batch)
        except BaseException:
            with self._cond:
                self._count[key] -= 1
                self._cond.notify()
            raise

    def release(self, slot: _DecodeSlot) -> None:
        with self._cond:
            self._free.setdefault((slot.cache.widths, slot.cache.batch_size), []).append(slot)
            self._cond.notify()

    def warmup(self, batch: int, *, mrl_level: int | None = None, widths: WidthSpec | None = None,
               slots: int = 1) -> None:
        """Capture ``slots`` graphs for (widths, batch) ahead of the first requests."""
        spec = self.model.backbone.resolve_widths(mrl_level, widths)
        taken = [self.acquire(spec, batch) for _ in range(slots)]
        for slot in taken:
            self.release(slot)

    @torch.inference_mode()
    def generate_stream(self, input_ids: torch.Tensor, max_new_tokens: int, *, mrl_level: int | None = None,
                        widths: WidthSpec | None = None, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, eos_id: int | None = None,
                        generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """As MatMambaLM.generate_stream: yield (tokens (batch,), log-probs (batch,)) one step at a time."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        params = SamplingParams(temperature, top_k, top_p)
        spec = self.model.backbone.resolve_widths(mrl_level, widths)
        slot = self.acquire(spec, input_ids.shape[0])
        try:
            slot.reset()
            with _autocast(self.autocast_dtype):
                logits = self.model(input_ids, cache=slot.cache)[:, -1]
            yield from sample_stream(logits, slot.advance, max_new_tokens, params, eos_id, generator)
        finally:
            self.release(slot)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Prompt (batch, length) -> prompt plus new tokens (batch, length + n); kwargs as generate_stream."""
        new = [token for token, _ in self.generate_stream(input_ids, max_new_tokens, **kwargs)]
        if not new:
            return input_ids
        return torch.cat([input_ids, torch.stack(new, dim=1).to(input_ids.dtype)], dim=1)


# ---------------------------------------------------------------- short chunks read from a cache


@dataclass
class _ChunkSlot:
    cache: InferenceCache  # the graph's own cache: a caller's state is copied in before each replay
    ids: torch.Tensor  # (batch, length) int64
    out: torch.Tensor  # the body's output (logits (batch, length, vocab) by default): written by each replay
    graph: torch.cuda.CUDAGraph


# What ChunkGraphs captures: (model, ids (batch, length), widths, the graph's cache) -> one output tensor.
ChunkBody = Callable[[torch.nn.Module, torch.Tensor, tuple[int, ...], InferenceCache], torch.Tensor]


def traced_logits(model: torch.nn.Module, ids: torch.Tensor, widths: tuple[int, ...],
                  cache: InferenceCache) -> torch.Tensor:
    """ChunkGraphs' default body: ``model(ids, cache=cache, keep_states=True)`` without its host-side checks."""
    return model.forward_unchecked(ids, widths, cache, keep_states=True)


class ChunkGraphs:
    """``body(model, ids, widths, cache)`` captured per (widths, batch, length) and replayed after; the default
    body is ``model(ids, cache=cache, keep_states=True)`` (its unchecked forward).

    For speculative verification: each round reads a short chunk (the pending token and k drafts) from a
    session's cache, a forward pass of a few hundred kernels that is launch-bound on a GPU. A replay
    copies the session's state into the graph's cache (one multi-tensor copy), replays, copies the new
    state back and hands the session the traces the graph's cache recorded, so that ``cache.rewind(n)``
    works as after the eager call (a body that rewinds inside the graph leaves none). The traces and the
    returned tensor are the graph's buffers: use them (rewind, sample) before the next call. Not
    thread-safe: call from one thread; capture while no other thread uses the GPU (``warmup`` at start-up).
    ``capture_fn`` is :func:`capture` (tests pass an eager stand-in).
    """

    def __init__(self, model: torch.nn.Module, *, autocast_dtype: torch.dtype | None = None,
                 body: ChunkBody = traced_logits, capture_fn: Callable[..., tuple] = capture) -> None:
        self.model, self.autocast_dtype, self.body, self._capture = model, autocast_dtype, body, capture_fn
        self._slots: dict[tuple[tuple[int, ...], int, int], _ChunkSlot] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def captured(self, widths: tuple[int, ...], batch: int, length: int) -> bool:
        """Whether a call with this cache and chunk shape replays a graph captured earlier."""
        return (widths, batch, length) in self._slots

    @torch.inference_mode()
    def _slot(self, widths: tuple[int, ...], batch: int, length: int) -> _ChunkSlot:
        slot = self._slots.get((widths, batch, length))
        if slot is None:
            device = self.model.lm_head.weight.device
            cache = self.model.backbone.allocate_cache(batch, widths, device)
            ids = torch.zeros(batch, length, dtype=torch.int64, device=device)
            graph, out = self._capture(lambda: self.body(self.model, ids, widths, cache), self.autocast_dtype)
            slot = self._slots[(widths, batch, length)] = _ChunkSlot(cache, ids, out, graph)
        return slot

    def warmup(self, widths: tuple[int, ...], lengths: range, batch: int = 1) -> None:
        """Capture a graph per chunk length ahead of the first requests."""
        for length in lengths:
            self._slot(widths, batch, length)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """ids (batch, length) -> the body's output (logits (batch, length, vocab) by default); updates ``cache``.

        Pass ``ids`` on the host where they come from there: they are checked there, at no device sync, and
        copied in; ids on the device are checked with one read-back (an out-of-vocabulary id inside a replay
        would fault the whole CUDA context).
        """
        self.model.check_ids(ids)
        batch, length = ids.shape
        slot = self._slot(cache.widths, batch, length)
        statics = [t for s in slot.cache.states for t in (s.conv, s.ssm)]
        states = [t for s in cache.states for t in (s.conv, s.ssm)]
        torch._foreach_copy_(statics, states)
        slot.ids.copy_(ids)
        slot.graph.replay()
        torch._foreach_copy_(states, statics)
        for static, state in zip(slot.cache.states, cache.states):
            state.trace = static.trace
        cache.seqlen += length
        return slot.out


# ---------------------------------------------------------------- whole forwards


@dataclass
class _ForwardGraph:
    input: torch.Tensor
    output: torch.Tensor
    graph: torch.cuda.CUDAGraph


class ForwardGraphs:
    """``fn(key, x)`` captured once per (key, x.shape, x.dtype) and replayed after.

    Not thread-safe: call from one thread (the cloud runner's batch executor), and use the
    returned tensor (the graph's output buffer) before the next call.
    """

    def __init__(self, fn: Callable[[Hashable, torch.Tensor], torch.Tensor], *,
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.fn, self.autocast_dtype = fn, autocast_dtype
        self._graphs: dict[tuple, _ForwardGraph] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    @torch.inference_mode()
    def __call__(self, key: Hashable, x: torch.Tensor) -> torch.Tensor:
        entry = self._graphs.get((key, tuple(x.shape), x.dtype))
        if entry is None:
            static = torch.empty(x.shape, dtype=x.dtype, device="cuda")
            static.copy_(x)
            graph, out = capture(lambda: self.fn(key, static), self.autocast_dtype)
            entry = self._graphs[(key, tuple(x.shape), x.dtype)] = _ForwardGraph(static, out, graph)
        entry.input.copy_(x, non_blocking=True)
        entry.graph.replay()
        return entry.output


def graph_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes a bucketed graph path captures: powers of two below max_batch, and max_batch.

    A batch of n rows runs in the smallest bucket >= n (the extra rows compute and are dropped).
    """
    sizes = {max_batch}
    size = 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


class BucketedForward:
    """Host batches of up to ``max_batch`` rows through ``graphs`` at bucket sizes (:func:`graph_buckets`).

    One call: the payloads are concatenated into a reused page-locked buffer of the smallest bucket
    that holds them, copied to the GPU once, replayed once, and the first n output rows copied
    back. Not thread-safe (as ForwardGraphs).
    """

    def __init__(self, graphs: ForwardGraphs, max_batch: int) -> None:
        self.graphs, self.buckets = graphs, graph_buckets(max_batch)
        self._pinned: dict[tuple, torch.Tensor] = {}  # page-locked host buffers by (shape, dtype)

    def fits(self, rows: int) -> bool:
        return rows <= self.buckets[-1]

    def _buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = self._pinned.get((shape, dtype))
        if buf is None:
            buf = self._pinned[(shape, dtype)] = torch.empty(shape, dtype=dtype, pin_memory=True)
        return buf

    def __call__(self, key: Hashable, payloads: list[np.ndarray]) -> np.ndarray:
        """``payloads`` (n_i, ...) of one dtype and row shape -> the graph's output rows (sum n_i, ...) on the host."""
        n = sum(p.shape[0] for p in payloads)
        bucket = next(b for b in self.buckets if b >= n)
        host_in = self._buffer((bucket, *payloads[0].shape[1:]), torch.from_numpy(payloads[0][:0]).dtype)
        np.concatenate(payloads, out=host_in.numpy()[:n])
        out = self.graphs(key, host_in)
        host_out = self._buffer(tuple(out.shape), out.dtype)
        host_out.copy_(out, non_blocking=True)
        torch.cuda.current_stream(out.device).synchronize()
        return host_out.numpy()[:n].copy()
