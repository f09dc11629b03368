"""Model repositories and requests for the operations tests: seeded ResNet-20s (no download) driven through the real
``tritonclient``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as tc
from support import CIFAR_INPUT, CIFAR_PREPROCESSING, seeded_resnet20, write_model


def write_resnet(repo: Path, name: str = "resnet", max_batch_size: int = 64, **sessions: Any) -> Path:
    """A ResNet-20 model folder with dynamic batching on and the given ``sessions:`` settings."""
    config: dict[str, Any] = {
        "platform": "pytorch",
        "architecture": "cifar_resnet20",
        "input": CIFAR_INPUT,
        "preprocessing": CIFAR_PREPROCESSING,
        "max_batch_size": max_batch_size,
        "dynamic_batching": {"enabled": True, "max_batch_size": 64},
    }
    if sessions:
        config["sessions"] = sessions
    return write_model(repo, name, config, {1: seeded_resnet20(0).state_dict()})


def session_header(sequence_id: str, model: str = "resnet", caller: str = "anonymous") -> dict[str, str]:
    """The routing metadata the SDK sends (``client/session.py``), for tritonclient callers."""
    return {"ttaserve-session": f"{caller}/{model}/{sequence_id}"}


def infer(
    client: tc.InferenceServerClient,
    batch: np.ndarray,
    strategy: str = "none",
    sequence_id: str = "",
    start: bool = False,
    end: bool = False,
    model: str = "resnet",
    headers: dict[str, str] | None = None,
    timeout_s: float | None = None,
) -> tc.InferResult:
    tensor = tc.InferInput("input", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(np.ascontiguousarray(batch))
    return client.infer(
        model,
        [tensor],
        outputs=[tc.InferRequestedOutput("logits")],
        parameters={"tta_strategy": strategy},
        sequence_id=sequence_id or 0,
        sequence_start=start,
        sequence_end=end,
        headers=headers,
        client_timeout=timeout_s,
    )


def session_event(result: tc.InferResult) -> str:
    params = result.get_response().parameters
    return params["tta_session_event"].string_param if "tta_session_event" in params else ""
