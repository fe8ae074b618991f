"""Speculative decoding at the model level: state rollback, greedy identity, the sampling distribution.

The drafting loop (`bench.speculate.speculate`) is the router's algorithm in its simplest synchronous
form: the nested submodel (same weights, narrower width) drafts k tokens by recurrent steps, the
cloud's Verifier checks them in one pass and rolls its state back. The router's own loop is
tested end to end in tests/test_speculative_e2e.py.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.speculate import GREEDY, speculate
from cloud.runner import VERIFY_GRAPH_LENGTHS, ModelRunner
from cloud.speculative import Verifier, accept_drafts, greedy_round
from matmamba import MatMambaLM, load_model
from matmamba.cuda_graphs import ChunkGraphs
from matmamba.generation import SamplingParams
from matmamba.kernels import ssd_state_after
from proto.validate import GenerateInputs

from .conftest import EagerDecodeSlots, small_lm

REPO_ROOT = Path(__file__).resolve().parents[1]
LM = REPO_ROOT / "checkpoints" / "matmamba-lm-austen"


# ------------------------------------------------------------------ state rollback


@pytest.mark.parametrize("level", [1, 4])
@pytest.mark.parametrize("keep", [1, 3, 9])
def test_rewind_equals_reading_only_the_kept_tokens(level: int, keep: int) -> None:
    model = small_lm(seed=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 14), generator=torch.Generator().manual_seed(keep))
    with torch.no_grad():
        cache = model.allocate_cache(2, level)
        model(ids[:, :5], cache=cache)
        model(ids[:, 5:], cache=cache, keep_states=True)  # 9 tokens traced
        cache.rewind(keep)
        ref = model.allocate_cache(2, level)
        model(ids[:, :5 + keep], cache=ref)
        # continuing from the rewound state equals decoding step by step from the reference state
        ours = model.step(ids[:, 0], cache)
        theirs = model.step(ids[:, 0], ref)
    assert cache.seqlen == ref.seqlen == 5 + keep + 1
    for mine, other in zip(cache.states, ref.states):
        torch.testing.assert_close(mine.conv, other.conv)
        torch.testing.assert_close(mine.ssm, other.ssm, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("level", [1, 4])
def test_rewind_with_a_device_keep_equals_the_host_rewind(level: int) -> None:
    """The static-shape rollback a CUDA graph runs (keep a 0-dim tensor) lands where rewind(int) does, every keep."""
    model = small_lm(seed=6)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(level))
    with torch.no_grad():
        for keep in range(1, 8):
            host, device = model.allocate_cache(1, level), model.allocate_cache(1, level)
            for cache in (host, device):
                model(ids[:, :5], cache=cache)
                model(ids[:, 5:], cache=cache, keep_states=True)  # 7 tokens traced
            host.rewind(keep)
            device.rewind_states(torch.tensor(keep))
            for mine, other in zip(device.states, host.states):
                assert mine.trace is None
                torch.testing.assert_close(mine.conv, other.conv, atol=0, rtol=0)
                torch.testing.assert_close(mine.ssm, other.ssm, atol=1e-6, rtol=1e-5)
        model(ids[:, 5:], cache=device, keep_states=True)
    with pytest.raises(TypeError, match="0-dim int64"):
        device.rewind_states(torch.tensor([3]))


def test_state_after_a_prefix_follows_the_recurrence_and_ends_at_the_scan_state() -> None:
    model = small_lm(seed=2, n_layer=1)
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model.allocate_cache(1)
        model(ids[:, :3], cache=cache)
        stepped = cache.clone()
        model(ids[:, 3:], cache=cache, keep_states=True)
        t = cache.states[0].trace
        for keep in range(1, 5):
            model.step(ids[:, 2 + keep], stepped)
            state = ssd_state_after(t.x, t.dt, t.A, t.B, t.dt_bias, t.ssm_before, keep)
            torch.testing.assert_close(state, stepped.states[0].ssm, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state, cache.states[0].ssm, atol=1e-5, rtol=1e-4)


def test_rewind_needs_a_traced_chunk() -> None:
    model = small_lm()
    cache = model.allocate_cache(1)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(ValueError, match="keep_states=True"):
        cache.rewind(1)
    with torch.no_grad():
        model(torch.tensor([[4, 5]]), cache=cache, keep_states=True)
    with pytest.raises(ValueError, match="keep must be in 1..2"):
        cache.rewind(3)
    with pytest.raises(ValueError, match="needs a cache"):
        model(torch.tensor([[1]]), keep_states=True)


# ------------------------------------------------------------------ the drafting loop


def _inputs(prompt: list[int], n: int, params: SamplingParams, seed: int | None, width: int) -> GenerateInputs:
    return GenerateInputs(np.asarray(prompt, dtype=np.int64), n, params.temperature, params.top_k, params.top_p,
                          seed, width, "")


@pytest.fixture(scope="module")
def austen() -> ModelRunner:
    torch.set_num_threads(1)
    model = load_model(LM)
    return ModelRunner(model, torch.device("cpu"), precision="fp32")


def _prompts(model: MatMambaLM, count: int) -> list[list[int]]:
    texts = ["It is a truth universally acknowledged", "Mr. Darcy", "Emma Woodhouse, handsome, clever",
             "The family of Dashwood", "She was", "“My dear", "In the morning", "Elizabeth", "Captain Wentworth",
             "Anne", "Catherine Morland", "Sir Thomas", "\n\nCHAPTER", "Mrs. Bennet said", "Harriet", "Fanny Price"]
    return [model.tokenizer.encode(t) for t in texts[:count]]


@pytest.mark.parametrize("level", [1, 2, 4, 8])
def test_greedy_speculative_output_equals_greedy_decoding(austen: ModelRunner, level: int) -> None:
    model = austen.model
    verifier = Verifier(austen)
    n, total_accepted, total_rounds = 24, 0, 0
    prompts = _prompts(model, 16)
    for i, prompt in enumerate(prompts):
        ref = model.generate(torch.tensor([prompt]), n, temperature=0.0)[0, len(prompt):].tolist()
        run = speculate(verifier, prompt, n, model.config.d_model // level, k=2 + i % 7)
        got, rounds, accepted = run.tokens, run.rounds, run.accepted
        assert got == ref, f"prompt {i} at level {level}"
        total_rounds, total_accepted = total_rounds + rounds, total_accepted + accepted
    if level == 1:  # the verifier's own width drafts: every draft is accepted
        assert total_rounds * 2 <= total_accepted
    # one pass per prompt longer than one token (its last token is read by the first round), one per round
    assert verifier.passes == sum(len(p) > 1 for p in prompts) + total_rounds


def _eager_capture(fn, autocast_dtype=None) -> tuple:
    """A CUDA graph's contract without CUDA: one call now, and each replay rewrites that call's output tensor."""
    out = fn()
    return types.SimpleNamespace(replay=lambda: out.copy_(fn())), out


def test_chunk_graphs_replay_equals_the_eager_traced_forward() -> None:
    """The graph path's bookkeeping: the session's state goes in, the new state and traces come back."""
    model = small_lm(seed=3)
    graphs = ChunkGraphs(model, capture_fn=_eager_capture)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, ref = model.allocate_cache(1, 2), model.allocate_cache(1, 2)
        model(ids[:, :6], cache=ours)
        model(ids[:, :6], cache=ref)
        pos = 6
        for length, keep in ((4, 2), (4, 4), (1, 1), (6, 3), (4, 1)):
            chunk = ids[:, pos:pos + length]
            got = graphs(chunk, ours).clone()
            torch.testing.assert_close(got, model(chunk, cache=ref, keep_states=True))
            ours.rewind(keep)
            ref.rewind(keep)
            assert ours.seqlen == ref.seqlen
            for mine, other in zip(ours.states, ref.states):
                torch.testing.assert_close(mine.conv, other.conv)
                torch.testing.assert_close(mine.ssm, other.ssm)
            pos += keep
    assert len(graphs) == 3  # one per chunk length, reused after
    assert graphs.captured(ours.widths, 1, 6) and not graphs.captured(ours.widths, 1, 5)


def test_verifier_through_chunk_graphs_gives_greedy_decoding(austen: ModelRunner) -> None:
    model = austen.model
    runner = ModelRunner(model, torch.device("cpu"), precision="fp32")
    runner.chunk_graphs = ChunkGraphs(model, capture_fn=_eager_capture)
    runner.chunk_graphs.warmup(model.backbone.resolve_widths(), range(1, 5))  # drafts of k <= 3 replay
    verifier = Verifier(runner)
    for i, prompt in enumerate(_prompts(model, 4)):
        ref = model.generate(torch.tensor([prompt]), 16, temperature=0.0)[0, len(prompt):].tolist()
        got = speculate(verifier, prompt, 16, model.config.d_model // 2, k=2 + i).tokens  # k = 5: the eager path
        assert got == ref, f"prompt {i}"
    assert len(runner.chunk_graphs) == 4  # no capture outside warm-up


def test_greedy_round_graphs_equal_the_host_round(austen: ModelRunner) -> None:
    """Greedy rounds through the whole-round body (acceptance and rollback on the device): the tokens of greedy
    decoding, and each verdict (accepted count, token, log-probabilities) equal to the host round's."""
    model = austen.model
    runner = ModelRunner(model, torch.device("cpu"), precision="fp32")
    runner.round_graphs = ChunkGraphs(model, body=greedy_round, capture_fn=_eager_capture)
    runner.round_graphs.warmup(model.backbone.resolve_widths(), range(1, 6))  # drafts of k <= 4 replay
    verifier, host = Verifier(runner), Verifier(austen)
    edge_width = model.config.d_model // 2
    for i, prompt in enumerate(_prompts(model, 4)):
        ref = model.generate(torch.tensor([prompt]), 16, temperature=0.0)[0, len(prompt):].tolist()
        got = speculate(verifier, prompt, 16, edge_width, k=1 + i).tokens
        assert got == ref, f"prompt {i}"
    prompt = _prompts(model, 1)[0]
    inputs = _inputs(prompt, 40, GREEDY, None, model.config.d_model)
    ref = model.generate(torch.tensor([prompt]), 4, temperature=0.0)[0, len(prompt):].tolist()
    ours, theirs = verifier.open(inputs)[0], host.open(inputs)[0]
    drafts = np.random.default_rng(0).integers(0, model.config.vocab_size, (6, 4))
    drafts[0] = ref  # the full model's own continuation: every draft accepted, then a bonus token
    accepted = []
    for draft in drafts:
        a, b = verifier.verify(ours, draft, None), host.verify(theirs, draft, None)
        assert (a.accepted, a.next_token) == (b.accepted, b.next_token)
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
        assert ours.position == theirs.position and ours.cache.seqlen == theirs.cache.seqlen
        accepted.append(a.accepted)
    assert accepted[0] == 4 and min(accepted) == 0  # both ends of the acceptance were exercised
    assert len(runner.round_graphs) == 5  # no capture outside warm-up


