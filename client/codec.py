"""Request building and response parsing shared by the sync and asyncio clients; no I/O on the network here.

Images become one input tensor: numpy arrays travel as raw UINT8/FP32 pixels, everything else (PIL images, file
paths, encoded bytes) as a BYTES tensor of encoded images that the server decodes and resizes. Outputs are read
from ``raw_output_contents`` with ``np.frombuffer`` (typed ``contents`` as a fallback for other servers).
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from ttaserve.protocol import adaptation_pb2 as apb
from ttaserve.protocol import kserve_v2_pb2 as pb

from .errors import InvalidArgument, NotFound
from .results import (
    BatchResult,
    Classification,
    ModelEntry,
    ModelMetadata,
    Prediction,
    SessionInfo,
    Strategy,
    TensorInfo,
)

#: what ``classify`` accepts: one image or a batch, as arrays, PIL images, file paths or encoded bytes
ImageLike = Union[np.ndarray, Image.Image, str, Path, bytes, bytearray]  # noqa: UP007  (a runtime alias)
Images = Union[ImageLike, Sequence[ImageLike]]  # noqa: UP007

CALLER_HEADER = "ttaserve-caller"
SESSION_HEADER = "ttaserve-session"
DEFAULT_CALLER = "anonymous"
_LENGTH = struct.Struct("<I")
_RAW_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# response parameters that are not adaptation stats
_RESERVED_PARAMS = {"tta_strategy", "tta_settings", "tta_session_steps", "tta_session_reset", "tta_session_event"}


@dataclass(frozen=True)
class EncodedInput:
    """One input tensor ready for the wire."""

    datatype: str
    shape: tuple[int, ...]
    raw: bytes


@dataclass(frozen=True)
class InputTarget:
    """Where a model wants its images: the input's name, the layout of raw tensors and, for a one-channel model,
    its (H, W), which tells a batch of grey (N, H, W) images from one (H, W, C) image."""

    name: str = "input"
    layout: str = "NHWC"  # or "NCHW"
    grey_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class SequenceFlags:
    sequence_id: str
    start: bool
    end: bool


# --- images -> input tensor -------------------------------------------------------------------------------------


def _as_batch_array(array: np.ndarray, grey_size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) and (H, W, C) are one image; (N, H, W, C) is a batch, and so is (N, H, W) for a grey model."""
    if array.ndim == 2:
        return array[None, :, :, None]
    if array.ndim == 3:
        if grey_size is not None and array.shape[1:] == grey_size:
            return array[..., None]
        return array[None]
    if array.ndim == 4:
        return array
    raise InvalidArgument(f"image array has shape {array.shape}; expected (H, W), (H, W, C) or (N, H, W, C)")


def encode_array(array: np.ndarray, target: InputTarget = InputTarget()) -> EncodedInput:
    """Pixels as a raw tensor: uint8 stays UINT8 (0-255), floats become FP32 (expected in [0, 1])."""
    batch = _as_batch_array(array, target.grey_size)
    if batch.dtype == np.uint8:
        datatype, dtype = "UINT8", np.dtype(np.uint8)
    elif np.issubdtype(batch.dtype, np.floating):
        datatype, dtype = "FP32", np.dtype("<f4")
    else:
        raise InvalidArgument(f"image array has dtype {batch.dtype}; send uint8 (0-255) or float32 (0-1) pixels")
    if target.layout == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    batch = np.ascontiguousarray(batch, dtype=dtype)
    return EncodedInput(datatype, tuple(batch.shape), batch.tobytes())


