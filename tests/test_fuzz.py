"""Property-based fuzzing (hypothesis) of every RPC of both services against real servers on 127.0.0.1.

Started once for the module: a vision and an LM cloud replica (``python -m cloud``) and a vision
and an LM router (``python -m router`` in the session's Ray cluster, escalating to them). Each
case sends a request built from malformed parts (tensor dtype, shape, byte length, NaN/Inf, huge
dimensions, token ids out of range, widths, request ids, sampling parameters, max_tokens, prompts,
raw bytes that are no message or carry invalid UTF-8, oversize messages) and checks:

- the answer is OK (and well-formed) or an error with the status code the contract names for
  what was wrong, and a message that says so (never UNKNOWN / INTERNAL);
- the server is still SERVING right after, and answers a valid request at the end.

Cases tried per server and RPC are counted; with ``RELIABILITY_OUT=DIR`` they are written to
DIR/fuzz.json (docs/RELIABILITY.md quotes them).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto import matmamba_pb2 as pb
from proto.tensors import to_tensor_msg

from .test_router_integration import LM, VISION, Process, cloud_process, free_port

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
# Per property; each case is one real RPC per server (a few ms) plus a health check. CI runs 40;
# FUZZ_EXAMPLES=300 for a longer run on demand.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
OK = grpc.StatusCode.OK
INVALID, TOO_LARGE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
CASES: Counter[str] = Counter()  # "server/RPC" -> cases tried
CODES: Counter[str] = Counter()  # status code name -> answers with it


@dataclass
class Server:
    name: str  # cloud-vision, cloud-lm, router-vision, router-lm
    address: str
    channel: grpc.Channel
    info: pb.ModelInfoReply

    @property
    def router(self) -> bool:
        return self.name.startswith("router")

    def call(self, method: str, body: bytes, *, stream: bool = False,
             service: str = "matmamba.v1.Inference", timeout: float = 60.0) -> tuple[grpc.StatusCode, str, list]:
        """Send raw request bytes; (status code, details, raw replies)."""
        path = f"/{service}/{method}"
        try:
            if stream:
                replies = list(self.channel.unary_stream(path)(body, timeout=timeout))
            else:
                replies = [self.channel.unary_unary(path)(body, timeout=timeout)]
        except grpc.RpcError as err:
            return err.code(), err.details() or "", []
        return OK, "", replies

    def healthy(self) -> bool:
        reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return reply.status == SERVING


@pytest.fixture(scope="module")
def servers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    clouds = {"cloud-vision": cloud_process(VISION, tmp, "cloud-vision").start(),
              "cloud-lm": cloud_process(LM, tmp, "cloud-lm").start()}
    ray = request.getfixturevalue("ray_cluster")
    routers = {}
    for name, checkpoint, cloud in (("router-vision", VISION, clouds["cloud-vision"]),
                                    ("router-lm", LM, clouds["cloud-lm"])):
        port = free_port()
        routers[name] = Process("router", ["--checkpoint", str(checkpoint), "--edge-level", "4", "--port", str(port),
                                           "--metrics-port", "-1", "--ray-address", ray.address, "--cloud",
                                           cloud.address, "--deadline-ms", "5000"], port, tmp / f"{name}.log")
    procs = {**clouds, **routers}
    out: dict[str, Server] = {}
    try:
        for p in clouds.values():
            p.wait_serving()
        for p in routers.values():
            p.start()
        for name, p in procs.items():
            p.wait_serving()
            channel = grpc.insecure_channel(p.address)
            info = pb.ModelInfoReply.FromString(
                channel.unary_unary("/matmamba.v1.Inference/ModelInfo")(b"", timeout=30))
            out[name] = Server(name, p.address, channel, info)
        yield out
        for server in out.values():
            assert server.healthy()
            assert all(p.proc.poll() is None for p in procs.values())  # no server died
    finally:
        for server in out.values():
            server.channel.close()
        for p in procs.values():
            p.kill()
        _write_counts()


def _write_counts() -> None:
    folder = os.environ.get("RELIABILITY_OUT")
    if folder and CASES:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "fuzz.json").write_text(json.dumps(
            {"examples_per_property": EXAMPLES, "cases": dict(sorted(CASES.items())),
             "codes": dict(sorted(CODES.items())), "total": sum(CASES.values()), "servers_crashed": 0,
             "unhealthy_after_a_case": 0}, indent=2) + "\n")


def expect(server: Server, rpc: str, got: tuple[grpc.StatusCode, str, list], allowed: set[grpc.StatusCode],
           says: str | None = None) -> None:
    """The answer's code is one of ``allowed`` with a message (containing ``says``), and the server is healthy."""
    code, details, _ = got
    CASES[f"{server.name}/{rpc}"] += 1
    CODES[code.name] += 1
    names = sorted(c.name for c in allowed)
    assert code in allowed, f"{server.name} {rpc}: {code.name} {details!r}; expected one of {names}"
    if code != OK:
        assert len(details) > 15, f"{server.name} {rpc}: {code.name} with an unclear message {details!r}"
        if says is not None:
            assert says in details, f"{server.name} {rpc}: {details!r} does not mention {says!r}"
    assert server.healthy(), f"{server.name} stopped SERVING after {rpc}"


