"""One loaded model version: its config, engine(s), preprocessing, batcher, statistics and strategy objects."""

from __future__ import annotations

import itertools
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ttaserve.adapters import SourceData, Strategy, StrategyContext, get_strategy_class

from .architectures import load_model
from .batching import DynamicBatcher
from .engines.base import Engine
from .engines.torch_engine import TorchEngine
from .errors import FailedPrecondition
from .model_config import ConfigError, ModelConfig, Platform, load_model_config, read_labels
from .preprocess import Preprocessor
from .statistics import ModelStatistics

if TYPE_CHECKING:
    from .warmup import SourceWarmup

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    config: ModelConfig
    version: int
    directory: Path
    labels: tuple[str, ...]
    engine: Engine
    #: the network the adaptive strategies run on (platform pytorch only)
    module: nn.Module | None
    device: torch.device
    preprocessor: Preprocessor
    statistics: ModelStatistics
    #: every plain forward (strategy ``none``) goes through it: dynamic batching and the ``instances`` bound
    batcher: DynamicBatcher
    #: background source warm-ups by strategy name (see ``warmup.py``)
    warmups: dict[str, SourceWarmup] = field(default_factory=dict)
    #: set when the version is unloaded, replaced or the server stops
    closed: bool = False
    #: unique per loaded instance: a reload of the same version gets a new one, so a session can tell whether the
    #: weights its state was built on are still the ones served
    serial: int = field(default_factory=itertools.count(1).__next__)
    _strategies: dict[str, Strategy] = field(default_factory=dict)
    _strategies_lock: threading.Lock = field(default_factory=threading.Lock)
    _build_locks: dict[str, threading.Lock] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def has_batchnorm(self) -> bool:
        return self.module is not None and any(isinstance(m, nn.BatchNorm2d) for m in self.module.modules())

    def strategy(self, name: str) -> Strategy:
        """The model's shared Strategy object for ``name``, built once on first use.

        Each name is built under its own lock: building RMT loads the source data and computes its prototypes
        (seconds), which must not hold up requests for the other strategies.
        """
        with self._strategies_lock:
            existing = self._strategies.get(name)
            if existing is not None:
                return existing
            build_lock = self._build_locks.setdefault(name, threading.Lock())
        with build_lock:
            built = self._strategies.get(name)
            if built is None:
                built = self._build_strategy(name)
                with self._strategies_lock:
                    self._strategies[name] = built
            return built

    def _build_strategy(self, name: str) -> Strategy:
        cls = get_strategy_class(name)
        if self.module is None:
            raise FailedPrecondition(
                f"strategy {name!r} needs a PyTorch network; model '{self.name}' is platform "
                f"{self.config.platform.value!r} (only 'none' runs on it)"
            )
        if "batchnorm" in cls.requires and not self.has_batchnorm():
            raise FailedPrecondition(f"strategy {name!r} needs BatchNorm2d layers; model '{self.name}' has none")
        return cls(self.module, self._context(cls))

    def _context(self, cls: type[Strategy]) -> StrategyContext:
        partner = None
        if "merge_partner" in cls.requires:
            if not self.config.merge_partner:
                raise FailedPrecondition(
                    f"strategy {cls.name!r} merges two models; model '{self.name}' names no 'merge_partner' "
                    "in its config"
                )
            partner = load_partner(self.directory.parent / self.config.merge_partner, self.device)
        source = None
        if self.config.source_data and uses_source_data(cls):
            source = self.load_source_data()
        return StrategyContext(
            partner=partner,
            source=source,
            device=self.device,
            input_mean=tuple(self.config.preprocessing.mean),
            input_std=tuple(self.config.preprocessing.std),
        )

    def load_source_data(self) -> SourceData:
        assert self.config.source_data is not None
        path = Path(self.config.source_data)
        if not path.is_absolute():
            path = self.directory / path
        try:
            with np.load(path) as data:
                images, labels = data["x"], data["y"]
        except (OSError, KeyError, ValueError) as exc:
            raise FailedPrecondition(f"model '{self.name}': source_data {path} cannot be read: {exc}") from None
        normalised = self.preprocessor.from_array(np.ascontiguousarray(images), "source_data")
        return SourceData(
            images=torch.from_numpy(normalised).to(self.device),
            labels=torch.from_numpy(labels.astype(np.int64)).to(self.device),
        )

    def close(self) -> None:
        self.closed = True
        self.engine.close()


