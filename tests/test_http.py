"""The v2 REST protocol over HTTP, through the real ``tritonclient.http`` and plain ``urllib`` (what curl sends):
the same answers as gRPC, bit for bit, and a clear status and message for every misuse."""

from __future__ import annotations

import base64
import gzip
import http.client
import io
import json
import socket
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tcg
import tritonclient.http as tch
import tritonclient.utils.shared_memory as shm
from PIL import Image
from support import start
from tritonclient.utils import InferenceServerException

from ttaserve.server.app import ServerHandle
from ttaserve.server.shared_memory import SHM_ROOT

MODEL = "resnet"
CLASSES = 10


@pytest.fixture(scope="module")
def rest(server: ServerHandle) -> Iterator[tch.InferenceServerClient]:
    with tch.InferenceServerClient(f"127.0.0.1:{server.http_port}") as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(server: ServerHandle) -> Iterator[tcg.InferenceServerClient]:
    with tcg.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as client:
        yield client


def http_call(
    server: ServerHandle, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request with http.client, so the test controls every header and byte."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def error_of(
    server: ServerHandle, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, str]:
    status, response_headers, data = http_call(
        server, method, path, body, {k.replace("_", "-"): v for k, v in headers.items()}
    )
    assert response_headers["Content-Type"] == "application/json"
    return status, json.loads(data)["error"]


