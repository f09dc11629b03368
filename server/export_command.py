"""What ``ttaserve export-onnx`` runs: find a repository model's PyTorch weights, export them, check parity.

Kept apart from the CLI so the client package never imports torch; the CLI imports this module only when the
command is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .architectures import load_model
from .model_config import ModelConfig, Platform, load_model_config
from .onnx_export import DEFAULT_OPSET, DEFAULT_RTOL, ParityReport, export_onnx

#: the embedded default model's repository, shipped as package data beside this module
DEFAULT_REPOSITORY = Path(__file__).resolve().parent / "default_model"
SAMPLE_SIZE = 64


@dataclass(frozen=True)
class ExportSource:
    module: nn.Module
    config: ModelConfig
    version: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        spec = self.config.input
        return (spec.channels, spec.height, spec.width)


def _pick_model(repository: Path, model: str | None) -> str:
    if model is not None:
        return model
    names = sorted(p.name for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) != 1:
        raise ValueError(f"{repository}: holds {len(names)} models ({', '.join(names)}); name one with --model")
    return names[0]


def _pick_version(model_dir: Path, config: ModelConfig, version: int | None) -> int:
    present = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    allowed = [v for v in present if not config.versions or v in config.versions]
    if version is None:
        if not allowed:
            raise ValueError(f"{model_dir}: no version folder (expected e.g. {model_dir / '1'})")
        return allowed[-1]
    if version not in allowed:
        raise ValueError(f"{model_dir}: version {version} not found; available: {allowed}")
    return version


def load_source(repository: Path | None, model: str | None = None, version: int | None = None) -> ExportSource:
    """Load the PyTorch module behind a repository model (the embedded default repository when None)."""
    repository = repository or DEFAULT_REPOSITORY
    if not repository.is_dir():
        raise ValueError(f"{repository}: model repository not found")
    model_dir = repository / _pick_model(repository, model)
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir}: no such model in the repository")
    config = load_model_config(model_dir)
    chosen = _pick_version(model_dir, config, version)
    weights = model_dir / str(chosen) / config.weights_filename
    if config.platform is Platform.PYTORCH:
        assert config.architecture is not None  # guaranteed by ModelConfig's validator
        module = load_model(config.architecture, weights, **config.architecture_args)
    elif config.platform is Platform.TORCHSCRIPT:
        module = torch.jit.load(str(weights), map_location="cpu").eval()
    else:
        raise ValueError(f"{model_dir}: platform {config.platform.value!r} is already ONNX; nothing to export")
    return ExportSource(module, config, chosen)


def load_sample(path: Path, config: ModelConfig, size: int = SAMPLE_SIZE, seed: int = 0) -> np.ndarray:
    """A seeded random batch from an .npz with ``x`` uint8 (N, H, W, C), normalised as the server would."""
    with np.load(path) as data:
        images = data["x"]
    if images.ndim != 4 or images.shape[1:] != (config.input.height, config.input.width, config.input.channels):
        spec = config.input
        raise ValueError(
            f"{path}: 'x' has shape {images.shape}; the model takes (N, {spec.height}, {spec.width}, {spec.channels})"
        )
    picked = images[np.random.default_rng(seed).choice(len(images), min(size, len(images)), replace=False)]
    mean = np.asarray(config.preprocessing.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(config.preprocessing.std, dtype=np.float32).reshape(1, -1, 1, 1)
    pixels = picked.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return np.ascontiguousarray((pixels - mean) / std)


def run_export(
    repository: Path | None,
    model: str | None,
    version: int | None,
    out: Path,
    *,
    sample: Path | None = None,
    opset: int = DEFAULT_OPSET,
    rtol: float = DEFAULT_RTOL,
) -> ParityReport:
    source = load_source(repository, model, version)
    batch = load_sample(sample, source.config) if sample is not None else None
    return export_onnx(source.module, source.input_shape, out, opset, sample=batch, rtol=rtol)
