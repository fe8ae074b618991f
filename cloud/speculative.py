"""Verification of drafted tokens for cross-tier speculative decoding (the cloud side).

The edge drafts k tokens with its nested submodel; the cloud's full-width model (same weights)
checks them. Per session the replica keeps the model's recurrent state after every token of the
sequence except the last one, the *pending* token. One Verify:

1. reads ``[pending, d_1, ..., d_k]`` in one chunked forward pass from the session's state, with
   ``keep_states=True``: row i of the logits is the full model's next-token distribution after d_i
   (row 0 after pending), and the SSM/conv state after every position is recorded;
2. accepts the longest valid prefix d_1..d_n (:func:`accept_drafts`): greedy, the drafts equal to
   the argmax; sampling, the rejection rule of speculative sampling, after which the output follows
   the full model's distribution exactly. It then picks one token x itself: from the residual
   distribution at the first rejection, or from row k (a bonus token) when all k were accepted;
3. rolls the state back to "after d_n" (``cache.rewind(n + 1)``) and makes x the new pending token.

On CUDA a greedy round is one CUDA-graph replay (``matmamba.cuda_graphs.ChunkGraphs`` with the body
:func:`greedy_round`, one graph per chunk length captured at warm-up), then one read-back of ``k + 3``
numbers. With the fused decode kernels (no autocast, one sequence, k + 1 <= ``SHORT_CHUNK_MAX``) the
replay is the decode step's kernels run over the chunk's positions: per layer the norm + in_proj with
the chunk's causal conv in its epilogue, a scan over the positions (``kernels.ssd_chunk_triton``) and
the gated norm + out_proj; then one kernel for the acceptance and the log-probabilities
(``kernels.greedy_accept_triton``: argmax, first mismatch, log-softmax) and one for the rollback of
every layer (``InferenceCache.rewind_states``, ``kernels.rewind_select_triton``), the accepted length
never leaving the device. Elsewhere (autocast, batches, longer chunks) the forward pass is the chunked
path (mamba-ssm's chunked scan), the acceptance PyTorch ops, the rollback one Triton kernel per layer
(``kernels.ssd_rewind_triton``). A sampling round replays the forward pass alone (the default body)
and accepts and rolls back on the host, since its rejection rule draws from the session's own
generator; so does every round on the CPU, without graphs.

Rollback uses what the verification pass recorded (``keep_states``), not a second pass; recomputing
the accepted prefix instead would cost a second forward pass on every round with a rejection, i.e. up
to twice the cloud passes this feature exists to save. What is recorded depends on the path:

- *short chunk*: the state after every position (checkpointed, 128 KB a position and layer for the
  shipped LM). The scan kernel holds each of them in registers as it goes, so storing them costs a
  write, and the rollback is a copy of the kept position's state and conv window;
- *chunked scan*: per layer the scan's inputs for the chunk (x, dt, B: a few KB for k + 1 tokens), the
  conv window and the SSM state before the chunk; ``cache.rewind(n + 1)`` computes the one state it
  needs in closed form (``matmamba.kernels.ssd_state_after``, one small einsum per layer; on the
  device ``ssd_rewind_triton``). mamba-ssm's chunked scan returns the final state only, so states
  per position would be a second computation there.

With every draft accepted neither path computes anything for the rollback.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import numpy as np
import torch
import torch.nn.functional as F

from matmamba import kernels
from matmamba.backbone import InferenceCache
from matmamba.generation import SamplingParams, sampling_probs
from proto import matmamba_pb2 as pb
from proto.tensors import TensorFormatError, from_tensor_msg
from proto.validate import GenerateInputs, RequestError

if TYPE_CHECKING:  # the runner captures greedy_round's graphs, so it imports this module
    from .runner import ModelRunner

log = logging.getLogger(__name__)

# Rows of draft_probs must sum to 1 within this (float32 rounding of a softmax over the vocabulary).
PROB_SUM_TOLERANCE = 1e-3


@dataclass
class Session:
    """One generation's verifier state on this replica."""

    cache: InferenceCache  # the full model's state after every token but the pending one
    pending: int  # the last token of the sequence, not read yet
    position: int  # tokens of the sequence so far, pending included
    max_position: int  # prompt + max_tokens: the session may not grow past it
    params: SamplingParams
    generator: torch.Generator | None
    width: int
    busy: bool = False  # a Verify is running


@dataclass(frozen=True)
class Verdict:
    """What one verification round decided."""

    accepted: int
    next_token: int
    logprobs: list[float]  # under the full model at temperature 1: accepted drafts, then next_token
    compute_ms: float