def pick(servers: dict[str, Server], task: str) -> list[Server]:
    return [s for name, s in servers.items() if name.endswith(task)]


# ------------------------------------------------------------------ strategies

DTYPES = st.sampled_from([*pb.DType.values(), 7, 99, -1])
DIMS = st.sampled_from([-(2 ** 62), -1, 0, 1, 2, 3, 4, 5, 27, 28, 29, 56, 1 << 20, 2 ** 31, 2 ** 62])
ITEMSIZE = {pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.UINT8: 1, pb.INT64: 8, pb.INT32: 4}
MAX_FUZZ_BYTES = 1 << 16  # exact-length payloads only when the tensor is small


@st.composite
def tensors(draw: st.DrawFn, shape: st.SearchStrategy | None = None, dtype: st.SearchStrategy = DTYPES) -> pb.Tensor:
    """A Tensor whose dtype, shape and bytes may or may not agree, with NaN/Inf or random values."""
    kind = draw(dtype)
    dims = draw(shape if shape is not None else st.lists(DIMS, max_size=5))
    count = math.prod(dims) if all(d >= 0 for d in dims) else -1
    size = ITEMSIZE.get(kind, 1)
    if 0 <= count * size <= MAX_FUZZ_BYTES and draw(st.booleans()):
        fill = draw(st.sampled_from(["random", "nan", "inf", "zero"]))
        if fill == "random" or kind not in (pb.FLOAT32, pb.FLOAT16):
            data = draw(st.binary(min_size=count * size, max_size=count * size))
        else:
            value = {"nan": np.nan, "inf": -np.inf, "zero": 0.0}[fill]
            data = np.full(count, value, np.float32 if kind == pb.FLOAT32 else np.float16).tobytes()
    else:
        data = draw(st.binary(max_size=256))
    return pb.Tensor(dtype=kind, shape=dims, data=data)


def widths(info: pb.ModelInfoReply) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([0, *info.supported_widths]),
                     st.integers(-(2 ** 31), 2 ** 31 - 1))


REQUEST_IDS = st.one_of(st.just(""), st.text(max_size=20), st.text(min_size=129, max_size=140),
                        st.sampled_from(["a\nb", "\x00", "id\x1b[31m"]))


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def string_field(number: int, raw: bytes) -> bytes:
    """A length-delimited field ``number`` holding ``raw`` bytes (the wire form of a proto string)."""
    return _varint(number << 3 | 2) + _varint(len(raw)) + raw


INVALID_UTF8 = st.sampled_from([b"\xff", b"\xc3\x28", b"abc\xe2\x82", b"\xed\xa0\x80", b"ok \x80 no"])
GARBAGE = st.one_of(st.binary(max_size=64), st.just(b"\xff" * 16), st.just(b"\x0a\xff\xff\xff\xff\x0f"))


# ------------------------------------------------------------------ Classify


def _classify_ok(server: Server, got: tuple, n: int) -> None:
    if got[0] == OK:
        reply = pb.ClassifyReply.FromString(got[2][0])
        assert len(reply.results) == n and list(reply.probs.shape) == [n, server.info.vision.num_classes]
        probs = np.frombuffer(reply.probs.data, np.float32).reshape(n, -1)
        assert np.isfinite(probs).all() and np.allclose(probs.sum(-1), 1, atol=1e-3)


