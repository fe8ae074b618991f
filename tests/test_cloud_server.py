"""The cloud replica end to end: a real grpc.aio server on 127.0.0.1 (port 0) in a background event loop.

Models are tiny (tests/conftest.py factories) saved into tmp dirs and loaded back with
matmamba.load_model; a few tests wrap the *model object's* forward to count calls or to slow it
down. Clients are plain sync grpcio stubs (the .proto alone suffices) unless a test is about
cloud.client.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.client import CloudClient
from cloud.generation import IncrementalDecoder
from cloud.runner import ModelRunner
from cloud.server import CloudServer, ServerConfig
from matmamba.data import FMNIST_CLASSES, load_fashion_mnist, normalize_images
from matmamba.data.tokenizer import ByteTokenizer
from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc
from proto.tensors import from_tensor_msg, to_tensor_msg

from .conftest import small_lm, small_vision

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_VISION = REPO_ROOT / "checkpoints" / "matmamba-vision-fmnist"
BYTE_VOCAB = 257  # ByteTokenizer: 256 bytes + EOS
MAX_BATCH = 8
MAX_SEQ_LEN = 64
MAX_TOKENS = 24
RPC_TIMEOUT = 20.0
REPLY_LIMIT = 256 * 1024  # the LM server's cap on a Score reply, below its 1 MiB message limit


# ------------------------------------------------------------------ harness


class Instrumented:
    """Wraps a model object's forward: counts calls and can hold each call for ``delay`` seconds."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls, self.delay, self.entered = 0, 0.0, threading.Event()
        self._forward = model.forward
        model.forward = self._counted

    def _counted(self, *args, **kwargs):
        self.calls += 1
        self.entered.set()
        if self.delay:
            time.sleep(self.delay)
        return self._forward(*args, **kwargs)


