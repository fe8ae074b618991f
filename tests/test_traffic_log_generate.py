"""Generate streams in the traffic log, with a real LM router, a real LM cloud process and Ray.

A few segment-mode streams (thresholds that escalate some segments), one speculative stream and
one stream the client cancels go through a router with ``--traffic-log --log-inputs``; the log
is read with plain msgpack and every record is checked against the chunks the client received.
Re-tuning from the log ignores the Generate records unless ``--method Generate`` is asked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import msgpack
import numpy as np
import pytest

from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc
from router.server import RouterConfig
from router.traffic_log import log_files
from router.tune import main as tune_main

from .test_router_integration import EDGE_LEVEL, LM, cloud_process, wait_until
from .test_traffic_log_router import Setup, serving

THRESHOLD = -1.7  # mean_token_logprob: escalates some segments of these prompts (as in test_router_integration)
PROMPTS = ["It is a truth universally acknowledged", "Emma Woodhouse, handsome, clever, and rich",
           "Zq xv jjk plorb"]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("traffic-generate")
    cloud = cloud_process(LM, tmp, "cloud-lm").start()
    thresholds = tmp / "thresholds.json"
    thresholds.write_text(json.dumps({"measure": "mean_token_logprob", "threshold": THRESHOLD, "version": "gen-log",
                                      "target_escalation": 0.5}))
    config = RouterConfig(checkpoint=LM, edge_level=EDGE_LEVEL, cloud=(cloud.address,), port=0, metrics_port=None,
                          deadline_ms=5000, health_interval_ms=200, thresholds=thresholds, traffic_log=tmp / "log",
                          log_inputs=True, grace_s=1.0)
    yield from serving(request, cloud, config, tmp)


def _records(directory: Path) -> list[dict]:
    """Every record of the log, read with plain msgpack."""
    out = []
    for path in log_files(directory):
        with open(path, "rb") as f:
            out.extend(msgpack.Unpacker(f, raw=False))
    return out


def _generate(stub, prompt: str, rid: str, mode: int = pb.SEGMENT) -> list[pb.GenerateChunk]:
    request = pb.GenerateRequest(text=prompt, max_tokens=MAX_TOKENS, temperature=0.0, request_id=rid, mode=mode)
    return list(stub.Generate(request, timeout=60))


def test_generate_streams_are_logged_one_record_each(setup: Setup) -> None:
    with grpc.insecure_channel(setup.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        streams = {f"gen-{i}": _generate(stub, p, f"gen-{i}") for i, p in enumerate(PROMPTS)}
        speculative = _generate(stub, PROMPTS[0], "gen-spec", pb.SPECULATIVE)
        call = stub.Generate(pb.GenerateRequest(text=PROMPTS[1], max_tokens=200, temperature=0.0,
                                                request_id="gen-cancel"), timeout=60)
        next(call)  # the first chunk has come: the client goes away mid-stream
        call.cancel()

    def logged() -> dict[str, dict]:
        return {r["id"]: r for r in _records(setup.log_dir) if r["method"] == "Generate"}

    wait_until(lambda: len(logged()) == len(streams) + 2, 20, "the Generate records")
    records = logged()
    tiers = set()
    for rid, chunks in streams.items():
        rec = records[rid]
        assert (rec["v"], rec["kind"], rec["task"], rec["mode"], rec["edge_level"]) == (1, "request", "lm", "segment",
                                                                                        EDGE_LEVEL)
        assert (rec["outcome"], rec["error"], rec["shadow_rate"]) == ("finished", "", 0.0)
        assert rec["finish"] == {pb.FINISH_REASON_EOS: "eos", pb.FINISH_REASON_LENGTH: "length"}[
            chunks[-1].finish_reason]
        assert rec["thresholds"]["threshold"] == THRESHOLD and rec["thresholds"]["version"] == "gen-log"
        assert rec["router_ms"] > 0 and len(rec["fingerprint"]) == 64
        assert np.frombuffer(rec["input"]["data"], dtype=rec["input"]["dtype"]).size >= 3  # the prompt's ids
        content = [c for c in chunks if c.token_ids]
        assert sum(item["chunks"] for item in rec["items"]) == len(content)
        i = 0
        for item in rec["items"]:  # each item is the next item["chunks"] chunks of the stream
            mine, i = content[i:i + item["chunks"]], i + item["chunks"]
            assert item["tokens"] == sum(len(c.token_ids) for c in mine) <= 8
            assert item["cloud_tokens"] == sum(len(c.token_ids) for c in mine if c.served_by.tier == pb.CLOUD)
            assert item["tier"] == ("cloud" if item["cloud_tokens"] else "edge")
            assert not item["degraded"] and not any(c.served_by.degraded for c in mine)
            conf = item["conf"]
            assert set(conf) == {"mean_token_logprob", "min_token_prob"} and 0 <= conf["min_token_prob"] <= 1
            assert conf["mean_token_logprob"] == pytest.approx(mine[0].served_by.confidence, abs=1e-9)
            assert item["escalated"] == (conf["mean_token_logprob"] < THRESHOLD) == (item["tier"] == "cloud")
            assert item["edge_ms"] > 0 and (item["cloud_ms"] > 0) == (item["tier"] == "cloud")
            tiers.add(item["tier"])
    assert tiers == {"edge", "cloud"}  # the thresholds escalate some segments and keep others

    rec = records["gen-spec"]
    assert (rec["mode"], rec["outcome"]) == ("speculative", "finished")
    content = [c for c in speculative if c.token_ids]
    assert sum(item["tokens"] for item in rec["items"]) == sum(len(c.token_ids) for c in content) > 0
    i = 0
    for item in rec["items"]:
        mine, i = content[i:i + item["chunks"]], i + item["chunks"]
        assert {(c.served_by.draft_tokens, c.served_by.accepted_tokens) for c in mine} == {(item["drafted"],
                                                                                            item["accepted"])}
        assert item["tier"] == "cloud" and "escalated" not in item

    cancelled = records["gen-cancel"]
    assert cancelled["outcome"] == "cancelled" and cancelled["finish"] == ""
    assert 1 <= sum(item["tokens"] for item in cancelled["items"]) < 200


def test_retune_ignores_generate_unless_asked(setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    deadline = time.monotonic() + 20
    while not any(r["method"] == "Generate" for r in _records(setup.log_dir)):
        assert time.monotonic() < deadline, "no Generate record in the log"
        with grpc.insecure_channel(setup.address) as channel:
            _generate(pb_grpc.InferenceStub(channel), PROMPTS[0], "retune")
        time.sleep(0.2)
    with pytest.raises(SystemExit) as exit_info:  # only Generate records: nothing for Classify / Score
        tune_main(["--from-log", str(setup.log_dir)])
    assert exit_info.value.code == 2 and "--method Generate" in capsys.readouterr().err

    out = tmp_path / "thresholds.json"
    assert tune_main(["--from-log", str(setup.log_dir), "--method", "Generate", "--target-escalation", "0.25",
                      "--apply", "--out", str(out)]) == 0
    assert "not estimated for Generate" in capsys.readouterr().out
    proposed = json.loads(out.read_text())
    conf = [item["conf"]["mean_token_logprob"] for r in _records(setup.log_dir)
            if r["method"] == "Generate" and r["mode"] == "segment" for item in r["items"]]
    rate = float(np.mean(np.array(conf) < proposed["threshold"]))
    assert proposed["measure"] == "mean_token_logprob" and proposed["expected_agreement"] is None
    assert rate == pytest.approx(proposed["expected_escalation"]["rate"]) and rate <= 0.25
    assert proposed["traffic_log"]["items"] == len(conf)
