"""proto/validate.py on its own: limits, request checks, and that it never needs torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto import matmamba_pb2 as pb
from proto.tensors import to_tensor_msg
from proto.validate import (
    ModelLimits,
    RequestError,
    validate_classify,
    validate_generate,
    validate_score,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
VISION = ModelLimits.vision(num_classes=10, channels=1, image_size=28, patch_size=4,
                            supported_widths=(64, 32, 16), default_width=64, max_batch=8)
LM = ModelLimits.lm(vocab_size=97, supported_widths=(64, 32), default_width=64, max_batch=4, max_seq_len=32,
                    max_tokens=16, default_max_tokens=8, max_reply_bytes=10_000)


def test_validate_and_client_import_no_torch() -> None:
    code = ("import sys; import proto.validate, cloud.client; "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_valid_classify_request_comes_back_as_arrays() -> None:
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 1, 28, 28)
    inputs = validate_classify(pb.ClassifyRequest(images=to_tensor_msg(images), width=32, request_id="r1"), VISION)
    np.testing.assert_array_equal(inputs.images, images)
    assert (inputs.width, inputs.request_id) == (32, "r1")
    assert validate_classify(pb.ClassifyRequest(images=to_tensor_msg(images)), VISION).width == 64  # 0 = default


def test_generate_defaults_follow_the_proto() -> None:
    inputs = validate_generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3])), LM)
    assert (inputs.max_tokens, inputs.temperature, inputs.top_k, inputs.top_p, inputs.seed) == (8, 1.0, 0, 1.0, None)
    request = pb.GenerateRequest(text="ab", temperature=0.0, top_p=0.5, seed=2**64 - 1, max_tokens=16)
    inputs = validate_generate(request, LM, encode=lambda text: [ord(c) - ord("a") for c in text])
    assert inputs.prompt_ids.tolist() == [0, 1]
    assert (inputs.temperature, inputs.top_p, inputs.seed, inputs.max_tokens) == (0.0, 0.5, 2**64 - 1, 16)


def test_text_prompt_without_a_tokenizer_is_a_failed_precondition() -> None:
    with pytest.raises(RequestError) as err:
        validate_generate(pb.GenerateRequest(text="hello"), LM, encode=None)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "token_ids" in err.value.message


def test_full_logprobs_over_the_reply_limit_say_last_only() -> None:
    tokens = np.zeros((4, 32), dtype=np.int64)  # 4 * 32 * 97 * 4 bytes > 10,000
    with pytest.raises(RequestError) as err:
        validate_score(pb.ScoreRequest(tokens=to_tensor_msg(tokens)), LM)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "last_only" in err.value.message
    assert validate_score(pb.ScoreRequest(tokens=to_tensor_msg(tokens), last_only=True), LM).last_only


def test_limits_from_model_info_round_trip() -> None:
    info = pb.ModelInfoReply(task=pb.VISION, d_model=64, served_width=64, supported_widths=[64, 32, 16],
                             max_batch_size=8, vision=pb.VisionInfo(num_classes=10, image_size=28, channels=1,
                                                                    patch_size=4))
    assert ModelLimits.from_model_info(info) == VISION
    with pytest.raises(ValueError, match="default_width"):
        ModelLimits.vision(num_classes=10, channels=1, image_size=28, patch_size=4, supported_widths=(32,),
                           default_width=64)


@settings(max_examples=150, deadline=None)
@given(dtype=st.sampled_from(list(pb.DType.values()) + [99]),
       shape=st.lists(st.integers(-2, 32), max_size=4),
       extra=st.integers(-3, 3), width=st.sampled_from([0, 64, 16, 7, -1]))
def test_any_classify_request_is_validated_or_refused_with_a_request_error(
        dtype: int, shape: list[int], extra: int, width: int) -> None:
    count = int(np.prod([max(d, 0) for d in shape])) if shape else 1
    itemsize = {pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.UINT8: 1, pb.INT64: 8, pb.INT32: 4}.get(dtype, 1)
    data = bytes(max(count * itemsize + extra, 0))
    request = pb.ClassifyRequest(images=pb.Tensor(dtype=dtype, shape=shape, data=data), width=width)
    try:
        inputs = validate_classify(request, VISION)
    except RequestError as err:
        assert err.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert err.message
        return
    n, c, h, w = inputs.images.shape
    assert 1 <= n <= VISION.max_batch and c == 1 and h % 4 == 0 and w % 4 == 0 and h > 0 and w > 0
    assert inputs.images.dtype in (np.uint8, np.float32) and inputs.width in VISION.supported_widths
