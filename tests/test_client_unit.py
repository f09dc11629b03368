"""The SDK without a server: image encoding, the BYTES wire format, request building, response parsing, errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from ttaserve.client import codec
from ttaserve.client.cli import _setting
from ttaserve.client.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, from_rpc_error
from ttaserve.client.results import ModelEntry, ModelMetadata, TensorInfo
from ttaserve.client.session import SessionCore
from ttaserve.client.table import format_table
from ttaserve.client.tls import ClientTls, client_tls
from ttaserve.protocol import kserve_v2_pb2 as pb


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _decode(encoded: codec.EncodedInput) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(e))) for e in codec.unpack_bytes(encoded.raw)]


# --- images -> tensor ---


def test_uint8_image_becomes_a_batch_of_one() -> None:
    image = np.random.default_rng(0).integers(0, 256, (28, 30, 3), dtype=np.uint8)
    encoded = codec.encode_images(image)
    assert (encoded.datatype, encoded.shape) == ("UINT8", (1, 28, 30, 3))
    assert encoded.raw == image.tobytes()


def test_grey_image_gets_batch_and_channel_axes() -> None:
    encoded = codec.encode_images(np.zeros((28, 28), dtype=np.uint8))
    assert encoded.shape == (1, 28, 28, 1)


def test_float_batch_becomes_little_endian_fp32() -> None:
    batch = np.random.default_rng(1).random((4, 8, 8, 3))  # float64
    encoded = codec.encode_images(batch)
    assert (encoded.datatype, encoded.shape) == ("FP32", (4, 8, 8, 3))
    np.testing.assert_array_equal(np.frombuffer(encoded.raw, "<f4").reshape(4, 8, 8, 3), batch.astype(np.float32))


def test_nchw_model_gets_transposed_pixels() -> None:
    batch = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    encoded = codec.encode_images(batch, codec.InputTarget("input", "NCHW"))
    assert encoded.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(np.frombuffer(encoded.raw, np.uint8).reshape(2, 3, 4, 5), batch.transpose(0, 3, 1, 2))


def test_list_of_arrays_is_stacked() -> None:
    images = [np.full((8, 8, 3), i, dtype=np.uint8) for i in range(3)]
    encoded = codec.encode_images(images)
    assert encoded.shape == (3, 8, 8, 3)
    assert np.frombuffer(encoded.raw, np.uint8).reshape(3, 8, 8, 3)[2].max() == 2


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (np.zeros((4, 4, 3), dtype=np.int16), "dtype int16"),
        (np.zeros((1, 2, 4, 4, 3), dtype=np.uint8), "shape"),
        ([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 5, 3), np.uint8)], "differ in shape"),
        ([np.zeros((4, 4, 3), np.uint8), b"\x89PNG"], "mixes"),
        ([], "no images"),
        (42, "cannot send a int"),
        ("/no/such/image.png", "cannot read image file"),
    ],
)
def test_bad_inputs_are_invalid_arguments(images: object, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        codec.encode_images(images)  # type: ignore[arg-type]


def test_pil_images_travel_as_lossless_png() -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    single = codec.encode_images(Image.fromarray(pixels))
    assert (single.datatype, single.shape) == ("BYTES", (1,))
    np.testing.assert_array_equal(_decode(single)[0], pixels)
    batch = codec.encode_images([Image.fromarray(pixels), Image.fromarray(pixels[:, :, 0])])
    assert batch.shape == (2,)
    np.testing.assert_array_equal(_decode(batch)[1], pixels[:, :, 0])


def test_paths_travel_as_their_file_bytes(tmp_path: Path) -> None:
    jpeg = tmp_path / "cat.jpg"
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(jpeg, format="JPEG")
    png = tmp_path / "dog.png"
    png.write_bytes(_png(np.ones((4, 4), np.uint8)))
    encoded = codec.encode_images([str(jpeg), png])
    assert encoded.shape == (2,)
    assert codec.unpack_bytes(encoded.raw) == [jpeg.read_bytes(), png.read_bytes()]
    assert codec.unpack_bytes(codec.encode_images(png).raw) == [png.read_bytes()]


def test_encoded_bytes_are_sent_as_they_are() -> None:
    data = _png(np.zeros((3, 3), np.uint8))
    assert codec.unpack_bytes(codec.encode_images(data).raw) == [data]
    assert codec.encode_images([data, bytearray(data)]).shape == (2,)


def test_bytes_length_prefix_is_little_endian_uint32() -> None:
    assert codec.pack_bytes([b"abc", b"", b"\x00" * 256]) == (
        b"\x03\x00\x00\x00abc" + b"\x00\x00\x00\x00" + b"\x00\x01\x00\x00" + b"\x00" * 256
    )
    assert codec.unpack_bytes(codec.pack_bytes([b"abc", b"", b"xy"])) == [b"abc", b"", b"xy"]
    with pytest.raises(InvalidArgument, match="past the end"):
        codec.unpack_bytes(b"\x05\x00\x00\x00abc")


# --- requests ---


def test_infer_request_carries_input_parameters_and_sequence() -> None:
    encoded = codec.encode_images(np.zeros((2, 4, 4, 3), np.uint8))
    request = codec.build_infer_request(
        "cifar",
        codec.InputTarget("pixels", "NHWC"),
        encoded,
        version="2",
        strategy="tent",
        top_k=3,
        settings={"lr": 1e-3, "tta_steps": 2, "episodic": True, "mode": "fast"},
        sequence=codec.SequenceFlags("cam-1", start=True, end=False),
    )
    assert (request.model_name, request.model_version) == ("cifar", "2")
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("pixels", "UINT8", [2, 4, 4, 3])
    assert request.raw_input_contents == [encoded.raw]
    params = {k: codec.parameter_value(v) for k, v in request.parameters.items()}
    assert params == {
        "tta_strategy": "tent",
        "top_k": 3,
        "tta_lr": 1e-3,
        "tta_steps": 2,
        "tta_episodic": True,
        "tta_mode": "fast",
        "sequence_id": "cam-1",
        "sequence_start": True,
    }
    assert request.parameters["tta_steps"].WhichOneof("parameter_choice") == "int64_param"
    assert request.parameters["tta_lr"].WhichOneof("parameter_choice") == "double_param"
    assert request.parameters["sequence_id"].WhichOneof("parameter_choice") == "string_param"


def test_unsupported_setting_type_is_rejected() -> None:
    encoded = codec.encode_images(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(InvalidArgument, match="tta_alpha"):
        codec.build_infer_request("m", codec.InputTarget("input", "NHWC"), encoded, settings={"alpha": [1, 2]})  # type: ignore[dict-item]


def test_a_session_batch_keeps_its_request_id_until_its_call_succeeds() -> None:
    core = SessionCore(None, "cifar", "cam-1", "tent")
    batch = codec.encode_images(np.zeros((2, 4, 4, 3), np.uint8))
    other = codec.encode_images(np.ones((2, 4, 4, 3), np.uint8))
    first = core.request_id(batch)
    assert core.request_id(batch) == first, "the same batch sent again after a failure keeps its id"
    second = core.request_id(other)
    assert second != first, "a different batch is a new step"
    core.record(core.next_flags(end=False))
    assert core.request_id(other) not in (first, second), "after an answer, even the same images are a new step"
    assert SessionCore(None, "cifar", "cam-1", "tent").request_id(batch) != first, "ids differ across sessions"


def test_session_sends_start_once_and_refuses_use_after_end() -> None:
    core = SessionCore("alice", "cifar", "cam-1", "tent")
    first = core.next_flags(end=False)
    assert first.start and not first.end
    assert core.next_flags(end=False).start, "a failed first request must be retried with sequence_start"
    core.record(first)
    assert not core.next_flags(end=False).start
    assert core.metadata == (("ttaserve-caller", "alice"), ("ttaserve-session", "alice/cifar/cam-1"))
    assert core.key.sequence_id == "cam-1" and core.key.strategy == "tent"
    core.record(core.next_flags(end=True))
    assert not core.needs_end
    with pytest.raises(FailedPrecondition, match="has ended"):
        core.next_flags(end=False)
    assert SessionCore(None, "m", "7", "none").metadata == (("ttaserve-session", "anonymous/m/7"),)


def test_channel_settings() -> None:
    assert codec.channel_options(2) == [
        ("grpc.max_send_message_length", 2 << 20),
        ("grpc.max_receive_message_length", 2 << 20),
    ]
    retrying = dict(codec.channel_options(2, retries=3))
    assert retrying["grpc.per_rpc_retry_buffer_size"] == 2 << 20, "a whole request must fit the retry buffer"
    (method_config,) = json.loads(str(retrying["grpc.service_config"]))["methodConfig"]
    assert method_config["retryPolicy"]["maxAttempts"] == 4
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    retried = {(n["service"], n["method"]) for n in method_config["name"]}
    assert ("inference.GRPCInferenceService", "ModelInfer") in retried
    assert not {m for _, m in retried} & {"RepositoryModelLoad", "EndSession", "ResetSession", "RestoreSession"}
    with pytest.raises(ValueError, match="retries must be between 0 and 4"):
        codec.channel_options(2, retries=5)
    assert codec.channel_target("grpc://localhost:8001/") == "localhost:8001"
    assert codec.channel_target("localhost:8001") == "localhost:8001"


# --- responses ---


def _response(logits: np.ndarray, labels: list[str], k: int, with_topk: bool = True) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name="cifar", model_version="1")
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    indices = np.argsort(-probabilities, 1)[:, :k]
    tensors = [("logits", "FP32", logits.astype("<f4")), ("probabilities", "FP32", probabilities.astype("<f4"))]
    if with_topk:
        tensors += [
            ("topk_indices", "INT64", indices.astype("<i8")),
            ("topk_scores", "FP32", np.take_along_axis(probabilities, indices, 1).astype("<f4")),
        ]
    for name, datatype, array in tensors:
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
    if with_topk:
        response.outputs.add(name="topk_labels", datatype="BYTES", shape=indices.shape)
        response.raw_output_contents.append(codec.pack_bytes([labels[i].encode() for i in indices.ravel()]))
    codec.set_parameter(response.parameters, "tta_strategy", "tent")
    codec.set_parameter(response.parameters, "tta_settings", json.dumps({"lr": 0.001, "steps": 1}))
    codec.set_parameter(response.parameters, "tta_entropy", 1.25)
    codec.set_parameter(response.parameters, "tta_session_steps", 4)
    codec.set_parameter(response.parameters, "tta_session_reset", "collapse")
    codec.set_parameter(response.parameters, "engine", "pytorch")
    codec.set_parameter(response.parameters, "device", "cpu")
    return response


def test_parse_full_response() -> None:
    logits = np.array([[0.0, 3.0, 1.0], [2.0, 0.0, -1.0]], dtype=np.float32)
    result = codec.parse_infer_response(_response(logits, ["cat", "dog", "ship"], k=2), top_k=2)
    assert [c.label for c in result] == ["dog", "cat"]
    assert [c.index for c in result] == [1, 0]
    assert [p.label for p in result[0].top_k] == ["dog", "ship"]
    assert result[0].score == pytest.approx(np.exp(3) / np.exp([0, 3, 1]).sum(), rel=1e-6)
    np.testing.assert_array_equal(result[1].logits, logits[1])
    assert result[1].probabilities.sum() == pytest.approx(1.0, rel=1e-6)
    assert (result.model, result.version, result.strategy) == ("cifar", "1", "tent")
    assert result.settings == {"lr": 0.001, "steps": 1}
    assert result.stats == {"entropy": 1.25}
    assert (result.session_steps, result.session_reset) == (4, "collapse")
    assert (result.engine, result.device) == ("pytorch", "cpu")


def test_parse_response_without_topk_outputs_computes_them() -> None:
    logits = np.array([[0.0, 3.0, 1.0]], dtype=np.float32)
    result = codec.parse_infer_response(_response(logits, [], k=0, with_topk=False), top_k=2)
    assert [p.index for p in result[0].top_k] == [1, 2]
    assert result[0].label == "1"


def test_parse_typed_contents() -> None:
    response = pb.ModelInferResponse()
    output = response.outputs.add(name="logits", datatype="FP32", shape=[1, 2])
    output.contents.fp32_contents.extend([0.5, -0.5])
    result = codec.parse_infer_response(response, top_k=1)
    assert result[0].index == 0 and len(result[0].top_k) == 1


def test_response_without_logits_is_reported() -> None:
    with pytest.raises(InvalidArgument, match="no 'logits'"):
        codec.parse_infer_response(pb.ModelInferResponse())


def test_model_selection() -> None:
    one = [ModelEntry("fmnist", "1", "READY", ""), ModelEntry("fmnist", "2", "READY", "")]
    assert codec.choose_model(one) == "fmnist"
    with pytest.raises(NotFound, match="no models"):
        codec.choose_model([])
    with pytest.raises(InvalidArgument, match=r"2 models \(a, b\)"):
        codec.choose_model([ModelEntry("b", "1", "READY", ""), ModelEntry("a", "1", "READY", "")])


@pytest.mark.parametrize(
    ("shape", "target"),
    [
        ((-1, 28, 28, 1), codec.InputTarget("pixels", "NHWC", (28, 28))),
        ((-1, 1, 28, 28), codec.InputTarget("pixels", "NCHW", (28, 28))),
        ((-1, 3, 32, 32), codec.InputTarget("pixels", "NCHW")),
        ((-1, 32, 32, 3), codec.InputTarget("pixels", "NHWC")),
        ((-1,), codec.InputTarget("pixels")),
    ],
)
def test_input_target_from_metadata(shape: tuple[int, ...], target: codec.InputTarget) -> None:
    metadata = ModelMetadata("m", ("1",), "pytorch", (TensorInfo("pixels", "FP32", shape),), ())
    assert codec.input_target(metadata) == target


def test_grey_batch_without_channel_axis_for_a_grey_model() -> None:
    grey = codec.InputTarget("input", "NHWC", (28, 28))
    assert codec.encode_images(np.zeros((5, 28, 28), np.uint8), grey).shape == (5, 28, 28, 1)
    assert codec.encode_images(np.zeros((28, 28, 1), np.uint8), grey).shape == (1, 28, 28, 1)
    assert codec.encode_images(np.zeros((5, 28, 28), np.uint8)).shape == (1, 5, 28, 28), "unknown model: one image"


# --- errors, CLI helpers, import hygiene ---


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_rpc_errors_keep_their_status_code_name() -> None:
    error = from_rpc_error(_FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    assert isinstance(error, DeadlineExceeded)
    assert (error.code, error.message, str(error)) == (
        "DEADLINE_EXCEEDED",
        "Deadline Exceeded",
        "DEADLINE_EXCEEDED: Deadline Exceeded",
    )
    other = from_rpc_error(_FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "no"))
    assert other.code == "PERMISSION_DENIED"


def test_cli_settings_and_tables() -> None:
    assert _setting("alpha=0.5") == ("alpha", 0.5)
    assert _setting("steps=2") == ("steps", 2)
    assert _setting("episodic=true") == ("episodic", True)
    assert _setting("mode=fast") == ("mode", "fast")
    table = format_table(["file", "score"], [["a.png", "0.500"], ["long-name.png", "0.25"]])
    assert table.splitlines() == [
        "file           score",
        "-------------  -----",
        "a.png          0.500",
        "long-name.png   0.25",
    ]


def test_client_package_never_imports_torch() -> None:
    code = (
        "import sys, ttaserve.client, ttaserve.client.cli, ttaserve.client.aio; "
        "bad = [m for m in ('torch', 'ttaserve.server') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- TLS settings ---


def test_tls_turns_on_by_flag_scheme_or_certificate_material(tmp_path: Path) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    none = {"root_certificates": None, "certificate_chain": None, "private_key": None, "server_name": None}
    assert client_tls("localhost:8001", tls=False, **none) is None
    assert client_tls("localhost:8001", tls=True, **none) == ClientTls()
    assert client_tls("grpcs://localhost:8001", tls=False, **none) == ClientTls()
    assert client_tls("localhost:8001", tls=False, **{**none, "root_certificates": pem}) == ClientTls(pem.read_bytes())
    renamed = client_tls("10.0.0.5:8001", tls=False, **{**none, "server_name": "ttaserve.internal"})
    assert renamed is not None and renamed.options() == [("grpc.ssl_target_name_override", "ttaserve.internal")]
    with pytest.raises(ValueError, match="certificate_chain and private_key go together"):
        client_tls("localhost:8001", tls=True, **{**none, "certificate_chain": pem})