class ServerThread:
    """A CloudServer running in its own event loop thread; ``stub``/``health`` are sync grpcio clients."""

    def __init__(self, runner: ModelRunner, **config) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        defaults = dict(port=0, metrics_port=0, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ_LEN, max_tokens=MAX_TOKENS)
        self.config = ServerConfig(**{**defaults, **config})
        self.runner = runner
        self.server = CloudServer(self.config, runner)
        self.run(self.server.start())
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def status(self) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT).status

    def close(self) -> None:
        self.channel.close()
        self.run(self.server.stop(grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _runner(model: torch.nn.Module, path: Path, tokenizer=None, **kwargs) -> ModelRunner:
    """Save ``model`` as a checkpoint and load it back the way the server does."""
    model.save_pretrained(path, tokenizer=tokenizer)
    limits = dict(max_batch=MAX_BATCH, max_seq_len=MAX_SEQ_LEN, max_tokens=MAX_TOKENS)
    return ModelRunner.load(path, device="cpu", **{**limits, **kwargs})


@pytest.fixture(scope="module")
def vision(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    server = ServerThread(_runner(small_vision(), tmp_path_factory.mktemp("vision")))
    yield server
    server.close()


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    model = small_lm(vocab_size=BYTE_VOCAB)
    runner = _runner(model, tmp_path_factory.mktemp("lm"), tokenizer=ByteTokenizer(), max_reply_bytes=REPLY_LIMIT)
    server = ServerThread(runner, max_message_mb=1)
    yield server
    server.close()


def _images(n: int, seed: int = 0, side: int = 28) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, side, side), dtype=np.uint8)


def _classify(stub: pb_grpc.InferenceStub, images: np.ndarray, **fields) -> pb.ClassifyReply:
    return stub.Classify(pb.ClassifyRequest(images=to_tensor_msg(images), **fields), timeout=RPC_TIMEOUT)


def _probs(reply: pb.ClassifyReply) -> np.ndarray:
    return from_tensor_msg(reply.probs, max_elements=1 << 20)


@torch.inference_mode()
def _direct_probs(model: torch.nn.Module, images: np.ndarray, width: int | None = None) -> np.ndarray:
    x = normalize_images(torch.from_numpy(images))
    return model(x, widths=width or model.config.d_model).softmax(-1).numpy()


# ------------------------------------------------------------------ answers equal the model's


def test_health_is_serving_after_warmup(vision: ServerThread) -> None:
    assert vision.status() == health_pb2.HealthCheckResponse.SERVING
    named = health_pb2.HealthCheckRequest(service="matmamba.v1.Inference")
    assert vision.health.Check(named, timeout=RPC_TIMEOUT).status == health_pb2.HealthCheckResponse.SERVING


def test_health_not_serving_until_the_warmup_batch_ran(tmp_path: Path) -> None:
    runner = _runner(small_vision(), tmp_path / "v")
    release, original = threading.Event(), runner.warmup
    runner.warmup = lambda: (release.wait(30), original())
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = CloudServer(ServerConfig(port=0, metrics_port=None), runner)
    starting = asyncio.run_coroutine_threadsafe(server.start(), loop)
    try:
        deadline = time.monotonic() + 20
        while not server.port and time.monotonic() < deadline:
            time.sleep(0.01)
        with grpc.insecure_channel(server.address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            assert check(health_pb2.HealthCheckRequest(), timeout=5).status == not_serving
            with pytest.raises(grpc.RpcError) as err:
                _classify(pb_grpc.InferenceStub(channel), _images(1))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
            release.set()
            starting.result(30)
            assert check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        asyncio.run_coroutine_threadsafe(server.stop(grace=0.5), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)


@pytest.mark.parametrize("as_float", [False, True])
def test_classify_equals_the_model(vision: ServerThread, as_float: bool) -> None:
    images = _images(5)
    sent = normalize_images(torch.from_numpy(images)).numpy() if as_float else images
    reply = _classify(vision.stub, sent, request_id="req-1")
    probs, expected = _probs(reply), _direct_probs(vision.runner.model, images)
    assert probs.shape == (5, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
    for row, result in zip(probs, reply.results):
        assert result.predicted_class == row.argmax() and result.label == FMNIST_CLASSES[row.argmax()]
        s = result.served_by
        assert (s.tier, s.width, s.level, s.request_id, s.replica) == (pb.CLOUD, 64, 1, "req-1", vision.server.address)
        assert s.batch_size >= 5 and s.cloud_ms > 0 and s.confidence == pytest.approx(row.max())


def test_classify_at_a_nested_width(vision: ServerThread) -> None:
    images = _images(3, seed=1)
    reply = _classify(vision.stub, images, width=16)
    np.testing.assert_allclose(_probs(reply), _direct_probs(vision.runner.model, images, 16), atol=1e-5, rtol=0)
    assert (reply.results[0].served_by.width, reply.results[0].served_by.level) == (16, 4)
    assert len(reply.results[0].served_by.request_id) > 0  # assigned by the server


def test_model_info_describes_the_checkpoint(vision: ServerThread) -> None:
    info = vision.stub.ModelInfo(pb.ModelInfoRequest(), timeout=RPC_TIMEOUT)
    assert (info.task, info.d_model, info.n_layer, info.served_width, info.served_level) == (pb.VISION, 64, 2, 64, 1)
    assert list(info.supported_levels) == [1, 2, 4, 8] and list(info.supported_widths) == [64, 32, 16, 8]
    assert info.checkpoint_sha256 == vision.runner.fingerprint and len(info.checkpoint_sha256) == 64
    assert (info.tier, info.device, info.max_batch_size, info.server_version) == (pb.CLOUD, "cpu", MAX_BATCH, "0.1.0")
    assert list(info.vision.class_names) == list(FMNIST_CLASSES)
    assert (info.vision.image_size, info.vision.channels, info.vision.patch_size) == (28, 1, 4)


@pytest.mark.parametrize("last_only", [False, True])
def test_score_equals_log_softmax_of_the_model(lm: ServerThread, last_only: bool) -> None:
    tokens = np.random.default_rng(0).integers(0, BYTE_VOCAB, (3, 12))
    reply = lm.stub.Score(pb.ScoreRequest(tokens=to_tensor_msg(tokens), last_only=last_only), timeout=RPC_TIMEOUT)
    logprobs = from_tensor_msg(reply.logprobs, max_elements=1 << 22)
    token_logprobs = from_tensor_msg(reply.token_logprobs, max_elements=1 << 22)
    with torch.inference_mode():
        expected = F.log_softmax(lm.runner.model(torch.from_numpy(tokens)).float(), -1).numpy()  # (3, 12, V)
    np.testing.assert_allclose(logprobs, expected[:, -1:] if last_only else expected, atol=1e-5, rtol=0)
    gathered = np.take_along_axis(expected[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(token_logprobs, gathered, atol=1e-5, rtol=0)
    assert [s.confidence_measure for s in reply.served_by] == ["mean_token_logprob"] * 3


def _generate(stub: pb_grpc.InferenceStub, **fields) -> list[pb.GenerateChunk]:
    return list(stub.Generate(pb.GenerateRequest(**fields), timeout=RPC_TIMEOUT))


def test_greedy_generate_equals_model_generate(lm: ServerThread) -> None:
    tok, model = ByteTokenizer(), lm.runner.model
    chunks = _generate(lm.stub, text="The cat ", max_tokens=20, temperature=0.0)
    ids = [i for c in chunks for i in c.token_ids]
    prompt = torch.tensor([tok.encode("The cat ")])
    expected = model.generate(prompt, 20, temperature=0.0, eos_id=tok.eos_id)[0, prompt.shape[1]:].tolist()
    assert ids == expected
    assert "".join(c.text for c in chunks) == tok.decode(ids)
    assert [c.finish_reason for c in chunks[:-1]] == [pb.FINISH_REASON_UNSPECIFIED] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == (pb.FINISH_REASON_EOS if tok.eos_id in ids else pb.FINISH_REASON_LENGTH)
    with torch.inference_mode():
        logits = model(torch.tensor([tok.encode("The cat ")]))[0, -1]
    first_logprob = F.log_softmax(logits.float(), -1)[ids[0]].item()
    assert chunks[0].logprobs[0] == pytest.approx(first_logprob, abs=1e-4)


def test_seeded_sampling_is_reproducible(lm: ServerThread) -> None:
    fields = dict(token_ids=pb.TokenIds(ids=[72, 105]), max_tokens=16, temperature=1.0, top_p=0.9, top_k=50)
    runs = [[i for c in _generate(lm.stub, seed=seed, **fields) for i in c.token_ids] for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and len(runs[0]) > 0
    assert runs[0] != runs[2]


def test_incremental_decoding_never_splits_a_character() -> None:
    tok = ByteTokenizer()
    text = "naïve café — 東京 🙂!"
    decoder = IncrementalDecoder(tok.decode)
    pieces = [decoder.push(i) for i in tok.encode(text)] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p == "") >= 6  # held back inside multi-byte characters


def test_cancelled_generation_stops_promptly(tmp_path: Path) -> None:
    runner = _runner(small_lm(vocab_size=BYTE_VOCAB), tmp_path / "lm", tokenizer=ByteTokenizer(), max_tokens=2000,
                     max_seq_len=4096)
    steps, original = [], runner.model.step
    runner.model.step = lambda *a, **k: (steps.append(1), time.sleep(0.01), original(*a, **k))[2]
    server = ServerThread(runner, max_tokens=2000, max_seq_len=4096)
    try:
        call = server.stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]), max_tokens=2000,
                                                       temperature=1.0, seed=1), timeout=RPC_TIMEOUT)
        for _ in range(3):
            next(call)
        call.cancel()
        pool, deadline = server.server.servicer.generation, time.monotonic() + 5
        while pool.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.running == 0, "the generation thread did not stop after the client cancelled"
        assert len(steps) < 100
    finally:
        server.close()


# ------------------------------------------------------------------ batching, queueing, deadlines


def test_concurrent_requests_are_batched(tmp_path: Path) -> None:
    runner = _runner(small_vision(), tmp_path / "v")
    counter = Instrumented(runner.model)
    server = ServerThread(runner, max_wait_ms=50, max_batch=64)
    try:
        images = [_images(1, seed=i) for i in range(16)]
        alone = [_direct_probs(runner.model, x) for x in images]
        before = counter.calls
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda x: _classify(server.stub, x), images))
        assert counter.calls - before < 16
        assert max(r.results[0].served_by.batch_size for r in replies) > 1
        for reply, expected in zip(replies, alone):
            np.testing.assert_allclose(_probs(reply), expected, atol=1e-5, rtol=0)
    finally:
        server.close()


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[tuple[ServerThread, Instrumented]]:
    runner = _runner(small_vision(), tmp_path / "v")
    counter = Instrumented(runner.model)
    server = ServerThread(runner, max_queue=1, max_wait_ms=0)
    counter.delay, counter.entered = 0.6, threading.Event()
    yield server, counter
    server.close()


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_full_queue_is_resource_exhausted(slow: tuple[ServerThread, Instrumented]) -> None:
    server, counter = slow
    first = server.stub.Classify.future(pb.ClassifyRequest(images=to_tensor_msg(_images(1))), timeout=RPC_TIMEOUT)
    assert counter.entered.wait(10)  # the first request is computing
    queued = server.stub.Classify.future(pb.ClassifyRequest(images=to_tensor_msg(_images(1))), timeout=RPC_TIMEOUT)
    _wait_until(lambda: server.server.servicer.batcher.waiting == 1)
    with pytest.raises(grpc.RpcError) as err:
        _classify(server.stub, _images(1))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in err.value.details()
    assert len(first.result().results) == 1 and len(queued.result().results) == 1


