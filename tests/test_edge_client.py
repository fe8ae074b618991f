"""edge/: the client SDK and CLI stay torch-free; image loading; the CLI's rows, summary and tier marks;
the client's retries against a real gRPC server on 127.0.0.1."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from edge.__main__ import ClassifyRow, build_parser, format_row, summarize
from edge.client import EdgeClient, Prediction, RetryPolicy, RouterError, Served
from edge.images import as_batch, expand_paths, load_image_file, load_images
from edge.streaming import TierWriter
from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_client_and_cli_never_import_torch() -> None:
    code = ("import sys, edge.client, edge.__main__, edge.images, edge.demo, edge.streaming, edge.calibration; "
            "bad = [m for m in ('torch', 'matmamba', 'ray') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_as_batch_shapes_and_dtypes() -> None:
    assert as_batch(np.zeros((28, 28), np.uint8)).shape == (1, 1, 28, 28)
    assert as_batch(np.zeros((5, 28, 28), np.uint8)).shape == (5, 1, 28, 28)
    assert as_batch(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 1, 28, 28)
    with pytest.raises(TypeError, match="uint8 pixels"):
        as_batch(np.zeros((28, 28), np.int64))
    with pytest.raises(ValueError, match="shape"):
        as_batch(np.zeros(28, np.uint8))


def test_pictures_npy_files_and_directories(tmp_path: Path) -> None:
    rgb = np.zeros((56, 56, 3), np.uint8)
    rgb[:, :, 0] = 255
    Image.fromarray(rgb).save(tmp_path / "big.png")
    Image.fromarray(np.full((28, 28), 7, np.uint8)).save(tmp_path / "small.jpg")
    np.save(tmp_path / "three.npy", np.ones((3, 28, 28), np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    big = load_image_file(tmp_path / "big.png", size=28)
    assert big.shape == (1, 1, 28, 28) and big.dtype == np.uint8 and 70 < big.mean() < 80  # red -> grey 76
    items = load_images([tmp_path])
    assert [name.rsplit("/", 1)[-1] for name, _ in items] == ["big.png", "small.jpg", "three.npy[0]",
                                                               "three.npy[1]", "three.npy[2]"]
    assert [p.name for p in expand_paths([tmp_path / "three.npy"])] == ["three.npy"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_paths([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="unsupported file type"):
        load_image_file(tmp_path / "notes.txt")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_image_file(tmp_path / "objects.npy")  # never unpickled


def _prediction(tier: str, degraded: bool, latency: float, conf: float = 0.9) -> Prediction:
    served = Served(tier, conf, "max_softmax", 0.8, degraded, 1.0, 2.0 if tier == "cloud" else 0.0, "id", "", 48)
    return Prediction("Bag", 8, np.zeros(10, np.float32), served, latency)


def test_rows_and_summary() -> None:
    rows = [ClassifyRow("a.png", _prediction("edge", False, 10.0)),
            ClassifyRow("b.png", _prediction("cloud", False, 30.0, conf=0.5)),
            ClassifyRow("c.png", _prediction("edge", True, 20.0, conf=0.4)),
            ClassifyRow("d.png", None, "INVALID_ARGUMENT: bad image")]
    assert "Bag" in format_row(rows[0], 8) and "cloud" in format_row(rows[1], 8)
    assert "edge (degraded)" in format_row(rows[2], 8) and "ERROR INVALID_ARGUMENT" in format_row(rows[3], 8)
    summary = summarize(rows)
    assert "4 image(s): 2 edge (1 degraded), 1 cloud, 1 error(s)" in summary
    assert "escalation rate 66.7% (2/3)" in summary and "p50 20.0 ms" in summary


def test_tier_marks_without_and_with_color() -> None:
    out = io.StringIO()
    writer = TierWriter(out, color=False)
    for text, kind in [("It was", "edge"), (" a fine", "cloud"), (" day", "cloud"), (".", "edge"), ("!", "degraded")]:
        writer.write(text, kind)
    writer.finish()
    assert out.getvalue() == "It was[[ a fine day]].{{!}}\n"
    out = io.StringIO()
    writer = TierWriter(out, color=True)
    writer.write("x", "cloud")
    writer.finish()
    assert out.getvalue() == "\x1b[36mx\x1b[0m\n"


def test_cli_arguments() -> None:
    args = build_parser().parse_args(["classify", "a.png", "dir/", "--router", "10.0.0.2:50052"])
    assert args.images == ["a.png", "dir/"] and args.router == "10.0.0.2:50052"
    args = build_parser().parse_args(["generate", "Hello", "--max-tokens", "5"])
    assert (args.prompt, args.max_tokens, args.router) == ("Hello", 5, "127.0.0.1:50052")


class ScriptedInfo(pb_grpc.InferenceServicer):
    """ModelInfo fails with the scripted codes in turn, then answers."""

    def __init__(self, codes: list[grpc.StatusCode]) -> None:
        self.codes, self.calls = list(codes), 0

    def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfoReply:
        self.calls += 1
        if self.codes:
            context.abort(self.codes.pop(0), "scripted failure")
        return pb.ModelInfoReply(task=pb.VISION, d_model=48, served_level=2)


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedInfo, str]]:
    servicer = ScriptedInfo([])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


FAST = RetryPolicy(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.02)


def test_client_retries_unavailable_and_cancelled(scripted: tuple[ScriptedInfo, str]) -> None:
    servicer, address = scripted
    servicer.codes = [grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED]
    with EdgeClient(address, retry=FAST, timeout_s=10) as client:
        info = client.info()
    assert (info.task, info.d_model, info.edge_level) == ("vision", 48, 2)
    assert servicer.calls == 4


def test_client_gives_up_after_its_attempts_and_never_retries_bad_input(scripted: tuple[ScriptedInfo, str]) -> None:
    servicer, address = scripted
    servicer.codes = [grpc.StatusCode.UNAVAILABLE] * 5
    with EdgeClient(address, retry=FAST, timeout_s=10) as client, pytest.raises(RouterError) as err:
        client.info()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and servicer.calls == FAST.attempts
    servicer.codes, servicer.calls = [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE], 0
    with EdgeClient(address, retry=FAST, timeout_s=10) as client, pytest.raises(RouterError) as err:
        client.info()
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "scripted failure" in err.value.details
    assert servicer.calls == 1


def test_a_port_past_65535_is_refused() -> None:
    with pytest.raises(ValueError, match="a port must be in 0..65535"):
        EdgeClient("127.0.0.1:99999")  # grpc would dial 34463
