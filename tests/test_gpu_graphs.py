"""GPU: CUDA-graph decoding gives the eager tokens; the graphed classify paths (cloud runner, edge worker) give
the eager answers.

Run on the device with `pytest -m gpu tests/test_gpu_graphs.py`.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from cloud.batcher import BatchKey
from cloud.runner import ModelRunner
from edge.results import SegmentRequest
from edge.worker import EdgeWorker
from matmamba import kernels
from matmamba.cuda_graphs import DecodeGraphs, graph_buckets
from matmamba.data.fashion_mnist import FMNIST_MEAN, FMNIST_STD
from proto.validate import GenerateInputs

from .conftest import small_lm, small_vision

pytestmark = pytest.mark.gpu

LEVELS = (1, 2, 4, 8)
CUDA = torch.device("cuda")


def lm_bf16():
    return small_lm(n_layer=3, d_model=128, headdim=8, d_state=32).to(CUDA, torch.bfloat16)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("level", LEVELS)
def test_graph_greedy_decode_equals_eager(level: int, batch: int) -> None:
    model = lm_bf16()
    prompt = torch.randint(0, 97, (batch, 7), device=CUDA)
    eager = model.generate(prompt, 40, mrl_level=level, temperature=0)
    graphs = DecodeGraphs(model)
    assert torch.equal(graphs.generate(prompt, 40, mrl_level=level, temperature=0), eager)
    # a second generation reuses the captured graph and its cache (reset in between)
    assert torch.equal(graphs.generate(prompt, 40, mrl_level=level, temperature=0), eager)
    assert graphs.captured == 1


def test_graph_sampling_equals_eager_with_the_same_seed() -> None:
    model = lm_bf16()
    prompt = torch.randint(0, 97, (2, 5), device=CUDA)
    kwargs = dict(mrl_level=2, temperature=0.8, top_k=20, top_p=0.9)
    eager = model.generate(prompt, 30, generator=torch.Generator(CUDA).manual_seed(3), **kwargs)
    graphed = DecodeGraphs(model).generate(prompt, 30, generator=torch.Generator(CUDA).manual_seed(3), **kwargs)
    assert torch.equal(graphed, eager)


def test_graph_decode_under_autocast_equals_eager_autocast() -> None:
    model = small_lm(n_layer=2, d_model=128, headdim=8, d_state=32).to(CUDA)  # fp32 weights
    prompt = torch.randint(0, 97, (1, 6), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model.generate(prompt, 25, widths="64,128", temperature=0)
    graphed = DecodeGraphs(model, autocast_dtype=torch.bfloat16).generate(prompt, 25, widths="64,128",
                                                                          temperature=0)
    assert torch.equal(graphed, eager)


def test_concurrent_generations_take_separate_graphs() -> None:
    model = lm_bf16()
    prompts = [torch.randint(0, 97, (1, 4 + i), device=CUDA) for i in range(3)]
    expected = [model.generate(p, 30, mrl_level=4, temperature=0) for p in prompts]
    graphs = DecodeGraphs(model, slots_per_key=2)  # three generations share two graphs
    graphs.warmup(1, mrl_level=4, slots=2)  # captured before the threads start (see DecodeGraphs)
    results: list[torch.Tensor | None] = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def work(i: int) -> None:
        start.wait()
        results[i] = graphs.generate(prompts[i], 30, mrl_level=4, temperature=0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for got, want in zip(results, expected):
        assert got is not None and torch.equal(got, want)
    assert graphs.captured == 2


@pytest.mark.parametrize("state_dtype,x_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                                 (torch.float32, torch.float32)])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_conv_step_equals_torch(state_dtype: torch.dtype, x_dtype: torch.dtype, bias: bool) -> None:
    batch, channels, width = 3, 1100, 4
    state = torch.randn(batch, channels, width, device=CUDA).to(state_dtype)
    zxbc = torch.randn(batch, channels + 40, device=CUDA).to(x_dtype)
    x = zxbc[:, 20:20 + channels]  # a strided slice, as the decode step passes it
    weight = torch.randn(channels, width, device=CUDA).to(x_dtype)
    b = torch.randn(channels, device=CUDA).to(x_dtype) if bias else None
    ref_state = state.clone()
    out = kernels.conv_step_triton(state, x, weight, b)
    ref = kernels.causal_conv_step_torch(ref_state, x, weight, b)
    assert torch.equal(state, ref_state)
    tol = 1e-5 if x_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_graph_buckets() -> None:
    assert graph_buckets(1) == (1,)
    assert graph_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert graph_buckets(128) == (1, 2, 4, 8, 16, 32, 64, 128)


def test_runner_graphed_classify_equals_eager() -> None:
    model = small_vision(n_layer=2).to(CUDA)
    graphed = ModelRunner(model, CUDA, max_batch=16)
    eager = ModelRunner(model, CUDA, max_batch=16, cuda_graphs=False)
    assert graphed.cuda_graphs and not eager.cuda_graphs
    rng = np.random.default_rng(0)
    for sizes in ([1], [2, 1], [5, 3, 8], [16]):
        payloads = [rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8) for n in sizes]
        for width in (64, 32, 8):
            key = BatchKey("Classify", width, (1, 28, 28))
            got, want = graphed.classify_batch(key, payloads), eager.classify_batch(key, payloads)
            assert [g.shape for g in got] == [(n, 10) for n in sizes]
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, atol=2e-3)  # same kernels; bf16 autocast in both
    # float32 (pre-normalised) images take the eager path and still answer
    floats = [rng.standard_normal((3, 1, 28, 28)).astype(np.float32)]
    assert graphed.classify_batch(BatchKey("Classify", 64, (1, 28, 28)), floats)[0].shape == (3, 10)


def test_edge_worker_graphed_classify_equals_eager(tmp_path) -> None:
    small_vision(n_layer=2).save_pretrained(tmp_path)
    worker = EdgeWorker(tmp_path, 2, max_batch=16, device="cuda")
    assert worker._graphs is not None and len(worker._graphs.graphs) == len(graph_buckets(16))  # captured at start
    rng = np.random.default_rng(0)
    for sizes in ([1], [2, 1], [5, 3, 8]):
        images = [rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8) for n in sizes]
        normalised = [((x / 255.0 - FMNIST_MEAN) / FMNIST_STD).astype(np.float32) for x in images]  # eager path
        got, want = worker.classify_batch(0, images), worker.classify_batch(0, normalised)
        assert [g.shape for g in got] == [(n, 10) for n in sizes]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-2)  # both bf16 autocast; the input rounds differently


def test_runner_graphed_generate_equals_eager() -> None:
    model = small_lm(n_layer=2).to(CUDA)
    graphed, eager = ModelRunner(model, CUDA), ModelRunner(model, CUDA, cuda_graphs=False)
    graphed.warmup()  # captures the decode graphs of every served width

    def tokens(runner: ModelRunner, width: int) -> list[int]:
        out: list[int] = []
        inputs = GenerateInputs(np.array([5, 1, 7], dtype=np.int64), 20, 0.0, 0, 1.0, None, width, "t")
        runner.generate(inputs, threading.Event(), lambda token, logprob: out.append(token))
        return out

    for width in graphed.widths:
        assert tokens(graphed, width) == tokens(eager, width)


def test_edge_worker_graphed_drafts_equal_eager(tmp_path) -> None:
    """An LM edge worker's segments through its captured decode steps: the eager worker's drafts, log-probs and
    resumption from the accepted prefix (both bf16 autocast, the same kernels)."""
    small_lm(n_layer=3, d_model=128, headdim=8, d_state=32).save_pretrained(tmp_path)
    graphed = EdgeWorker(tmp_path, 2, device="cuda")
    eager = EdgeWorker(tmp_path, 2, device="cuda", cuda_graphs=False)
    assert graphed._steps is not None and graphed._steps.captured == 1 and eager._steps is None  # captured at start
    prompt = np.arange(6, dtype=np.int64)

    async def segments(worker: EdgeWorker) -> list:
        first = await worker.generate_segment(SegmentRequest("g", prompt, 8, temperature=0.0, draft=True))
        context = np.concatenate([prompt, first.tokens[:3], [11]])  # 3 drafts accepted, then the cloud's token
        resumed = await worker.generate_segment(SegmentRequest("g", context, 8, temperature=0.0, draft=True))
        sampled = await worker.generate_segment(SegmentRequest("s", prompt, 8, temperature=0.8, seed=3, draft=True))
        return [first, resumed, sampled]

    got, want = asyncio.run(segments(graphed)), asyncio.run(segments(eager))
    assert got[1].reused_state and want[1].reused_state and graphed._steps.captured == 1  # none at request time
    for g, w in zip(got, want):
        assert g.tokens == w.tokens
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-3)
