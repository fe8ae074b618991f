"""`python -m cloud` as users run it: a subprocess that drains on SIGTERM, and clear start-up errors."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from cloud.__main__ import main
from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc
from proto.tensors import to_tensor_msg

from .conftest import small_vision

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 60.0
LISTENING = re.compile(r"listening on (\S+:\d+)")


class CloudProcess:
    """`python -m cloud ...` with its log lines collected by a reader thread."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen([sys.executable, "-m", "cloud", *args], cwd=REPO_ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                assert self.proc.poll() is None, f"python -m cloud exited early:\n{''.join(self.log)}"
                continue
            self.log.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"{pattern!r} not logged in {timeout} s:\n{''.join(self.log)}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp_path: Path) -> None:
    small_vision().save_pretrained(tmp_path / "v")
    # A long batch wait keeps the requests queued (in flight) when SIGTERM arrives.
    cloud = CloudProcess("--checkpoint", str(tmp_path / "v"), "--port", "0", "--metrics-port", "-1",
                         "--device", "cpu", "--max-wait-ms", "1500", "--wait-when-idle",
                         "--grace", "20")
    try:
        address = cloud.wait_for(LISTENING.pattern).group(1)
        cloud.wait_for("serving VISION")
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            images = np.zeros((1, 1, 28, 28), dtype=np.uint8)
            calls = [stub.Classify.future(pb.ClassifyRequest(images=to_tensor_msg(images)), timeout=30)
                     for _ in range(4)]
            time.sleep(0.3)
            assert not any(call.done() for call in calls), "requests finished before SIGTERM: raise --max-wait-ms"
            cloud.proc.send_signal(signal.SIGTERM)
            cloud.wait_for("draining")
            replies = [call.result() for call in calls]
            assert [len(r.results) for r in replies] == [1, 1, 1, 1]
            assert all(r.results[0].served_by.batch_size == 4 for r in replies)
            assert cloud.proc.wait(30) == 0, "".join(cloud.log)
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfo(pb.ModelInfoRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        cloud.kill()


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code = main(["--checkpoint", str(tmp_path / "nowhere"), "--port", "0", "--metrics-port", "-1",
                 "--device", "cpu"])
    assert code == 1
    assert "does not exist" in caplog.text and "nowhere" in caplog.text


def test_bad_flag_values_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", "x", "--max-batch", "0"])
    assert exit_info.value.code == 2 and "--max-batch must be positive" in capsys.readouterr().err