def test_request_past_its_deadline_is_not_computed(slow: tuple[ServerThread, Instrumented]) -> None:
    server, counter = slow
    first = server.stub.Classify.future(pb.ClassifyRequest(images=to_tensor_msg(_images(1))), timeout=RPC_TIMEOUT)
    assert counter.entered.wait(10)
    calls = counter.calls
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Classify(pb.ClassifyRequest(images=to_tensor_msg(_images(1))), timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    first.result()
    time.sleep(0.1)  # the worker would have taken the expired request right after the first batch
    assert counter.calls == calls, "a request past its deadline reached the model"
    counter.delay = 0.0
    assert len(_classify(server.stub, _images(1)).results) == 1


def test_compute_failure_fails_its_batch_only(tmp_path: Path) -> None:
    runner = _runner(small_vision(), tmp_path / "v")
    counter = Instrumented(runner.model)
    server = ServerThread(runner)
    try:
        original = counter._forward
        counter._forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("simulated CUDA error"))
        with pytest.raises(grpc.RpcError) as err:
            _classify(server.stub, _images(2))
        assert err.value.code() == grpc.StatusCode.INTERNAL and "simulated CUDA error" in err.value.details()
        counter._forward = original
        assert len(_classify(server.stub, _images(2)).results) == 2
        assert server.status() == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.close()