@given(data=st.data())
@FUZZ
def test_classify_malformed_images(servers: dict[str, Server], data: st.DataObject) -> None:
    for server in pick(servers, "vision"):
        v = server.info.vision
        shape = st.one_of(st.lists(DIMS, max_size=5),
                          st.tuples(st.integers(0, 3), st.sampled_from([0, 1, 2, v.channels]),
                                    st.sampled_from([0, 4, 27, 28, 32, 2 ** 40]),
                                    st.sampled_from([0, 4, 28, 29, 56])).map(list))
        images = data.draw(tensors(shape=shape))
        request = pb.ClassifyRequest(images=images, width=data.draw(widths(server.info)),
                                     request_id=data.draw(REQUEST_IDS))
        got = server.call("Classify", request.SerializeToString())
        expect(server, "Classify", got, {OK, INVALID, TOO_LARGE})
        _classify_ok(server, got, images.shape[0] if images.shape else 0)


def test_classify_named_bad_inputs_get_the_named_code(servers: dict[str, Server]) -> None:
    good = np.zeros((1, 1, 28, 28), np.uint8)
    for server in pick(servers, "vision"):
        limit = server.info.max_batch_size
        cases = [
            (pb.ClassifyRequest(), INVALID, "missing"),
            (pb.ClassifyRequest(images=to_tensor_msg(np.full((1, 1, 28, 28), np.nan, np.float32))), INVALID, "NaN"),
            (pb.ClassifyRequest(images=to_tensor_msg(np.full((1, 1, 28, 28), np.inf, np.float32))), INVALID, "NaN"),
            (pb.ClassifyRequest(images=to_tensor_msg(good.astype(np.int64))), INVALID, "UINT8"),
            (pb.ClassifyRequest(images=pb.Tensor(dtype=pb.UINT8, shape=[1, 1, 28, 28], data=b"\x00" * 783)),
             INVALID, "bytes"),
            (pb.ClassifyRequest(images=pb.Tensor(dtype=pb.UINT8, shape=[2 ** 40, 1, 28, 28], data=b"")),
             TOO_LARGE, "at most"),
            (pb.ClassifyRequest(images=pb.Tensor(dtype=pb.UINT8, shape=[1, 1, 2 ** 40, 2 ** 40], data=b"")),
             None, None),
            (pb.ClassifyRequest(images=to_tensor_msg(good), width=7), INVALID, "width"),
            (pb.ClassifyRequest(images=to_tensor_msg(np.zeros((limit + 1, 1, 28, 28), np.uint8))), TOO_LARGE,
             f"at most {limit}"),
            (pb.ClassifyRequest(images=to_tensor_msg(np.zeros((0, 1, 28, 28), np.uint8))), INVALID, "empty"),
        ]
        for request, code, says in cases:
            got = server.call("Classify", request.SerializeToString())
            expect(server, "Classify", got, {code} if code else {INVALID, TOO_LARGE}, says)


# ------------------------------------------------------------------ Score


@st.composite
def token_tensors(draw: st.DrawFn, vocab: int) -> pb.Tensor:
    """Well-formed (N, L) INT64 tensors whose ids may lie outside [0, vocab)."""
    n, length = draw(st.integers(0, 3)), draw(st.integers(0, 9))
    ids = draw(st.lists(st.sampled_from([-(2 ** 63), -1, 0, 1, vocab - 1, vocab, 2 ** 63 - 1]),
                        min_size=n * length, max_size=n * length))
    return pb.Tensor(dtype=pb.INT64, shape=[n, length], data=np.array(ids, np.int64).tobytes())


@given(data=st.data())
@FUZZ
def test_score_malformed_tokens(servers: dict[str, Server], data: st.DataObject) -> None:
    for server in pick(servers, "lm"):
        vocab = server.info.lm.vocab_size
        tokens = data.draw(st.one_of(tensors(), token_tensors(vocab)))
        request = pb.ScoreRequest(tokens=tokens, width=data.draw(widths(server.info)),
                                  last_only=data.draw(st.booleans()), request_id=data.draw(REQUEST_IDS))
        got = server.call("Score", request.SerializeToString())
        expect(server, "Score", got, {OK, INVALID, TOO_LARGE})
        if got[0] == OK:
            reply = pb.ScoreReply.FromString(got[2][0])
            assert len(reply.served_by) == tokens.shape[0]


