"""Speculative verification's short-chunk kernels (`MatMamba2.chunk_prenorm`, `kernels.ssd_chunk_triton`,
`kernels.rewind_select_triton`, `kernels.greedy_accept_triton`) against the decode step and the PyTorch acceptance,
on the CPU through Triton's interpreter (in a child pytest: see tests/conftest.py) and on the GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cloud.speculative import accept_drafts, greedy_round
from matmamba import kernels
from matmamba.backbone import InferenceCache
from matmamba.generation import SamplingParams

from .conftest import interpreted, run_interpreted, small_lm

GREEDY = SamplingParams(0.0, 0, 1.0)


def test_interpreted_cases() -> None:
    run_interpreted(__file__)


def _stepped(model: torch.nn.Module, ids: torch.Tensor, cache) -> tuple[torch.Tensor, list]:
    """The decode path over ids (L,) one token at a time: logits (L, V) and a clone of the cache after each."""
    logits, after = [], []
    for token in ids:
        logits.append(model.step(token.view(1), cache)[0])
        after.append(cache.clone())
    return torch.stack(logits), after


def _chunked(model: torch.nn.Module, ids: torch.Tensor, cache) -> torch.Tensor:
    """The short-chunk path over ids (L,) from cache (what `NestedStack.forward` runs on CUDA): logits (L, V)."""
    backbone = model.backbone
    h = backbone._short_chunk(backbone.embedding(ids), cache)
    return model._head(h)


def _prefilled(model: torch.nn.Module, level: int, seed: int):
    cache = model.allocate_cache(1, level)
    prompt = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(seed))
    model(prompt, cache=cache)
    return cache


@interpreted
@pytest.mark.parametrize("level,length", [(1, 9), (2, 5), (4, 1), (1, 3)])
@torch.inference_mode()
def test_chunk_equals_the_decode_steps_and_records_every_state(level: int, length: int) -> None:
    """L positions in one pass give the logits, the final state and the state after each position that L decode
    steps give (conv window of 4: chunks shorter than it mix the old conv state in)."""
    model = small_lm(seed=level + length, n_layer=2, d_model=64, headdim=8, d_state=16)
    ids = torch.randint(0, model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(length))
    start = _prefilled(model, level, seed=level)
    stepped_cache, chunk_cache = start.clone(), start.clone()
    expected, after = _stepped(model, ids, stepped_cache)
    got = _chunked(model, ids, chunk_cache)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert chunk_cache.seqlen == stepped_cache.seqlen
    for mine, theirs in zip(chunk_cache.states, stepped_cache.states):
        torch.testing.assert_close(mine.conv, theirs.conv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.ssm, theirs.ssm, atol=1e-5, rtol=1e-5)
        assert mine.trace is not None and mine.trace.length == length
    for t, cache in enumerate(after):
        for mine, theirs in zip(chunk_cache.states, cache.states):
            torch.testing.assert_close(mine.trace.states[t], theirs.ssm, atol=1e-5, rtol=1e-5)
    assert not torch.equal(start.states[0].ssm, chunk_cache.states[0].ssm)  # the chunk moved the state


def _unevenly_placed(cache: InferenceCache) -> InferenceCache:
    """A copy of ``cache`` whose layers' SSM states lie in one buffer at uneven gaps: never one stride apart (a
    clone's separate allocations may happen to be)."""
    out = cache.clone()
    numel = out.states[0].ssm.numel()
    buffer = torch.empty(len(out.states) * numel + len(out.states) ** 2)
    for i, state in enumerate(out.states):
        start = i * numel + i * i
        state.ssm = buffer[start:start + numel].view_as(state.ssm).copy_(state.ssm)
    return out


@interpreted
@pytest.mark.parametrize("on_device,stacked", [(False, True), (True, True), (True, False)])
@torch.inference_mode()
def test_rewind_after_a_chunk_returns_to_each_position(on_device: bool, stacked: bool) -> None:
    """rewind(keep) after a chunk, with keep on the host or as a device tensor (`rewind_select_triton`: one launch
    for a stacked cache, one per layer for tensors at uneven gaps), leaves the cache as after the first keep
    tokens: equal to the decode steps' state there, and decoding on from it gives the decode path's logits."""
    model = small_lm(seed=5, n_layer=3, d_model=64, headdim=8, d_state=16)
    ids = torch.tensor([3, 14, 15, 92, 65, 35])
    start = _prefilled(model, 2, seed=9)
    _, after = _stepped(model, ids, start.clone())
    for keep in (1, 2, 4, 6):
        if stacked:
            cache = model.allocate_cache(1, 2)
            cache.copy_(start)
        else:
            cache = _unevenly_placed(start)
        assert (kernels.layer_stride([s.ssm for s in cache.states]) is not None) == stacked
        _chunked(model, ids, cache)
        if on_device:
            cache.rewind_states(torch.tensor(keep))
        else:
            cache.rewind(keep)
        for mine, theirs in zip(cache.states, after[keep - 1].states):
            torch.testing.assert_close(mine.conv, theirs.conv, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mine.ssm, theirs.ssm, atol=1e-5, rtol=1e-5)
            assert mine.trace is None
        token = torch.tensor([7])
        torch.testing.assert_close(model.step(token, cache), model.step(token, after[keep - 1].clone()),
                                   atol=1e-4, rtol=1e-4)


