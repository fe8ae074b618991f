"""The Ray Serve path (cloud/serve_app.py): the same Inference service behind Serve's gRPC ingress.

Skipped unless Ray Serve's extras import (they are not part of `make setup`; see docs/CLOUD.md).
Runs `python -m cloud.serve_app` in a subprocess so its Ray cluster is its own.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from matmamba.data.tokenizer import ByteTokenizer
from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc

from .conftest import small_lm

pytest.importorskip("ray.serve", reason="Ray Serve extras are not installed (pip install 'ray[serve]==2.60.0')")

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 180.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(lines: queue.Queue[str], proc: subprocess.Popen, pattern: str) -> None:
    deadline, seen = time.monotonic() + START_TIMEOUT, []
    while time.monotonic() < deadline:
        try:
            seen.append(lines.get(timeout=0.2))
        except queue.Empty:
            assert proc.poll() is None, "".join(seen[-40:])
            continue
        if re.search(pattern, seen[-1]):
            return
    raise AssertionError(f"{pattern!r} not logged:\n{''.join(seen[-40:])}")


@pytest.mark.slow
def test_serve_ingress_answers_like_python_m_cloud(tmp_path: Path) -> None:
    model = small_lm(vocab_size=ByteTokenizer().vocab_size)
    model.save_pretrained(tmp_path / "lm", tokenizer=ByteTokenizer())
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cloud.serve_app", "--checkpoint", str(tmp_path / "lm"),
                             "--grpc-port", str(port), "--device", "cpu"], cwd=REPO_ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        _wait_for(lines, proc, "Ray Serve gRPC ingress on")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            chunks = list(stub.Generate(pb.GenerateRequest(text="ab", max_tokens=8, temperature=0.0), timeout=60))
            prompt = torch.tensor([ByteTokenizer().encode("ab")])
            expected = model.generate(prompt, 8, temperature=0.0, eos_id=ByteTokenizer().eos_id)[0, 2:].tolist()
            assert [i for c in chunks for i in c.token_ids] == expected
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(pb.GenerateRequest(text="ab", top_p=3.0), timeout=60))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in err.value.details()
            info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=60)
            assert info.task == pb.LM and info.checkpoint_sha256 == model.fingerprint
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