def encode_image_bytes(image: ImageLike) -> bytes:
    """An encoded image: paths are read as they are, PIL images are written as (lossless) PNG."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    if isinstance(image, str | Path):
        try:
            return Path(image).read_bytes()
        except OSError as exc:
            raise InvalidArgument(f"cannot read image file {image}: {exc.strerror or exc}") from None
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise InvalidArgument(f"cannot send a {type(image).__name__} as an image; use an array, PIL image, path or bytes")


def pack_bytes(elements: Sequence[bytes]) -> bytes:
    """The v2 raw BYTES encoding: each element prefixed with its length as a little-endian uint32."""
    parts: list[bytes] = []
    for element in elements:
        parts.append(_LENGTH.pack(len(element)))
        parts.append(element)
    return b"".join(parts)


def unpack_bytes(buffer: bytes) -> list[bytes]:
    elements: list[bytes] = []
    offset = 0
    while offset < len(buffer):
        if offset + _LENGTH.size > len(buffer):
            raise InvalidArgument("BYTES tensor: truncated length prefix")
        (length,) = _LENGTH.unpack_from(buffer, offset)
        offset += _LENGTH.size
        if offset + length > len(buffer):
            raise InvalidArgument("BYTES tensor: element runs past the end of the buffer")
        elements.append(buffer[offset : offset + length])
        offset += length
    return elements


def encode_images(images: Images, target: InputTarget = InputTarget()) -> EncodedInput:
    """Turn any accepted image input into one tensor (see ``Images``)."""
    if isinstance(images, np.ndarray):
        return encode_array(images, target)
    if isinstance(images, Sequence) and not isinstance(images, str | bytes | bytearray):
        if len(images) == 0:
            raise InvalidArgument("no images to classify")
        arrays = [isinstance(image, np.ndarray) for image in images]
        if all(arrays):
            shapes = {image.shape for image in images}  # type: ignore[union-attr]
            if len(shapes) != 1:
                raise InvalidArgument(f"image arrays differ in shape {sorted(shapes)}; resize them or send files")
            singles = [_as_batch_array(image)[0] for image in images]  # type: ignore[arg-type]
            return encode_array(np.stack(singles), target)
        if any(arrays):
            raise InvalidArgument("a batch mixes numpy arrays with encoded images; send one kind per request")
        elements = [encode_image_bytes(image) for image in images]
    else:
        elements = [encode_image_bytes(images)]
    return EncodedInput("BYTES", (len(elements),), pack_bytes(elements))


# --- requests ---------------------------------------------------------------------------------------------------


def set_parameter(target: Any, key: str, value: bool | int | float | str) -> None:
    """Store ``value`` in an ``InferParameter`` map under its natural protobuf type."""
    param = target[key]
    if isinstance(value, bool | np.bool_):
        param.bool_param = bool(value)
    elif isinstance(value, int | np.integer):
        param.int64_param = int(value)
    elif isinstance(value, float | np.floating):
        param.double_param = float(value)
    elif isinstance(value, str):
        param.string_param = value
    else:
        raise InvalidArgument(f"parameter {key!r}: {type(value).__name__} is not a bool, int, float or string")


def parameter_value(param: pb.InferParameter) -> bool | int | float | str | bytes | None:
    choice = param.WhichOneof("parameter_choice")
    return getattr(param, choice) if choice else None


def build_infer_request(
    model: str,
    target: InputTarget,
    images: EncodedInput,
    *,
    version: str = "",
    strategy: str = "none",
    top_k: int = 5,
    settings: Mapping[str, bool | int | float | str] | None = None,
    sequence: SequenceFlags | None = None,
    shared_memory_region: str | None = None,
    request_id: str = "",
) -> pb.ModelInferRequest:
    """A ModelInfer request; ``settings`` keys may be given with or without their ``tta_`` prefix. With
    ``shared_memory_region`` the input's bytes are in that registered region (at offset 0), not in the request."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    tensor = request.inputs.add(name=target.name, datatype=images.datatype, shape=images.shape)
    if shared_memory_region is None:
        request.raw_input_contents.append(images.raw)
    else:
        set_parameter(tensor.parameters, "shared_memory_region", shared_memory_region)
        set_parameter(tensor.parameters, "shared_memory_byte_size", len(images.raw))
    set_parameter(request.parameters, "tta_strategy", strategy)
    set_parameter(request.parameters, "top_k", int(top_k))
    for key, value in (settings or {}).items():
        set_parameter(request.parameters, key if key.startswith("tta_") else f"tta_{key}", value)
    if sequence is not None:
        set_parameter(request.parameters, "sequence_id", sequence.sequence_id)
        if sequence.start:
            set_parameter(request.parameters, "sequence_start", True)
        if sequence.end:
            set_parameter(request.parameters, "sequence_end", True)
    return request


def call_metadata(caller: str | None, session_route: str | None = None) -> tuple[tuple[str, str], ...]:
    metadata: list[tuple[str, str]] = []
    if caller:
        metadata.append((CALLER_HEADER, caller))
    if session_route:
        metadata.append((SESSION_HEADER, session_route))
    return tuple(metadata)


