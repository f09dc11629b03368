"""The in-process backend: ``ttaserve.adapters.Adapter`` on the networks of a model repository, no gRPC.

It reads the same repository (config, weights, preprocessing, merge partner, source data) a server would serve,
so an in-process run and a run through a server on that repository differ only by the transport. It is the fast
way to run the protocols: no encoding, no copies through a socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ttaserve.adapters import Adapter, SourceData, StrategyContext
from ttaserve.server.architectures import load_model
from ttaserve.server.loaded_model import available_versions, load_partner
from ttaserve.server.model_config import ModelConfig, load_model_config, read_labels

from .methods import Method


@dataclass(frozen=True)
class _Model:
    config: ModelConfig
    directory: Path
    network: nn.Module
    mean: torch.Tensor
    std: torch.Tensor

    def normalise(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, C) -> (x / 255 - mean) / std, (N, C, H, W) float32: what the server's preprocessor does."""
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        # Contiguous NCHW like the server's: a permuted tensor would carry channels-last strides through the network.
        return ((pixels - self.mean) / self.std).contiguous()


class InProcessStream:
    def __init__(self, adapter: Adapter, model: _Model) -> None:
        self._adapter = adapter
        self._model = model
        self._fresh = True

    def predict(self, images: np.ndarray, reset: bool) -> np.ndarray:
        if reset and not self._fresh:
            self._adapter.reset()
        self._fresh = False
        with torch.no_grad():  # strategies that train enable gradients themselves
            logits = self._adapter(self._model.normalise(images))
        return logits.argmax(1).numpy()

    def close(self) -> None:
        """Nothing to free beyond what garbage collection does."""


class InProcessBackend:
    """Methods run on ``repository``'s models in this process, on the CPU."""

    def __init__(self, repository: Path, model: str) -> None:
        self.repository = Path(repository)
        self.model = model
        self._models: dict[str, _Model] = {}

    def describe(self) -> str:
        return f"in-process (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)"

    def _load(self, name: str) -> _Model:
        if name not in self._models:
            directory = self.repository / name
            config = load_model_config(directory)
            versions = available_versions(directory, config)
            if config.architecture is None or not versions:
                raise ValueError(f"{directory}: in-process evaluation needs a 'pytorch' model with a version folder")
            weights = directory / str(versions[-1]) / config.weights_filename
            network = load_model(config.architecture, weights, **config.architecture_args).eval()
            shape = (1, -1, 1, 1)
            mean = torch.tensor(config.preprocessing.mean, dtype=torch.float32).view(shape)
            std = torch.tensor(config.preprocessing.std, dtype=torch.float32).view(shape)
            self._models[name] = _Model(config, directory, network, mean, std)
        return self._models[name]

    def labels(self, model: str) -> tuple[str, ...]:
        loaded = self._load(model)
        labels = read_labels(loaded.directory, loaded.config)
        if labels is not None:
            return labels
        probe = torch.zeros(1, loaded.config.input.channels, loaded.config.input.height, loaded.config.input.width)
        with torch.no_grad():
            return tuple(str(i) for i in range(loaded.network(probe).shape[1]))

    def input_shape(self, model: str) -> tuple[int, int, int]:
        spec = self._load(model).config.input
        return spec.height, spec.width, spec.channels

    def _context(self, model: _Model, strategy: str) -> StrategyContext:
        partner = None
        if model.config.merge_partner and strategy in ("t3", "t3_batch"):
            partner = load_partner(self.repository / model.config.merge_partner, torch.device("cpu"))
        source = None
        if model.config.source_data and strategy == "rmt":
            path = Path(model.config.source_data)
            with np.load(path if path.is_absolute() else model.directory / path) as data:
                images, labels = data["x"], data["y"].astype(np.int64)
            images = images[..., None] if images.ndim == 3 else images  # grey (N, H, W)
            source = SourceData(model.normalise(images), torch.from_numpy(labels))
        preprocessing = model.config.preprocessing
        return StrategyContext(
            partner=partner, source=source, input_mean=tuple(preprocessing.mean), input_std=tuple(preprocessing.std)
        )

    def open(self, method: Method, stream_id: str) -> InProcessStream:
        model = self._load(method.model or self.model)
        adapter = Adapter(method.strategy, model.network, self._context(model, method.strategy), **method.settings)
        return InProcessStream(adapter, model)