def test_score_named_bad_inputs_get_the_named_code(servers: dict[str, Server]) -> None:
    for server in pick(servers, "lm"):
        vocab = server.info.lm.vocab_size
        cases = [
            (pb.ScoreRequest(tokens=to_tensor_msg(np.array([[1, vocab]], np.int64))), INVALID, "vocabulary"),
            (pb.ScoreRequest(tokens=to_tensor_msg(np.array([[-1, 2]], np.int64))), INVALID, "vocabulary"),
            (pb.ScoreRequest(tokens=to_tensor_msg(np.array([[1, 2]], np.int32))), INVALID, "INT64"),
            (pb.ScoreRequest(tokens=to_tensor_msg(np.zeros((1, 0), np.int64))), INVALID, "L = 0"),
            (pb.ScoreRequest(tokens=to_tensor_msg(np.zeros((1, 3000), np.int64)), last_only=True), TOO_LARGE,
             "at most"),
            (pb.ScoreRequest(tokens=to_tensor_msg(np.zeros((1, 2, 3), np.int64))), INVALID, "(N, L)"),
        ]
        for request, code, says in cases:
            expect(server, "Score", server.call("Score", request.SerializeToString()), {code}, says)


# ------------------------------------------------------------------ Generate


@st.composite
def generate_requests(draw: st.DrawFn, info: pb.ModelInfoReply) -> pb.GenerateRequest:
    vocab = info.lm.vocab_size
    request = pb.GenerateRequest(
        max_tokens=draw(st.sampled_from([-(2 ** 31), -1, 1, 2, 3, 513, 2 ** 31 - 1])),
        top_k=draw(st.sampled_from([-5, 0, 1, 40, 2 ** 31 - 1])),
        top_p=draw(st.sampled_from([-0.1, 0.0, 0.5, 1.0, 1.5, math.nan, math.inf])),
        width=draw(widths(info)), request_id=draw(REQUEST_IDS))
    if draw(st.booleans()):
        request.temperature = draw(st.sampled_from([-1.0, 0.0, 0.7, 1.0, math.nan, math.inf, 1e308]))
    if draw(st.booleans()):
        request.seed = draw(st.integers(0, 2 ** 64 - 1))
    prompt = draw(st.sampled_from(["text", "ids", "none"]))
    if prompt == "text":
        request.text = draw(st.one_of(st.text(max_size=30), st.just(""), st.just("\x00\ufffd"), st.just("é" * 3000)))
    elif prompt == "ids":
        request.token_ids.ids.extend(draw(st.lists(st.sampled_from([-1, 0, 5, vocab - 1, vocab, 2 ** 62]),
                                                   max_size=5)))
    return request


@given(data=st.data())
@FUZZ
def test_generate_malformed_requests(servers: dict[str, Server], data: st.DataObject) -> None:
    for server in pick(servers, "lm"):
        request = data.draw(generate_requests(server.info))
        got = server.call("Generate", request.SerializeToString(), stream=True)
        expect(server, "Generate", got, {OK, INVALID, TOO_LARGE})
        if got[0] == OK:
            chunks = [pb.GenerateChunk.FromString(raw) for raw in got[2]]
            assert chunks and chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
            assert sum(len(c.token_ids) for c in chunks) <= request.max_tokens


def test_generate_named_bad_inputs_get_the_named_code(servers: dict[str, Server]) -> None:
    for server in pick(servers, "lm"):
        vocab = server.info.lm.vocab_size
        cases = [
            (pb.GenerateRequest(text="Hi", max_tokens=-1), INVALID, "max_tokens"),
            (pb.GenerateRequest(text="Hi", max_tokens=2 ** 31 - 1), TOO_LARGE, "max_tokens"),
            (pb.GenerateRequest(max_tokens=2), INVALID, "prompt is missing"),
            (pb.GenerateRequest(text="", max_tokens=2), INVALID, "empty"),
            (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[vocab]), max_tokens=2), INVALID, "vocabulary"),
            (pb.GenerateRequest(text="Hi", max_tokens=2, temperature=-1), INVALID, "temperature"),
            (pb.GenerateRequest(text="Hi", max_tokens=2, top_p=1.5), INVALID, "top_p"),
            (pb.GenerateRequest(text="Hi", max_tokens=2, width=5), INVALID, "width"),
        ]
        for request, code, says in cases:
            got = server.call("Generate", request.SerializeToString(), stream=True)
            expect(server, "Generate", got, {code}, says)


# ------------------------------------------------------------------ raw bytes, wrong task, oversize, ModelInfo


