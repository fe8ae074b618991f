"""Cross-tier speculative decoding in one process: a nested drafter and the cloud's Verifier, no RPC.

The router's algorithm (router/speculative.py) in its simplest synchronous form: the edge's
submodel (the same weights at a narrower width) drafts k tokens by recurrent steps, snapshotting
its state before each; one ``Verifier.verify`` checks them in one cloud pass; the drafter rolls
back to the state after the accepted drafts and reads the cloud's token. Used by the model-level
tests (tests/test_speculative.py), the GPU profile (bench/verify_profile.py) and the per-level
table on either device (bench/spec_levels.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from cloud.speculative import Verdict, Verifier
from matmamba.generation import SamplingParams, sample_next, sampling_probs
from proto.validate import GenerateInputs
from router.draft_length import DraftLength

GREEDY = SamplingParams(0.0)


@dataclass
class SpeculativeRun:
    tokens: list[int]  # the n generated tokens
    rounds: int  # verification rounds (cloud passes after the prompt's)
    drafted: int
    accepted: int  # drafts the cloud accepted


@torch.inference_mode()
def speculate(verifier: Verifier, prompt: Sequence[int], n: int, width: int, k: int | DraftLength, *,
              drafter: torch.nn.Module | None = None, params: SamplingParams = GREEDY, seed: int | None = None,
              verify: Callable[..., Verdict] | None = None) -> SpeculativeRun:
    """Generate n tokens speculatively.

    width: the drafter's nested width. k: drafts per round, fixed, or a ``DraftLength`` that adapts it
    to the acceptance as the router does. drafter: the model that drafts (default: the verifier's own
    model, at ``width``). verify: what calls ``verifier.verify`` (default: the call itself; a timer
    may wrap it). seed: sampling seed of the cloud session; the drafter samples from seed + 1.
    """
    runner = verifier.runner
    model = drafter if drafter is not None else runner.model
    device = next(model.parameters()).device
    verify = verify or verifier.verify
    length = k if isinstance(k, DraftLength) else None
    most = length.max_k if length is not None else k
    session, _ = verifier.open(GenerateInputs(np.asarray(prompt, dtype=np.int64), n + most + 1, params.temperature,
                                              params.top_k, params.top_p, seed, runner.config.d_model, ""))
    cache = model.allocate_cache(1, widths=width)
    logits = model(torch.tensor([list(prompt)], device=device), cache=cache)[:, -1]
    gen = torch.Generator(device=device).manual_seed(seed + 1) if seed is not None else None
    run = SpeculativeRun([], 0, 0, 0)
    while len(run.tokens) < n:
        drafts_now = length.k if length is not None else k
        drafts, probs, snapshots = [], [], []
        for _ in range(drafts_now):
            snapshots.append(cache.clone())
            if not params.greedy:
                probs.append(sampling_probs(logits, params)[0])
            token = sample_next(logits, params, gen)
            drafts.append(int(token))
            logits = model.step(token, cache)
        q = torch.stack(probs).cpu().numpy() if not params.greedy else None
        verdict = verify(session, np.asarray(drafts, dtype=np.int64), q)
        if length is not None:
            length.update(drafts_now, verdict.accepted)
        run.rounds += 1
        run.drafted += drafts_now
        run.accepted += verdict.accepted
        run.tokens += drafts[:verdict.accepted] + [verdict.next_token]
        if verdict.accepted < drafts_now:  # back to the state after the accepted drafts
            cache.copy_(snapshots[verdict.accepted])
        logits = model.step(torch.tensor([verdict.next_token], device=device), cache)
    run.tokens = run.tokens[:n]
    return run


class CloudTimer(Protocol):
    """Accumulates the cloud's cost of the calls made through ``measure``, in ms per named measure."""

    ms: dict[str, float]

    def measure(self, fn: Callable[..., Any], *args: Any) -> Any: ...


class WallTime:
    """The wall time of each call (the cloud's cost on a CPU, where the calling thread does the work)."""

    def __init__(self) -> None:
        self.ms = {"wall": 0.0}

    def measure(self, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        result = fn(*args)
        self.ms["wall"] += (time.perf_counter() - start) * 1e3
        return result


def level_row(runner, drafter: torch.nn.Module, prompts: Sequence[Sequence[int]], level: int, max_k: int,
              tokens: int, timer: Callable[[], CloudTimer]) -> dict[str, Any]:
    """Cloud-only against speculative decoding at one edge level, greedy, side by side per prompt.

    Cloud-only is ``runner.generate``; speculative is ``speculate`` with k adaptive up to max_k
    (``DraftLength``, the router's rule) and ``drafter`` at the level's width. ``timer()`` makes one
    timer per mode; for each of its measures the row has ``cloud_only_<m>_ms_per_token``,
    ``spec_<m>_ms_per_token`` and ``<m>_ratio`` (cloud-only / speculative: above 1, speculative is cheaper).
    """
    width = runner.config.d_model // level
    base, spec = timer(), timer()
    tokens_base = tokens_spec = rounds = drafted = accepted = 0
    identical = True
    verifier = Verifier(runner)
    for prompt in prompts:
        inputs = GenerateInputs(np.asarray(prompt, dtype=np.int64), tokens, 0.0, 0, 1.0, None,
                                runner.config.d_model, "level")
        ref: list[int] = []
        base.measure(runner.generate, inputs, threading.Event(), lambda token, logprob, ref=ref: ref.append(token))
        tokens_base += len(ref)
        run = speculate(verifier, list(prompt), tokens, width, DraftLength(max_k), drafter=drafter,
                        verify=lambda *call: spec.measure(verifier.verify, *call))
        rounds, drafted, accepted = rounds + run.rounds, drafted + run.drafted, accepted + run.accepted
        identical &= run.tokens == ref
        tokens_spec += len(run.tokens)
    row = {"level": level, "width": width, "identical": identical, "rounds": rounds, "tokens": tokens_spec,
           "drafts_accepted": accepted / drafted, "tokens_per_round": tokens_spec / rounds,
           "passes_per_token": rounds / tokens_spec}
    for name in base.ms:
        row[f"cloud_only_{name}_ms_per_token"] = base.ms[name] / tokens_base
        row[f"spec_{name}_ms_per_token"] = spec.ms[name] / tokens_spec
        row[f"{name}_ratio"] = row[f"cloud_only_{name}_ms_per_token"] / row[f"spec_{name}_ms_per_token"]
    return row
