"""The router end to end on 127.0.0.1: real cloud processes, real Ray actors, the real SDK and CLI.

One Ray cluster serves the whole test session (``ray_cluster`` in tests/conftest.py). Cloud replicas run as
``python -m cloud`` subprocesses: the shipped vision and LM checkpoints, plus a vision replica
serving a different checkpoint (a fingerprint mismatch). Two routers run in this process
(``RouterThread``: the real RouterServer on its own event loop); one more runs as
``python -m router`` joining the same cluster, for SIGTERM. Every test counts its answers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from edge.client import EdgeClient, Prediction, RouterError
from matmamba import load_model
from matmamba.data import load_fashion_mnist
from matmamba.data.fashion_mnist import FMNIST_MEAN, FMNIST_STD
from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc
from proto.tensors import from_tensor_msg, to_tensor_msg
from router.ray_setup import RayInfo
from router.server import CLOUD_HEALTH_SERVICE, RouterConfig, RouterThread

from .conftest import small_vision

REPO_ROOT = Path(__file__).resolve().parents[1]
VISION = REPO_ROOT / "checkpoints" / "matmamba-vision-fmnist"
LM = REPO_ROOT / "checkpoints" / "matmamba-lm-austen"
EDGE_LEVEL = 4
START_TIMEOUT_S = 120.0
N_IMAGES = 200
SERVING = health_pb2.HealthCheckResponse.SERVING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(address: str, service: str = "") -> int | None:
    """The health status of ``service`` at ``address``, or None when it does not answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=1.0)
        except grpc.RpcError:
            return None
        return reply.status


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class Process:
    """A `python -m ...` server subprocess on 127.0.0.1 with its log in a file."""

    def __init__(self, module: str, args: list[str], port: int, log: Path) -> None:
        self.module, self.args, self.port, self.log = module, args, port, log
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Process:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", self.module, *self.args], cwd=REPO_ROOT, env=env,
                                         stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> Process:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.module} exited with {self.proc.returncode}:\n{self.log.read_text()}")
            return health(self.address) == SERVING

        wait_until(up, timeout_s, f"{self.module} on {self.address}", poll_s=0.2)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def cloud_process(checkpoint: Path, tmp: Path, name: str, metrics_port: int = -1) -> Process:
    port = free_port()
    args = ["--checkpoint", str(checkpoint), "--port", str(port), "--metrics-port", str(metrics_port),
            "--host", "127.0.0.1"]
    return Process("cloud", args, port, tmp / f"{name}.log")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics at 127.0.0.1:port as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ------------------------------------------------------------------ session and module fixtures


@dataclass
class Backends:
    vision: Process  # the shipped vision checkpoint
    other: Process  # a vision replica serving different weights
    lm: Process  # the shipped LM checkpoint
    other_metrics: int
    tmp: Path