@given(data=st.data())
@FUZZ
def test_bytes_that_are_no_request_or_carry_invalid_utf8(servers: dict[str, Server], data: st.DataObject) -> None:
    # (method, streaming, number of a string field of its request)
    methods = [("Classify", False, 3), ("Score", False, 4), ("Generate", True, 1), ("ModelInfo", False, None)]
    for server in servers.values():
        method, stream, field = data.draw(st.sampled_from(methods))
        if field is not None and data.draw(st.booleans()):
            body = string_field(field, data.draw(INVALID_UTF8))
            allowed = {INVALID, PRECONDITION}  # bad UTF-8 is refused before the task is looked at (or after)
        else:
            body = data.draw(GARBAGE)
            allowed = {OK, INVALID, PRECONDITION, TOO_LARGE}  # random bytes may parse as some request
        expect(server, method, server.call(method, body, stream=stream, timeout=30), allowed)


def test_wrong_task_oversize_and_empty_messages(servers: dict[str, Server]) -> None:
    image = pb.ClassifyRequest(images=to_tensor_msg(np.zeros((1, 1, 28, 28), np.uint8))).SerializeToString()
    tokens = pb.ScoreRequest(tokens=to_tensor_msg(np.ones((1, 4), np.int64))).SerializeToString()
    oversize = string_field(3, b"x" * (80 << 20))  # more than any server's message limit (16 / 64 MiB)
    for server in servers.values():
        vision = server.info.task == pb.VISION
        wrong = [("Score", tokens, False), ("Generate", pb.GenerateRequest(text="Hi").SerializeToString(), True)]
        for method, body, stream in (wrong if vision else [("Classify", image, False)]):
            expect(server, method, server.call(method, body, stream=stream), {PRECONDITION})
        expect(server, "Classify", server.call("Classify", oversize), {TOO_LARGE})
        expect(server, "Classify", server.call("Classify", b""), {INVALID, PRECONDITION}, None)
        code, _, replies = server.call("ModelInfo", b"\x0a\x00")  # an unknown field is ignored (proto3)
        expect(server, "ModelInfo", (code, "", replies), {OK})
        assert pb.ModelInfoReply.FromString(replies[0]).checkpoint_sha256 == server.info.checkpoint_sha256


# ------------------------------------------------------------------ RouterAdmin


ADMIN = "matmamba.v1.RouterAdmin"
PATHS = st.one_of(st.text(max_size=40), st.sampled_from(
    ["/", "/etc/passwd", "/dev/zero", "/dev/urandom", "/proc/self/mem", "/proc/self/environ", "/proc/kcore",
     "/nonexistent/t.json", "\x00", "../../../../etc/shadow", "~", "/tmp", "x" * 5000]))


@given(path=PATHS, raw=st.one_of(st.none(), INVALID_UTF8))
@FUZZ
def test_admin_reload_refuses_what_is_no_thresholds_file_and_keeps_the_policy(
        servers: dict[str, Server], path: str, raw: bytes | None) -> None:
    for server in pick(servers, "vision") + pick(servers, "lm"):
        if not server.router:
            continue
        before = server.call("GetThresholds", b"", service=ADMIN)
        body = string_field(1, raw) if raw is not None else pb.ReloadThresholdsRequest(path=path).SerializeToString()
        got = server.call("ReloadThresholds", body, service=ADMIN, timeout=30)
        expect(server, "ReloadThresholds", got, {grpc.StatusCode.NOT_FOUND, INVALID, PRECONDITION})
        after = server.call("GetThresholds", b"", service=ADMIN)
        expect(server, "GetThresholds", after, {OK})
        assert after[2] == before[2]  # the thresholds in force did not change


def test_every_server_still_answers_a_valid_request(servers: dict[str, Server]) -> None:
    calls: dict[str, Callable[[Server], tuple]] = {
        "vision": lambda s: s.call("Classify", pb.ClassifyRequest(
            images=to_tensor_msg(np.zeros((2, 1, 28, 28), np.uint8))).SerializeToString()),
        "lm": lambda s: s.call("Score", pb.ScoreRequest(
            tokens=to_tensor_msg(np.ones((2, 5), np.int64)), last_only=True).SerializeToString()),
    }
    for server in servers.values():
        got = calls["vision" if server.info.task == pb.VISION else "lm"](server)
        assert got[0] == OK, got
