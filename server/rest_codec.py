"""The v2 REST protocol's bodies <-> the gRPC messages the pipeline serves.

An inference request is a JSON object, optionally followed by the raw bytes of its inputs (Triton's binary tensor
data extension: the header ``Inference-Header-Content-Length`` says where the JSON ends, each input's
``binary_data_size`` parameter how many bytes are its own). Outputs come back as JSON ``data`` lists or, when asked
(``binary_data`` per output, ``binary_data_output`` for all), as raw bytes after the JSON in the same way.
Everything a client can get wrong here is an ``InvalidArgument`` naming the field.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import Message

from ttaserve.protocol import kserve_v2_pb2 as pb

from .codec import (
    NUMPY_DTYPES,
    decode_bytes_elements,
    encode_bytes_elements,
    parameter_value,
    set_parameter,
    values_to_array,
)
from .errors import InvalidArgument
from .shared_memory import REGION_PARAMETER

BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA = "binary_data"
BINARY_DATA_OUTPUT = "binary_data_output"
#: MLServer's and KServe's way to carry encoded images in JSON: BYTES elements as base64 strings
CONTENT_TYPE = "content_type"
BASE64 = "base64"
#: parameters of the transport, not of the request: they are consumed here and never reach the pipeline
_TRANSPORT_PARAMETERS = frozenset({BINARY_DATA_SIZE, BINARY_DATA, BINARY_DATA_OUTPUT, CONTENT_TYPE})


@dataclass(frozen=True)
class ParsedInferBody:
    request: pb.ModelInferRequest
    #: output name -> whether it goes back as raw bytes after the JSON
    binary_outputs: Mapping[str, bool]
    #: the default for outputs the request did not name (``binary_data_output``)
    binary_by_default: bool


@dataclass(frozen=True)
class EncodedBody:
    body: bytes
    #: the JSON's length when raw output bytes follow it (``Inference-Header-Content-Length``), else None
    json_length: int | None


def parse_infer_body(model_name: str, model_version: str, body: bytes, json_length: int | None) -> ParsedInferBody:
    if json_length is None:
        json_length = len(body)
    elif not 0 <= json_length <= len(body):
        raise InvalidArgument(
            f"header Inference-Header-Content-Length: {json_length} is outside the body's {len(body)} bytes"
        )
    header = _load_json_object(body[:json_length], "inference request")
    request = pb.ModelInferRequest(model_name=model_name, model_version=model_version)
    if "id" in header:
        request.id = _expect(header["id"], str, "'id'")
    request_params = _expect(header.get("parameters", {}), dict, "'parameters'")
    _copy_parameters(request_params, request.parameters, "request parameter")
    binary_by_default = _expect(
        request_params.get(BINARY_DATA_OUTPUT, False), bool, f"parameter '{BINARY_DATA_OUTPUT}'"
    )

    tail = memoryview(body)[json_length:]
    offset = 0
    inputs = _expect(header.get("inputs"), list, "'inputs'")
    for index, item in enumerate(inputs):
        tensor_json = _expect(item, dict, f"inputs[{index}]")
        tensor, raw, binary_size = _parse_input(tensor_json, index, tail[offset:])
        request.inputs.append(tensor)
        if raw is not None:
            request.raw_input_contents.append(raw)
        offset += binary_size
    if offset != len(tail):
        raise InvalidArgument(
            f"the body has {len(tail)} bytes after the JSON, but the inputs' binary_data_size add up to {offset}"
        )

    binary_outputs: dict[str, bool] = {}
    for index, item in enumerate(_expect(header.get("outputs", []), list, "'outputs'")):
        output_json = _expect(item, dict, f"outputs[{index}]")
        name = _expect(output_json.get("name"), str, f"outputs[{index}].name")
        params = _expect(output_json.get("parameters", {}), dict, f"output '{name}' parameters")
        binary_outputs[name] = _expect(
            params.get(BINARY_DATA, binary_by_default), bool, f"output '{name}' parameter '{BINARY_DATA}'"
        )
        output = request.outputs.add(name=name)
        _copy_parameters(params, output.parameters, f"output '{name}' parameter")
    return ParsedInferBody(request, binary_outputs, binary_by_default)


def _parse_input(
    tensor_json: dict[str, Any], index: int, tail: memoryview
) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes | None, int]:
    """The tensor, its data as raw bytes (None: none given), and how many bytes of the binary tail it took."""
    name = _expect(tensor_json.get("name"), str, f"inputs[{index}].name")
    datatype = _expect(tensor_json.get("datatype"), str, f"input '{name}' datatype")
    shape = _expect(tensor_json.get("shape"), list, f"input '{name}' shape")
    if not all(isinstance(dim, int) and not isinstance(dim, bool) for dim in shape):
        raise InvalidArgument(f"input '{name}': shape must be a list of integers, got {shape}")
    params = _expect(tensor_json.get("parameters", {}), dict, f"input '{name}' parameters")
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    _copy_parameters(params, tensor.parameters, f"input '{name}' parameter")
    if datatype != "BYTES" and datatype not in NUMPY_DTYPES:
        raise InvalidArgument(f"input '{name}': unknown datatype {datatype!r}")

    if BINARY_DATA_SIZE in params:
        size = params[BINARY_DATA_SIZE]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidArgument(f"input '{name}': '{BINARY_DATA_SIZE}' must be a byte count, got {size!r}")
        if size > len(tail):
            raise InvalidArgument(
                f"input '{name}': '{BINARY_DATA_SIZE}' is {size} bytes but only {len(tail)} follow in the body"
            )
        if "data" in tensor_json:
            raise InvalidArgument(f"input '{name}': data given both in JSON and as binary data")
        return tensor, bytes(tail[:size]), size
    if "data" not in tensor_json:
        # no data at all is fine here: the input may name a shared-memory region, which the pipeline checks
        return tensor, None, 0
    values = _flatten(tensor_json["data"])
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(values) != count:
        raise InvalidArgument(f"input '{name}': shape {shape} needs {count} values, got {len(values)}")
    if datatype == "BYTES":
        base64_encoded = params.get(CONTENT_TYPE) == BASE64
        return tensor, encode_bytes_elements([_bytes_element(v, name, base64_encoded) for v in values]), 0
    return tensor, values_to_array(values, datatype, name).tobytes(), 0


def _bytes_element(value: object, name: str, base64_encoded: bool) -> bytes:
    if not isinstance(value, str):
        raise InvalidArgument(f"input '{name}': BYTES data must be strings, got {type(value).__name__}")
    if not base64_encoded:
        return value.encode()
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise InvalidArgument(f"input '{name}': an element is not valid base64 ({exc})") from None


def _flatten(data: object) -> list[Any]:
    """The v2 protocol allows ``data`` flat or nested as the shape (row-major); both become one flat list."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item))
    return flat