@pytest.fixture(scope="module")
def backends(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    tmp = tmp_path_factory.mktemp("router-it")
    other_dir = tmp / "other-vision"
    small_vision(seed=3).save_pretrained(other_dir)
    other_metrics = free_port()
    b = Backends(cloud_process(VISION, tmp, "cloud-vision").start(),
                 cloud_process(other_dir, tmp, "cloud-other", other_metrics).start(),
                 cloud_process(LM, tmp, "cloud-lm").start(), other_metrics, tmp)
    try:
        request.getfixturevalue("ray_cluster")  # Ray starts while the clouds load
        for p in (b.vision, b.other, b.lm):
            p.wait_serving()
        yield b
    finally:
        for p in (b.vision, b.other, b.lm):
            p.kill()


@dataclass
class Routers:
    vision: RouterThread
    lm: RouterThread

    @property
    def vision_address(self) -> str:
        return self.vision.server.address

    @property
    def lm_address(self) -> str:
        return self.lm.server.address


def _router_config(checkpoint: Path, cloud: tuple[str, ...]) -> RouterConfig:
    # A long deadline: on a loaded 2-core machine a cloud answer may take a while, and these tests
    # compare escalated answers with the cloud's (a degraded answer would be a flake, not a finding).
    return RouterConfig(checkpoint=checkpoint, edge_level=EDGE_LEVEL, cloud=cloud, port=0, metrics_port=0,
                        deadline_ms=5000, health_interval_ms=200, breaker_cooldown_ms=500, grace_s=1.0)


@pytest.fixture(scope="module")
def routers(backends: Backends) -> Iterator[Routers]:
    r = Routers(RouterThread(_router_config(VISION, (backends.vision.address, backends.other.address))),
                RouterThread(_router_config(LM, (backends.lm.address,))))
    r.vision.begin()
    r.lm.begin()
    try:
        r.vision.wait()
        r.lm.wait()
        yield r
    finally:
        r.vision.stop()
        r.lm.stop()


@dataclass
class Offline:
    """What the edge model answers on its own, computed here without the router."""

    images: np.ndarray  # (N, 1, 28, 28) uint8
    probs: np.ndarray  # (N, 10) edge probabilities
    threshold: float  # a max_softmax threshold no image's confidence lies near
    escalate: np.ndarray  # (N,) bool: images below it
    thresholds_file: Path


def separated_threshold(conf: np.ndarray, quantile: float, gap: float = 1e-3) -> float:
    """A threshold near ``quantile`` of ``conf`` with no value within gap/2 of it (float noise can't flip one)."""
    values = np.sort(conf)
    start = int(quantile * len(values))
    for offset in range(len(values)):
        for i in (start + offset, start - offset):
            if 0 < i < len(values) and values[i] - values[i - 1] > gap:
                return float((values[i] + values[i - 1]) / 2)
    raise AssertionError("no separated threshold in these confidences")


@pytest.fixture(scope="module")
def offline(backends: Backends) -> Offline:
    images = load_fashion_mnist("test-sample")[0][:N_IMAGES].numpy()[:, None]  # (N, 1, 28, 28)
    edge = load_model(VISION, mrl_level=EDGE_LEVEL)
    x = (torch.from_numpy(images).float() / 255 - FMNIST_MEAN) / FMNIST_STD
    with torch.no_grad():
        probs = edge(x, mrl_level=EDGE_LEVEL).softmax(-1).numpy()
    threshold = separated_threshold(probs.max(-1), quantile=0.2)
    path = backends.tmp / "vision-thresholds.json"
    path.write_text(json.dumps({"measure": "max_softmax", "threshold": threshold, "version": "it-1",
                                "checkpoint_fingerprint": edge.fingerprint, "edge_level": EDGE_LEVEL}))
    return Offline(images, probs, threshold, probs.max(-1) < threshold, path)


def classify_each(address: str, images: np.ndarray, workers: int = 8) -> list[Prediction]:
    """One request per image, ``workers`` in flight; every request must be answered."""
    with EdgeClient(address) as client, ThreadPoolExecutor(workers) as pool:
        answers = list(pool.map(lambda i: client.classify(images[i:i + 1])[0], range(len(images))))
    assert len(answers) == len(images)
    return answers


def cloud_classify(address: str, images: np.ndarray) -> np.ndarray:
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.InferenceStub(channel).Classify(pb.ClassifyRequest(images=to_tensor_msg(images)))
    return from_tensor_msg(reply.probs, max_elements=len(reply.probs.data))


# ------------------------------------------------------------------ vision


def test_escalation_rate_and_answers_match_offline_edge_and_direct_cloud(
        routers: Routers, backends: Backends, offline: Offline) -> None:
    with EdgeClient(routers.vision_address) as client:
        reply = client.reload_thresholds(str(offline.thresholds_file))
        assert reply.loaded.version == "it-1" and reply.previous.is_default
    answers = classify_each(routers.vision_address, offline.images)
    tiers = np.array([a.tier == "cloud" for a in answers])
    assert not any(a.degraded for a in answers)
    np.testing.assert_array_equal(tiers, offline.escalate)  # item by item, so the rate too
    assert tiers.mean() == offline.escalate.mean() and 0.05 < tiers.mean() < 0.5
    probs = np.stack([a.probs for a in answers])
    np.testing.assert_allclose(probs[~tiers], offline.probs[~tiers], atol=1e-4)  # kept = the edge's own answer
    direct = cloud_classify(backends.vision.address, offline.images[tiers])
    np.testing.assert_allclose(probs[tiers], direct, atol=1e-4)  # escalated = the cloud's direct answer
    assert {a.served.replica for a in answers if a.tier == "cloud"} == {backends.vision.address}
    assert all(a.served.measure == "max_softmax" and a.served.threshold == offline.threshold for a in answers)
    assert len({a.served.request_id for a in answers}) == N_IMAGES  # the router assigned one id each


def test_a_replica_with_another_checkpoint_is_refused(routers: Routers, backends: Backends,
                                                       offline: Offline) -> None:
    with EdgeClient(routers.vision_address) as client:
        client.reload_thresholds(str(offline.thresholds_file))
    answers = classify_each(routers.vision_address, offline.images[offline.escalate][:20])
    assert all(a.tier == "cloud" and a.served.replica == backends.vision.address for a in answers)
    metrics = scrape(routers.vision.server.metrics_port)
    assert metrics[("router_replica_state", (("replica", backends.other.address), ("state", "mismatch")))] == 1
    assert metrics[("router_replica_state", (("replica", backends.vision.address), ("state", "healthy")))] == 1
    theirs = scrape(backends.other_metrics)
    assert not any(name == "matmamba_cloud_requests_total" and ("method", "Classify") in labels and value
                   for (name, labels), value in theirs.items())
    assert health(routers.vision_address, CLOUD_HEALTH_SERVICE) == SERVING  # the good replica serves


def test_requests_with_ids_and_bad_input(routers: Routers) -> None:
    with EdgeClient(routers.vision_address) as client:
        got = client.classify(np.zeros((2, 1, 28, 28), np.uint8), request_id="req-42")
        assert [p.served.request_id for p in got] == ["req-42", "req-42"]
        with pytest.raises(RouterError) as err:
            client.classify(np.zeros((1, 1, 30, 28), np.uint8))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "multiples of the patch size" in err.value.details
        with pytest.raises(RouterError) as err:
            list(client.generate("hello"))
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        info = client.info()
        assert (info.task, info.edge_width, info.edge_level) == ("vision", 48, EDGE_LEVEL)


def test_thresholds_admin_refuses_bad_files_and_keeps_the_policy(routers: Routers, backends: Backends,
                                                                 offline: Offline) -> None:
    with EdgeClient(routers.vision_address) as client:
        client.reload_thresholds(str(offline.thresholds_file))
        bad = backends.tmp / "bad.json"
        cases = [("{", grpc.StatusCode.INVALID_ARGUMENT),
                 (json.dumps({"measure": "max_softmax", "threshold": 0.5, "checkpoint_fingerprint": "cd" * 32}),
                  grpc.StatusCode.FAILED_PRECONDITION)]
        for text, code in cases:
            bad.write_text(text)
            with pytest.raises(RouterError) as err:
                client.reload_thresholds(str(bad))
            assert err.value.code == code
        with pytest.raises(RouterError) as err:
            client.reload_thresholds(str(backends.tmp / "missing.json"))
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(RouterError) as err:
            client.reload_thresholds("")  # started without --thresholds
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert client.thresholds().version == "it-1"
    info = scrape(routers.vision.server.metrics_port)
    assert any(name == "router_thresholds_info" and ("version", "it-1") in labels for name, labels in info)


def test_edge_cli_classifies_files_and_directories(routers: Routers, offline: Offline, tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(offline.images[i, 0]).save(folder / f"img{i}.png")
    np.save(tmp_path / "pair.npy", offline.images[3:5, 0])
    done = subprocess.run([sys.executable, "-m", "edge", "classify", str(folder), str(tmp_path / "pair.npy"),
                           "--router", routers.vision_address], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert sum("conf" in line for line in lines) == 5 and "pair.npy[1]" in done.stdout
    assert "5 image(s)" in done.stdout and "escalation rate" in done.stdout and "p99" in done.stdout


# ------------------------------------------------------------------ language model


@pytest.fixture(scope="module")
def lm_edge():
    return load_model(LM, mrl_level=EDGE_LEVEL)


def _lm_thresholds(path: Path, threshold: float, fingerprint: str) -> Path:
    path.write_text(json.dumps({"measure": "mean_token_logprob", "threshold": threshold, "version": "lm-it",
                                "checkpoint_fingerprint": fingerprint}))
    return path


def test_score_keeps_confident_sequences_and_escalates_the_others(routers: Routers, backends: Backends,
                                                                  lm_edge, tmp_path: Path) -> None:
    tok = lm_edge.tokenizer
    text = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
            "must be in want of a wife. Zq xv jjk plorb qqq vvv zzz wub wub. The weather was fine and "
            "everybody was glad of it. Nonsense wordz flibber gabble snick.")
    ids = np.array(tok.encode(text), dtype=np.int64)
    starts = np.linspace(0, len(ids) - 12, 12).astype(int)
    tokens = np.stack([ids[i:i + 12] for i in starts])  # (12, 12) windows over sense and nonsense
    with torch.no_grad():
        lp = torch.log_softmax(lm_edge(torch.from_numpy(tokens), mrl_level=EDGE_LEVEL).float(), -1).numpy()
    token_lp = np.take_along_axis(lp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    threshold = separated_threshold(token_lp.mean(-1), quantile=0.5, gap=1e-3)
    with EdgeClient(routers.lm_address) as client:
        client.reload_thresholds(str(_lm_thresholds(tmp_path / "lm.json", threshold, lm_edge.fingerprint)))
    with grpc.insecure_channel(routers.lm_address) as channel:
        reply = pb_grpc.InferenceStub(channel).Score(pb.ScoreRequest(tokens=to_tensor_msg(tokens)))
    assert len(reply.served_by) == len(tokens)
    cloud = np.array([s.tier == pb.CLOUD for s in reply.served_by])
    np.testing.assert_array_equal(cloud, token_lp.mean(-1) < threshold)
    got = from_tensor_msg(reply.logprobs, max_elements=len(reply.logprobs.data))
    np.testing.assert_allclose(got[~cloud], lp[~cloud], atol=1e-4)
    with grpc.insecure_channel(backends.lm.address) as channel:
        direct = pb_grpc.InferenceStub(channel).Score(pb.ScoreRequest(tokens=to_tensor_msg(tokens[cloud])))
    np.testing.assert_allclose(got[cloud], from_tensor_msg(direct.logprobs, max_elements=len(direct.logprobs.data)),
                               atol=1e-4)


def _cloud_continuation(address: str, context: list[int], k: int) -> list[int]:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=context), max_tokens=k, temperature=0.0)
    with grpc.insecure_channel(address) as channel:
        return [t for c in pb_grpc.InferenceStub(channel).Generate(request) for t in c.token_ids]


def _edge_continuation(model, context: list[int], k: int) -> list[int]:
    ids = torch.tensor([context])
    stream = model.generate_stream(ids, k, mrl_level=EDGE_LEVEL, temperature=0.0, eos_id=model.tokenizer.eos_id)
    return [int(t[0]) for t, _ in stream]


def test_generation_segments_come_from_the_edge_or_the_cloud(routers: Routers, backends: Backends, lm_edge,
                                                             tmp_path: Path) -> None:
    prompt = "It is a truth universally acknowledged"
    with EdgeClient(routers.lm_address) as client:
        client.reload_thresholds(str(_lm_thresholds(tmp_path / "lm.json", -1.7, lm_edge.fingerprint)))
        chunks = list(client.generate(prompt, max_tokens=40, temperature=0.0))
    assert chunks[-1].finish_reason in ("length", "eos")
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) <= 40 and "".join(c.text for c in chunks) == lm_edge.tokenizer.decode(tokens)
    assert {c.tier for c in chunks if c.token_ids} == {"edge", "cloud"}
    assert not any(c.degraded for c in chunks)
    context, k = lm_edge.tokenizer.encode(prompt), routers.lm.server.config.segment_tokens
    content, i, produced = [c for c in chunks if c.token_ids], 0, 0
    while i < len(content):  # replay: every segment must be what its tier writes from its context
        if content[i].tier == "edge":
            segment = list(content[i].token_ids)
            assert content[i].confidence >= -1.7
            assert segment == _edge_continuation(lm_edge, context, len(segment))
            i += 1
        else:
            segment, want = [], min(k, 40 - produced)
            assert content[i].confidence < -1.7
            while i < len(content) and content[i].tier == "cloud" and len(segment) < want:
                segment += content[i].token_ids  # a cloud segment may stream as several chunks
                i += 1
            assert segment == _cloud_continuation(backends.lm.address, context, len(segment))
        context, produced = context + segment, produced + len(segment)