def session_route(caller: str | None, model: str, sequence_id: str) -> str:
    """``<caller>/<model>/<sequence id>``: lets a proxy pin a session to one replica."""
    return f"{caller or DEFAULT_CALLER}/{model}/{sequence_id}"


def session_key(caller: str | None, model: str, strategy: str, sequence_id: str) -> apb.SessionKey:
    return apb.SessionKey(caller=caller or "", model_name=model, strategy=strategy, sequence_id=sequence_id)


#: the calls retried on UNAVAILABLE (the connection was lost, the server is draining): reads, and ModelInfer, which
#: is safe to repeat (a stateless request changes nothing; a session's carries its request id and is replayed)
RETRIED_METHODS = {
    "inference.GRPCInferenceService": (
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
    ),
    "ttaserve.v1.Adaptation": ("ListStrategies", "ListSessions", "GetSession"),
}
#: gRPC allows at most five attempts
MAX_RETRIES = 4


def retry_service_config(retries: int) -> str:
    """gRPC's own retry policy for ``RETRIED_METHODS``: up to ``retries`` more attempts, 0.1 s backoff doubling to
    at most 1 s, all within the call's deadline."""
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be between 0 and {MAX_RETRIES}, not {retries}")
    policy = {
        "maxAttempts": retries + 1,
        "initialBackoff": "0.1s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    names = [{"service": service, "method": m} for service, methods in RETRIED_METHODS.items() for m in methods]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


def channel_options(max_message_mb: int, retries: int = 0) -> list[tuple[str, int | str]]:
    """Message limits both ways; with ``retries``, the retry policy and a retry buffer that holds a whole request
    (gRPC's default, 256 KiB, would leave a larger batch unretried)."""
    limit = max_message_mb * 1024 * 1024
    options: list[tuple[str, int | str]] = [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
    ]
    if retries:
        options += [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", retry_service_config(retries)),
            ("grpc.per_rpc_retry_buffer_size", limit),
        ]
    return options


def channel_target(url: str) -> str:
    """Accept ``host:port`` as well as a pasted ``grpc://host:port``."""
    for scheme in ("grpc://", "grpcs://", "http://", "https://"):
        if url.startswith(scheme):
            return url[len(scheme) :].rstrip("/")
    return url


# --- responses --------------------------------------------------------------------------------------------------


def output_arrays(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Every output tensor by name; BYTES tensors become object arrays of ``bytes``."""
    arrays: dict[str, np.ndarray] = {}
    raw = response.raw_output_contents
    for index, output in enumerate(response.outputs):
        shape = tuple(output.shape)
        if index < len(raw):
            if output.datatype == "BYTES":
                array = np.array(unpack_bytes(raw[index]), dtype=object)
            elif output.datatype in _RAW_DTYPES:
                array = np.frombuffer(raw[index], dtype=_RAW_DTYPES[output.datatype])
            else:
                raise InvalidArgument(f"output {output.name!r}: unsupported datatype {output.datatype}")
        else:
            values = getattr(output.contents, _TYPED_FIELDS.get(output.datatype, "bytes_contents"))
            array = np.array(values, dtype=object if output.datatype == "BYTES" else _RAW_DTYPES[output.datatype])
        try:
            arrays[output.name] = array.reshape(shape)
        except ValueError:
            raise InvalidArgument(f"output {output.name!r}: {array.size} elements do not fit shape {shape}") from None
    return arrays


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _classifications(arrays: Mapping[str, np.ndarray], top_k: int) -> list[Classification]:
    if "logits" not in arrays:
        raise InvalidArgument(f"response has no 'logits' output (outputs: {', '.join(arrays) or 'none'})")
    logits = arrays["logits"].astype(np.float32, copy=False)
    probabilities = arrays["probabilities"] if "probabilities" in arrays else _softmax(logits)
    if "topk_indices" in arrays:
        indices = arrays["topk_indices"].astype(np.int64, copy=False)
    else:
        indices = np.argsort(-probabilities, axis=1, kind="stable")[:, : max(1, min(top_k, logits.shape[1]))]
    scores = arrays["topk_scores"] if "topk_scores" in arrays else np.take_along_axis(probabilities, indices, 1)
    labels = arrays.get("topk_labels")
    results = []
    for row in range(len(logits)):
        predictions = [
            Prediction(
                index=int(indices[row, j]),
                label=labels[row, j].decode() if labels is not None else str(int(indices[row, j])),
                score=float(scores[row, j]),
            )
            for j in range(indices.shape[1])
        ]
        best = predictions[0]
        results.append(Classification(best.label, best.index, best.score, predictions, logits[row], probabilities[row]))
    return results


def parse_infer_response(response: pb.ModelInferResponse, top_k: int = 5) -> BatchResult:
    params = {key: parameter_value(value) for key, value in response.parameters.items()}
    settings_json = params.get("tta_settings")
    steps = params.get("tta_session_steps")
    reset = params.get("tta_session_reset")
    event = params.get("tta_session_event")
    return BatchResult(
        _classifications(output_arrays(response), top_k),
        model=response.model_name,
        version=response.model_version,
        strategy=str(params.get("tta_strategy", "")),
        settings=json.loads(settings_json) if isinstance(settings_json, str) and settings_json else {},
        stats={
            key.removeprefix("tta_"): float(value)
            for key, value in params.items()
            if key.startswith("tta_") and key not in _RESERVED_PARAMS and isinstance(value, int | float)
        },
        session_steps=int(steps) if isinstance(steps, int) else None,
        session_reset=str(reset) if reset else None,
        session_event=str(event) if event else None,
        engine=str(params.get("engine", "")),
        device=str(params.get("device", "")),
    )


def parse_index(response: pb.RepositoryIndexResponse) -> list[ModelEntry]:
    return [ModelEntry(m.name, m.version, m.state, m.reason) for m in response.models]


def choose_model(entries: Sequence[ModelEntry]) -> str:
    """The server's only model; with none or several, say so (and name them)."""
    names = sorted({entry.name for entry in entries})
    if not names:
        raise NotFound("the server has no models")
    if len(names) > 1:
        raise InvalidArgument(f"the server has {len(names)} models ({', '.join(names)}); name one with model=...")
    return names[0]


def _tensors(tensors: Sequence[pb.ModelMetadataResponse.TensorMetadata]) -> tuple[TensorInfo, ...]:
    return tuple(TensorInfo(t.name, t.datatype, tuple(t.shape)) for t in tensors)


def parse_metadata(response: pb.ModelMetadataResponse) -> ModelMetadata:
    return ModelMetadata(
        response.name,
        tuple(response.versions),
        response.platform,
        _tensors(response.inputs),
        _tensors(response.outputs),
    )


def input_target(metadata: ModelMetadata) -> InputTarget:
    """Name, layout and grey size of the image input. The SDK takes NHWC arrays and transposes for a model declared
    (N, C, H, W), recognised by a channel count (1 or 3) in position 1 and not in position 3."""
    if not metadata.inputs:
        raise InvalidArgument(f"model {metadata.name!r} declares no input")
    tensor = metadata.inputs[0]
    shape = tensor.shape
    if len(shape) != 4:
        return InputTarget(tensor.name)
    channels_first = shape[1] in (1, 3) and shape[3] not in (1, 3)
    channels, height, width = (shape[1], shape[2], shape[3]) if channels_first else (shape[3], shape[1], shape[2])
    grey_size = (height, width) if channels == 1 and height > 0 and width > 0 else None
    return InputTarget(tensor.name, "NCHW" if channels_first else "NHWC", grey_size)


def parse_strategies(response: apb.ListStrategiesResponse) -> list[Strategy]:
    return [
        Strategy(
            name=s.name,
            description=s.description,
            schema=json.loads(s.config_schema_json) if s.config_schema_json else {},
            defaults=json.loads(s.defaults_json) if s.defaults_json else {},
            stateful=s.stateful,
            uses_gradients=s.uses_gradients,
            requires=tuple(s.requires),
        )
        for s in response.strategies
    ]


def parse_session(info: apb.SessionInfo) -> SessionInfo:
    return SessionInfo(
        caller=info.key.caller,
        model=info.key.model_name,
        strategy=info.key.strategy,
        sequence_id=info.key.sequence_id,
        model_version=info.model_version,
        steps=info.steps,
        resets=info.resets,
        state_bytes=info.state_bytes,
        last_stats=dict(info.last_stats),
        settings=json.loads(info.settings_json) if info.settings_json else {},
        created_unix=info.created_unix,
        last_used_unix=info.last_used_unix,
        spilled=info.spilled,
    )
