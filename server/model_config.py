"""A served model's configuration: the ``config.yaml`` (or ``config.json``) in its repository folder.

Layout of a model repository (Triton's, with a YAML/JSON config validated by pydantic)::

    <repository>/<model name>/config.yaml
    <repository>/<model name>/<version>/model.pt      (platform pytorch: a state dict for ``architecture``)
    <repository>/<model name>/<version>/model.ts      (platform torchscript)
    <repository>/<model name>/<version>/model.onnx    (platform onnx)
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_FILENAMES = ("config.yaml", "config.yml", "config.json")
DEFAULT_WEIGHT_FILES = {"pytorch": "model.pt", "torchscript": "model.ts", "onnx": "model.onnx"}


class ConfigError(ValueError):
    """A model configuration that cannot be used; the message names the file and the field."""


class Platform(str, Enum):
    PYTORCH = "pytorch"
    TORCHSCRIPT = "torchscript"
    ONNX = "onnx"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """The image tensor a client sends. Raw tensors carry pixels: UINT8 in [0, 255] or FP32 in [0, 1]; the server
    applies ``preprocessing`` (mean/std) to both. BYTES tensors carry encoded JPEG/PNG images, resized first."""

    name: str = "input"
    layout: Literal["NHWC", "NCHW"] = "NHWC"
    datatypes: tuple[Literal["FP32", "UINT8", "BYTES"], ...] = ("FP32", "UINT8", "BYTES")
    height: int = Field(gt=0, le=8192)
    width: int = Field(gt=0, le=8192)
    channels: Literal[1, 3] = 3

    def shape(self, batch: int = -1) -> list[int]:
        if self.layout == "NHWC":
            return [batch, self.height, self.width, self.channels]
        return [batch, self.channels, self.height, self.width]


class Preprocessing(_Strict):
    """How pixels in [0, 1] become the network's input: ``(x - mean) / std`` per channel."""

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    #: resize filter for encoded images whose size differs from the input's
    resample: Literal["bilinear", "bicubic", "nearest"] = "bilinear"

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(s <= 0 for s in v):
            raise ValueError("every std must be > 0")
        return v


class DynamicBatching(_Strict):
    """Merge concurrent stateless requests into one forward pass (never requests that carry a session)."""

    enabled: bool = False
    max_batch_size: int = Field(default=64, gt=0)
    max_queue_delay_us: int = Field(default=500, ge=0, le=1_000_000)


class SessionSettings(_Strict):
    """Session lifetime, snapshots and the collapse guard.

    The guard resets a session to the source state when its logits or stats turn non-finite, or when the running
    (EMA) class marginal of its predictions loses its entropy: a model that predicts one class for everything. The
    long default horizon (momentum 0.99, about 100 batches) keeps label-sorted streams, which legitimately see one
    class for a few dozen batches, from tripping it.
    """

    #: write a snapshot every N steps (0 = only on request and on drain), so another replica can resume
    snapshot_every_steps: int = Field(default=0, ge=0)
    collapse_min_marginal_entropy: float = Field(default=0.15, ge=0)
    collapse_marginal_momentum: float = Field(default=0.99, ge=0, lt=1)
    collapse_min_steps: int = Field(default=50, ge=0)


class ModelConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    platform: Platform
    #: registered architecture name (platform pytorch only), e.g. ``cifar_resnet20``
    architecture: str | None = None
    #: keyword arguments for the architecture's constructor
    architecture_args: dict[str, Any] = Field(default_factory=dict)
    #: weights file inside each version folder; defaults by platform (model.pt / model.ts / model.onnx)
    weights_file: str | None = None
    #: versions to serve; empty = every numeric folder present
    versions: tuple[int, ...] = ()
    input: InputSpec
    preprocessing: Preprocessing = Preprocessing()
    labels: tuple[str, ...] | None = None
    #: a text file (one label a line) beside the config, instead of ``labels``
    labels_file: str | None = None
    max_batch_size: int = Field(default=256, gt=0, le=4096)
    dynamic_batching: DynamicBatching = DynamicBatching()
    #: forward passes of strategy ``none`` that may run at once (Triton's instance count); further requests queue.
    #: An ONNX Runtime CPU session then gives each run cores ÷ instances intra-op threads, so two instances on two
    #: cores run two one-threaded forwards side by side: more images/s under concurrent load, a slower lone request
    instances: int = Field(default=1, ge=1, le=64)
    sessions: SessionSettings = SessionSettings()
    #: run the ``none`` strategy of a pytorch model through an ONNX export on ONNX Runtime
    onnx_source_path: bool = False
    #: T3's expert: another model of this repository with the same architecture and initialisation
    merge_partner: str | None = None
    #: labelled source images (.npz with ``x`` uint8 NHWC and ``y``) for RMT warm-up / replay / prototypes
    source_data: str | None = None
    #: with ``source_data``: run the source warm-up of strategies that have one (RMT) for their default settings in
    #: the background right after loading, instead of inside the first request that needs it
    source_warmup_on_load: bool = True
    description: str = ""

    @model_validator(mode="after")
    def _check_platform_fields(self) -> ModelConfig:
        if self.platform is Platform.PYTORCH and not self.architecture:
            raise ValueError("platform 'pytorch' needs 'architecture' (a registered architecture name)")
        if self.platform is not Platform.PYTORCH and self.architecture:
            raise ValueError(f"'architecture' applies to platform 'pytorch' only, not {self.platform.value!r}")
        if self.labels is not None and self.labels_file is not None:
            raise ValueError("give either 'labels' or 'labels_file', not both")
        channels = self.input.channels
        for field_name in ("mean", "std"):
            values = getattr(self.preprocessing, field_name)
            if len(values) not in (1, channels):
                raise ValueError(
                    f"preprocessing.{field_name} has {len(values)} values; the input has {channels} channels"
                )
        return self

    @property
    def weights_filename(self) -> str:
        return self.weights_file or DEFAULT_WEIGHT_FILES[self.platform.value]


def find_config_file(model_dir: Path) -> Path:
    for filename in CONFIG_FILENAMES:
        path = model_dir / filename
        if path.is_file():
            return path
    raise ConfigError(f"{model_dir}: no model config (expected one of {', '.join(CONFIG_FILENAMES)})")


def load_model_config(model_dir: Path) -> ModelConfig:
    """Read and validate ``model_dir``'s config; errors name the file and each offending field."""
    path = find_config_file(model_dir)
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot parse: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw.setdefault("name", model_dir.name)
    try:
        config = ModelConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc']) or '<root>'}': {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None
    if config.name != model_dir.name:
        raise ConfigError(f"{path}: field 'name': {config.name!r} differs from the folder name {model_dir.name!r}")
    return config


def read_labels(model_dir: Path, config: ModelConfig) -> tuple[str, ...] | None:
    if config.labels is not None:
        return config.labels
    if config.labels_file is None:
        return None
    path = model_dir / config.labels_file
    try:
        return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    except OSError as exc:
        raise ConfigError(f"{model_dir / 'config'}: field 'labels_file': cannot read {path}: {exc}") from exc