@pytest.mark.slow
def test_a_chain_router_generates_each_segment_at_its_first_confident_stage(backends: Backends, tmp_path: Path) -> None:
    """--edge-level 8,4 on the LM: a segment is level 8's when it is confident enough, else level 4's, else the
    cloud's; replayed token for token from each tier, and a level-4 or cloud segment was doubtful at level 8."""
    full = load_model(LM)
    t8, t4 = -1.2, -1.7
    path = tmp_path / "chain.json"
    path.write_text(json.dumps({"stages": [{"edge_level": 8, "measure": "mean_token_logprob", "threshold": t8},
                                           {"edge_level": 4, "measure": "mean_token_logprob", "threshold": t4}],
                                "version": "lm-chain", "checkpoint_fingerprint": full.fingerprint}))
    config = _router_config(LM, (backends.lm.address,))
    router = RouterThread(dataclasses.replace(config, edge_level=8, edge_levels=(8, 4), thresholds=path))
    router.begin()
    try:
        router.wait()
        prompt = "It is a truth universally acknowledged"
        with EdgeClient(router.server.address) as client:
            chunks = [c for c in client.generate(prompt, max_tokens=40, temperature=0.0) if c.token_ids]
    finally:
        router.stop()
    context, k = full.tokenizer.encode(prompt), config.segment_tokens

    def edge(level: int, n: int) -> tuple[list[int], float]:  # a level's greedy continuation, its mean log-prob
        stream = full.generate_stream(torch.tensor([context]), n, mrl_level=level, temperature=0.0,
                                      eos_id=full.tokenizer.eos_id)
        pairs = [(int(t[0]), float(lp[0])) for t, lp in stream]
        return [t for t, _ in pairs], float(np.mean([lp for _, lp in pairs]))

    levels, i = [], 0
    while i < len(chunks):
        level = full.config.d_model // chunks[i].served.width  # the stage that answered (1: the cloud)
        if chunks[i].tier == "edge":
            segment, n = list(chunks[i].token_ids), 1
            tokens, conf = edge(level, len(segment))
            assert segment == tokens and conf >= (t8 if level == 8 else t4)
        else:
            segment, n = [], 0
            while i + n < len(chunks) and chunks[i + n].tier == "cloud" and len(segment) < k:
                segment += chunks[i + n].token_ids
                n += 1
            assert segment == _cloud_continuation(backends.lm.address, context, len(segment))
        if level != 8:
            assert edge(8, len(segment))[1] < t8  # level 8 doubted it first
        levels.append(level)
        context, i = context + segment, i + n
    assert not any(c.degraded for c in chunks)
    assert set(levels) - {8}, "every segment stayed at level 8: the chain's later stages never ran"


