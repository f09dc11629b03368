"""ONNX Runtime engine: serves the non-adaptive path (strategy ``none``) of ONNX models and ONNX exports.

The serving overhead over calling ORT in-process should be near zero, so the session is built once with every
graph optimisation on, the input/output names are cached, and ``infer`` passes the caller's array straight to
``InferenceSession.run`` (thread-safe; concurrent requests share one session).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .base import Engine

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


class OnnxLoadError(RuntimeError):
    """The model file or bytes are not a loadable ONNX classifier; the message says which and why."""


ProviderList = list[str | tuple[str, dict[str, str]]]


def _parse_device(device: str) -> tuple[str, int]:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` (as ``str(torch.device)`` writes it) -> (kind, GPU index)."""
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {device!r}")
    return kind, int(index or 0)


def requested_providers(device: str) -> ProviderList:
    """``auto`` asks for CUDA when this ORT build has it; ``cuda`` without it is an error, not a silent fallback."""
    kind, index = _parse_device(device)
    built_with_cuda = CUDA_PROVIDER in ort.get_available_providers()
    if kind == "cuda" and not built_with_cuda:
        raise OnnxLoadError(
            f"device {device!r} requested but this ONNX Runtime build has no {CUDA_PROVIDER} "
            f"(available: {ort.get_available_providers()}; install onnxruntime-gpu)"
        )
    if kind != "cpu" and built_with_cuda:
        return [(CUDA_PROVIDER, {"device_id": str(index)}), CPU_PROVIDER]
    return [CPU_PROVIDER]


def session_options(intra_op_threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    return options


class OnnxEngine(Engine):
    """One ``InferenceSession`` for a classifier with a single image input and logits as its first output."""

    kind = "onnx"

    def __init__(
        self,
        model: Path | str | bytes,
        device: str = "auto",
        *,
        intra_op_threads: int | None = None,
    ) -> None:
        source = f"{len(model)} bytes of ONNX" if isinstance(model, bytes) else str(model)
        wanted = requested_providers(device)
        model_arg = model if isinstance(model, bytes) else str(model)
        try:
            self.session = ort.InferenceSession(model_arg, session_options(intra_op_threads), providers=wanted)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidProtobuf, NoSuchFile, ...)
            raise OnnxLoadError(f"{source}: cannot load as an ONNX model: {exc}") from exc
        self.providers = tuple(self.session.get_providers())
        self._check_provider(device, wanted, source)
        self.device = "cuda" if CUDA_PROVIDER in self.providers else "cpu"
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise OnnxLoadError(f"{source}: expected one input (the image batch), found {len(inputs)}")
        self.input_name = inputs[0].name
        self.input_shape = tuple(inputs[0].shape)
        self.output_names = [self.session.get_outputs()[0].name]

    def _check_provider(self, device: str, wanted: ProviderList, source: str) -> None:
        if wanted[0] == CPU_PROVIDER or CUDA_PROVIDER in self.providers:
            return
        if device.startswith("cuda"):
            raise OnnxLoadError(
                f"{source}: device {device!r} requested but ONNX Runtime loaded only {list(self.providers)} "
                f"(check that the CUDA and cuDNN libraries onnxruntime-gpu needs are installed)"
            )
        log.warning("%s: CUDAExecutionProvider requested but unavailable; running on %s", source, self.providers)

    def infer(self, x: np.ndarray) -> np.ndarray:
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run(self.output_names, {self.input_name: x})[0]

    def close(self) -> None:
        # Dropping the session frees its arena (and GPU memory with the CUDA provider).
        del self.session