def test_health_watchers_see_not_serving_while_draining(tmp_path: Path) -> None:
    runner = _runner(small_vision(), tmp_path / "v")
    counter = Instrumented(runner.model)
    server = ServerThread(runner, max_wait_ms=0)
    counter.delay = 0.5
    watch = health_pb2_grpc.HealthStub(server.channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
    stopping = threading.Thread(target=server.run, args=(server.server.stop(grace=10.0),))
    try:
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        slow = server.stub.Classify.future(pb.ClassifyRequest(images=to_tensor_msg(_images(1))), timeout=30)
        assert counter.entered.wait(10)
        stopping.start()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # an open Watch stream is an in-flight RPC too: the drain would wait for it
        assert len(slow.result().results) == 1  # the request in flight completes during the drain
        stopping.join(15)
        assert not stopping.is_alive(), "the drain did not finish"
    finally:
        watch.cancel()
        if not stopping.is_alive():
            server.close()  # stops again (a no-op when drained), ends the loop thread


# ------------------------------------------------------------------ bad input


def _tensor(dtype: int, shape: list[int], data: bytes | None = None) -> pb.Tensor:
    itemsize = {pb.UINT8: 1, pb.FLOAT32: 4, pb.FLOAT16: 2, pb.INT64: 8, pb.INT32: 4}[dtype]
    count = math.prod(shape)
    return pb.Tensor(dtype=dtype, shape=shape, data=bytes(count * itemsize) if data is None else data)


def _float_images(value: float) -> pb.Tensor:
    x = np.zeros((1, 1, 28, 28), dtype=np.float32)
    x[0, 0, 3, 4] = value
    return to_tensor_msg(x)


INVALID, TOO_LARGE, PRECONDITION = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    grpc.StatusCode.FAILED_PRECONDITION)
IMG = [1, 1, 28, 28]
CLASSIFY_CASES = {
    "missing images": (pb.ClassifyRequest(), INVALID, "images is missing"),
    "dtype unset": (pb.ClassifyRequest(images=pb.Tensor(shape=IMG, data=bytes(784))), INVALID, "DTYPE_UNSPECIFIED"),
    "float16 images": (pb.ClassifyRequest(images=_tensor(pb.FLOAT16, IMG)), INVALID, "got FLOAT16"),
    "int64 images": (pb.ClassifyRequest(images=_tensor(pb.INT64, IMG)), INVALID, "UINT8"),
    "rank 3": (pb.ClassifyRequest(images=_tensor(pb.UINT8, [1, 28, 28])), INVALID, "shape (N, 1, H, W)"),
    "3 channels": (pb.ClassifyRequest(images=_tensor(pb.UINT8, [1, 3, 28, 28])), INVALID, "1 channel"),
    "short data": (pb.ClassifyRequest(images=_tensor(pb.UINT8, IMG, bytes(783))), INVALID, "783 bytes"),
    "negative dim": (pb.ClassifyRequest(images=pb.Tensor(dtype=pb.UINT8, shape=[1, 1, -28, 28])), INVALID,
                     "negative"),
    "empty batch": (pb.ClassifyRequest(images=_tensor(pb.UINT8, [0, 1, 28, 28])), INVALID, "empty"),
    "side not patch multiple": (pb.ClassifyRequest(images=_tensor(pb.UINT8, [1, 1, 30, 28])), INVALID,
                                "multiples of the patch size 4"),
    "nan": (pb.ClassifyRequest(images=_float_images(float("nan"))), INVALID, "NaN"),
    "inf": (pb.ClassifyRequest(images=_float_images(float("-inf"))), INVALID, "infinite"),
    "batch too large": (pb.ClassifyRequest(images=_tensor(pb.UINT8, [MAX_BATCH + 1, 1, 28, 28])), TOO_LARGE,
                        f"at most {MAX_BATCH}"),
    "image too large": (pb.ClassifyRequest(images=_tensor(pb.UINT8, [1, 1, 28, 200])), TOO_LARGE, "largest side"),
    "unsupported width": (pb.ClassifyRequest(images=_tensor(pb.UINT8, IMG), width=24), INVALID,
                          "supported widths are [64, 32, 16, 8]"),
    "negative width": (pb.ClassifyRequest(images=_tensor(pb.UINT8, IMG), width=-64), INVALID, "width -64"),
    "request id too long": (pb.ClassifyRequest(images=_tensor(pb.UINT8, IMG), request_id="x" * 200), INVALID,
                            "request_id"),
}


