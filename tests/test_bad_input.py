"""Every kind of bad request gets the right gRPC status and a message naming the problem; the server keeps serving."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from support import start

from ttaserve.protocol import grpc_service_pb2_grpc
from ttaserve.protocol import kserve_v2_pb2 as pb
from ttaserve.server.codec import encode_bytes_elements

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def stub(url: str) -> Iterator[grpc_service_pb2_grpc.GRPCInferenceServiceStub]:
    options = [
        ("grpc.max_send_message_length", 512 * 1024 * 1024),
        ("grpc.max_receive_message_length", 512 * 1024 * 1024),
    ]
    with grpc.insecure_channel(url, options=options) as channel:
        yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


def request(
    raw: bytes,
    shape: list[int],
    datatype: str = "UINT8",
    model: str = "resnet",
    name: str = "input",
    **params: object,
) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name=name, datatype=datatype, shape=shape)
    message.raw_input_contents.append(raw)
    for key, value in params.items():
        if isinstance(value, str):
            message.parameters[key].string_param = value
        elif isinstance(value, float):
            message.parameters[key].double_param = value
        else:
            message.parameters[key].int64_param = int(value)
    return message


def uint8_images(n: int, h: int = 32, w: int = 32) -> bytes:
    return np.random.default_rng(n).integers(0, 255, (n, h, w, 3), dtype=np.uint8).tobytes()


def expect(
    stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub,
    message: pb.ModelInferRequest,
    code: grpc.StatusCode,
    *fragments: str,
) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.ModelInfer(message, timeout=30)
    assert excinfo.value.code() == code, excinfo.value.details()
    for fragment in fragments:
        assert fragment in excinfo.value.details(), excinfo.value.details()
    # the server is unharmed: a good request still works
    ok = stub.ModelInfer(request(uint8_images(1), [1, 32, 32, 3]), timeout=30)
    assert ok.outputs[0].name == "logits"


def test_wrong_shape(stub) -> None:
    expect(stub, request(uint8_images(2, 28, 28), [2, 28, 28, 3]), INVALID, "shape", "[-1, 32, 32, 3]")


def test_wrong_rank(stub) -> None:
    expect(stub, request(uint8_images(1), [32, 32, 3]), INVALID, "4 dimensions")


def test_wrong_datatype(stub) -> None:
    raw = np.zeros((1, 32, 32, 3), np.int32).tobytes()
    expect(stub, request(raw, [1, 32, 32, 3], datatype="INT32"), INVALID, "INT32", "UINT8")


def test_byte_count_mismatch(stub) -> None:
    expect(stub, request(uint8_images(2)[:-7], [2, 32, 32, 3]), INVALID, "needs 6144 bytes", "got 6137")


def test_typed_contents_out_of_the_datatypes_range(stub) -> None:
    """Values in ``contents`` (not raw bytes) that a UINT8 cannot hold are the client's error, not an overflow."""
    message = pb.ModelInferRequest(model_name="resnet")
    tensor = message.inputs.add(name="input", datatype="UINT8", shape=[1, 32, 32, 3])
    tensor.contents.uint_contents.extend([7] * 3071 + [300])
    expect(stub, message, INVALID, "UINT8", "outside [0, 255]", "max 300")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(stub, bad: float) -> None:
    images = np.full((1, 32, 32, 3), 0.5, np.float32)
    images[0, 3, 4, 1] = bad
    expect(stub, request(images.tobytes(), [1, 32, 32, 3], datatype="FP32"), INVALID, "NaN or Inf")


def test_undecodable_image(stub) -> None:
    raw = encode_bytes_elements([b"this is not an image"])
    expect(stub, request(raw, [1], datatype="BYTES"), INVALID, "image 0 cannot be decoded")


def test_empty_image(stub) -> None:
    raw = encode_bytes_elements([b""])
    expect(stub, request(raw, [1], datatype="BYTES"), INVALID, "image 0 is empty")


def test_truncated_bytes_tensor(stub) -> None:
    raw = encode_bytes_elements([b"abcdef"])[:-2]
    expect(stub, request(raw, [1], datatype="BYTES"), INVALID, "claims 6 bytes")


def test_empty_batch(stub) -> None:
    expect(stub, request(b"", [0, 32, 32, 3]), INVALID, "empty batch")


def test_unknown_model(stub) -> None:
    expect(
        stub, request(uint8_images(1), [1, 32, 32, 3], model="nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"
    )


def test_unknown_version(stub) -> None:
    message = request(uint8_images(1), [1, 32, 32, 3])
    message.model_version = "9"
    expect(stub, message, grpc.StatusCode.NOT_FOUND, "no version 9", "1, 2")


def test_unknown_output(stub) -> None:
    message = request(uint8_images(1), [1, 32, 32, 3])
    message.outputs.add(name="embedding")
    expect(stub, message, INVALID, "unknown output 'embedding'", "logits")


def test_unknown_input_name(stub) -> None:
    expect(stub, request(uint8_images(1), [1, 32, 32, 3], name="image"), INVALID, "no input 'image'", "'input'")


def test_batch_above_maximum(stub) -> None:
    expect(stub, request(uint8_images(65), [65, 32, 32, 3]), grpc.StatusCode.RESOURCE_EXHAUSTED, "max_batch_size 64")


def test_unknown_strategy_setting(stub) -> None:
    message = request(uint8_images(1), [1, 32, 32, 3], tta_strategy="none", tta_alpha=0.5)
    expect(stub, message, INVALID, "tta_alpha", "strategy 'none'")


def test_out_of_range_setting_lists_every_setting_with_its_type_and_bounds(stub) -> None:
    message = request(uint8_images(1), [1, 32, 32, 3], tta_strategy="rmt", tta_lr=-1.0)
    expect(
        stub,
        message,
        INVALID,
        "tta_lr",
        "tta_warmup_samples (integer, ≥ 0 ≤ 10000000, default 50000)",
        "tta_input_mean (array or null, default null)",  # optional settings name their types too
    )


def test_bad_top_k(stub) -> None:
    expect(stub, request(uint8_images(1), [1, 32, 32, 3], top_k=0), INVALID, "top_k")


def test_oversized_message_is_refused(model_repo) -> None:
    handle = start(model_repo, max_message_mb=1, models=("resnet",), metrics_port=None)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{handle.grpc_port}") as channel:
            small_limit_stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as excinfo:
                small_limit_stub.ModelInfer(request(uint8_images(400), [400, 32, 32, 3]), timeout=30)
            assert excinfo.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in excinfo.value.details() or "message" in excinfo.value.details().lower()
            ok = small_limit_stub.ModelInfer(request(uint8_images(1), [1, 32, 32, 3]), timeout=30)
            assert ok.model_name == "resnet"
    finally:
        handle.stop()