def infer_json(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def uint8_input(images: np.ndarray, *, binary: bool = True) -> tch.InferInput:
    tensor = tch.InferInput("input", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


def grpc_logits(client: tcg.InferenceServerClient, images: np.ndarray, **kwargs: Any) -> np.ndarray:
    tensor = tcg.InferInput("input", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    return client.infer(MODEL, [tensor], outputs=[tcg.InferRequestedOutput("logits")], **kwargs).as_numpy("logits")


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# --- health, metadata, configuration, statistics ------------------------------------------------------------------


def test_health_and_metadata_match_grpc(
    rest: tch.InferenceServerClient, grpc_client: tcg.InferenceServerClient
) -> None:
    assert rest.is_server_live() and rest.is_server_ready()
    assert rest.is_model_ready(MODEL) and rest.is_model_ready(MODEL, "1")
    assert not rest.is_model_ready("no_such_model")
    assert rest.get_server_metadata() == grpc_client.get_server_metadata(as_json=True)
    for version in ("", "1"):
        metadata = rest.get_model_metadata(MODEL, version)
        over_grpc = grpc_client.get_model_metadata(MODEL, version, as_json=True)
        assert metadata["versions"] == over_grpc["versions"] == ["1", "2"]
        assert metadata["inputs"][0]["shape"] == [-1, 32, 32, 3]  # numbers, where protobuf's JSON writes strings
        assert [o["name"] for o in metadata["outputs"]] == [o["name"] for o in over_grpc["outputs"]]
        assert metadata["platform"] == over_grpc["platform"] == "pytorch"


def test_head_is_a_get_without_the_body(server: ServerHandle) -> None:
    for path, status in (("/v2/health/ready", 200), ("/v2/models/no_such_model/ready", 503)):
        assert http_call(server, "HEAD", path)[0] == status
    get_status, get_headers, get_body = http_call(server, "GET", f"/v2/models/{MODEL}")
    status, headers, body = http_call(server, "HEAD", f"/v2/models/{MODEL}")
    assert (status, body) == (get_status, b"") and headers["Content-Length"] == str(len(get_body)) != "0"
    assert headers["Content-Type"] == get_headers["Content-Type"]
    assert http_call(server, "HEAD", f"/v2/models/{MODEL}/infer")[0] == 405


def test_config_and_statistics(rest: tch.InferenceServerClient, real_images: np.ndarray) -> None:
    config = rest.get_model_config(MODEL)
    assert config["name"] == MODEL and config["max_batch_size"] == 64
    assert config["input"][0]["format"] == "FORMAT_NHWC" and config["input"][0]["dims"] == [32, 32, 3]
    assert config["parameters"]["labels"]["string_value"].split(",")[0] == "airplane"
    before = rest.get_inference_statistics(MODEL, "2")["model_stats"][0]
    rest.infer(MODEL, [uint8_input(real_images[:3])])
    after = rest.get_inference_statistics(MODEL, "2")["model_stats"][0]
    assert after["inference_count"] == before.get("inference_count", 0) + 3
    assert isinstance(after["inference_stats"]["success"]["ns"], int)
    every_model = rest.get_inference_statistics()["model_stats"]
    assert {(s["name"], s["version"]) for s in every_model} >= {(MODEL, "1"), (MODEL, "2"), ("resnet_onnx", "1")}


# --- inference ----------------------------------------------------------------------------------------------------


def test_binary_and_json_tensors_give_the_grpc_logits(
    rest: tch.InferenceServerClient, grpc_client: tcg.InferenceServerClient, real_images: np.ndarray
) -> None:
    images = real_images[:8]
    expected = grpc_logits(grpc_client, images)
    binary = rest.infer(MODEL, [uint8_input(images)], outputs=[tch.InferRequestedOutput("logits")])
    as_json = rest.infer(
        MODEL, [uint8_input(images, binary=False)], outputs=[tch.InferRequestedOutput("logits", binary_data=False)]
    )
    np.testing.assert_array_equal(binary.as_numpy("logits"), expected)
    np.testing.assert_array_equal(as_json.as_numpy("logits"), expected)
    assert as_json.get_output("logits")["datatype"] == "FP32"
    assert "data" in as_json.get_output("logits") and "data" not in binary.get_output("logits")

    floats = images.astype(np.float32) / 255.0  # FP32 pixels are in [0, 1]
    tensor = tch.InferInput("input", list(floats.shape), "FP32")
    tensor.set_data_from_numpy(floats, binary_data=False)
    fp32 = rest.infer(MODEL, [tensor], outputs=[tch.InferRequestedOutput("logits")])
    np.testing.assert_allclose(fp32.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)


def test_every_output_and_the_onnx_model(
    rest: tch.InferenceServerClient, grpc_client: tcg.InferenceServerClient, real_images: np.ndarray
) -> None:
    images = real_images[:5]
    result = rest.infer("resnet_onnx", [uint8_input(images)], parameters={"top_k": 3})
    tensor = tcg.InferInput("input", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    over_grpc = grpc_client.infer("resnet_onnx", [tensor], parameters={"top_k": 3})
    for name in ("logits", "probabilities", "topk_indices", "topk_scores", "topk_labels"):
        np.testing.assert_array_equal(result.as_numpy(name), over_grpc.as_numpy(name))
    assert result.as_numpy("topk_labels").shape == (5, 3)
    assert result.get_response()["parameters"]["engine"] == "onnx"


def test_classification_and_outputs_in_json(rest: tch.InferenceServerClient, real_images: np.ndarray) -> None:
    images = real_images[:4]
    outputs = [
        tch.InferRequestedOutput("logits", class_count=2, binary_data=False),
        tch.InferRequestedOutput("topk_labels", binary_data=False),
    ]
    result = rest.infer(MODEL, [uint8_input(images)], outputs=outputs)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["logits", "topk_labels"]
    classes = result.as_numpy("logits")
    assert classes.shape == (4, 2)
    score, index, label = str(classes[0, 0]).split(":")  # JSON BYTES come back as str
    assert (
        0 <= int(index) < CLASSES
        and label == rest.get_model_config(MODEL)["parameters"]["labels"]["string_value"].split(",")[int(index)]
    )
    assert float(score) >= float(str(classes[0, 1]).split(":")[0])
    labels = result.get_output("topk_labels")["data"]
    assert all(isinstance(label, str) for label in labels) and len(labels) == 4 * 5


def test_encoded_images_binary_and_base64(
    server: ServerHandle,
    rest: tch.InferenceServerClient,
    grpc_client: tcg.InferenceServerClient,
    real_images: np.ndarray,
) -> None:
    images = real_images[:3]
    expected = grpc_logits(grpc_client, images)
    encoded = np.array([png_bytes(image) for image in images], dtype=np.object_)
    tensor = tch.InferInput("input", [3], "BYTES")
    tensor.set_data_from_numpy(encoded)
    np.testing.assert_array_equal(
        rest.infer(MODEL, [tensor], outputs=[tch.InferRequestedOutput("logits")]).as_numpy("logits"), expected
    )
    # curl's way: base64 strings in JSON, flagged as MLServer and KServe flag them
    body = infer_json(
        [
            {
                "name": "input",
                "datatype": "BYTES",
                "shape": [3],
                "parameters": {"content_type": "base64"},
                "data": [base64.b64encode(png_bytes(image)).decode() for image in images],
            }
        ],
        outputs=[{"name": "logits"}],
    )
    status, headers, data = http_call(server, "POST", f"/v2/models/{MODEL}/infer", body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    answer = json.loads(data)
    assert answer["model_name"] == MODEL and answer["model_version"] == "2"
    np.testing.assert_array_equal(
        np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(3, CLASSES), expected
    )


def test_nested_json_data_and_request_id(server: ServerHandle, real_images: np.ndarray) -> None:
    image = real_images[:1]
    flat = infer_json(
        [{"name": "input", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": image.ravel().tolist()}], id="req-7"
    )
    nested = infer_json([{"name": "input", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": image.tolist()}])
    flat_answer = json.loads(http_call(server, "POST", f"/v2/models/{MODEL}/versions/1/infer", flat)[2])
    nested_answer = json.loads(http_call(server, "POST", f"/v2/models/{MODEL}/versions/1/infer", nested)[2])
    assert flat_answer["id"] == "req-7" and flat_answer["model_version"] == "1"
    assert flat_answer["outputs"] == nested_answer["outputs"]


def test_strategy_parameters_are_validated_and_echoed(rest: tch.InferenceServerClient, real_images: np.ndarray) -> None:
    result = rest.infer(
        MODEL, [uint8_input(real_images[:16])], parameters={"tta_strategy": "alpha_bn", "tta_alpha": 0.3}
    )
    parameters = result.get_response()["parameters"]
    assert parameters["tta_strategy"] == "alpha_bn" and json.loads(parameters["tta_settings"])["alpha"] == 0.3
    assert 0 < parameters["tta_entropy"] <= np.log(CLASSES) + 1e-6
    with pytest.raises(InferenceServerException) as unknown:
        rest.infer(MODEL, [uint8_input(real_images[:2])], parameters={"tta_strategy": "magic"})
    assert (
        unknown.value.status() == "400"
        and "allowed:" in unknown.value.message()
        and "unmix_tns" in unknown.value.message()
    )
    with pytest.raises(InferenceServerException) as out_of_bounds:
        rest.infer(MODEL, [uint8_input(real_images[:2])], parameters={"tta_strategy": "alpha_bn", "tta_alpha": 7.0})
    assert out_of_bounds.value.status() == "400" and "tta_alpha" in out_of_bounds.value.message()


def test_the_timeout_parameter_is_the_deadline_of_an_http_request(
    rest: tch.InferenceServerClient, real_images: np.ndarray
) -> None:
    """HTTP has no deadline of its own: Triton's ``timeout`` parameter (microseconds) is one."""
    assert rest.infer(MODEL, [uint8_input(real_images[:2])], timeout=10_000_000).as_numpy("logits").shape == (2, 10)
    with pytest.raises(InferenceServerException) as expired:
        rest.infer(MODEL, [uint8_input(real_images[:2])], timeout=1)
    assert expired.value.status() == "504" and "deadline passed" in expired.value.message()


def test_a_session_over_http_matches_the_same_session_over_grpc(
    server: ServerHandle,
    rest: tch.InferenceServerClient,
    grpc_client: tcg.InferenceServerClient,
    real_images: np.ndarray,
) -> None:
    """Triton's sequence parameters open and continue a session; the stream's outputs equal the same stream sent
    over gRPC, bit for bit, and the caller header keeps two callers' sessions of the same id apart."""
    batches = [real_images[i * 16 : (i + 1) * 16] for i in range(3)]
    sequence = int(uuid.uuid4().int % 2**62) + 1
    over_http, over_grpc = [], []
    for step, batch in enumerate(batches):
        flags = {"sequence_id": sequence, "sequence_start": step == 0, "sequence_end": step == len(batches) - 1}
        params = {"tta_strategy": "unmix_tns"}
        result = rest.infer(
            MODEL, [uint8_input(batch)], parameters=params, headers={"ttaserve-caller": "cam-a"}, **flags
        )
        over_http.append(result.as_numpy("logits"))
        assert result.get_response()["parameters"]["tta_session_steps"] == step + 1
        over_grpc.append(
            grpc_logits(grpc_client, batch, parameters=params, headers={"ttaserve-caller": "cam-b"}, **flags)
        )
    for a, b in zip(over_http, over_grpc, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(over_http[0], over_http[2])  # it adapted


def test_adaptation_service_is_transcoded(
    server: ServerHandle, rest: tch.InferenceServerClient, real_images: np.ndarray
) -> None:
    status, _, data = http_call(server, "GET", "/ttaserve.v1.Adaptation/ListStrategies")
    assert status == 200
    strategies = {s["name"]: s for s in json.loads(data)["strategies"]}
    assert {"none", "tbn", "alpha_bn", "unmix_tns", "tent", "rmt", "t3", "t3_batch"} <= set(strategies)
    assert json.loads(strategies["alpha_bn"]["defaults_json"])["alpha"] == 0.1

    rest.infer(
        MODEL,
        [uint8_input(real_images[:8])],
        parameters={"tta_strategy": "tbn"},
        sequence_id="http-cam",
        headers={"ttaserve-caller": "ops"},
    )
    key = {"caller": "ops", "model_name": MODEL, "strategy": "tbn", "sequence_id": "http-cam"}
    status, _, data = http_call(server, "POST", "/ttaserve.v1.Adaptation/GetSession", json.dumps({"key": key}).encode())
    assert status == 200 and json.loads(data)["session"]["steps"] == 1
    status, _, data = http_call(server, "POST", "/ttaserve.v1.Adaptation/ListSessions", b'{"model_name": "resnet"}')
    assert status == 200  # another caller's sessions are not listed (other tests may leave anonymous ones)
    assert all(s["key"]["caller"] == "anonymous" for s in json.loads(data).get("sessions", []))
    caller = {"ttaserve-caller": "ops"}
    listed = json.loads(
        http_call(server, "POST", "/ttaserve.v1.Adaptation/ListSessions", b'{"model_name": "resnet"}', caller)[2]
    )
    assert any(s["key"]["sequence_id"] == "http-cam" for s in listed["sessions"])
    assert http_call(server, "POST", "/ttaserve.v1.Adaptation/EndSession", json.dumps({"key": key}).encode())[0] == 200
    status, message = error_of(server, "POST", "/ttaserve.v1.Adaptation/GetSession", json.dumps({"key": key}).encode())
    assert status == 404 and "http-cam" in message
    status, message = error_of(server, "POST", "/ttaserve.v1.Adaptation/Teleport", b"{}")
    assert status == 404 and "ListStrategies" in message
    status, message = error_of(server, "POST", "/ttaserve.v1.Adaptation/GetSession", b'{"key": {"colour": 1}}')
    assert status == 400 and "colour" in message


# --- repository -----------------------------------------------------------------------------------------------------


def test_repository_index_load_and_unload(rest: tch.InferenceServerClient) -> None:
    index = {entry["name"]: entry for entry in rest.get_model_repository_index()}
    assert index[MODEL]["state"] == "READY" and index["broken"]["state"] == "UNAVAILABLE"
    with pytest.raises(InferenceServerException) as broken:
        rest.load_model("broken")
    assert broken.value.status() == "400" and "config.yaml" in broken.value.message()
    rest.unload_model("resnet_nchw")
    assert not rest.is_model_ready("resnet_nchw")
    rest.load_model("resnet_nchw")
    assert rest.is_model_ready("resnet_nchw")
    with pytest.raises(InferenceServerException) as override:
        rest.load_model("resnet_nchw", config=json.dumps({"max_batch_size": 2}))
    assert override.value.status() == "400" and "not supported" in override.value.message()


# --- transport: compression, keep-alive ---------------------------------------------------------------------------


def test_compressed_requests_and_responses(
    server: ServerHandle,
    rest: tch.InferenceServerClient,
    grpc_client: tcg.InferenceServerClient,
    real_images: np.ndarray,
) -> None:
    images = real_images[:8]
    expected = grpc_logits(grpc_client, images)
    for algorithm in ("gzip", "deflate"):
        result = rest.infer(
            MODEL,
            [uint8_input(images)],
            outputs=[tch.InferRequestedOutput("logits")],
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        np.testing.assert_array_equal(result.as_numpy("logits"), expected)
    # a client that refuses gzip (q=0) but takes deflate gets deflate
    body = infer_json(
        [{"name": "input", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": images[0].ravel().tolist()}]
    )
    status, headers, data = http_call(
        server, "POST", f"/v2/models/{MODEL}/infer", body, {"Accept-Encoding": "gzip;q=0, deflate"}
    )
    assert status == 200 and headers["Content-Encoding"] == "deflate"
    assert json.loads(zlib.decompress(data))["model_name"] == MODEL


def test_one_connection_carries_many_requests(server: ServerHandle, real_images: np.ndarray) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        for image in real_images[:5]:
            body = infer_json(
                [{"name": "input", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": image.ravel().tolist()}]
            )
            connection.request("POST", f"/v2/models/{MODEL}/infer", body=body)
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())["outputs"]
            connection.request("GET", "/v2/models/nope/config")  # an error keeps the connection open too
            response = connection.getresponse()
            assert response.status == 404 and "nope" in json.loads(response.read())["error"]
    finally:
        connection.close()


# --- bad input: the right status, a message naming the problem, and the server keeps serving ------------------------


def _uint8_body(shape: list[int], data: list[Any] | None = None, **tensor: Any) -> bytes:
    entry = {"name": "input", "datatype": "UINT8", "shape": shape, **tensor}
    if data is not None:
        entry["data"] = data
    return infer_json([entry])


BAD_REQUESTS = {
    "unknown route": ("GET", "/v1/models/resnet", None, {}, 404, "/v2"),
    "wrong method": ("GET", f"/v2/models/{MODEL}/infer", None, {}, 405, "POST"),
    "unknown model": ("POST", "/v2/models/nope/infer", _uint8_body([1, 32, 32, 3], [0] * 3072), {}, 404, "nope"),
    "unknown version": ("GET", f"/v2/models/{MODEL}/versions/9", None, {}, 404, "no version 9"),
    "not JSON": ("POST", f"/v2/models/{MODEL}/infer", b"{inputs: [", {}, 400, "not valid JSON"),
    "JSON not an object": ("POST", f"/v2/models/{MODEL}/infer", b"[1, 2]", {}, 400, "must be an object"),
    "no inputs": ("POST", f"/v2/models/{MODEL}/infer", b"{}", {}, 400, "'inputs' is missing"),
    "too few values": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        _uint8_body([1, 32, 32, 3], [0] * 3000),
        {},
        400,
        "3072 values, got 3000",
    ),
    "UINT8 out of range": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        _uint8_body([1, 2], [0, 300]),
        {},
        400,
        "outside [0, 255]",
    ),
    "strings for numbers": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        _uint8_body([2], ["a", "b"]),
        {},
        400,
        "flat list of numbers",
    ),
    "ragged data": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        _uint8_body([2, 2], [[1, 2], [3]]),
        {},
        400,
        "needs 4 values, got 3",
    ),
    "shape not integers": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        _uint8_body([1, "32"], [0]),
        {},
        400,
        "list of integers",
    ),
    "wrong shape": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        _uint8_body([1, 16, 16, 3], [0] * 768),
        {},
        400,
        "expected shape [-1, 32, 32, 3]",
    ),
    "unknown datatype": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        infer_json([{"name": "input", "datatype": "FP128", "shape": [1], "data": [1]}]),
        {},
        400,
        "FP128",
    ),
    "NaN": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        infer_json([{"name": "input", "datatype": "FP32", "shape": [1, 32, 32, 3], "data": [float("nan")] * 3072}]),
        {},
        400,
        "NaN",
    ),
    "parameter a list": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        infer_json([], parameters={"tta_strategy": ["tbn"]}),
        {},
        400,
        "tta_strategy",
    ),
    "batch over the maximum": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        _uint8_body([65, 1, 1, 3], [0] * 195),
        {},
        413,
        "max_batch_size",
    ),
    "binary size beyond the body": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        _uint8_body([1, 32, 32, 3], parameters={"binary_data_size": 3072}),
        {},
        400,
        "binary_data_size",
    ),
    "header length beyond the body": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        b"{}",
        {"Inference-Header-Content-Length": "99"},
        400,
        "Inference-Header-Content-Length",
    ),
    "header length not a number": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        b"{}",
        {"Inference-Header-Content-Length": "ten"},
        400,
        "not a byte count",
    ),
    "bytes nobody claims": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        _uint8_body([1, 2], [1, 2]) + b"xx",
        {"Inference-Header-Content-Length": str(len(_uint8_body([1, 2], [1, 2])))},
        400,
        "add up to 0",
    ),
    "bad base64": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        infer_json(
            [
                {
                    "name": "input",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"content_type": "base64"},
                    "data": ["%%%"],
                }
            ]
        ),
        {},
        400,
        "base64",
    ),
    "undecodable image": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        infer_json([{"name": "input", "datatype": "BYTES", "shape": [1], "data": ["not a png"]}]),
        {},
        400,
        "image 0 cannot be decoded",
    ),
    "unknown output": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        infer_json(
            [{"name": "input", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [0] * 3072}],
            outputs=[{"name": "embedding"}],
        ),
        {},
        400,
        "embedding",
    ),
    "unknown encoding": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        b"{}",
        {"Content-Encoding": "br"},
        415,
        "gzip or deflate",
    ),
    "corrupt gzip": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        b"\x1f\x8bnot-gzip",
        {"Content-Encoding": "gzip"},
        400,
        "gzip",
    ),
    "CUDA shared memory": ("GET", "/v2/cudasharedmemory/status", None, {}, 501, "system shared memory"),
    "shared memory off": ("GET", "/v2/systemsharedmemory/status", None, {}, 501, "--allow-shared-memory"),
    "index with bad JSON": ("POST", "/v2/repository/index", b'{"ready": "yes"}', {}, 400, "'ready'"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_requests_get_a_clear_status(
    case: str, server: ServerHandle, rest: tch.InferenceServerClient, real_images: np.ndarray
) -> None:
    method, path, body, headers, expected_status, expected_text = BAD_REQUESTS[case]
    status, response_headers, data = http_call(server, method, path, body, headers)
    assert status == expected_status, data
    assert response_headers["Content-Type"] == "application/json"
    message = json.loads(data)["error"]
    assert expected_text in message, message
    assert rest.infer(MODEL, [uint8_input(real_images[:1])]).as_numpy("logits").shape == (1, CLASSES)


def test_a_body_over_the_limit_is_refused_before_it_is_read(model_repo: Path, real_images: np.ndarray) -> None:
    handle = start(model_repo, metrics_port=None, max_message_mb=1, models=(MODEL,))
    try:
        big = np.zeros((64, 32, 32, 3), dtype=np.uint8)  # 196 KB binary: fits; 96 images as JSON text do not
        with tch.InferenceServerClient(f"127.0.0.1:{handle.http_port}") as client:
            assert client.infer(MODEL, [uint8_input(big)]).as_numpy("logits").shape == (64, CLASSES)
            with pytest.raises(InferenceServerException) as refused:
                client.infer(MODEL, [uint8_input(np.full((96, 32, 32, 3), 255, np.uint8), binary=False)])
            assert refused.value.status() == "413" and "1048576-byte limit" in refused.value.message()
            bomb = gzip.compress(b" " * (3 << 20))  # 3 MB of spaces in 3 KB
            status, message = error_of(handle, "POST", f"/v2/models/{MODEL}/infer", bomb, Content_Encoding="gzip")
            assert status == 413 and "inflates" in message
            assert client.infer(MODEL, [uint8_input(real_images[:2])]).as_numpy("logits").shape == (2, CLASSES)
        # chunked bodies have no length to check up front: refused, and the connection closed
        with socket.create_connection(("127.0.0.1", handle.http_port), timeout=10) as raw:
            head = b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            raw.sendall(head + b"2\r\n{}\r\n0\r\n\r\n")
            reply = raw.makefile("rb").read()
        assert reply.startswith(b"HTTP/1.1 411") and b"Content-Length" in reply
    finally:
        handle.stop()


def test_draining_reports_not_ready_and_refuses_inference(model_repo: Path, real_images: np.ndarray) -> None:
    handle = start(model_repo, metrics_port=None, models=(MODEL,))
    try:
        with tch.InferenceServerClient(f"127.0.0.1:{handle.http_port}") as client:
            assert client.is_server_ready()
            handle.inflight.draining = True
            assert client.is_server_live() and not client.is_server_ready() and not client.is_model_ready(MODEL)
            with pytest.raises(InferenceServerException) as refused:
                client.infer(MODEL, [uint8_input(real_images[:1])])
            assert refused.value.status() == "503" and "draining" in refused.value.message()
    finally:
        handle.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{handle.http_port}/v2/health/live", timeout=5)


@pytest.mark.skipif(not SHM_ROOT.is_dir(), reason=f"needs POSIX shared memory at {SHM_ROOT}")
def test_shared_memory_over_http(model_repo: Path, real_images: np.ndarray) -> None:
    """tritonclient.http's shared-memory calls: register, status, an input and an output in regions, unregister."""
    handle = start(model_repo, metrics_port=None, models=(MODEL,), allow_shared_memory=True)
    key = f"/ttaserve-http-test-{uuid.uuid4().hex[:8]}"
    images = real_images[:4]
    region = shm.create_shared_memory_region("http-region", key, images.nbytes + 4 * CLASSES * 4)
    try:
        with tch.InferenceServerClient(f"127.0.0.1:{handle.http_port}") as client:
            expected = client.infer(MODEL, [uint8_input(images)]).as_numpy("logits")
            shm.set_shared_memory_region(region, [images])
            client.register_system_shared_memory("http-region", key, images.nbytes + 4 * CLASSES * 4)
            assert client.get_system_shared_memory_status() == [
                {"name": "http-region", "key": key, "offset": 0, "byte_size": images.nbytes + 4 * CLASSES * 4}
            ]
            tensor = tch.InferInput("input", list(images.shape), "UINT8")
            tensor.set_shared_memory("http-region", images.nbytes)
            output = tch.InferRequestedOutput("logits")
            output.set_shared_memory("http-region", 4 * CLASSES * 4, offset=images.nbytes)
            result = client.infer(MODEL, [tensor], outputs=[output])
            assert result.get_output("logits")["parameters"]["shared_memory_region"] == "http-region"
            written = shm.get_contents_as_numpy(region, np.float32, [4, CLASSES], offset=images.nbytes)
            np.testing.assert_array_equal(written, expected)
            with pytest.raises(InferenceServerException) as duplicate:
                client.register_system_shared_memory("http-region", key, 8)
            assert duplicate.value.status() == "409"
            client.unregister_system_shared_memory("http-region")
            assert client.get_system_shared_memory_status() == []
    finally:
        shm.destroy_shared_memory_region(region)
        handle.stop()


def test_what_the_http_layer_refuses_itself_is_json_too(server: ServerHandle) -> None:
    """Methods no route takes, and headers the HTTP parser refuses, get the same JSON error body."""
    status, message = error_of(server, "PUT", f"/v2/models/{MODEL}/infer", b"{}")
    assert status == 405 and "POST" in message
    status, message = error_of(server, "DELETE", "/v2/health/live")
    assert status == 405 and "GET" in message
    status, message = error_of(server, "OPTIONS", "/v2")
    assert status == 501 and "OPTIONS" in message
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as raw:
        raw.sendall(b"GET /v2 HTTP/1.1\r\nX-Huge: " + b"a" * 70_000 + b"\r\n\r\n")
        reply = raw.makefile("rb").read()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), head
    assert "too long" in json.loads(body)["error"]


def test_connections_beyond_the_limit_get_503_and_the_limit_frees_up(model_repo: Path) -> None:
    handle = start(model_repo, metrics_port=None, models=(MODEL,), http_max_connections=2)
    try:
        idle = [socket.create_connection(("127.0.0.1", handle.http_port), timeout=10) for _ in range(2)]
        time.sleep(0.2)  # both accepted, each holding its thread
        status, message = error_of(handle, "GET", "/v2/health/ready")
        assert status == 503 and "maximum of 2 open HTTP connections" in message
        for connection in idle:
            connection.close()
        deadline = time.monotonic() + 10
        while http_call(handle, "GET", "/v2/health/ready")[0] != 200:  # the threads notice the closed sockets
            assert time.monotonic() < deadline, "the connection slots were not given back"
            time.sleep(0.05)
    finally:
        handle.stop()