@pytest.mark.parametrize("case", CLASSIFY_CASES)
def test_bad_classify_requests_are_refused(vision: ServerThread, case: str) -> None:
    request, code, words = CLASSIFY_CASES[case]
    with pytest.raises(grpc.RpcError) as err:
        vision.stub.Classify(request, timeout=RPC_TIMEOUT)
    assert err.value.code() == code and words in err.value.details(), err.value.details()
    assert vision.status() == health_pb2.HealthCheckResponse.SERVING
    assert len(_classify(vision.stub, _images(1)).results) == 1


def _ids(*ids: int) -> pb.TokenIds:
    return pb.TokenIds(ids=list(ids))


def _tokens(shape: list[int], value: int = 1, dtype: int = pb.INT64) -> pb.Tensor:
    return to_tensor_msg(np.full(shape, value, dtype=np.int64 if dtype == pb.INT64 else np.int32))


LM_CASES = {
    "classify on an lm": ("Classify", pb.ClassifyRequest(images=_tensor(pb.UINT8, IMG)), PRECONDITION,
                          "needs a VISION checkpoint"),
    "int32 tokens": ("Score", pb.ScoreRequest(tokens=_tokens([1, 4], dtype=pb.INT32)), INVALID, "INT64"),
    "missing tokens": ("Score", pb.ScoreRequest(), INVALID, "tokens is missing"),
    "1-d tokens": ("Score", pb.ScoreRequest(tokens=_tokens([4])), INVALID, "shape (N, L)"),
    "zero length": ("Score", pb.ScoreRequest(tokens=_tokens([2, 0])), INVALID, "L = 0"),
    "id too large": ("Score", pb.ScoreRequest(tokens=_tokens([1, 3], BYTE_VOCAB)), INVALID, "[0, 257)"),
    "negative id": ("Score", pb.ScoreRequest(tokens=_tokens([1, 3], -1)), INVALID, "id -1"),
    "sequence too long": ("Score", pb.ScoreRequest(tokens=_tokens([1, MAX_SEQ_LEN + 1])), TOO_LARGE,
                          f"at most {MAX_SEQ_LEN}"),
    "reply too large": ("Score", pb.ScoreRequest(tokens=_tokens([MAX_BATCH, MAX_SEQ_LEN])), TOO_LARGE,
                        "last_only"),
    "no prompt": ("Generate", pb.GenerateRequest(max_tokens=4), INVALID, "prompt is missing"),
    "empty text": ("Generate", pb.GenerateRequest(text=""), INVALID, "text prompt is empty"),
    "empty token ids": ("Generate", pb.GenerateRequest(token_ids=_ids()), INVALID, "token_ids is empty"),
    "prompt id out of range": ("Generate", pb.GenerateRequest(token_ids=_ids(1, 300)), INVALID, "id 300"),
    "negative max_tokens": ("Generate", pb.GenerateRequest(text="a", max_tokens=-1), INVALID, "max_tokens"),
    "max_tokens over cap": ("Generate", pb.GenerateRequest(text="a", max_tokens=MAX_TOKENS + 1), TOO_LARGE,
                            f"limit of {MAX_TOKENS}"),
    "negative temperature": ("Generate", pb.GenerateRequest(text="a", temperature=-0.5), INVALID, "temperature"),
    "nan temperature": ("Generate", pb.GenerateRequest(text="a", temperature=float("nan")), INVALID, "temperature"),
    "top_p above 1": ("Generate", pb.GenerateRequest(text="a", top_p=1.5), INVALID, "top_p"),
    "negative top_p": ("Generate", pb.GenerateRequest(text="a", top_p=-0.1), INVALID, "top_p"),
    "negative top_k": ("Generate", pb.GenerateRequest(text="a", top_k=-3), INVALID, "top_k"),
    "unsupported width": ("Generate", pb.GenerateRequest(text="a", width=48), INVALID, "width 48"),
    "prompt plus tokens too long": ("Generate", pb.GenerateRequest(token_ids=_ids(*[1] * 60), max_tokens=10),
                                    TOO_LARGE, "longest sequence"),
}


