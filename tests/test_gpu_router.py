"""The router's edge node on a GPU under Ray, end to end (device only: ``pytest -m gpu``).

Ray does not ship on the device image; ``bench/gpu_router.sh`` carries a Ray wheel (see
docs/DEVELOPING.md) and runs this file. A cloud replica (``python -m cloud``, CUDA) and a router
(``python -m router --edge-gpus 1``: one EdgeWorker actor declaring ``num_gpus=1``) run as
subprocesses on 127.0.0.1 with the shipped vision checkpoint and its calibrated thresholds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge.client import EdgeClient
from matmamba.data import load_fashion_mnist

pytestmark = pytest.mark.gpu

REPO_ROOT = Path(__file__).resolve().parents[1]
VISION = REPO_ROOT / "checkpoints" / "matmamba-vision-fmnist"
THRESHOLDS = REPO_ROOT / "docs" / "results" / "tune" / "thresholds-fmnist-level4.json"
EDGE_LEVEL = 4
N_IMAGES = 512
START_TIMEOUT_S = 300.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def _start(module: str, args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # keeps PYTHONPATH: the device installs into /tmp/site
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, address: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if _serving(address):
            return
        time.sleep(0.5)
    raise AssertionError(f"{address} did not serve within {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("ray")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tmp = tmp_path_factory.mktemp("gpu-router")
    cloud_port, router_port = _free_port(), _free_port()
    procs = []
    try:
        cloud = _start("cloud", ["--checkpoint", str(VISION), "--port", str(cloud_port), "--metrics-port", "-1"],
                       tmp / "cloud.log")
        procs.append(cloud)
        _wait(cloud, f"127.0.0.1:{cloud_port}", tmp / "cloud.log")
        routed = _start("router", ["--checkpoint", str(VISION), "--edge-level", str(EDGE_LEVEL),
                                   "--cloud", f"127.0.0.1:{cloud_port}", "--port", str(router_port),
                                   "--metrics-port", "-1", "--thresholds", str(THRESHOLDS), "--edge-gpus", "1"],
                        tmp / "router.log")
        procs.append(routed)
        _wait(routed, f"127.0.0.1:{router_port}", tmp / "router.log")
        yield f"127.0.0.1:{router_port}", tmp
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            assert proc.wait(timeout=120) == 0, "a server did not drain and exit 0 on SIGTERM"


def test_edge_worker_runs_on_the_gpu_under_ray_and_escalates(router) -> None:
    address, tmp = router
    images, labels = load_fashion_mnist("test-sample")
    images, labels = images[:N_IMAGES].numpy(), labels[:N_IMAGES].numpy()
    with EdgeClient(address) as client:
        info = client.info()
        assert info.device.startswith("cuda"), f"the edge worker runs on {info.device!r}, not the GPU"
        assert info.edge_level == EDGE_LEVEL
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: client.classify(images[i])[0], range(N_IMAGES)))
    assert len(answers) == N_IMAGES
    tiers = [a.tier for a in answers]
    assert not any(a.degraded for a in answers), "a cloud replica was up, nothing may be degraded"
    assert 0 < tiers.count("cloud") < N_IMAGES, "the calibrated thresholds escalate some images, not all"
    accuracy = float(np.mean([a.class_index == y for a, y in zip(answers, labels)]))
    assert accuracy > 0.88, f"cascade accuracy {accuracy:.3f} on the GPU is below the CPU cascade's (~0.91)"
    log = (tmp / "router.log").read_text()
    assert "one per GPU" in log, "the router did not start its edge worker as a GPU actor"