def uses_source_data(cls: type[Strategy]) -> bool:
    """Whether the strategy is handed the model's ``source_data`` (RMT uses it when present, without requiring it)."""
    return "source_data" in cls.requires or cls.name == "rmt"


def load_partner(model_dir: Path, device: torch.device) -> nn.Module:
    """The newest version of another repository model's network (T3's expert), loaded without serving it."""
    config = load_model_config(model_dir)
    if config.platform is not Platform.PYTORCH or config.architecture is None:
        raise FailedPrecondition(f"merge partner '{config.name}' must be platform 'pytorch'")
    versions = available_versions(model_dir, config)
    if not versions:
        raise FailedPrecondition(f"merge partner '{config.name}' has no version folder with weights")
    weights = model_dir / str(versions[-1]) / config.weights_filename
    return load_model(config.architecture, weights, **config.architecture_args).to(device).eval()


def available_versions(model_dir: Path, config: ModelConfig) -> list[int]:
    """Numeric version folders holding the weights file, filtered by the config's ``versions``."""
    found = sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and (p / config.weights_filename).exists()
    )
    if config.versions:
        missing = [v for v in config.versions if v not in found]
        if missing:
            raise ConfigError(
                f"{model_dir}: field 'versions': version(s) {missing} have no {config.weights_filename} folder"
            )
        return [v for v in found if v in config.versions]
    return found


def build_engine_and_module(
    config: ModelConfig, weights: Path, device: torch.device
) -> tuple[Engine, nn.Module | None]:
    if config.platform is Platform.PYTORCH:
        assert config.architecture is not None
        module = load_model(config.architecture, weights, **config.architecture_args)
        engine: Engine = TorchEngine(module, device)
        if config.onnx_source_path:
            from .engines.onnx_engine import OnnxEngine
            from .onnx_export import export_for_serving

            input_shape = (config.input.channels, config.input.height, config.input.width)
            engine = OnnxEngine(
                export_for_serving(module, input_shape),
                device=onnx_device(device),
                intra_op_threads=intra_op_threads(config.instances),
            )
        return engine, module.to(device)
    if config.platform is Platform.TORCHSCRIPT:
        scripted = torch.jit.load(str(weights), map_location="cpu")
        return TorchEngine(scripted, device), None
    from .engines.onnx_engine import OnnxEngine

    return OnnxEngine(weights, device=onnx_device(device), intra_op_threads=intra_op_threads(config.instances)), None


def intra_op_threads(instances: int) -> int | None:
    """ONNX Runtime's intra-op threads per run: its own default (every core) for one instance, else the cores
    shared out between the instances (at least one each)."""
    if instances == 1:
        return None
    return max(1, len(os.sched_getaffinity(0)) // instances)


def onnx_device(device: torch.device) -> str:
    """ONNX Runtime follows torch's choice, but a CUDA machine whose ONNX Runtime lacks the CUDA provider falls back
    to the CPU with a warning (``auto``) instead of refusing to load."""
    return "auto" if device.type == "cuda" else "cpu"


def load_version(model_dir: Path, config: ModelConfig, version: int, device: torch.device) -> LoadedModel:
    weights = model_dir / str(version) / config.weights_filename
    engine, module = build_engine_and_module(config, weights, device)
    preprocessor = Preprocessor(config.input, config.preprocessing)
    probe = np.zeros((1, config.input.channels, config.input.height, config.input.width), dtype=np.float32)
    num_classes = int(engine.infer(probe).shape[1])  # also warms the engine up
    labels = read_labels(model_dir, config) or tuple(str(i) for i in range(num_classes))
    if len(labels) != num_classes:
        raise ConfigError(f"{model_dir}: field 'labels': {len(labels)} labels for a model with {num_classes} outputs")
    statistics = ModelStatistics()
    batching = config.dynamic_batching
    loaded = LoadedModel(
        config=config,
        version=version,
        directory=model_dir,
        labels=labels,
        engine=engine,
        module=module,
        device=device,
        preprocessor=preprocessor,
        statistics=statistics,
        # without dynamic batching, one request per execution: the batcher only bounds executions by `instances`
        batcher=DynamicBatcher(
            engine.infer,
            max_batch_size=batching.max_batch_size if batching.enabled else 1,
            max_queue_delay_us=batching.max_queue_delay_us if batching.enabled else 0,
            on_execution=statistics.record_execution,
            instances=config.instances,
        ),
    )
    log.info(
        "loaded model %s version %d: %s on %s (providers %s), %d classes",
        config.name,
        version,
        engine.kind,
        engine.device,
        ",".join(engine.providers),
        num_classes,
    )
    return loaded