def accept_drafts(logits: torch.Tensor, draft: torch.Tensor, draft_probs: torch.Tensor | None,
                  params: SamplingParams, generator: torch.Generator | None = None) -> tuple[int, int]:
    """The accepted prefix length n and the token after it.

    logits: (k+1, V) full-model logits, row i = the distribution of the token after draft i-1;
    draft: (k,) ids; draft_probs: (k, V) the distributions the drafts were sampled from (sampling only).
    Greedy: n = the first i where draft[i] != argmax(logits[i]), the token = that argmax.
    Sampling: draft i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection
    the token is drawn from normalize(max(0, p_i - q_i)); with all k accepted it is drawn from p_k.
    """
    k = draft.shape[0]
    if params.greedy:
        target = logits.argmax(-1)  # (k+1,)
        mismatch = (target[:k] != draft).nonzero()
        n = int(mismatch[0, 0]) if mismatch.numel() else k
        return n, int(target[n])
    p = sampling_probs(logits, params)  # (k+1, V)
    assert draft_probs is not None, "sampling verification needs the draft distributions"
    q = draft_probs.to(p)
    rows = torch.arange(k, device=p.device)
    ratio = p[rows, draft] / q[rows, draft]  # (k,)
    u = torch.rand(k, device=p.device, generator=generator)
    rejected = (u >= ratio).nonzero()
    if not rejected.numel():
        return k, int(torch.multinomial(p[k], 1, generator=generator))
    n = int(rejected[0, 0])
    residual = (p[n] - q[n]).clamp(min=0)
    if float(residual.sum()) <= 0:  # p == q up to rounding: rejection then has probability ~0
        residual = p[n]
    return n, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))


def parse_draft(request: pb.VerifyRequest, session: Session, vocab_size: int, max_draft: int) -> tuple[
        np.ndarray, np.ndarray | None]:
    """The drafted ids (k,) and, when sampling, their distributions (k, V); RequestError on bad input."""
    draft = np.asarray(request.draft_token_ids, dtype=np.int64)
    k = draft.size
    if k > max_draft:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{k} drafted tokens; at most {max_draft} per Verify (--max-draft-tokens)")
    if k and (draft.min() < 0 or draft.max() >= vocab_size):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"drafted ids must be in [0, {vocab_size}); got {draft.min()}..{draft.max()}")
    if session.position + k + 1 > session.max_position:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"the session holds {session.position} tokens; {k} drafts + 1 would pass its length "
                           f"{session.max_position} (prompt + max_tokens); draft fewer or open a longer session")
    if session.params.greedy or k == 0:
        return draft, None
    return draft, _draft_probs(request, draft, vocab_size)


def _draft_probs(request: pb.VerifyRequest, draft: np.ndarray, vocab_size: int) -> np.ndarray:
    k = draft.size
    if not request.HasField("draft_probs"):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           "the session samples (temperature > 0), so Verify needs draft_probs: the distribution "
                           f"each draft was sampled from, FLOAT32 ({k}, {vocab_size})")
    msg = request.draft_probs
    if msg.dtype != pb.FLOAT32 or list(msg.shape) != [k, vocab_size]:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"draft_probs must be FLOAT32 of shape ({k}, {vocab_size}); got "
                           f"{pb.DType.Name(msg.dtype)} {list(msg.shape)}")
    try:
        q = from_tensor_msg(msg, max_elements=k * vocab_size)
    except TensorFormatError as err:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"draft_probs: {err}") from None
    sums = q.sum(-1)
    if not np.isfinite(q).all() or (q < 0).any() or np.abs(sums - 1).max() > PROB_SUM_TOLERANCE:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           "draft_probs rows must be finite, >= 0 and sum to 1 (probabilities, not logits)")
    if (q[np.arange(k), draft] <= 0).any():
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           "draft_probs give a drafted token probability 0; send the distribution it was drawn from")
    return q