@pytest.mark.parametrize("case", LM_CASES)
def test_bad_lm_requests_are_refused(lm: ServerThread, case: str) -> None:
    method, request, code, words = LM_CASES[case]
    call = getattr(lm.stub, method)
    with pytest.raises(grpc.RpcError) as err:
        reply = call(request, timeout=RPC_TIMEOUT)
        if method == "Generate":
            list(reply)
    assert err.value.code() == code and words in err.value.details(), err.value.details()
    assert lm.status() == health_pb2.HealthCheckResponse.SERVING
    assert len(_generate(lm.stub, text="ok", max_tokens=2)) >= 2


def test_invalid_utf8_on_the_wire_is_refused_and_the_server_keeps_serving(lm: ServerThread) -> None:
    # A well-behaved protobuf library cannot even send this: GenerateRequest.text = b"\xff\xfe".
    raw = lm.channel.unary_stream("/matmamba.v1.Inference/Generate")
    with pytest.raises(grpc.RpcError) as err:
        list(raw(b"\x0a\x02\xff\xfe", timeout=RPC_TIMEOUT))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bad UTF-8" in err.value.details()
    assert lm.status() == health_pb2.HealthCheckResponse.SERVING


def test_oversize_message_is_resource_exhausted(lm: ServerThread) -> None:
    big = pb.ScoreRequest(tokens=to_tensor_msg(np.zeros((1, 200_000), dtype=np.int64)))  # 1.6 MB > 1 MiB
    with pytest.raises(grpc.RpcError) as err:
        lm.stub.Score(big, timeout=RPC_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert lm.status() == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------ metrics and clients


def test_metrics_endpoint_counts_requests_by_method_and_code(vision: ServerThread) -> None:
    for _ in range(3):
        _classify(vision.stub, _images(2))
    with pytest.raises(grpc.RpcError):
        vision.stub.Classify(pb.ClassifyRequest(), timeout=RPC_TIMEOUT)
    url = f"http://127.0.0.1:{vision.server.metrics_port}/metrics"

    def value(pattern: str) -> float:
        match = re.search(pattern + r" ([0-9.e+]+)", text)
        assert match, f"{pattern} not in /metrics"
        return float(match.group(1))

    # A refused RPC's status reaches the client before its handler's bookkeeping (the in-flight
    # gauge) finishes on the server: read until that settles, for at most 5 s.
    deadline = time.monotonic() + 5.0
    while True:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        if value(r'matmamba_cloud_inflight_requests\{method="Classify"\}') == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    assert value(r'matmamba_cloud_requests_total\{code="OK",method="Classify"\}') >= 3
    assert value(r'matmamba_cloud_requests_total\{code="INVALID_ARGUMENT",method="Classify"\}') >= 1
    assert value(r'matmamba_cloud_batch_size_count\{method="Classify"\}') >= 3
    assert value(r'matmamba_cloud_queue_wait_seconds_count\{method="Classify"\}') >= 3
    assert value(r'matmamba_cloud_compute_seconds_count\{method="Classify"\}') >= 3
    assert value(r'matmamba_cloud_queue_depth\{method="Classify"\}') == 0
    assert value(r'matmamba_cloud_inflight_requests\{method="Classify"\}') == 0
    assert 'matmamba_cloud_model_info{checkpoint="' in text


def test_plain_grpcio_client_needs_only_the_proto(vision: ServerThread) -> None:
    images = _images(4, seed=3)
    with grpc.insecure_channel(vision.server.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        request = pb.ClassifyRequest(images=pb.Tensor(dtype=pb.UINT8, shape=list(images.shape),
                                                      data=images.tobytes()))
        reply = stub.Classify(request, timeout=RPC_TIMEOUT)
    probs = np.frombuffer(reply.probs.data, dtype="<f4").reshape(tuple(reply.probs.shape))
    np.testing.assert_allclose(probs, _direct_probs(vision.runner.model, images), atol=1e-5, rtol=0)
    assert [r.predicted_class for r in reply.results] == probs.argmax(1).tolist()


def test_cloud_client_helpers(lm: ServerThread) -> None:
    async def use() -> tuple:
        async with CloudClient(lm.server.address, timeout=RPC_TIMEOUT) as cloud:
            await cloud.wait_ready(timeout=10)
            info = await cloud.model_info()
            scored = await cloud.score(np.array([[1, 2, 3]]), last_only=True)
            chunks = [c async for c in cloud.generate("hi", max_tokens=5, temperature=0)]
            return await cloud.health(), info, scored, chunks

    health, info, scored, chunks = asyncio.run(use())
    assert health == "SERVING" and info.task == pb.LM and info.lm.tokenizer == "byte"
    assert info.lm.eos_token_id == BYTE_VOCAB - 1 and info.lm.vocab_size == BYTE_VOCAB
    assert scored.logprobs.shape == (1, 1, BYTE_VOCAB) and scored.token_logprobs.shape == (1, 2)
    assert chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED


def test_shipped_vision_checkpoint_answers_like_the_model(tmp_path: Path) -> None:
    runner = ModelRunner.load(SHIPPED_VISION, device="cpu")
    server = ServerThread(runner)
    try:
        images, labels = load_fashion_mnist("test-sample")
        batch = images[:8].numpy()[:, None]  # (8, 1, 28, 28) uint8
        reply = _classify(server.stub, batch)
        np.testing.assert_allclose(_probs(reply), _direct_probs(runner.model, batch), atol=1e-5, rtol=0)
        predicted = np.array([r.predicted_class for r in reply.results])
        assert (predicted == labels[:8].numpy()).mean() >= 0.75  # the checkpoint is ~91% accurate
        info = server.stub.ModelInfo(pb.ModelInfoRequest(), timeout=RPC_TIMEOUT)
        assert info.d_model == 192 and info.checkpoint_sha256 == runner.fingerprint
    finally:
        server.close()
