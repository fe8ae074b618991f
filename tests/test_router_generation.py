"""router/generation.py: the segment loop, with a scripted edge and cloud (the real ones: test_router_integration)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from edge.results import EdgeInfo, SegmentOutput, SegmentRequest
from proto import matmamba_pb2 as pb
from proto.validate import ModelLimits
from router.core import RouterCore
from router.escalation import EscalationError
from router.generation import IncrementalText, generate_chunks
from router.metrics import RouterMetrics
from router.thresholds import ThresholdStore

EOS = 0
CONFIDENT, DOUBTFUL = -0.5, -5.0  # token log-probabilities around the default threshold -4.0
INFO = EdgeInfo(task="lm", fingerprint="ab" * 32, d_model=64, n_layer=2, levels=(1, 2, 4), edge_level=4,
                edge_width=16, device="cpu", load_seconds=0.0, bytes_read=0, file_bytes=0, vocab_size=300, eos_id=EOS)


class ByteText:
    """Token id = byte value (ids 1..255), 0 = EOS."""

    eos_id = EOS

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i).decode("utf-8", errors="replace")


class ScriptedEdge:
    """Writes 'e' tokens with the log-probability its script gives for each segment."""

    def __init__(self, logprobs: list[float], eos_at: int | None = None) -> None:
        self.logprobs, self.eos_at = logprobs, eos_at
        self.requests: list[SegmentRequest] = []
        self.ended: list[str] = []

    def pick(self) -> int:
        return 0

    async def generate_segment(self, request: SegmentRequest, worker: int) -> SegmentOutput:
        assert worker == 0
        self.requests.append(request)
        lp = self.logprobs[min(len(self.requests) - 1, len(self.logprobs) - 1)]
        tokens = [ord("e")] * request.max_new
        if self.eos_at is not None and len(self.requests) - 1 == self.eos_at:
            tokens[-1] = EOS
        return SegmentOutput(tokens, [lp] * len(tokens), tokens[-1] == EOS, 1.0)

    def end_session(self, worker: int, session: str) -> None:
        self.ended.append(session)


class ScriptedCloud:
    """Streams 'C' tokens one per chunk; ``fail_after`` tokens then EscalationError (None = never)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.requests: list[pb.GenerateRequest] = []

    async def stream(self, method: str, request: pb.GenerateRequest) -> AsyncIterator[tuple]:
        self.requests.append(request)
        for i in range(request.max_tokens):
            if self.fail_after is not None and i >= self.fail_after:
                raise EscalationError("scripted outage", partial=i > 0)
            yield pb.GenerateChunk(token_ids=[ord("C")], logprobs=[-0.1],
                                   served_by=pb.ServedBy(width=64, level=1)), "cloud:1", 3.0
        yield pb.GenerateChunk(finish_reason=pb.FINISH_REASON_LENGTH), "cloud:1", 4.0


def _core(edge: ScriptedEdge, cloud: ScriptedCloud) -> RouterCore:
    limits = ModelLimits.lm(vocab_size=300, supported_widths=(16, 8), default_width=16)
    store = ThresholdStore(task="lm", fingerprint=INFO.fingerprint, edge_level=4)
    return RouterCore(INFO, limits, edge, cloud, store, RouterMetrics(), ByteText(), segment_tokens=4)


def _generate(core: RouterCore, max_tokens: int) -> list[pb.GenerateChunk]:
    async def main() -> list[pb.GenerateChunk]:
        request = pb.GenerateRequest(text="Hi", max_tokens=max_tokens, temperature=0.0)
        return [c async for c in generate_chunks(core, request)]

    return asyncio.run(main())


def _tiers(chunks: list[pb.GenerateChunk]) -> list[tuple[str, bool, str]]:
    return [(pb.Tier.Name(c.served_by.tier), c.served_by.degraded, c.text) for c in chunks if c.token_ids]


def test_confident_segments_stay_at_the_edge() -> None:
    edge, cloud = ScriptedEdge([CONFIDENT]), ScriptedCloud()
    chunks = _generate(_core(edge, cloud), 10)
    assert _tiers(chunks) == [("EDGE", False, "eeee"), ("EDGE", False, "eeee"), ("EDGE", False, "ee")]
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH and not cloud.requests
    assert [len(r.context) for r in edge.requests] == [2, 6, 10] and edge.ended == [edge.requests[0].session]