def _planted(length: int, vocab: int, matches: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (L, V) and ids [pending, d_1..d_{L-1}] whose first ``matches`` drafts are the argmax of their rows."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(length, vocab, generator=g)
    target = logits.argmax(-1)
    draft = torch.randint(0, vocab, (length - 1,), generator=g)
    draft[:matches] = target[:matches]
    if matches < length - 1:
        draft[matches] = (target[matches] + 1) % vocab  # the first mismatch
    return logits, torch.cat([torch.tensor([0]), draft])


@interpreted
@pytest.mark.parametrize("length,vocab,matches", [(9, 2048, 0), (9, 2048, 3), (9, 2048, 8), (1, 97, 0),
                                                  (17, 1000, 16), (5, 513, 2)])
def test_greedy_accept_kernel_equals_accept_drafts(length: int, vocab: int, matches: int) -> None:
    logits, ids = _planted(length, vocab, matches, seed=length + vocab + matches)
    out, keep = kernels.greedy_accept_triton(logits, ids)
    n, token = accept_drafts(logits, ids[1:], None, GREEDY)
    assert n == matches and int(out[0]) == n and int(out[1]) == token and int(keep) == n + 1
    emitted = torch.cat([ids[1:n + 1], torch.tensor([token])])
    expected = F.log_softmax(logits[:n + 1].double(), -1).gather(-1, emitted[:, None])[:, 0]
    torch.testing.assert_close(out[2:3 + n], expected, atol=1e-5, rtol=1e-5)


@interpreted
def test_greedy_accept_kernel_takes_the_first_of_equal_maxima() -> None:
    """Ties across the kernel's vocabulary blocks and inside one resolve as torch.argmax does (the first)."""
    logits = torch.zeros(3, 1500)
    logits[0, [700, 20]] = 5.0
    logits[1, [1400, 1100]] = 5.0
    logits[2, [3, 4]] = 5.0
    ids = torch.tensor([0, 20, 1100])
    out, _ = kernels.greedy_accept_triton(logits, ids)
    assert (int(out[0]), int(out[1])) == (2, 3) == (2, int(logits[2].argmax()))


def test_layer_stride_finds_views_of_one_stacked_tensor() -> None:
    block = torch.zeros(4, 2, 3)
    assert kernels.layer_stride(list(block)) == 6
    assert kernels.layer_stride([block[0]]) == 0
    assert kernels.layer_stride([block[0], block[2]]) == 12
    assert kernels.layer_stride([block[1], block[0]]) is None  # out of order
    assert kernels.layer_stride([block[0], block[1, :1]]) is None  # shapes differ


def test_short_chunk_runs_on_cuda_only() -> None:
    """CPU tensors keep the chunked path (the interpreter is for tests), and so does a chunk too long for a tile."""
    x, weight = torch.randn(9, 64), torch.randn(200, 64)
    assert not kernels.use_short_chunk(x, weight)
    assert not kernels.use_greedy_accept(torch.randn(9, 97))
    model = small_lm(seed=0)
    with torch.inference_mode():
        cache = model.allocate_cache(1, 1)
        model(torch.tensor([[1, 2, 3]]), cache=cache, keep_states=True)
    assert cache.states[0].trace.states is None and cache.states[0].trace.x is not None


@pytest.mark.gpu
@pytest.mark.parametrize("level", [1, 2])
@torch.inference_mode()
def test_cuda_chunk_round_equals_the_chunked_round(level: int) -> None:
    """On CUDA a keep_states forward of a short chunk takes the short-chunk kernels (fused mode) and a greedy round
    on it decides as the chunked path's round (unfused mode: mamba-ssm's chunked scan, torch acceptance), with
    the same state after it."""
    from matmamba.devices import use_ieee_fp32

    use_ieee_fp32()
    model = small_lm(seed=11, n_layer=3, d_model=128, headdim=16, d_state=32, vocab_size=512).cuda()
    prompt = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(2)).cuda()
    continuation = model.generate(prompt, 9, temperature=0.0)[0, 20:]
    for matches in (9, 4, 0):  # every draft the model's own greedy token, then a wrong one at `matches`
        ids = continuation.clone()
        if matches < 8:
            ids[matches + 1] = (ids[matches + 1] + 1) % 512
        results = {}
        for mode in ("fused", "unfused"):
            cache = model.allocate_cache(1, level)
            model(prompt, cache=cache)
            with kernels.decode_gemv(mode):
                out = greedy_round(model, ids[None], cache.widths, cache)
            assert cache.states[0].trace is None  # the round rolled back and consumed it
            results[mode] = (out.cpu(), [s.ssm.clone() for s in cache.states], [s.conv.clone() for s in cache.states])
        fused, unfused = results["fused"], results["unfused"]
        n = int(unfused[0][0])
        assert int(fused[0][0]) == n and int(fused[0][1]) == int(unfused[0][1])
        if level == 1:
            assert n == min(matches, 8)
        torch.testing.assert_close(fused[0][2:3 + n], unfused[0][2:3 + n], atol=1e-4, rtol=1e-4)
        for a, b in zip(fused[1] + fused[2], unfused[1] + unfused[2]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@torch.inference_mode()
def test_cuda_keep_states_forward_takes_the_short_chunk_kernels() -> None:
    model = small_lm(seed=1, n_layer=2, d_model=128, headdim=16, d_state=32).cuda()
    cache = model.allocate_cache(1, 1)
    model(torch.tensor([[1, 2, 3, 4]], device="cuda"), cache=cache, keep_states=True)
    assert cache.states[0].trace.states is not None and cache.states[0].trace.states.shape[0] == 4
    with kernels.decode_gemv("unfused"):
        cache = model.allocate_cache(1, 1)
        model(torch.tensor([[1, 2, 3, 4]], device="cuda"), cache=cache, keep_states=True)
    assert cache.states[0].trace.states is None