def test_edge_cli_streams_a_generation(routers: Routers) -> None:
    done = subprocess.run([sys.executable, "-m", "edge", "generate", "Emma", "--router", routers.lm_address,
                           "--max-tokens", "12", "--seed", "1"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "tokens:" in done.stderr and "finish" in done.stderr


# ------------------------------------------------------------------ processes: SIGTERM, a dying cloud


def test_router_process_drains_on_sigterm(ray_cluster: RayInfo, backends: Backends, tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    router = Process("router", ["--checkpoint", str(VISION), "--edge-level", str(EDGE_LEVEL),
                                "--cloud", backends.vision.address, "--port", str(port), "--metrics-port",
                                str(metrics), "--ray-address", ray_cluster.address, "--max-wait-ms", "400",
                                "--grace", "10"], port, tmp_path / "router.log")
    router.start()
    try:
        router.wait_serving()
        images = np.zeros((1, 1, 28, 28), np.uint8)
        with grpc.insecure_channel(router.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            calls = [stub.Classify.future(pb.ClassifyRequest(images=to_tensor_msg(images))) for _ in range(10)]
            wait_until(lambda: scrape(metrics).get(("router_inflight_requests", (("method", "Classify"),)), 0) >= 10,
                       10, "10 requests in flight", poll_s=0.02)
            router.proc.send_signal(signal.SIGTERM)
            answers = [call.result(timeout=30) for call in calls]
        assert len(answers) == 10 and all(len(a.results) == 1 for a in answers)
        assert router.proc.wait(timeout=60) == 0
        assert "draining" in router.log.read_text()
    finally:
        router.kill()


def test_a_restarted_edge_worker_is_used_again(routers: Routers, offline: Offline) -> None:
    import ray

    pool = routers.vision.server.edge
    before = pool.workers[0].endpoint
    ray.kill(pool.workers[0].handle, no_restart=False)  # the actor process dies; Ray starts it again
    answered, refused = 0, 0
    with EdgeClient(routers.vision_address) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                client.classify(offline.images[:1])
                answered += 1
            except RouterError as err:  # would be a clear status, but Ray re-runs the call
                assert err.code == grpc.StatusCode.UNAVAILABLE
                refused += 1
            endpoint = pool.workers[0].endpoint
            if answered >= 3 and endpoint is not before and endpoint is not None and not endpoint.closed:
                break
        assert refused == 0 and answered >= 3  # calls caught in the dying actor were re-run on the new one
        endpoint = pool.workers[0].endpoint
        assert endpoint is not before and endpoint is not None and not endpoint.closed  # the fast path is back
        assert len(client.classify(offline.images[:4])) == 4


def test_killed_cloud_gives_degraded_answers_then_escalation_resumes(
        routers: Routers, backends: Backends, offline: Offline) -> None:
    address = routers.vision_address
    with EdgeClient(address) as client:
        client.reload_thresholds(str(offline.thresholds_file))
    doubtful = offline.images[offline.escalate]  # every one of these wants the cloud
    answers: list[tuple[float, Prediction]] = []
    stop, sent = threading.Event(), 0

    def load() -> None:  # a steady stream of requests for the whole test (bounded)
        nonlocal sent
        with EdgeClient(address) as client:
            while not stop.is_set() and sent < 5000:
                image = doubtful[sent % len(doubtful)]
                sent += 1
                answers.append((time.monotonic(), client.classify(image[None])[0]))

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        wait_until(lambda: sum(a.tier == "cloud" for _, a in answers) >= 5, 30, "cloud answers before the kill")
        backends.vision.kill()  # kill -9 mid-run
        killed = time.monotonic()
        wait_until(lambda: health(address, CLOUD_HEALTH_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING,
                   10, "the router to report its cloud NOT_SERVING")
        wait_until(lambda: sum(t > killed for t, _ in answers) >= 20, 30, "answers while the cloud is down")
        restarted = time.monotonic()
        backends.vision.start().wait_serving()  # the same port
        wait_until(lambda: any(t > restarted and a.tier == "cloud" for t, a in answers), 10,
                   "escalation to resume after the restart")
    finally:
        stop.set()
        worker.join(timeout=30)
    assert len(answers) == sent  # nothing lost
    after_kill = [a for t, a in answers if killed < t < restarted]
    wrong = [(a.tier, a.degraded, a.served.request_id) for a in after_kill[1:] if not (a.tier == "edge" and a.degraded)]
    assert after_kill and not wrong  # the first may have been answered by the cloud just before it died
    assert all((a.tier == "cloud" and not a.degraded) or (a.tier == "edge" and a.degraded) for _, a in answers)
    metrics = scrape(routers.vision.server.metrics_port)
    assert metrics[("router_degraded_total", (("method", "Classify"),))] >= len(after_kill) - 1
