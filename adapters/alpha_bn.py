"""``alpha_bn``: blend source and test batch statistics (You, Li, Zhao 2021, "Test-time Batch Statistics
Calibration for Covariate Shift", arXiv:2110.04065)."""

from __future__ import annotations

import torch
from pydantic import Field

from .base import AdapterState, Step, Strategy, StrategyConfig, StrategyContext, ThreadLocalModule
from .losses import prediction_stats
from .norm import AlphaNorm2d, replace_batchnorm, replaced_layers, require_batchnorm, set_plain_attributes
from .registry import register


class AlphaBNConfig(StrategyConfig):
    """α is the weight on the test batch's statistics: 0 = source BN, 1 = TBN. The paper's harness uses 0.1,
    which keeps even single-image statistics stable (90 % source prior)."""

    alpha: float = Field(0.1, ge=0.0, le=1.0, description="weight of the test batch statistics")


@register
class AlphaBN(Strategy):
    """alpha-BN: normalise with μ = (1−α)μ_s + αμ_t and σ² = (1−α)σ²_s + ασ²_t (no training, no state).

    The batch moments are computed explicitly from the layer input (biased variance, as BatchNorm's own
    normalisation uses), never through a module's train/eval mode — relying on that mode is a known trap of the
    reference code. The paper's "Core" correlation loss on top of alpha-BN is not implemented.
    """

    name = "alpha_bn"
    config_cls = AlphaBNConfig
    requires = ("batchnorm",)

    def __init__(self, model: torch.nn.Module, context: StrategyContext | None = None) -> None:
        super().__init__(model, context)
        require_batchnorm(model)
        self._net = ThreadLocalModule(lambda: replace_batchnorm(model, AlphaNorm2d))

    def init_state(self, config: StrategyConfig) -> AdapterState:
        return AdapterState()

    @torch.inference_mode()
    def step(self, state: AdapterState, x: torch.Tensor, config: StrategyConfig) -> Step:
        assert isinstance(config, AlphaBNConfig)
        net = self._net.get()
        for _, layer in replaced_layers(net, AlphaNorm2d):
            set_plain_attributes(layer, alpha=config.alpha)
        logits = net(x)
        return Step(logits=logits, state=AdapterState(steps=state.steps + 1), stats=prediction_stats(logits))