def test_a_doubtful_segment_is_replaced_by_the_clouds_continuation() -> None:
    edge, cloud = ScriptedEdge([CONFIDENT, DOUBTFUL, CONFIDENT]), ScriptedCloud()
    chunks = _generate(_core(edge, cloud), 12)
    assert "".join(t for _, _, t in _tiers(chunks)) == "eeeeCCCCeeee"
    assert [t for t, _, _ in _tiers(chunks)] == ["EDGE"] + ["CLOUD"] * 4 + ["EDGE"]
    request = cloud.requests[0]
    assert list(request.token_ids.ids) == list(b"Hi") + [ord("e")] * 4 and request.max_tokens == 4
    assert request.HasField("temperature") and request.temperature == 0.0
    cloud_chunk = [c for c in chunks if c.served_by.tier == pb.CLOUD][0]
    assert cloud_chunk.served_by.replica == "cloud:1" and cloud_chunk.served_by.confidence == DOUBTFUL
    assert cloud_chunk.served_by.level == 1 and cloud_chunk.served_by.cloud_ms == 3.0
    assert list(edge.requests[2].context[-4:]) == [ord("C")] * 4  # the edge continues after the cloud's tokens


def test_an_unreachable_cloud_keeps_the_edge_segment_degraded() -> None:
    edge, cloud = ScriptedEdge([DOUBTFUL]), ScriptedCloud(fail_after=0)
    chunks = _generate(_core(edge, cloud), 8)
    assert _tiers(chunks) == [("EDGE", True, "eeee"), ("EDGE", True, "eeee")]
    assert len(edge.requests) == 2  # the discarded segment was kept, not generated again


def test_a_cloud_stream_breaking_midway_is_completed_by_the_edge() -> None:
    edge, cloud = ScriptedEdge([DOUBTFUL, CONFIDENT]), ScriptedCloud(fail_after=3)
    chunks = _generate(_core(edge, cloud), 4)
    assert _tiers(chunks) == [("CLOUD", False, "C"), ("CLOUD", False, "C"), ("CLOUD", False, "C"),
                              ("EDGE", True, "e")]
    assert edge.requests[1].max_new == 1 and list(edge.requests[1].context[-3:]) == [ord("C")] * 3


def test_end_of_sequence_ends_the_generation() -> None:
    edge, cloud = ScriptedEdge([CONFIDENT], eos_at=1), ScriptedCloud()
    chunks = _generate(_core(edge, cloud), 40)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_EOS and len(edge.requests) == 2
    assert sum(len(c.token_ids) for c in chunks) == 8


def test_metrics_count_segments_and_decisions() -> None:
    core = _core(ScriptedEdge([DOUBTFUL]), ScriptedCloud(fail_after=0))
    _generate(core, 8)
    m = core.metrics.registry
    assert m.get_sample_value("router_escalations_total", {"method": "Generate"}) == 2
    assert m.get_sample_value("router_degraded_total", {"method": "Generate"}) == 2
    assert m.get_sample_value("router_escalation_rate", {"method": "Generate"}) == 1.0