class Verifier:
    """Opens sessions and verifies drafts on a ModelRunner (call from one worker thread at a time)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.passes = 0  # forward passes run (prompts and verifications), for the metrics

    def open(self, inputs: GenerateInputs) -> tuple[Session, float]:
        """Read all but the prompt's last token; returns the session and the compute milliseconds."""
        start, runner = time.perf_counter(), self.runner
        cache = runner.model.allocate_cache(1, widths=inputs.width)
        prompt = inputs.prompt_ids
        if prompt.size > 1:
            ids = torch.from_numpy(np.ascontiguousarray(prompt[:-1]))[None].to(runner.device)  # (1, L-1)
            with torch.inference_mode(), runner.autocast():
                runner.model(ids, cache=cache)
            self.passes += 1
        generator = None
        if inputs.seed is not None:
            generator = torch.Generator(device=runner.device).manual_seed(inputs.seed)
        params = SamplingParams(inputs.temperature, inputs.top_k, inputs.top_p)
        session = Session(cache, int(prompt[-1]), int(prompt.size), int(prompt.size) + inputs.max_tokens, params,
                          generator, inputs.width)
        return session, (time.perf_counter() - start) * 1e3

    @torch.inference_mode()
    def verify(self, session: Session, draft: np.ndarray, draft_probs: np.ndarray | None) -> Verdict:
        """One round (see the module docstring); updates ``session``."""
        start, runner = time.perf_counter(), self.runner
        ids = torch.from_numpy(np.concatenate([[session.pending], draft]).astype(np.int64))[None]  # (1, k+1)
        rounds = runner.round_graphs
        if session.params.greedy and rounds is not None and rounds.captured(session.cache.widths, 1, ids.shape[1]):
            out = rounds(ids, session.cache).tolist()  # the whole round on the device; ids checked on the host
            n, token, logprobs = int(out[0]), int(out[1]), out[2:3 + int(out[0])]
            session.cache.seqlen -= ids.shape[1] - (n + 1)
        else:
            n, token, logprobs = self._verify_on_host(session, ids, draft_probs)
        self.passes += 1
        session.pending, session.position = token, session.position + n + 1
        return Verdict(n, token, logprobs, (time.perf_counter() - start) * 1e3)

    def _verify_on_host(self, session: Session, ids: torch.Tensor, draft_probs: np.ndarray | None) -> tuple[
            int, int, list[float]]:
        """A round whose acceptance and rollback run on the host: sampling, or no captured round graph."""
        runner = self.runner
        graphs = runner.chunk_graphs
        if graphs is not None and graphs.captured(session.cache.widths, 1, ids.shape[1]):
            logits = graphs(ids, session.cache)[0].float()  # (k+1, V); the graph runs its own autocast
        else:
            with runner.autocast():
                logits = runner.model(ids.to(runner.device), cache=session.cache, keep_states=True)[0].float()
        q = None if draft_probs is None else torch.from_numpy(draft_probs).to(runner.device)
        n, token = accept_drafts(logits, ids[0, 1:].to(runner.device), q, session.params, session.generator)
        session.cache.rewind(n + 1)
        emitted = torch.tensor([*ids[0, 1:n + 1].tolist(), token], device=runner.device)
        logprobs = F.log_softmax(logits[:n + 1], -1).gather(-1, emitted[:, None])[:, 0]
        return n, token, logprobs.cpu().tolist()


def greedy_round(model: torch.nn.Module, ids: torch.Tensor, widths: tuple[int, ...],
                 cache: InferenceCache) -> torch.Tensor:
    """A whole greedy verification round on the device, with no host sync: what a round graph captures.

    ids: (1, k+1) = [pending, d_1..d_k]. Reads the chunk, accepts the drafts equal to the full model's
    argmax up to the first mismatch (n of them), takes the argmax after them as the next token, rolls
    ``cache``'s states back to "after d_n" (its ``seqlen`` is the caller's) and returns, as float64
    (k+3,): [n, next token, log-probability of each emitted token (d_1..d_n, then the next token), then
    k - n unused entries]. Same arithmetic as ``accept_drafts`` with greedy params, then ``rewind(n + 1)``.
    """
    logits = model.forward_unchecked(ids, widths, cache, keep_states=True)[0].float()  # (k+1, V)
    if kernels.use_greedy_accept(logits):
        out, keep = kernels.greedy_accept_triton(logits, ids[0])
        cache.rewind_states(keep)
        return out
    target = logits.argmax(-1)  # (k+1,)
    draft = ids[0, 1:]
    n = torch.cumprod(target[:-1] == draft, dim=0).sum()  # leading matches; 0-dim int64
    token = target.gather(0, n.view(1))  # (1,)
    cache.rewind_states(n + 1)
    positions = torch.arange(ids.shape[1], device=ids.device)
    emitted = torch.where(positions < n, torch.cat([draft, token]), token)  # (k+1,): d_1..d_n, token, ...
    logprobs = F.log_softmax(logits, -1).gather(-1, emitted[:, None])[:, 0]
    return torch.cat([n.view(1).double(), token.double(), logprobs.double()])
