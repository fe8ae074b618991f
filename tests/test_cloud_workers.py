"""`python -m cloud --workers N`: N real server processes on one port (SO_REUSEPORT) and their parent.

Each client below opens its own TCP connection (``grpc.use_local_subchannel_pool``), so the kernel
spreads them over the workers; the workers' DEBUG log lines carry their pid, which shows who answered.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud.__main__ import main
from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc
from proto.tensors import to_tensor_msg
from router.escalation import EscalationSettings, ReplicaPool

from .conftest import small_lm, small_vision
from .test_cloud_process import LISTENING, CloudProcess
from .test_cloud_server import _direct_probs, _images, _probs

WORKERS = 2
CONNECTIONS = 16  # all on one of 2 workers by chance: 2 * 2**-16
RPC_TIMEOUT = 30.0
SERVING = r"all \d+ workers serving on (\S+:\d+)"
METRICS = re.compile(r"metrics at (http://\S+/metrics)")
PIDS = re.compile(r"started \d+ workers on \S+: pids ([\d, ]+)")
ANSWERED = re.compile(r"cloud\.servicer\[(\d+)\]: Classify (\S+) -> OK")
BASE = ("--port", "0", "--device", "cpu", "--cpu-threads", "1", "--workers", str(WORKERS))


def own_channel(address: str) -> grpc.Channel:
    """A channel with its own TCP connection (channels share one per target by default)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def drain_log(cloud: CloudProcess) -> str:
    """Everything the process logged so far."""
    while True:
        try:
            cloud.log.append(cloud.lines.get_nowait())
        except queue.Empty:
            return "".join(cloud.log)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class Served:
    def __init__(self, cloud: CloudProcess, model, address: str, metrics_url: str, pids: list[int]) -> None:
        self.cloud, self.model, self.address, self.metrics_url, self.pids = cloud, model, address, metrics_url, pids


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    model, path = small_vision(), tmp_path_factory.mktemp("workers") / "vision"
    model.save_pretrained(path)
    # --max-wait-ms (with --wait-when-idle) keeps requests queued long enough for the drain test to catch them.
    cloud = CloudProcess("--checkpoint", str(path), *BASE, "--metrics-port", "0", "--max-wait-ms", "1000",
                         "--wait-when-idle",
                         "--grace", "20", "--log-level", "DEBUG")
    try:
        metrics_url = cloud.wait_for(METRICS.pattern).group(1)
        pids = [int(p) for p in cloud.wait_for(PIDS.pattern).group(1).split(", ")]
        address = cloud.wait_for(SERVING).group(1)
        yield Served(cloud, model, address, metrics_url, pids)
    finally:
        cloud.kill()


def classify_on_own_connection(address: str, images: np.ndarray, request_id: str) -> pb.ClassifyReply:
    with own_channel(address) as channel:
        request = pb.ClassifyRequest(images=to_tensor_msg(images), request_id=request_id)
        return pb_grpc.InferenceStub(channel).Classify(request, timeout=RPC_TIMEOUT)