def _copy_parameters(source: Mapping[str, Any], target: Any, what: str) -> None:
    for key, value in source.items():
        if key in _TRANSPORT_PARAMETERS:
            continue
        if value is None or isinstance(value, list | dict):
            raise InvalidArgument(f"{what} '{key}': must be a string, number or boolean, got {json.dumps(value)}")
        try:
            set_parameter(target[key], value)
        except ValueError:
            raise InvalidArgument(f"{what} '{key}': {value} is outside the 64-bit integer range") from None


def encode_infer_response(response: pb.ModelInferResponse, parsed: ParsedInferBody) -> EncodedBody:
    tail: list[bytes] = []
    outputs = []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        params = parameters_to_json(tensor.parameters)
        in_shared_memory = REGION_PARAMETER in params
        if not in_shared_memory and parsed.binary_outputs.get(tensor.name, parsed.binary_by_default):
            params[BINARY_DATA_SIZE] = len(raw)
            tail.append(raw)
        elif not in_shared_memory:
            entry["data"] = _output_values(tensor.datatype, raw)
        if params:
            entry["parameters"] = params
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        body["id"] = response.id
    if response.parameters:
        body["parameters"] = parameters_to_json(response.parameters)
    body["outputs"] = outputs
    header = json.dumps(body, separators=(",", ":")).encode()
    if not tail:
        return EncodedBody(header, None)
    return EncodedBody(header + b"".join(tail), len(header))


def _output_values(datatype: str, raw: bytes) -> list[Any]:
    if datatype == "BYTES":
        return [element.decode("utf-8", "replace") for element in decode_bytes_elements(raw, "output")]
    return np.frombuffer(raw, dtype=NUMPY_DTYPES[datatype]).tolist()


def parameters_to_json(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in parameters.items()}


def message_to_json(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton's REST responses write it: proto field names, 64-bit integers as JSON numbers
    (protobuf's own JSON mapping writes them as strings), and every scalar and list present even at its default (a
    client reads ``steps: 0`` and ``sessions: []`` instead of a missing key); unset sub-messages and oneof members
    are left out."""
    result: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        singular_message = field.message_type is not None and not field.is_repeated
        if (singular_message or field.containing_oneof is not None) and not message.HasField(field.name):
            continue
        result[field.name] = _field_to_json(field, value)
    return result


def _field_to_json(field: Any, value: Any) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        return {key: _scalar_to_json(value_field, item) for key, item in value.items()}
    if field.is_repeated:
        return [_scalar_to_json(field, item) for item in value]
    return _scalar_to_json(field, value)


def _scalar_to_json(field: Any, value: Any) -> Any:
    if field.message_type is not None:
        return message_to_json(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def _load_json_object(data: bytes | memoryview, what: str) -> dict[str, Any]:
    try:
        loaded = json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{what}: the body is not valid JSON ({exc})") from None
    return _expect(loaded, dict, what)


def load_json_object(data: bytes, what: str) -> dict[str, Any]:
    """A request body that must be a JSON object; an empty body is an empty object."""
    return _load_json_object(data, what) if data.strip() else {}


def _expect(value: Any, kind: type, what: str) -> Any:
    if value is None and kind is not bool:
        raise InvalidArgument(f"{what} is missing")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = {dict: "an object", list: "a list", str: "a string", bool: "true or false", int: "an integer"}
        raise InvalidArgument(f"{what} must be {names.get(kind, kind.__name__)}, got {json.dumps(value)}")
    return value
