"""Strategy registry: name -> Strategy class, and the one-line way to adapt a model as a library user."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import AdapterState, Step, Strategy, StrategyConfig, StrategyContext

_STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator that makes a strategy available under ``cls.name``."""
    if cls.name in _STRATEGIES:
        raise ValueError(f"strategy {cls.name!r} is registered twice")
    _STRATEGIES[cls.name] = cls
    return cls


def strategy_names() -> list[str]:
    return sorted(_STRATEGIES)


def get_strategy_class(name: str) -> type[Strategy]:
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; available: {', '.join(strategy_names())}") from None


class Adapter:
    """A strategy, its settings and one stream's state: call it on successive batches.

    >>> adapter = Adapter("unmix_tns", model, num_components=16)
    >>> logits = adapter(batch)          # adapts, then predicts
    """

    def __init__(self, name: str, model: nn.Module, context: StrategyContext | None = None, **settings: Any) -> None:
        self.strategy = get_strategy_class(name)(model, context)
        self.config: StrategyConfig = self.strategy.make_config(**settings)
        self.state: AdapterState = self.strategy.init_state(self.config)
        self.last_stats: dict[str, float] = {}

    def step(self, x: torch.Tensor) -> Step:
        result = self.strategy.step(self.state, x, self.config)
        self.state = result.state
        self.last_stats = result.stats
        return result

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(x).logits

    def reset(self) -> None:
        self.state = self.strategy.init_state(self.config)

    @property
    def variant(self) -> str:
        """Which form of the method runs with these settings (what a server response reports as ``tta_variant``)."""
        return self.strategy.variant(self.config)
