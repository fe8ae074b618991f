"""What an edge worker returns (plain dataclasses of numpy arrays; no torch, cheap to pickle through Ray)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EdgeInfo:
    """Description of the narrow submodel an edge worker runs."""

    task: str  # "vision" or "lm"
    fingerprint: str  # sha256 of the checkpoint (verified when it was loaded)
    d_model: int
    n_layer: int
    levels: tuple[int, ...]  # nesting levels of the checkpoint, ascending (1 = full width)
    edge_level: int
    edge_width: int  # d_model // edge_level: the widest width this worker can run
    device: str  # e.g. "cpu" or "cuda:0 (NVIDIA H100 80GB HBM3)"
    load_seconds: float
    bytes_read: int  # weight bytes partial loading read
    file_bytes: int  # size of the weights file
    # vision
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    image_size: int = 0
    channels: int = 0
    patch_size: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    # language model
    vocab_size: int = 0
    eos_id: int = -1
    tokenizer: str = ""  # tokenizer kind, e.g. "bpe" or "byte"; "" when the checkpoint has none
    flops_per_item: int = 0  # forward FLOPs of one image (vision) or token (LM) at edge_width
    host: str = ""  # host name of the worker's machine (its private endpoint is reachable from this host only)

    @property
    def widths(self) -> tuple[int, ...]:
        """Widths this worker can run (its edge width and the narrower levels), widest first."""
        return tuple(self.d_model // k for k in self.levels if k >= self.edge_level)


@dataclass(frozen=True)
class ClassifyOutput:
    """Edge answer for the images of one request."""

    probs: np.ndarray  # (N, num_classes) float32 softmax
    edge_ms: float  # in the worker: waiting for its micro-batch, then the batch's model time
    batch_size: int  # images in that micro-batch


@dataclass(frozen=True)
class ScoreOutput:
    """Edge answer for the sequences of one Score request."""

    logprobs: np.ndarray  # (N, L, V), or (N, 1, V) when last_only; float32
    token_logprobs: np.ndarray  # (N, L-1) float32: log p(tokens[:, t+1] | tokens[:, :t+1])
    edge_ms: float  # in the worker: waiting for its micro-batch, then the batch's model time
    batch_size: int  # sequences in that micro-batch


@dataclass(frozen=True)
class SegmentRequest:
    """Generate up to ``max_new`` tokens after ``context`` (one generation, one segment)."""

    session: str  # generation id: the worker keeps its recurrent state between segments of one session
    context: np.ndarray  # (L,) int64: prompt + tokens accepted so far
    max_new: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    width: int = 0  # 0 = the edge width
    stop_at_eos: bool = True
    # Speculative drafting: return each token's sampling distribution (SegmentOutput.probs) and keep a
    # checkpoint of the state before each token, so that a next context keeping only some of these
    # tokens (the ones the cloud accepted, then its own) continues from there instead of re-reading.
    draft: bool = False


@dataclass(frozen=True)
class SegmentOutput:
    """Tokens of one generated segment and their log-probabilities under the edge model (temperature 1)."""

    tokens: list[int]
    logprobs: list[float]
    eos: bool  # the segment ends with the end-of-sequence token
    compute_ms: float
    reused_state: bool = False  # True when the worker continued its cached state instead of re-reading the context
    # draft requests that sample: the distribution each token was drawn from (after temperature, top-k,
    # top-p), (len(tokens), vocab_size) float32; None otherwise (greedy drafts need none)
    probs: np.ndarray | None = None
