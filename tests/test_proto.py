"""The gRPC wire (proto/): codegen, Tensor encoding, and the stubs over a real grpc.aio server."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc.aio import ServicerContext

import proto
from proto import codegen
from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc
from proto.tensors import TensorFormatError, from_tensor_msg, to_tensor_msg

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (its own protobuf descriptor pool and sys.path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --- codegen -----------------------------------------------------------------------------------


def test_proto_is_this_repositorys_package() -> None:
    # proto-plus (a Ray dependency) also installs a top-level `proto`; the repo root must come first.
    assert Path(proto.__file__).resolve().parent == REPO_ROOT / "proto", proto.__file__


def test_codegen_into_temp_package_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "wire"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    changed = codegen.generate(pkg)
    assert sorted(p.name for p in changed) == ["matmamba_pb2.py", "matmamba_pb2.pyi", "matmamba_pb2_grpc.py"]
    grpc_src = (pkg / "matmamba_pb2_grpc.py").read_text()
    assert "from . import matmamba_pb2 as matmamba__pb2" in grpc_src
    assert "\nimport matmamba_pb2" not in grpc_src

    done = _run_python(
        "from wire import matmamba_pb2 as pb, matmamba_pb2_grpc as g\n"
        "assert g.InferenceStub and g.RouterAdminServicer and pb.Tensor(dtype=pb.INT64).dtype == 5\n"
        "print(pb.DESCRIPTOR.package)",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "matmamba.v1"


def test_codegen_is_idempotent_and_reproducible(tmp_path: Path) -> None:
    first = codegen.generate(tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in first}
    assert codegen.generate(tmp_path) == []  # second run: nothing to write
    assert {p: p.stat().st_mtime_ns for p in first} == mtimes
    for path in first:  # same bytes as the in-repo generation
        assert path.read_bytes() == (REPO_ROOT / "proto" / path.name).read_bytes(), "stale: run `make proto`"
    assert codegen.stale_files(tmp_path) == []
    (tmp_path / "matmamba_pb2.py").write_text("# edited\n")
    assert codegen.stale_files(tmp_path) == [tmp_path / "matmamba_pb2.py"]
    assert codegen.main(["--check", "--out", str(tmp_path)]) == 1


def test_codegen_reports_protoc_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.proto").write_text('syntax = "proto3";\nmessage Broken { int32 x = ; }\n')
    with pytest.raises(RuntimeError, match=r"protoc failed .*broken\.proto"):
        codegen.generate(tmp_path / "out", proto_dir=tmp_path)


def test_missing_generated_code_says_make_proto(tmp_path: Path) -> None:
    shutil.copytree(
        REPO_ROOT / "proto", tmp_path / "proto", ignore=shutil.ignore_patterns("*_pb2*", "__pycache__")
    )
    for statement in (
        "import proto.matmamba_pb2",
        "from proto import matmamba_pb2_grpc",
        "import proto.tensors",
    ):
        done = _run_python(
            f"try:\n    {statement}\nexcept ImportError as e:\n"
            "    print(type(e).__name__, e)\nelse:\n    print('imported')",
            cwd=tmp_path,
        )
        assert "GeneratedCodeMissingError" in done.stdout and "make proto" in done.stdout, (statement, done)

    # A fresh checkout: the codegen itself must run without the generated modules.
    generated = subprocess.run(
        [sys.executable, "-m", "proto.codegen"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert generated.returncode == 0, generated.stderr
    done = _run_python("import proto.tensors, proto.matmamba_pb2_grpc", cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_tensors_module_does_not_import_torch() -> None:
    done = _run_python("import sys, proto.tensors\nprint('torch' in sys.modules)", cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# --- Tensor encoding ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "wire"),
    [
        (np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4), pb.FLOAT32),
        (np.array([[0.5, -1e4], [65504.0, np.inf]], dtype=np.float16), pb.FLOAT16),
        (np.arange(2 * 1 * 28 * 28, dtype=np.uint8).reshape(2, 1, 28, 28), pb.UINT8),
        (np.array([[0, 50_256, 2**40], [-1, 7, 2**62]], dtype=np.int64), pb.INT64),
        (np.array([-(2**31), 0, 2**31 - 1], dtype=np.int32), pb.INT32),
        (np.zeros((0, 5), dtype=np.float32), pb.FLOAT32),
        (np.array(3.5, dtype=np.float32), pb.FLOAT32),
        (np.arange(6, dtype=">i4").reshape(3, 2), pb.INT32),  # big-endian input goes out little-endian
    ],
    ids=["float32", "float16", "uint8", "int64", "int32", "empty", "scalar", "big-endian"],
)
def test_round_trip(array: np.ndarray, wire: int) -> None:
    msg = pb.Tensor.FromString(to_tensor_msg(array).SerializeToString())
    assert msg.dtype == wire and list(msg.shape) == list(array.shape)
    assert msg.data == array.astype(array.dtype.newbyteorder("<")).tobytes()
    back = from_tensor_msg(msg, max_elements=array.size)
    assert back.dtype == array.dtype.newbyteorder("=") and back.flags.writeable
    np.testing.assert_array_equal(back, array)


def test_round_trip_bfloat16() -> None:
    exact = np.array([[1.0, -2.5, 0.0, -0.0], [3.140625, 2.0**100, np.inf, -np.inf]], dtype=np.float32)
    msg = to_tensor_msg(exact, bfloat16=True)
    assert msg.dtype == pb.BFLOAT16 and len(msg.data) == exact.size * 2
    back = from_tensor_msg(msg, max_elements=8)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, exact)
    assert np.signbit(back[0, 3])
    # Rounding is to nearest, ties to even (bfloat16 keeps 7 mantissa bits); NaN survives.
    rounded = from_tensor_msg(
        to_tensor_msg(np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-7 + 2**-9, np.nan]), bfloat16=True),
        max_elements=4,
    )
    np.testing.assert_array_equal(rounded[:3], [1.0, 1 + 2**-6, 1 + 2**-7])
    assert np.isnan(rounded[3])


def test_to_tensor_msg_rejects_unsupported_dtypes() -> None:
    with pytest.raises(TensorFormatError, match=r"float64.*astype"):
        to_tensor_msg(np.zeros(3))
    with pytest.raises(TensorFormatError, match=r"bfloat16=True needs a floating array.*int64"):
        to_tensor_msg(np.zeros(3, dtype=np.int64), bfloat16=True)


def _raw(dtype: int, shape: list[int], nbytes: int) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, data=bytes(nbytes))


@pytest.mark.parametrize(
    ("msg", "max_elements", "expected"),
    [
        (
            _raw(pb.FLOAT32, [2, 3], 20),
            100,
            r"20 bytes; shape \[2, 3\] of FLOAT32 needs 24 \(6 elements x 4 bytes\)",
        ),
        (_raw(pb.INT64, [4], 33), 100, r"33 bytes; shape \[4\] of INT64 needs 32"),
        (
            _raw(pb.UINT8, [2, -3], 0),
            100,
            r"shape \[2, -3\] has dimension 1 = -3; every dimension must be >= 0",
        ),
        (_raw(pb.UINT8, [1000, 1000], 10**6), 65_536, r"1,000,000 elements; at most 65,536 are accepted"),
        (_raw(pb.FLOAT16, [2**40, 2**40], 0), 10**9, r"elements; at most 1,000,000,000"),
        (_raw(99, [1], 4), 100, r"dtype is <unknown 99> \(99\); expected one of FLOAT32, FLOAT16, BFLOAT16"),
        (_raw(pb.DTYPE_UNSPECIFIED, [1], 4), 100, r"dtype is DTYPE_UNSPECIFIED \(0\); expected one of"),
    ],
    ids=["short", "long", "negative-dim", "too-many", "overflowing-shape", "unknown-dtype", "unset-dtype"],
)
def test_malformed_tensors_are_rejected(msg: pb.Tensor, max_elements: int, expected: str) -> None:
    msg = pb.Tensor.FromString(msg.SerializeToString())  # as a server receives it
    with pytest.raises(TensorFormatError, match=expected):
        from_tensor_msg(msg, max_elements=max_elements)


# --- the stubs over a real grpc.aio server -----------------------------------------------------


class ToyInference(pb_grpc.InferenceServicer):
    """Just enough of Inference to exercise the definitions (not the product server)."""

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: ServicerContext) -> pb.ModelInfoReply:
        return pb.ModelInfoReply(
            task=pb.VISION,
            d_model=128,
            n_layer=4,
            served_width=32,
            served_level=4,
            supported_levels=[1, 2, 4, 8],
            supported_widths=[128, 64, 32, 16],
            tier=pb.EDGE,
            vision=pb.VisionInfo(
                num_classes=10,
                class_names=["T-shirt/top", "Trouser"],
                image_size=28,
                channels=1,
                patch_size=4,
                mean=[0.286],
                std=[0.353],
            ),
            checkpoint_sha256="ab" * 32,
            server_version="0.0.test",
            device="cpu",
            max_batch_size=64,
        )

    async def Classify(self, request: pb.ClassifyRequest, context: ServicerContext) -> pb.ClassifyReply:
        try:
            images = from_tensor_msg(request.images, max_elements=64 * 28 * 28)
        except TensorFormatError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"images: {err}")
        probs = np.full((images.shape[0], 10), 0.1, dtype=np.float32)
        meta = pb.ServedBy(
            tier=pb.EDGE, request_id=request.request_id, width=32, level=4, batch_size=images.shape[0]
        )
        return pb.ClassifyReply(
            probs=to_tensor_msg(probs),
            results=[pb.ImageResult(predicted_class=0, served_by=meta)] * images.shape[0],
        )

    async def Generate(
        self, request: pb.GenerateRequest, context: ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        if request.WhichOneof("prompt") != "token_ids" or request.max_tokens <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "need token_ids and max_tokens > 0")
        temperature = request.temperature if request.HasField("temperature") else 1.0
        last, last_i = request.token_ids.ids[-1], request.max_tokens - 1
        for i in range(request.max_tokens):
            tier = pb.EDGE if i % 2 == 0 else pb.CLOUD
            yield pb.GenerateChunk(
                token_ids=[last + i + 1],
                text=f"<{last + i + 1}>",
                logprobs=[-0.5 * temperature],
                served_by=pb.ServedBy(
                    tier=tier,
                    confidence=0.9 - i / 10,
                    confidence_measure="max_softmax",
                    request_id=request.request_id,
                    cloud_ms=1.5 * (tier == pb.CLOUD),
                ),
                finish_reason=pb.FINISH_REASON_LENGTH if i == last_i else pb.FINISH_REASON_UNSPECIFIED,
            )


@pytest.fixture(scope="module")
def toy_server() -> Iterator[str]:
    """A grpc.aio server on 127.0.0.1 (a free port) in its own event-loop thread; yields HOST:PORT."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        pb_grpc.add_InferenceServicer_to_server(ToyInference(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=1), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture()