@pytest.mark.slow
def test_every_worker_answers_correctly_and_metrics_add_up(served: Served) -> None:
    images = {f"conn-{i}": _images(1 + i % 3, seed=i) for i in range(CONNECTIONS)}
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        replies = dict(zip(images, pool.map(lambda rid: classify_on_own_connection(served.address, images[rid], rid),
                                            images)))
    for rid, reply in replies.items():
        np.testing.assert_allclose(_probs(reply), _direct_probs(served.model, images[rid]), atol=1e-5, rtol=0)
        assert all(r.served_by.request_id == rid for r in reply.results)

    answered: dict[str, int] = {}
    deadline = time.monotonic() + 10
    while len(answered) < CONNECTIONS and time.monotonic() < deadline:  # a worker logs just after replying
        answered = {rid: int(pid) for pid, rid in ANSWERED.findall(drain_log(served.cloud)) if rid in images}
        time.sleep(0.05)
    assert set(answered) == set(images)
    log = drain_log(served.cloud)
    # port 0 was resolved once, by the parent: every worker listens on the address it announced
    assert {m.group(1) for m in LISTENING.finditer(log)} == {served.address}
    # no worker turned SERVING before every worker was warm
    warm = [m.start() for m in re.finditer(r"warm; waiting for the other workers", log)]
    serving = [m.start() for m in re.finditer(r"serving VISION", log)]
    assert len(warm) == len(serving) == WORKERS and max(warm) < min(serving)
    per_worker = {pid: sum(1 for p in answered.values() if p == pid) for pid in served.pids}
    assert all(n > 0 for n in per_worker.values()), f"one worker took every connection: {per_worker}"

    ok = ("matmamba_cloud_requests_total", (("code", "OK"), ("method", "Classify")))
    inflight = ("matmamba_cloud_inflight_requests", (("method", "Classify"),))
    deadline = time.monotonic() + 10
    while (metrics := scrape(served.metrics_url)).get(inflight) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    # The one endpoint sums both workers: every request counted once, whichever worker took it.
    assert metrics[ok] == CONNECTIONS == sum(per_worker.values())
    assert metrics[inflight] == 0
    assert metrics[("matmamba_cloud_batch_size_sum", (("method", "Classify"),))] >= sum(map(len, images.values()))
    info = [labels for (name, labels) in metrics if name == "matmamba_cloud_model_info"]
    assert len(info) == 1 and dict(info[0])["device"] == "cpu"


@pytest.mark.slow
def test_a_router_pool_with_several_connections_reaches_every_worker(served: Served) -> None:
    """router --cloud-connections: one replica address, its calls spread over the workers."""
    with grpc.insecure_channel(served.address) as channel:
        fingerprint = pb_grpc.InferenceStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=RPC_TIMEOUT)
    ids = [f"pool-{i}" for i in range(2 * CONNECTIONS)]

    async def escalate() -> None:
        pool = ReplicaPool([served.address], fingerprint=fingerprint.checkpoint_sha256, task=pb.VISION,
                           settings=EscalationSettings(deadline_s=RPC_TIMEOUT, connections=CONNECTIONS))
        await pool.start()
        try:
            for rid in ids:
                request = pb.ClassifyRequest(images=to_tensor_msg(_images(1)), request_id=rid)
                assert (await pool.unary("Classify", request)).replica == served.address
        finally:
            await pool.close()

    asyncio.run(escalate())
    answered: dict[str, int] = {}
    deadline = time.monotonic() + 10
    while len(answered) < len(ids) and time.monotonic() < deadline:  # a worker logs just after replying
        answered = {rid: int(pid) for pid, rid in ANSWERED.findall(drain_log(served.cloud)) if rid in ids}
        time.sleep(0.05)
    assert set(answered) == set(ids)
    assert set(answered.values()) == set(served.pids), "every call went to one worker"


