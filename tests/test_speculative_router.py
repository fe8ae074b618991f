"""router/speculative.py pieces: the adaptive draft length, and CloudSession against a real cloud server.

The cloud is a real CloudServer on 127.0.0.1 (tests/test_cloud_server.py's ServerThread) with a
tiny model; the router side is the real ReplicaPool and CloudSession.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from proto import matmamba_pb2 as pb
from proto.validate import GenerateInputs
from router.draft_length import DraftLength
from router.escalation import EscalationError, EscalationSettings, ReplicaPool
from router.speculative import CloudSession

from .conftest import small_lm
from .test_cloud_server import ServerThread, _runner

PROMPT = [4, 8, 15, 16]


def test_draft_length_follows_the_acceptance_probability() -> None:
    length = DraftLength(8)
    assert length.k == 5  # before any round: alpha = 0.6 assumed, 0.6^5 < 0.1
    for _ in range(20):
        length.update(4, 4)
    assert length.alpha > 0.99 and length.k == 8  # nothing rejected: the most allowed
    for _ in range(20):
        length.update(6, 2)  # two accepted, then a rejection: alpha = 2/3, 0.67^6 < 0.1
    assert abs(length.alpha - 2 / 3) < 0.01 and length.k == 6
    for _ in range(20):
        length.update(8, 0)
    assert length.k == 1  # nothing accepted: one draft per round
    length.update(0, 0)  # a round without drafts changes nothing
    assert length.k == 1
    with pytest.raises(ValueError, match="--draft-tokens"):
        DraftLength(0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    s = ServerThread(_runner(small_lm(seed=7), tmp_path_factory.mktemp("lm")), max_sessions=1, session_ttl_s=30)
    yield s
    s.close()


def _inputs(max_tokens: int) -> GenerateInputs:
    return GenerateInputs(np.asarray(PROMPT, dtype=np.int64), max_tokens, 0.0, 0, 1.0, None, 64, "t")


async def _pool(server: ServerThread) -> ReplicaPool:
    pool = ReplicaPool([server.server.address], fingerprint=server.runner.fingerprint, task=pb.LM,
                       settings=EscalationSettings(deadline_s=10.0))
    await pool.start()
    return pool


def test_a_lost_session_is_reopened_with_the_context(server: ServerThread) -> None:
    expected = server.runner.model.generate(torch.tensor([PROMPT]), 6, temperature=0.0)[0, len(PROMPT):].tolist()

    async def main() -> list[int]:
        pool = await _pool(server)
        session, context = CloudSession(pool, _inputs(6), "t"), list(PROMPT)
        try:
            reply, _ = await session.verify(context, expected[:2], None, 6)  # opens the session
            context += expected[:2] + [reply.next_token_id]
            first = session.session_id
            server.run(_drop(server, first))  # the replica forgets it (as on expiry or a restart)
            reply, _ = await session.verify(context, expected[3:5], None, 3)
            context += expected[3:5] + [reply.next_token_id]
            assert session.session_id != first and reply.accepted == 2
            session.close()
            await asyncio.sleep(0.2)  # the background CloseSession
            return context[len(PROMPT):]
        finally:
            await pool.close()

    assert asyncio.run(main()) == expected
    assert len(server.server.speculative.sessions) == 0


async def _drop(server: ServerThread, sid: str) -> None:
    server.server.speculative.sessions.close(sid)


def test_a_full_session_table_is_an_escalation_error(server: ServerThread) -> None:
    async def main() -> str:
        pool = await _pool(server)
        holder, other = CloudSession(pool, _inputs(4), "a"), CloudSession(pool, _inputs(4), "b")
        try:
            await holder.verify(PROMPT, [], None, 4)
            with pytest.raises(EscalationError) as err:
                await other.verify(PROMPT, [], None, 4)
            return err.value.reason
        finally:
            holder.close()
            await asyncio.sleep(0.2)
            await pool.close()

    reason = asyncio.run(main())
    assert "RESOURCE_EXHAUSTED" in reason and "--max-sessions 1" in reason
