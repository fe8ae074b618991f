"""Shared test setup: the `gpu` marker, small model factories, one Ray cluster per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator

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


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayInfo]:
    """One Ray cluster for the whole test session (starting one costs seconds); every Ray test shares it."""
    import ray

    environment = dict(os.environ)  # init_ray sets HOME and RAY_* for Ray's processes; restored after
    info = init_ray(num_cpus=8)  # logical CPUs: room for every test's actors on a small machine
    yield info
    ray.shutdown()
    os.environ.clear()
    os.environ.update(environment)
    info.cleanup()
