"""``none``: the source model as trained, the baseline every adaptation method is measured against."""

from __future__ import annotations

import torch

from .base import AdapterState, Step, Strategy, StrategyConfig
from .registry import register


class SourceConfig(StrategyConfig):
    """No settings."""


@register
class Source(Strategy):
    """Plain inference with the source model and its source BatchNorm statistics (no adaptation)."""

    name = "none"
    config_cls = SourceConfig

    def init_state(self, config: StrategyConfig) -> AdapterState:
        return AdapterState()

    @torch.inference_mode()
    def step(self, state: AdapterState, x: torch.Tensor, config: StrategyConfig) -> Step:
        return Step(logits=self.model(x), state=state)