# ------------------------------------------------------------------ sampling


def chisquare_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's chi-square test of observed counts against expected counts (same total)."""
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = observed.size - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def test_accept_drafts_rule_on_fixed_distributions() -> None:
    """One position, many trials: the emitted token follows p, whatever q drafted it."""
    gen = torch.Generator().manual_seed(0)
    p_logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    params = SamplingParams(1.0)
    counts = np.zeros(4)
    for _ in range(4000):
        d = torch.multinomial(q, 1, generator=gen)
        n, token = accept_drafts(p_logits, d, q[None], params, gen)
        counts[d.item() if n == 1 else token] += 1
    expected = p_logits[0].softmax(-1).numpy() * counts.sum()
    assert chisquare_pvalue(counts, expected) > 1e-3


def test_sampled_speculative_output_follows_the_full_model() -> None:
    """Joint distribution of the first two tokens (chi-square), a tiny random model with 8 tokens."""
    torch.manual_seed(5)
    model = small_lm(seed=5, n_layer=2, vocab_size=8)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)  # tied to the embedding: sharper, more distinct distributions per width
    runner = ModelRunner(model, torch.device("cpu"), precision="fp32")
    verifier, params, prompt = Verifier(runner), SamplingParams(1.0), [3, 1]
    edge_width = model.config.d_model // 4
    with torch.no_grad():
        first = model(torch.tensor([prompt]))[0, -1].softmax(-1)  # (V,)
        second = torch.stack([model(torch.tensor([prompt + [t]]))[0, -1].softmax(-1) for t in range(8)])
        edge_first = model(torch.tensor([prompt]), widths=edge_width)[0, -1].softmax(-1)
    expected = (first[:, None] * second).flatten().numpy()  # P(t1, t2) under the full model
    trials = 1000
    counts = np.zeros(64)
    for seed in range(trials):
        out = speculate(verifier, prompt, 2, edge_width, k=2, params=params, seed=seed).tokens
        counts[out[0] * 8 + out[1]] += 1
    keep = expected * trials >= 5  # chi-square needs enough expected counts per cell
    observed = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum()) * trials
    assert chisquare_pvalue(observed, exp) > 1e-3
    # the test can tell: the edge's own distribution of the first token is far from the full model's
    assert (edge_first - first).abs().sum() > 0.5
    first_counts = counts.reshape(8, 8).sum(1)
    assert chisquare_pvalue(first_counts, edge_first.numpy() * trials + 1e-9) < 1e-6


