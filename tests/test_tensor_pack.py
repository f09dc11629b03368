"""Snapshot files pack a state's tensors into one buffer per dtype; what comes back is what went in, and snapshots
written before (format 1, a record per tensor) still restore."""

from __future__ import annotations

import io

import torch

from ttaserve.adapters import get_strategy_class
from ttaserve.adapters.tent import TentState
from ttaserve.server.sessions import Session, SessionKey, session_from_payload, snapshot_payload
from ttaserve.server.tensor_pack import pack, unpack


def test_nested_tensors_of_every_kind_come_back_equal_and_unshared() -> None:
    value = {
        "params": {"bn1.weight": torch.randn(16), "bn1.bias": torch.randn(16, dtype=torch.float64)},
        "rng": torch.Generator().manual_seed(3).get_state(),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "grid": [torch.arange(6).reshape(2, 3), torch.ones(2, 2, 2, dtype=torch.float16)],
        "steps": 7,
        "name": "cam-1",
    }
    packed = pack(value)
    assert len(packed["buffers"]) == 6, "one buffer per dtype: float32, float64, uint8, bool, int64, float16"
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    back = unpack(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert back["steps"] == 7 and back["name"] == "cam-1"
    pairs = [
        (back["params"]["bn1.weight"], value["params"]["bn1.weight"]),
        (back["params"]["bn1.bias"], value["params"]["bn1.bias"]),
        (back["rng"], value["rng"]),
        (back["mask"], value["mask"]),
        (back["scalar"], value["scalar"]),
        (back["empty"], value["empty"]),
        (back["grid"][0], value["grid"][0]),
        (back["grid"][1], value["grid"][1]),
    ]
    for restored, original in pairs:
        assert restored.dtype == original.dtype and restored.shape == original.shape
        assert torch.equal(restored, original)
    back["grid"][0] += 100  # each tensor owns its memory: no view into a shared buffer
    assert torch.equal(back["grid"][1], value["grid"][1]) and back["grid"][0].untyped_storage().nbytes() == 6 * 8


def _session() -> Session:
    generator = torch.Generator().manual_seed(0)
    layers = [f"layer{i}.bn" for i in range(3)]
    state = TentState(
        steps=4,
        params={name: torch.randn(8, generator=generator) for name in layers},
        first={name: torch.randn(8, generator=generator) for name in layers},
        second={name: torch.rand(8, generator=generator) for name in layers},
    )
    key = SessionKey("anonymous", "resnet", "tent", "cam-1")
    return Session(key=key, model_version=1, settings=get_strategy_class("tent").config_cls(), state=state)


def test_a_snapshot_in_the_former_format_still_restores() -> None:
    session = _session()
    current = snapshot_payload(session)
    former = {**current, "format": 1, "state": session.state.to_dict()}
    for payload in (current, former):
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        loaded = torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)
        restored = session_from_payload(loaded, TentState, torch.device("cpu"), model_serial=1)
        assert restored.steps == 4 and restored.key == session.key
        for field in ("params", "first", "second"):
            for name, tensor in getattr(session.state, field).items():
                assert torch.equal(getattr(restored.state, field)[name], tensor)
