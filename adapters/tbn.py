"""``tbn``: test-time batch normalisation ("BN-1" / "norm test"; Nado et al. 2020, Schneider et al. 2020)."""

from __future__ import annotations

import torch

from .base import AdapterState, Step, Strategy, StrategyConfig, StrategyContext, ThreadLocalModule
from .losses import prediction_stats
from .norm import BatchStatNorm2d, replace_batchnorm, require_batchnorm
from .registry import register


class TBNConfig(StrategyConfig):
    """No settings: every BatchNorm2d normalises with the current batch's mean and (biased) variance."""


@register
class TBN(Strategy):
    """Normalise every BatchNorm2d layer with the current batch's statistics instead of the source ones.

    Stateless: each batch is normalised on its own, so it corrects covariate shift when a batch is large and
    i.i.d., and fails on small or label-correlated batches (the motivation for alpha-BN and UnMix-TNS).
    """

    name = "tbn"
    config_cls = TBNConfig
    requires = ("batchnorm",)

    def __init__(self, model: torch.nn.Module, context: StrategyContext | None = None) -> None:
        super().__init__(model, context)
        require_batchnorm(model)
        self._net = ThreadLocalModule(lambda: replace_batchnorm(model, BatchStatNorm2d))

    def init_state(self, config: StrategyConfig) -> AdapterState:
        return AdapterState()

    @torch.inference_mode()
    def step(self, state: AdapterState, x: torch.Tensor, config: StrategyConfig) -> Step:
        logits = self._net.get()(x)
        return Step(logits=logits, state=AdapterState(steps=state.steps + 1), stats=prediction_stats(logits))