def stub(toy_server: str) -> Iterator[pb_grpc.InferenceStub]:
    with grpc.insecure_channel(toy_server) as channel:
        yield pb_grpc.InferenceStub(channel)


def test_model_info_round_trip(stub: pb_grpc.InferenceStub) -> None:
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert info.task == pb.VISION and info.WhichOneof("head") == "vision"
    assert (info.d_model, info.n_layer, info.served_width, info.served_level) == (128, 4, 32, 4)
    assert list(info.supported_levels) == [1, 2, 4, 8] and list(info.supported_widths) == [128, 64, 32, 16]
    assert info.tier == pb.EDGE and info.max_batch_size == 64
    assert info.vision.num_classes == 10 and list(info.vision.class_names) == ["T-shirt/top", "Trouser"]
    assert (info.vision.image_size, info.vision.channels, info.vision.patch_size) == (28, 1, 4)
    assert info.vision.mean[0] == pytest.approx(0.286) and info.vision.std[0] == pytest.approx(0.353)
    assert (info.checkpoint_sha256, info.server_version, info.device) == ("ab" * 32, "0.0.test", "cpu")


def test_generate_streams_chunks(stub: pb_grpc.InferenceStub) -> None:
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[5, 9]), max_tokens=3, temperature=2.0, seed=7, request_id="req-1"
    )
    chunks = list(stub.Generate(request, timeout=10))
    assert [list(c.token_ids) for c in chunks] == [[10], [11], [12]]
    assert "".join(c.text for c in chunks) == "<10><11><12>"
    assert [c.logprobs[0] for c in chunks] == [-1.0, -1.0, -1.0]
    assert [c.served_by.tier for c in chunks] == [pb.EDGE, pb.CLOUD, pb.EDGE]
    assert [c.served_by.cloud_ms for c in chunks] == [0.0, 1.5, 0.0]
    assert chunks[1].served_by.confidence == pytest.approx(0.8)
    assert {c.served_by.request_id for c in chunks} == {"req-1"}
    assert {c.served_by.confidence_measure for c in chunks} == {"max_softmax"}
    assert [c.finish_reason for c in chunks] == [pb.FINISH_REASON_UNSPECIFIED] * 2 + [pb.FINISH_REASON_LENGTH]


def test_generate_error_is_a_status(stub: pb_grpc.InferenceStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(text="hello", max_tokens=3), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "token_ids" in err.value.details()


def test_classify_tensor_over_the_wire(stub: pb_grpc.InferenceStub) -> None:
    images = np.zeros((3, 1, 28, 28), dtype=np.uint8)
    reply = stub.Classify(pb.ClassifyRequest(images=to_tensor_msg(images), request_id="r"), timeout=10)
    probs = from_tensor_msg(reply.probs, max_elements=30)
    assert probs.shape == (3, 10) and len(reply.results) == 3
    assert reply.results[2].served_by.batch_size == 3 and reply.results[2].served_by.request_id == "r"

    bad = pb.ClassifyRequest(images=pb.Tensor(dtype=pb.UINT8, shape=[1, 1, 28, 28], data=b"\0" * 10))
    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(bad, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "10 bytes; shape [1, 1, 28, 28] of UINT8 needs 784" in err.value.details()
