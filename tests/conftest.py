"""Shared test setup: the `gpu` marker, Triton-interpreter runs, small model factories and the session's Ray cluster."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from matmamba import MatMamba2Config, MatMambaLM, MatMambaLMConfig, MatMambaVision, MatMambaVisionConfig
from router.ray_setup import RayInfo, init_ray


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run `pytest -m gpu` on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Triton kernels on CPU tensors run in Triton's interpreter, which must be on before anything imports
# triton.language (its standard functions, such as tl.sum, are built as compiled or interpreted kernels at
# import), and other tests import mamba-ssm's Triton modules: so a file's `interpreted` cases run in a child
# pytest of that file started with TRITON_INTERPRET=1 (`run_interpreted`), and are skipped in the parent.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in a child pytest under TRITON_INTERPRET=1")


def run_interpreted(test_file: str) -> None:
    """Run ``test_file``'s tests in a child pytest with Triton's interpreter on; fail with its output if any fails."""
    if INTERPRETED:
        pytest.skip("this is the child process")
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                           cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TRITON_INTERPRET": "1"},
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    assert " passed" in child.stdout and " failed" not in child.stdout


def small_block_config(**overrides) -> MatMamba2Config:
    base = dict(d_model=64, d_state=16, headdim=8, chunk_size=16)
    base.update(overrides)
    return MatMamba2Config(**base)


def small_lm(seed: int = 0, n_layer: int = 2, vocab_size: int = 97, **block) -> MatMambaLM:
    torch.manual_seed(seed)
    cfg = MatMambaLMConfig(n_layer=n_layer, vocab_size=vocab_size, block=small_block_config(**block))
    return MatMambaLM(cfg).eval()


def small_vision(seed: int = 0, n_layer: int = 2, **block) -> MatMambaVision:
    torch.manual_seed(seed)
    cfg = MatMambaVisionConfig(n_layer=n_layer, patch_size=4, image_size=28, block=small_block_config(**block))
    return MatMambaVision(cfg).eval()


def use_prose(directory: Path, paragraphs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand a corpus of these paragraphs in for the prepared Austen novels (MATMAMBA_PROSE_DIR)."""
    text = "\n\n".join(paragraphs)
    directory.mkdir(parents=True)
    (directory / "austen.txt").write_text(text)
    (directory / "austen.json").write_text(json.dumps({"sha256": hashlib.sha256(text.encode()).hexdigest()}))
    monkeypatch.setenv("MATMAMBA_PROSE_DIR", str(directory))


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayInfo]:
    """One Ray cluster for the whole test session, whichever test files need it (starting one costs seconds)."""
    import ray

    environment = dict(os.environ)  # init_ray sets HOME and RAY_* for Ray's processes; restored after
    info = init_ray(num_cpus=8)  # logical CPUs: room for every test's actors on a small machine
    yield info
    ray.shutdown()
    os.environ.clear()
    os.environ.update(environment)
    info.cleanup()


class EagerDecodeSlots:
    """`DecodeGraphs`' slot protocol run eagerly (a CPU stand-in for the edge worker's captured steps): one slot per
    (widths, batch), reused across segments, with its own cache and one logits buffer that every step overwrites,
    as a graph's replay does."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.slots, self.steps = model, {}, 0

    def acquire(self, widths: tuple[int, ...], batch: int) -> types.SimpleNamespace:
        if (widths, batch) not in self.slots:
            cache = self.model.backbone.allocate_cache(batch, widths)
            slot = types.SimpleNamespace(cache=cache, logits=torch.empty(batch, self.model.config.vocab_size))

            def advance(token: torch.Tensor, slot: types.SimpleNamespace = slot) -> torch.Tensor:
                self.steps += 1
                return slot.logits.copy_(self.model.step(token, slot.cache))
            slot.advance = advance
            self.slots[widths, batch] = slot
        return self.slots[widths, batch]

    def release(self, slot: types.SimpleNamespace) -> None:
        pass
