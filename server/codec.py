"""Tensors on the wire <-> numpy arrays, without Python lists on the hot path.

Raw contents are little-endian buffers read with ``np.frombuffer``; BYTES elements are each prefixed with their
length as a 4-byte little-endian unsigned integer (the v2 protocol's raw encoding).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from ttaserve.protocol import kserve_v2_pb2 as pb

from .errors import InvalidArgument

NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

_TYPED_CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_LENGTH = struct.Struct("<I")


def element_count(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def decode_bytes_elements(buffer: bytes | memoryview, name: str) -> list[bytes]:
    """Split a raw BYTES buffer into its length-prefixed elements."""
    elements: list[bytes] = []
    view = memoryview(buffer)
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise InvalidArgument(f"input '{name}': truncated BYTES length prefix at byte {offset}")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidArgument(
                f"input '{name}': BYTES element {len(elements)} claims {length} bytes, {len(view) - offset} remain"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    return elements


def encode_bytes_elements(elements: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def decode_tensor(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | memoryview | None
) -> np.ndarray | list[bytes]:
    """The input's values: a numpy array shaped as declared, or the list of BYTES elements."""
    name, datatype, shape = tensor.name, tensor.datatype, tuple(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise InvalidArgument(f"input '{name}': negative dimension in shape {list(shape)}")
    count = element_count(shape)
    if datatype == "BYTES":
        elements = decode_bytes_elements(raw, name) if raw is not None else list(tensor.contents.bytes_contents)
        if len(elements) != count:
            raise InvalidArgument(
                f"input '{name}': shape {list(shape)} needs {count} BYTES elements, got {len(elements)}"
            )
        return elements
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"input '{name}': unknown datatype {datatype!r}")
    if raw is not None:
        expected = count * dtype.itemsize
        if len(raw) != expected:
            raise InvalidArgument(
                f"input '{name}': {datatype} shape {list(shape)} needs {expected} bytes, got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    values = getattr(tensor.contents, _TYPED_CONTENTS[datatype])
    if len(values) != count:
        raise InvalidArgument(f"input '{name}': shape {list(shape)} needs {count} values, got {len(values)}")
    return values_to_array(values, datatype, name).reshape(shape)


def values_to_array(values: Sequence[bool | int | float], datatype: str, name: str) -> np.ndarray:
    """A flat list of numbers as a ``datatype`` array; a value the type cannot hold (300 as UINT8, 1.5 as an
    integer, a string) is the client's error, not an overflow inside the server."""
    dtype = NUMPY_DTYPES[datatype]
    try:
        array = np.asarray(values)
    except ValueError:
        raise InvalidArgument(f"input '{name}': data is not a flat list of numbers") from None
    if array.size == 0:
        return array.astype(dtype)
    if array.ndim != 1 or array.dtype.kind not in "biuf":
        raise InvalidArgument(f"input '{name}': {datatype} data must be a flat list of numbers")
    if dtype.kind in "iu":
        if array.dtype.kind == "f" and not np.array_equal(array, np.trunc(array)):
            raise InvalidArgument(f"input '{name}': {datatype} data holds non-integer values")
        info, lowest, highest = np.iinfo(dtype), array.min(), array.max()
        if lowest < info.min or highest > info.max:
            raise InvalidArgument(
                f"input '{name}': {datatype} data holds values outside [{info.min}, {info.max}] "
                f"(min {lowest}, max {highest})"
            )
    elif dtype.kind == "b" and array.dtype.kind != "b":
        raise InvalidArgument(f"input '{name}': BOOL data must be true/false")
    return array.astype(dtype)


def datatype_of(array: np.ndarray) -> str:
    for name, dtype in NUMPY_DTYPES.items():
        if array.dtype == dtype:
            return name
    raise TypeError(f"no v2 datatype for numpy dtype {array.dtype}")


def parameter_value(param: pb.InferParameter) -> bool | int | float | str:
    choice = param.WhichOneof("parameter_choice")
    if choice is None:
        raise InvalidArgument("a parameter has no value set")
    return getattr(param, choice)


def set_parameter(target: pb.InferParameter, value: bool | int | float | str) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = str(value)
