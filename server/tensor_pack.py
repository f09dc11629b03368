"""Nested tensors packed into one flat buffer per dtype, for snapshot files.

``torch.load(weights_only=True)`` pays ~75 µs per tensor it reads back, whatever its size: a TENT state of a
ResNet-20 (~100 small tensors) took 8 ms to read and an RMT one (~300) 17 ms, most of what restoring a spilled
session cost. Packed, a state is a handful of tensors, a structure of plain dicts and lists, and an index.
"""

from __future__ import annotations

import math
from typing import Any

import torch

_TENSOR = "__packed_tensor__"


def pack(value: Any) -> dict[str, Any]:
    """``value`` (dicts, lists, tensors and plain numbers or strings, nested) as buffers + index + structure."""
    tensors: list[torch.Tensor] = []

    def index(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            tensors.append(item.detach().cpu())
            return {_TENSOR: len(tensors) - 1}
        if isinstance(item, dict):
            return {key: index(inner) for key, inner in item.items()}
        if isinstance(item, list | tuple):
            return [index(inner) for inner in item]
        return item

    structure = index(value)
    groups: dict[str, list[torch.Tensor]] = {}
    filled: dict[str, int] = {}  # elements placed so far, per dtype
    placement = []
    for tensor in tensors:
        dtype = str(tensor.dtype).removeprefix("torch.")
        groups.setdefault(dtype, []).append(tensor)
        placement.append([dtype, filled.get(dtype, 0), list(tensor.shape)])
        filled[dtype] = filled.get(dtype, 0) + tensor.numel()
    buffers = {dtype: torch.cat([t.reshape(-1) for t in group]) for dtype, group in groups.items()}
    return {"structure": structure, "placement": placement, "buffers": buffers}


def unpack(packed: dict[str, Any]) -> Any:
    """What ``pack`` was given (tuples come back as lists), every tensor its own copy on the CPU."""
    buffers, placement = packed["buffers"], packed["placement"]

    def rebuild(item: Any) -> Any:
        if isinstance(item, dict) and set(item) == {_TENSOR}:
            dtype, offset, shape = placement[item[_TENSOR]]
            return buffers[dtype][offset : offset + math.prod(shape)].view(shape).clone()
        if isinstance(item, dict):
            return {key: rebuild(inner) for key, inner in item.items()}
        if isinstance(item, list):
            return [rebuild(inner) for inner in item]
        return item

    return rebuild(packed["structure"])