# ------------------------------------------------------------------ the edge worker's drafts


@pytest.mark.parametrize("steps", ["eager", "slots"])
def test_edge_drafts_resume_from_the_accepted_prefix(tmp_path: Path, steps: str) -> None:
    """A draft segment keeps checkpoints: the next context (accepted prefix + the cloud's token) resumes there;
    likewise when the decode steps run in a graph slot's own cache ("slots", the CUDA path's protocol)."""
    import asyncio

    from edge.results import SegmentRequest
    from edge.worker import EdgeWorker

    small_lm(seed=4).save_pretrained(tmp_path / "lm")
    worker = EdgeWorker(tmp_path / "lm", 4)
    if steps == "slots":
        worker._steps = EagerDecodeSlots(worker.model)
    prompt = np.arange(6, dtype=np.int64)

    async def main() -> None:
        first = await worker.generate_segment(SegmentRequest("g", prompt, 5, temperature=0.0, draft=True))
        assert first.probs is None and len(first.tokens) == 5  # greedy drafts need no distributions
        for accepted in (2, 0, 5):
            context = np.concatenate([prompt, first.tokens[:accepted], [11]])  # the cloud's token after them
            resumed = await worker.generate_segment(SegmentRequest("g", context, 3, temperature=0.0, draft=True))
            fresh = await worker.generate_segment(SegmentRequest(f"f{accepted}", context, 3, temperature=0.0))
            assert resumed.reused_state and not fresh.reused_state
            assert resumed.tokens == fresh.tokens
            np.testing.assert_allclose(resumed.logprobs, fresh.logprobs, atol=1e-5)
            first = await worker.generate_segment(SegmentRequest("g", prompt, 5, temperature=0.0, draft=True))
        sampled = await worker.generate_segment(SegmentRequest("s", prompt, 4, temperature=0.8, top_k=20, seed=1,
                                                               draft=True))
        assert sampled.probs.shape == (4, 97)
        np.testing.assert_allclose(sampled.probs.sum(-1), 1.0, atol=1e-5)
        assert ((sampled.probs > 0).sum(-1) <= 20).all()
        assert (sampled.probs[np.arange(4), sampled.tokens] > 0).all()  # each token drawn from its row

    asyncio.run(main())
    if steps == "slots":
        assert worker._steps.steps > 0  # the segments stepped in the slot


