"""Speculative generation end to end: a real ``python -m cloud`` process, a real router on Ray (shared cluster).

The router runs at edge level 1, so a request's ``width`` picks any trained level as the drafter
(256, 128, 64, 32 = levels 1, 2, 4, 8) from one router; the cloud verifies at full width. The
router's greedy output must equal the cloud's own greedy Generate, token for token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from matmamba import load_model
from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc
from router.ray_setup import RayInfo
from router.server import RouterConfig, RouterThread

from .test_router_integration import LM, Process, free_port

N_TOKENS = 20
LEVELS = (1, 2, 4, 8)


@dataclass
class Stack:
    cloud: Process
    router: RouterThread

    @property
    def router_address(self) -> str:
        return self.router.server.address


@pytest.fixture(scope="module")
def stack(ray_cluster: RayInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("spec-e2e")
    port = free_port()
    cloud = Process("cloud", ["--checkpoint", str(LM), "--port", str(port), "--metrics-port", "-1",
                              "--max-sessions", "8", "--session-ttl-s", "30"], port, tmp / "cloud.log").start()
    config = RouterConfig(checkpoint=LM, edge_level=1, cloud=(cloud.address,), port=0, metrics_port=None,
                          deadline_ms=5000, health_interval_ms=200, breaker_cooldown_ms=500, grace_s=1.0,
                          generate_mode="speculative", draft_tokens=6)
    router = RouterThread(config)
    try:
        cloud.wait_serving()
        router.start()
        yield Stack(cloud, router)
    finally:
        router.stop()
        cloud.kill()


def _generate(address: str, prompt: list[int], **fields) -> list[pb.GenerateChunk]:
    with grpc.insecure_channel(address) as channel:
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_tokens=N_TOKENS, **fields)
        return list(pb_grpc.InferenceStub(channel).Generate(request, timeout=120))


def _tokens(chunks: list[pb.GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    tokenizer = load_model(LM).tokenizer
    texts = ["It is a truth universally acknowledged", "Mr. Darcy", "Emma Woodhouse, handsome, clever",
             "She was", "In the morning", "Captain Wentworth"]
    return [tokenizer.encode(t) for t in texts]


def test_greedy_speculative_output_equals_the_clouds_greedy_output(stack: Stack, prompts: list[list[int]]) -> None:
    for level in LEVELS:
        accepted = drafted = 0
        for prompt in prompts:
            cloud_only = _tokens(_generate(stack.cloud.address, prompt, temperature=0.0))
            chunks = _generate(stack.router_address, prompt, temperature=0.0, width=256 // level)
            assert _tokens(chunks) == cloud_only, f"level {level}, prompt {prompt}"
            assert chunks[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
            for c in chunks[:-1]:
                s = c.served_by
                assert not s.degraded and s.replica == stack.cloud.address and s.draft_tokens >= s.accepted_tokens
                if s.tier == pb.CLOUD:  # the token the cloud chose after the accepted drafts
                    assert len(c.token_ids) == 1 and s.width == 256
                else:  # drafted at the edge and accepted
                    assert s.tier == pb.EDGE and len(c.token_ids) == s.accepted_tokens and s.width == 256 // level
            rounds = [c.served_by for c in chunks[:-1] if c.served_by.tier == pb.CLOUD]
            accepted += sum(s.accepted_tokens for s in rounds)
            drafted += sum(s.draft_tokens for s in rounds)
        if level == 1:  # the drafter is the verifier: nothing is rejected
            assert accepted == drafted > 0
        assert accepted > 0


def test_a_request_may_still_ask_for_segments(stack: Stack, prompts: list[list[int]]) -> None:
    chunks = _generate(stack.router_address, prompts[0], temperature=0.0, mode=pb.SEGMENT)
    assert len(_tokens(chunks)) == N_TOKENS
    assert all(c.served_by.draft_tokens == 0 for c in chunks)


def test_sampled_generation_is_reproducible_with_a_seed(stack: Stack, prompts: list[list[int]]) -> None:
    runs = [_tokens(_generate(stack.router_address, prompts[1], temperature=0.9, seed=11, width=64))
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == N_TOKENS


def test_without_the_cloud_the_edge_drafts_are_kept_degraded(stack: Stack, prompts: list[list[int]]) -> None:
    """Runs last: it stops the cloud process."""
    edge = load_model(LM, mrl_level=4)
    stack.cloud.kill()
    chunks = _generate(stack.router_address, prompts[2], temperature=0.0, width=64)
    expected = edge.generate(torch.tensor([prompts[2]]), N_TOKENS, temperature=0.0, mrl_level=4)
    assert _tokens(chunks) == expected[0, len(prompts[2]):].tolist()
    assert all(c.served_by.tier == pb.EDGE and c.served_by.degraded for c in chunks[:-1])


def test_cli_of_the_cloud_lists_the_session_flags() -> None:
    from cloud.__main__ import build_parser

    args = build_parser().parse_args(["--checkpoint", str(Path(".")), "--max-sessions", "3", "--session-ttl-s", "2"])
    assert (args.max_sessions, args.session_ttl_s, args.max_draft_tokens) == (3, 2.0, 32)