@pytest.mark.slow
def test_sigterm_drains_every_worker_and_exits_zero(served: Served) -> None:
    """Last of the tests on ``served``: it stops it."""
    channels = [own_channel(served.address) for _ in range(CONNECTIONS)]
    try:
        for channel in channels:  # connected first, so that the requests arrive together
            grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT)
        request = pb.ClassifyRequest(images=to_tensor_msg(_images(1)))
        calls = [pb_grpc.InferenceStub(c).Classify.future(request, timeout=RPC_TIMEOUT) for c in channels]
        time.sleep(0.1)
        assert not any(call.done() for call in calls), "requests finished before SIGTERM: raise --max-wait-ms"
        served.cloud.proc.send_signal(signal.SIGTERM)
        assert all(len(call.result().results) == 1 for call in calls)
        assert served.cloud.proc.wait(60) == 0, drain_log(served.cloud)
    finally:
        for channel in channels:
            channel.close()
    log = drain_log(served.cloud)
    assert "signal received; draining 2 workers" in log
    assert all(f"cloud.server[{pid}]: draining" in log for pid in served.pids)
    assert all(not _alive(pid) for pid in served.pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_a_killed_worker_stops_the_others_and_the_parent_fails(tmp_path: Path) -> None:
    small_vision().save_pretrained(tmp_path / "v")
    cloud = CloudProcess("--checkpoint", str(tmp_path / "v"), *BASE, "--metrics-port", "-1")
    try:
        pids = [int(p) for p in cloud.wait_for(PIDS.pattern).group(1).split(", ")]
        cloud.wait_for(SERVING)
        os.kill(pids[0], signal.SIGKILL)
        line = cloud.wait_for(r"ERROR cloud\.workers.*").group(0)
        assert f"worker 0 (pid {pids[0]}) was killed by SIGKILL while serving; stopping the other workers" in line
        assert cloud.proc.wait(60) == 1
        assert not _alive(pids[1])
    finally:
        cloud.kill()


@pytest.mark.slow
def test_a_bad_checkpoint_fails_every_worker_clearly(tmp_path: Path) -> None:
    small_vision().save_pretrained(tmp_path / "v")
    (tmp_path / "v" / "model.safetensors").write_bytes(b"not a safetensors file")
    cloud = CloudProcess("--checkpoint", str(tmp_path / "v"), *BASE, "--metrics-port", "0")
    try:
        assert cloud.proc.wait(60) == 1
        log = drain_log(cloud)
        assert "cannot serve:" in log
        assert re.search(r"worker \d \(pid \d+\) exited with code 1 during start-up; stopping the other workers", log)
        assert "all 2 workers serving" not in log
    finally:
        cloud.kill()


@pytest.mark.slow
def test_a_speculative_session_stays_on_its_connections_worker(tmp_path: Path) -> None:
    """One connection reaches one worker, which holds the session; another worker does not know it
    (NOT_FOUND), and the owner refuses a wrong position (FAILED_PRECONDITION): both are codes the
    router answers by reopening the session (router/speculative.py, SESSION_LOST)."""
    small_lm().save_pretrained(tmp_path / "lm")
    cloud = CloudProcess("--checkpoint", str(tmp_path / "lm"), *BASE, "--metrics-port", "-1")
    try:
        address = cloud.wait_for(SERVING).group(1)
        with own_channel(address) as channel:
            stub = pb_grpc.SpeculativeDecodingStub(channel)
            generation = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 9, 2]), max_tokens=8, temperature=0.0)
            opened = stub.OpenSession(pb.OpenSessionRequest(generation=generation), timeout=RPC_TIMEOUT)
            wrong = pb.VerifyRequest(session_id=opened.session_id, position=opened.position + 5)
            codes = []
            for _ in range(CONNECTIONS):
                with own_channel(address) as other:
                    with pytest.raises(grpc.RpcError) as err:
                        pb_grpc.SpeculativeDecodingStub(other).Verify(wrong, timeout=RPC_TIMEOUT)
                    codes.append(err.value.code())
                    if err.value.code() == grpc.StatusCode.NOT_FOUND:
                        assert "is unknown on this replica" in err.value.details()
            assert set(codes) == {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}
            for _ in range(4):  # the session's own connection keeps reaching its worker
                reply = stub.Verify(pb.VerifyRequest(session_id=opened.session_id, position=opened.position),
                                    timeout=RPC_TIMEOUT)
                assert reply.position == opened.position + 1
                opened.position = reply.position
        cloud.proc.send_signal(signal.SIGTERM)
        assert cloud.proc.wait(60) == 0
    finally:
        cloud.kill()


# ------------------------------------------------------------------ refused before any worker starts


def test_bad_worker_counts_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", "x", "--workers", "0"])
    assert exit_info.value.code == 2 and "--workers must be at least 1, got 0" in capsys.readouterr().err


def test_a_missing_checkpoint_is_one_clear_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--port", "0", "--workers", "3"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "does not exist" in errors[0] and "nowhere" in errors[0]


def test_a_port_in_use_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    small_vision().save_pretrained(tmp_path / "v")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["--checkpoint", str(tmp_path / "v"), "--port", str(port), "--workers", "2",
                     "--metrics-port", "-1"])
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text and "is the port in use?" in caplog.text