def test_incremental_text_never_splits_a_character() -> None:
    data = "café ☕".encode()
    text = IncrementalText(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    pieces = [text.push([b]) for b in data]
    assert "".join(pieces) + text.flush() == "café ☕" and "\ufffd" not in "".join(pieces)


# ------------------------------------------------------------------ a chain of edge stages (--edge-level 4,2)

CHAIN_INFO = dataclasses.replace(INFO, edge_level=2, edge_width=32)
NARROW, WIDE = 16, 32  # levels 4 and 2 of d_model 64


class StageEdge(ScriptedEdge):
    """Writes 'n' at the narrow width and 'w' at the wide one, with a log-probability per width."""

    def __init__(self, logprob: dict[int, float]) -> None:
        super().__init__([])
        self.logprob = logprob

    async def generate_segment(self, request: SegmentRequest, worker: int) -> SegmentOutput:
        self.requests.append(request)
        tokens = [ord("n" if request.width == NARROW else "w")] * request.max_new
        return SegmentOutput(tokens, [self.logprob[request.width]] * len(tokens), False, 1.5)


def _chain_core(edge: ScriptedEdge, cloud: ScriptedCloud) -> RouterCore:
    limits = ModelLimits.lm(vocab_size=300, supported_widths=(WIDE, NARROW), default_width=WIDE)
    store = ThresholdStore(task="lm", fingerprint=INFO.fingerprint, edge_levels=(4, 2))
    return RouterCore(CHAIN_INFO, limits, edge, cloud, store, RouterMetrics(), ByteText(), segment_tokens=4,
                      chain=(4, 2))


def _chain_generate(core: RouterCore, max_tokens: int, width: int = 0) -> list[pb.GenerateChunk]:
    async def main() -> list[pb.GenerateChunk]:
        request = pb.GenerateRequest(text="Hi", max_tokens=max_tokens, temperature=0.0, width=width)
        return [c async for c in generate_chunks(core, request)]

    return asyncio.run(main())


def test_a_chain_answers_from_its_first_confident_stage() -> None:
    edge, cloud = StageEdge({NARROW: CONFIDENT, WIDE: CONFIDENT}), ScriptedCloud()
    chunks = _chain_generate(_chain_core(edge, cloud), 8)
    assert "".join(t for _, _, t in _tiers(chunks)) == "nnnnnnnn" and not cloud.requests
    assert [r.width for r in edge.requests] == [NARROW, NARROW]  # the wide stage never ran
    assert all(c.served_by.level == 4 and c.served_by.edge_ms == 1.5 for c in chunks if c.token_ids)


def test_a_doubtful_narrow_segment_goes_to_the_wide_stage_then_the_cloud() -> None:
    edge, cloud = StageEdge({NARROW: DOUBTFUL, WIDE: CONFIDENT}), ScriptedCloud()
    core = _chain_core(edge, cloud)
    chunks = _chain_generate(core, 8)
    assert "".join(t for _, _, t in _tiers(chunks)) == "wwwwwwww" and not cloud.requests
    assert [r.width for r in edge.requests] == [NARROW, WIDE, NARROW, WIDE]
    served = [c.served_by for c in chunks if c.token_ids]
    assert all(s.tier == pb.EDGE and s.level == 2 and s.width == WIDE and s.edge_ms == 3.0 for s in served)
    assert list(edge.requests[2].context[-4:]) == [ord("w")] * 4  # the narrow stage goes on after the wide tokens
    sessions = {r.width: r.session for r in edge.requests}
    assert len(set(sessions.values())) == 2 and sorted(edge.ended) == sorted(sessions.values())

    edge, cloud = StageEdge({NARROW: DOUBTFUL, WIDE: DOUBTFUL}), ScriptedCloud()
    core = _chain_core(edge, cloud)
    chunks = _chain_generate(core, 4)
    assert "".join(t for _, _, t in _tiers(chunks)) == "CCCC" and len(cloud.requests) == 1
    assert chunks[0].served_by.confidence == DOUBTFUL and chunks[0].served_by.edge_ms == 3.0
    assert core.metrics.registry.get_sample_value("router_escalations_total", {"method": "Generate"}) == 1


def test_a_request_naming_a_width_runs_that_width_alone() -> None:
    edge, cloud = StageEdge({NARROW: DOUBTFUL, WIDE: CONFIDENT}), ScriptedCloud()
    chunks = _chain_generate(_chain_core(edge, cloud), 4, width=NARROW)
    assert [r.width for r in edge.requests] == [NARROW] and len(cloud.requests) == 1
    assert "".join(t for _, _, t in _tiers(chunks)) == "CCCC"


def test_a_segment_is_one_item_however_many_chunks_it_streams() -> None:
    """The cloud streams a segment token by token; the metrics count segments, as they count decisions."""
    core = _core(ScriptedEdge([CONFIDENT, DOUBTFUL, CONFIDENT]), ScriptedCloud())
    chunks = _generate(core, 12)
    assert sum(1 for c in chunks if c.served_by.tier == pb.CLOUD) == 4  # one segment, four chunks
    m = core.metrics.registry
    items = {tier: m.get_sample_value("router_items_total", {"method": "Generate", "tier": tier, "degraded": "false"})
             for tier in ("edge", "cloud")}
    assert items == {"edge": 2, "cloud": 1}
    assert m.get_sample_value("router_escalations_total", {"method": "Generate"}) == 1

    core = _core(ScriptedEdge([DOUBTFUL, CONFIDENT]), ScriptedCloud(fail_after=3))
    _generate(core, 4)  # 3 cloud tokens, then the edge completes the segment, degraded
    m = core.metrics.registry
    assert m.get_sample_value("router_items_total", {"method": "Generate", "tier": "cloud", "degraded": "true"}) == 1
    assert m.get_sample_value("router_degraded_total", {"method": "Generate"}) == 1
