"""Speculative-decoding sessions on a real cloud server (127.0.0.1, port 0): verify, capacity, expiry, errors."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from cloud.sessions import SessionTable
from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc
from proto.tensors import to_tensor_msg
from proto.validate import RequestError

from .conftest import small_lm
from .test_cloud_server import RPC_TIMEOUT, ServerThread, _runner

VOCAB = 97
TTL_S = 1.0
MAX_SESSIONS = 2


class Client:
    """Sync stubs of the SpeculativeDecoding service on one server."""

    def __init__(self, server: ServerThread) -> None:
        self.stub = pb_grpc.SpeculativeDecodingStub(server.channel)

    def open(self, prompt: list[int], max_tokens: int = 16, **sampling) -> pb.OpenSessionReply:
        generation = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_tokens=max_tokens,
                                        temperature=sampling.pop("temperature", 0.0), **sampling)
        return self.stub.OpenSession(pb.OpenSessionRequest(generation=generation), timeout=RPC_TIMEOUT)

    def verify(self, sid: str, position: int, drafts: list[int], probs: np.ndarray | None = None) -> pb.VerifyReply:
        request = pb.VerifyRequest(session_id=sid, position=position, draft_token_ids=drafts)
        if probs is not None:
            request.draft_probs.CopyFrom(to_tensor_msg(probs.astype(np.float32)))
        return self.stub.Verify(request, timeout=RPC_TIMEOUT)

    def close(self, sid: str) -> bool:
        return self.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=RPC_TIMEOUT).closed


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    runner = _runner(small_lm(vocab_size=VOCAB), tmp_path_factory.mktemp("lm"))
    s = ServerThread(runner, max_sessions=MAX_SESSIONS, session_ttl_s=TTL_S, max_draft_tokens=6)
    yield s
    s.close()


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    c = Client(server)
    yield c
    server.run(_close_all(server))


async def _close_all(server: ServerThread) -> None:
    table = server.server.speculative.sessions
    for sid in list(table._open):
        table.close(sid)


def _refused(call, code: grpc.StatusCode, fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    assert fragment in err.value.details()


def test_verified_rounds_continue_greedy_decoding(server: ServerThread, client: Client) -> None:
    model, prompt = server.runner.model, [5, 9, 2, 7]
    expected = model.generate(torch.tensor([prompt]), 12, temperature=0.0)[0, len(prompt):].tolist()
    opened = client.open(prompt)
    assert opened.position == len(prompt) and opened.ttl_s == TTL_S
    out, position = [], opened.position
    # drafts: right for two tokens then wrong, all wrong, all right, none
    for right, wrong in ((2, 1), (0, 3), (4, 0), (0, 0)):
        drafts = expected[len(out):len(out) + right] + [(t + 1) % VOCAB for t in expected[len(out) + right:][:wrong]]
        reply = client.verify(opened.session_id, position, drafts)
        assert reply.accepted == right and len(reply.logprobs) == right + 1
        assert reply.served_by.draft_tokens == len(drafts) and reply.served_by.accepted_tokens == right
        out += drafts[:right] + [reply.next_token_id]
        assert reply.position == position + right + 1
        position = reply.position
    assert out == expected[:len(out)] and len(out) == 3 + 1 + 5 + 1
    assert client.close(opened.session_id) and not client.close(opened.session_id)


def test_capacity_is_resource_exhausted_until_a_session_closes(client: Client) -> None:
    sids = [client.open([1, 2]).session_id for _ in range(MAX_SESSIONS)]
    _refused(lambda: client.open([1, 2]), grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-sessions 2")
    assert client.close(sids[0])
    assert client.open([1, 2]).session_id


def test_expired_unknown_and_closed_sessions_are_not_found(client: Client) -> None:
    stale, closed = client.open([3]), client.open([4])
    client.close(closed.session_id)
    _refused(lambda: client.verify(closed.session_id, 1, [1]), grpc.StatusCode.NOT_FOUND, "was closed")
    _refused(lambda: client.verify("f" * 32, 1, [1]), grpc.StatusCode.NOT_FOUND, "is unknown on this replica")
    time.sleep(TTL_S + 0.3)
    _refused(lambda: client.verify(stale.session_id, 1, [1]), grpc.StatusCode.NOT_FOUND, "expired after 1 s")


def test_a_wrong_position_changes_nothing(server: ServerThread, client: Client) -> None:
    opened = client.open([8, 8, 8])
    _refused(lambda: client.verify(opened.session_id, 7, [1]), grpc.StatusCode.FAILED_PRECONDITION,
             "holds 3 tokens but the request assumes 7")
    expected = server.runner.model.generate(torch.tensor([[8, 8, 8]]), 1, temperature=0.0)[0, -1].item()
    assert client.verify(opened.session_id, 3, []).next_token_id == expected


def test_bad_drafts_are_invalid_argument(client: Client) -> None:
    greedy = client.open([1, 2, 3], max_tokens=8)
    sid = greedy.session_id
    _refused(lambda: client.verify(sid, 3, [VOCAB]), grpc.StatusCode.INVALID_ARGUMENT, "drafted ids must be in")
    _refused(lambda: client.verify(sid, 3, [1] * 7), grpc.StatusCode.INVALID_ARGUMENT, "--max-draft-tokens")
    client.close(sid)
    sampled = client.open([1, 2, 3], max_tokens=8, temperature=1.0, seed=3).session_id
    _refused(lambda: client.verify(sampled, 3, [4]), grpc.StatusCode.INVALID_ARGUMENT, "needs draft_probs")
    logits = np.zeros((1, VOCAB), np.float32)
    _refused(lambda: client.verify(sampled, 3, [4], logits), grpc.StatusCode.INVALID_ARGUMENT, "sum to 1")
    one_hot = np.eye(VOCAB, dtype=np.float32)[[5]]
    _refused(lambda: client.verify(sampled, 3, [4], one_hot), grpc.StatusCode.INVALID_ARGUMENT, "probability 0")
    uniform = np.full((1, VOCAB), 1 / VOCAB, np.float32)
    assert client.verify(sampled, 3, [4], uniform).position in (4, 5)


def test_length_past_the_session_is_resource_exhausted(client: Client) -> None:
    sid = client.open([1, 2], max_tokens=3).session_id
    _refused(lambda: client.verify(sid, 2, [1, 2, 3]), grpc.StatusCode.RESOURCE_EXHAUSTED, "pass its length 5")
    assert client.verify(sid, 2, [1, 2]).position >= 3


def test_session_table_expiry_and_capacity_with_a_clock() -> None:
    now = [0.0]
    table: SessionTable[str] = SessionTable(max_sessions=2, ttl_s=10.0, clock=lambda: now[0])
    a, b = table.add("a"), table.add("b")
    with pytest.raises(RequestError) as err:
        table.add("c")
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    now[0] = 6.0
    assert table.get(a) == "a"  # a's idle timer restarts at 6
    now[0] = 12.0  # b idle for 12 s: expired; a for 6 s: kept
    assert table.add("c") and len(table) == 2 and table.expired_total == 1
    with pytest.raises(RequestError, match="expired after 10 s"):
        table.get(b)
    with pytest.raises(ValueError, match="--max-sessions"):
        SessionTable(max_sessions=0, ttl_s=1.0)


def test_vision_checkpoint_refuses_sessions(tmp_path: Path) -> None:
    from .conftest import small_vision

    s = ServerThread(_runner(small_vision(), tmp_path / "v"))
    try:
        _refused(lambda: Client(s).open([1]), grpc.StatusCode.FAILED_PRECONDITION, "needs a LM checkpoint")
    finally:
        s.close()


def test_a_failed_verify_drops_its_session_and_the_server_keeps_serving(server: ServerThread,
                                                                        client: Client) -> None:
    model = server.runner.model
    sid = client.open([1, 2, 3]).session_id

    def broken(*args, **kwargs):
        raise RuntimeError("simulated device error")

    model.forward = broken
    try:
        _refused(lambda: client.verify(sid, 3, [4]), grpc.StatusCode.INTERNAL, "Verify failed on the server")
    finally:
        del model.forward  # back to the class's forward
    _refused(lambda: client.verify(sid, 3, [4]), grpc.StatusCode.NOT_FOUND, "dropped after its Verify failed")
    fresh = client.open([1, 2, 3]).session_id
    assert client.verify(fresh, 3, [4]).position in (4, 5)
