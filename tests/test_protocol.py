"""The v2 protocol through the real, unmodified ``tritonclient[grpc]`` against the real server on loopback, once
on each gRPC front end (the native C++ one and grpcio's Python server)."""

from __future__ import annotations

import io
import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from support import CIFAR_LABELS, native_frontend_or_skip, normalise, seeded_resnet20, start
from tritonclient.utils import InferenceServerException

from ttaserve.server.app import ServerHandle


@pytest.fixture(scope="module", params=["native", "python"])
def server(
    request: pytest.FixtureRequest, model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerHandle]:
    if request.param == "native":
        native_frontend_or_skip()
    handle = start(model_repo, snapshot_dir=tmp_path_factory.mktemp("snapshots"), frontend=request.param)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def url(server: ServerHandle) -> str:
    return f"127.0.0.1:{server.grpc_port}"


@pytest.fixture(scope="module")
def client(url: str) -> tc.InferenceServerClient:
    return tc.InferenceServerClient(url)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    """The same network as the served 'resnet' version 2, run in-process."""
    return seeded_resnet20(0)


def expected_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(normalise(images)).numpy()


def infer_uint8(client: tc.InferenceServerClient, images: np.ndarray, model: str = "resnet", **kwargs: object):
    tensor = tc.InferInput("input", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    return client.infer(model, [tensor], **kwargs)


def test_health_and_metadata(client: tc.InferenceServerClient, url: str) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("resnet")
    assert client.is_model_ready("resnet", "1")
    assert not client.is_model_ready("resnet", "7")
    assert not client.is_model_ready("no_such_model")
    metadata = client.get_server_metadata()
    assert metadata.name == "ttaserve"
    assert "sequence" in metadata.extensions and "classification" in metadata.extensions
    model = client.get_model_metadata("resnet")
    assert list(model.versions) == ["1", "2"]
    assert model.inputs[0].name == "input" and list(model.inputs[0].shape) == [-1, 32, 32, 3]
    assert [o.name for o in model.outputs] == ["logits", "probabilities", "topk_indices", "topk_scores", "topk_labels"]
    with grpc.insecure_channel(url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "resnet"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_model_config(client: tc.InferenceServerClient) -> None:
    config = client.get_model_config("resnet").config
    assert config.name == "resnet" and config.max_batch_size == 64
    assert list(config.input[0].dims) == [32, 32, 3]
    assert config.parameters["labels"].string_value.split(",") == list(CIFAR_LABELS)
    assert config.dynamic_batching.preferred_batch_size == [64]
    onnx = client.get_model_config("resnet_onnx").config
    assert onnx.platform == "onnxruntime_onnx"
    assert "CPUExecutionProvider" in onnx.parameters["providers"].string_value
    assert [g.count for g in config.instance_group] == [1] and [g.count for g in onnx.instance_group] == [2]


def test_infer_uint8_matches_in_process_forward(
    client: tc.InferenceServerClient, real_images: np.ndarray, reference: torch.nn.Module
) -> None:
    images = real_images[:16]
    result = infer_uint8(client, images)
    np.testing.assert_allclose(result.as_numpy("logits"), expected_logits(reference, images), rtol=1e-4, atol=1e-4)
    probabilities = result.as_numpy("probabilities")
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    top = result.as_numpy("topk_indices")
    assert top.shape == (16, 5)
    np.testing.assert_array_equal(top[:, 0], probabilities.argmax(axis=1))
    labels = result.as_numpy("topk_labels")
    assert labels[0, 0].decode() == CIFAR_LABELS[top[0, 0]]
    np.testing.assert_allclose(
        result.as_numpy("topk_scores"), np.take_along_axis(probabilities, top, axis=1), rtol=1e-6
    )
    params = result.get_response().parameters
    assert params["tta_strategy"].string_param == "none"
    assert params["engine"].string_param == "pytorch"


def test_fp32_and_nchw_inputs_agree_with_uint8(client: tc.InferenceServerClient, real_images: np.ndarray) -> None:
    images = real_images[:4]
    baseline = infer_uint8(client, images).as_numpy("logits")
    fp32 = tc.InferInput("input", [4, 32, 32, 3], "FP32")
    fp32.set_data_from_numpy(images.astype(np.float32) / 255.0)
    np.testing.assert_allclose(client.infer("resnet", [fp32]).as_numpy("logits"), baseline, rtol=1e-4, atol=1e-4)
    nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    tensor = tc.InferInput("input", list(nchw.shape), "UINT8")
    tensor.set_data_from_numpy(nchw)
    np.testing.assert_allclose(client.infer("resnet_nchw", [tensor]).as_numpy("logits"), baseline, rtol=1e-4, atol=1e-4)


def test_version_selection(client: tc.InferenceServerClient, real_images: np.ndarray) -> None:
    images = real_images[:2]
    v1 = infer_uint8(client, images, model_version="1")
    v2 = infer_uint8(client, images, model_version="2")
    latest = infer_uint8(client, images)
    assert v1.get_response().model_version == "1"
    assert latest.get_response().model_version == "2"
    np.testing.assert_array_equal(v2.as_numpy("logits"), latest.as_numpy("logits"))
    assert not np.allclose(v1.as_numpy("logits"), v2.as_numpy("logits"))


def encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def test_bytes_png_and_jpeg(client: tc.InferenceServerClient, real_images: np.ndarray) -> None:
    images = real_images[:3]
    png = np.array([encode(im, "PNG") for im in images], dtype=np.object_)
    tensor = tc.InferInput("input", [3], "BYTES")
    tensor.set_data_from_numpy(png)
    from_png = client.infer("resnet", [tensor]).as_numpy("logits")
    # PNG is lossless: identical pixels, identical logits
    np.testing.assert_allclose(from_png, infer_uint8(client, images).as_numpy("logits"), rtol=1e-5, atol=1e-5)
    big = np.array(Image.fromarray(images[0]).resize((96, 96), Image.Resampling.BICUBIC))
    jpeg = np.array([encode(big, "JPEG")], dtype=np.object_)
    tensor = tc.InferInput("input", [1], "BYTES")
    tensor.set_data_from_numpy(jpeg)
    result = client.infer("resnet", [tensor], outputs=[tc.InferRequestedOutput("topk_indices")])
    assert result.as_numpy("topk_indices").shape == (1, 5)


def test_output_selection_and_classification_extension(
    client: tc.InferenceServerClient, real_images: np.ndarray
) -> None:
    result = infer_uint8(
        client,
        real_images[:2],
        outputs=[tc.InferRequestedOutput("probabilities", class_count=3), tc.InferRequestedOutput("topk_labels")],
        parameters={"top_k": 2},
    )
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["probabilities", "topk_labels"]
    assert result.as_numpy("logits") is None
    classes = result.as_numpy("probabilities")
    assert classes.shape == (2, 3)
    score, index, label = classes[0, 0].decode().split(":")
    assert CIFAR_LABELS[int(index)] == label and 0 < float(score) <= 1
    assert result.as_numpy("topk_labels").shape == (2, 2)


def test_strategy_parameter_echoed_and_validated(client: tc.InferenceServerClient, real_images: np.ndarray) -> None:
    result = infer_uint8(client, real_images[:2], parameters={"tta_strategy": "none"})
    assert result.get_response().parameters["tta_strategy"].string_param == "none"
    with pytest.raises(InferenceServerException) as excinfo:
        infer_uint8(client, real_images[:2], parameters={"tta_strategy": "magic"})
    assert excinfo.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "magic" in excinfo.value.message() and "none" in excinfo.value.message()


def test_stream_infer(client: tc.InferenceServerClient, real_images: np.ndarray, reference: torch.nn.Module) -> None:
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        for i in range(3):
            tensor = tc.InferInput("input", [2, 32, 32, 3], "UINT8")
            tensor.set_data_from_numpy(real_images[2 * i : 2 * i + 2])
            client.async_stream_infer("resnet", [tensor], request_id=str(i))
        bad = tc.InferInput("input", [1, 8, 8, 3], "UINT8")
        bad.set_data_from_numpy(np.zeros((1, 8, 8, 3), np.uint8))
        client.async_stream_infer("resnet", [bad], request_id="bad")
        received = [responses.get(timeout=30) for _ in range(4)]
    finally:
        client.stop_stream()
    for i, (result, error) in enumerate(received[:3]):
        assert error is None
        assert result.get_response().id == str(i)
        expected = expected_logits(reference, real_images[2 * i : 2 * i + 2])
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-4, atol=1e-4)
    result, error = received[3]
    assert result is None and "INVALID_ARGUMENT" in str(error) and "shape" in str(error)


def test_statistics_count_requests(client: tc.InferenceServerClient, real_images: np.ndarray) -> None:
    before = client.get_inference_statistics("resnet_nchw").model_stats[0]
    tensor = tc.InferInput("input", [3, 3, 32, 32], "UINT8")
    tensor.set_data_from_numpy(np.ascontiguousarray(real_images[:3].transpose(0, 3, 1, 2)))
    client.infer("resnet_nchw", [tensor])
    after = client.get_inference_statistics("resnet_nchw").model_stats[0]
    assert after.inference_count == before.inference_count + 3
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    every = client.get_inference_statistics().model_stats
    assert {(s.name, s.version) for s in every} >= {("resnet", "1"), ("resnet", "2"), ("resnet_nchw", "1")}


def test_onnx_model_serves_same_logits(client: tc.InferenceServerClient, real_images: np.ndarray) -> None:
    images = real_images[:8]
    onnx = infer_uint8(client, images, model="resnet_onnx")
    assert onnx.get_response().parameters["engine"].string_param == "onnx"
    np.testing.assert_allclose(onnx.as_numpy("logits"), infer_uint8(client, images).as_numpy("logits"), atol=1e-4)


def test_large_batch_of_224_images(client: tc.InferenceServerClient) -> None:
    """64 RGB 224x224 float32 images are 38.5 MB: far above gRPC's 4 MiB default."""
    images = np.random.default_rng(0).random((64, 224, 224, 3), dtype=np.float32)
    tensor = tc.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    result = client.infer("pool224", [tensor], outputs=[tc.InferRequestedOutput("logits")])
    assert result.as_numpy("logits").shape == (64, 4)


def test_repository_index_load_unload(client: tc.InferenceServerClient, model_repo: Path) -> None:
    index = {(m.name, m.version): m for m in client.get_model_repository_index().models}
    assert index[("resnet", "2")].state == "READY"
    assert index[("broken", "")].state == "UNAVAILABLE"
    assert "height" in index[("broken", "")].reason
    client.unload_model("resnet_nchw")
    assert not client.is_model_ready("resnet_nchw")
    with pytest.raises(InferenceServerException) as excinfo:
        client.get_model_metadata("resnet_nchw")
    assert excinfo.value.status() == "StatusCode.UNAVAILABLE"
    client.load_model("resnet_nchw")
    assert client.is_model_ready("resnet_nchw")
    with pytest.raises(InferenceServerException) as excinfo:
        client.load_model("broken")
    assert excinfo.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "config.yaml" in excinfo.value.message() and "input.height" in excinfo.value.message()
    with pytest.raises(InferenceServerException) as excinfo:
        client.load_model("not_there")
    assert excinfo.value.status() == "StatusCode.NOT_FOUND"


def test_reflection_lists_services(server: ServerHandle, url: str) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request])))
        names = {s.name for s in response.list_services_response.service}
        assert {"inference.GRPCInferenceService", "ttaserve.v1.Adaptation", "grpc.health.v1.Health"} <= names
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")
        response = next(stub.ServerReflectionInfo(iter([request])))
        assert response.file_descriptor_response.file_descriptor_proto