# ------------------------------------------------------------------ CUDA (run on the device: pytest -m gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("level", [1, 4])
def test_cuda_rewind_equals_reading_the_prefix_and_the_cpu(level: int) -> None:
    """The Triton scan with a traced chunk, rewound, equals reading only the prefix (CUDA) and the CPU path."""
    cpu_model = small_lm(seed=1, n_layer=2, d_model=128, headdim=8, d_state=32)
    model = small_lm(seed=1, n_layer=2, d_model=128, headdim=8, d_state=32).cuda()
    ids = torch.randint(0, model.config.vocab_size, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        results = []
        for m, x in ((model, ids.cuda()), (cpu_model, ids)):
            cache = m.allocate_cache(2, level)
            m(x[:, :5], cache=cache)
            m(x[:, 5:], cache=cache, keep_states=True)
            cache.rewind(3)
            ref = m.allocate_cache(2, level)
            m(x[:, :8], cache=ref)
            step_ours, step_ref = m.step(x[:, 8], cache), m.step(x[:, 8], ref)
            torch.testing.assert_close(step_ours, step_ref, atol=1e-3, rtol=1e-3)
            results.append(step_ours.cpu())
    torch.testing.assert_close(results[0], results[1], atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
def test_cuda_greedy_speculative_output_equals_greedy_decoding() -> None:
    model = load_model(LM, device=torch.device("cuda"))
    verifier = Verifier(ModelRunner(model, torch.device("cuda"), precision="fp32"))
    for i, prompt in enumerate(_prompts(model, 8)):
        ref = model.generate(torch.tensor([prompt], device="cuda"), 24, temperature=0.0)[0, len(prompt):].tolist()
        got = speculate(verifier, prompt, 24, model.config.d_model // 4, k=2 + i % 5).tokens
        assert got == ref, f"prompt {i}"
    assert len(verifier.runner.chunk_graphs) == 0  # not warmed up: every round ran eager


@pytest.mark.gpu
def test_cuda_verification_graphs_equal_eager_verification() -> None:
    """Verify through the graphs captured at warm-up: the same tokens as greedy decoding, and the rounds replay."""
    model = load_model(LM, device=torch.device("cuda"))
    runner = ModelRunner(model, torch.device("cuda"), precision="fp32")
    runner.warmup()
    assert len(runner.chunk_graphs) == len(runner.round_graphs) == len(VERIFY_GRAPH_LENGTHS)
    verifier = Verifier(runner)
    for i, prompt in enumerate(_prompts(model, 8)):
        ref = model.generate(torch.tensor([prompt], device="cuda"), 24, temperature=0.0)[0, len(prompt):].tolist()
        got = speculate(verifier, prompt, 24, model.config.d_model // 2, k=1 + i % 8).tokens
        assert got == ref, f"prompt {i}"
    assert len(runner.chunk_graphs) == len(runner.round_graphs) == len(VERIFY_GRAPH_LENGTHS)
