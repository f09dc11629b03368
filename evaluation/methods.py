"""What is evaluated: a strategy on a model with settings, under a label for tables and plots."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

Settings = Mapping[str, bool | int | float | str]

#: the strategies of the main tables (T3's two need a merge partner and have their own protocol)
STRATEGIES: tuple[str, ...] = ("none", "tbn", "alpha_bn", "unmix_tns", "tent", "rmt")

#: RMT as it runs here: no warm-up and no source replay (50,000 warm-up images would cost about half an hour of
#: CPU per stream); the contrastive term's class prototypes come from the model's ``source_data`` when it has one.
DEFAULT_SETTINGS: dict[str, dict[str, bool | int | float | str]] = {"rmt": {"warmup_samples": 0, "lambda_src": 0.0}}


@dataclass(frozen=True)
class Method:
    label: str
    strategy: str
    #: the repository model to run on; None = the run's model
    model: str | None = None
    settings: Settings = field(default_factory=dict)


def strategy_methods(
    strategies: list[str] | tuple[str, ...], overrides: Mapping[str, Settings] | None = None
) -> list[Method]:
    """One method per entry on the run's model, with the defaults above and ``overrides`` per label.

    An entry is a strategy name (its own label) or ``LABEL=STRATEGY``, to run one strategy twice with different
    settings, e.g. ``["unmix_tns", "unmix_exact=unmix_tns"]`` with ``{"unmix_exact": {"exact_init": True}}``.
    """
    overrides = overrides or {}
    methods = []
    for entry in strategies:
        label, _, strategy = entry.rpartition("=")
        label = label or strategy
        methods.append(
            Method(label, strategy, settings={**DEFAULT_SETTINGS.get(strategy, {}), **overrides.get(label, {})})
        )
    return methods


class StreamRunner(Protocol):
    """One stream's adaptation state, wherever it lives."""

    def predict(self, images: np.ndarray, reset: bool) -> np.ndarray:
        """Adapt on and classify uint8 images (N, H, W, C); ``reset`` starts from the source state first."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    """Where methods run: in this process or on a server."""

    #: the model methods run on when they name none
    model: str

    def describe(self) -> str: ...

    def labels(self, model: str) -> tuple[str, ...]: ...

    def input_shape(self, model: str) -> tuple[int, int, int]:
        """(height, width, channels) of the model's images."""
        ...

    def open(self, method: Method, stream_id: str) -> StreamRunner: ...
