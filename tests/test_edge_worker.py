"""edge/worker.py used directly (no Ray): partial loading, batched answers, resumable generation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from edge.results import SegmentRequest
from edge.worker import EdgeWorker
from matmamba import load_model
from matmamba.data.fashion_mnist import FMNIST_MEAN, FMNIST_STD

from .conftest import EagerDecodeSlots, small_lm, small_vision

LEVEL = 4


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vision")
    small_vision(seed=1).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lm")
    small_lm(seed=2).save_pretrained(path)
    return path


def test_info_describes_the_partially_loaded_edge_model(vision_dir: Path) -> None:
    worker = EdgeWorker(vision_dir, LEVEL)
    info = worker.info()
    full = load_model(vision_dir)
    assert info.task == "vision" and info.fingerprint == full.fingerprint
    assert info.edge_width == 64 // LEVEL and info.widths == (16, 8)
    assert info.bytes_read < info.file_bytes  # partial loading read only the edge width's slices
    assert info.num_classes == 10 and info.class_names[9] == "Ankle boot" and info.device == "cpu"


def test_concurrent_classify_calls_are_batched_and_equal_the_model(vision_dir: Path) -> None:
    worker = EdgeWorker(vision_dir, LEVEL, max_batch=16, max_wait_ms=20)
    images = np.random.default_rng(0).integers(0, 256, (6, 1, 28, 28), dtype=np.uint8)

    async def main():
        return await asyncio.gather(*(worker.classify(images[i:i + 1]) for i in range(6)))

    outs = asyncio.run(main())
    assert {o.batch_size for o in outs} == {6}
    model = load_model(vision_dir, mrl_level=LEVEL)
    x = (torch.from_numpy(images).float() / 255 - FMNIST_MEAN) / FMNIST_STD
    with torch.no_grad():
        expected = model(x, mrl_level=LEVEL).softmax(-1).numpy()
    np.testing.assert_allclose(np.concatenate([o.probs for o in outs]), expected, atol=1e-5)


def test_score_returns_token_logprobs_of_the_given_tokens(lm_dir: Path) -> None:
    worker = EdgeWorker(lm_dir, LEVEL)
    tokens = np.random.default_rng(1).integers(0, 97, (3, 12)).astype(np.int64)
    out = asyncio.run(worker.score(tokens, 0, False))
    assert out.logprobs.shape == (3, 12, 97) and out.token_logprobs.shape == (3, 11)
    picked = np.take_along_axis(out.logprobs[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(out.token_logprobs, picked, atol=1e-6)
    last = asyncio.run(worker.score(tokens, 0, True))
    np.testing.assert_allclose(last.logprobs[:, 0], out.logprobs[:, -1], atol=1e-5)


@pytest.mark.parametrize("steps", ["eager", "slots"])
def test_segments_continue_the_state_and_equal_one_greedy_generation(lm_dir: Path, steps: str) -> None:
    """Also with the decode steps in a graph slot's own cache ("slots": the CUDA path's protocol, run eagerly);
    another generation's segment runs between each two, in the same slot."""
    worker = EdgeWorker(lm_dir, LEVEL)
    if steps == "slots":
        worker._steps = EagerDecodeSlots(worker.model)
    prompt = np.arange(5, dtype=np.int64)
    context, segments = prompt, []

    async def main():
        nonlocal context
        for i in range(3):
            seg = await worker.generate_segment(SegmentRequest("g", context, 4, temperature=0.0))
            segments.append(seg)
            context = np.concatenate([context, seg.tokens])
            await worker.generate_segment(SegmentRequest(f"other{i}", prompt[::-1].copy(), 3, temperature=0.0))

    asyncio.run(main())
    assert [s.reused_state for s in segments] == [False, True, True]
    model = load_model(lm_dir, mrl_level=LEVEL)
    expected = model.generate(torch.from_numpy(prompt)[None], 12, temperature=0.0, mrl_level=LEVEL)
    assert context.tolist() == expected[0].tolist()
    worker.end_session("g")


def test_a_changed_context_is_read_again(lm_dir: Path) -> None:
    worker = EdgeWorker(lm_dir, LEVEL)
    first = asyncio.run(worker.generate_segment(SegmentRequest("g", np.arange(5), 4, temperature=0.0)))
    other = np.concatenate([np.arange(5), [7, 7]])  # as if the cloud had written two tokens
    again = asyncio.run(worker.generate_segment(SegmentRequest("g", other, 4, temperature=0.0)))
    fresh = asyncio.run(worker.generate_segment(SegmentRequest("h", other, 4, temperature=0.0)))
    assert not again.reused_state and again.tokens == fresh.tokens and len(first.tokens) == 4
    np.testing.assert_allclose(again.logprobs, fresh.logprobs, atol=1e-6)
