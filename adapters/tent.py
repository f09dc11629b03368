"""``tent``: fully test-time adaptation by entropy minimisation (Wang et al., ICLR 2021, arXiv:2006.10726)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import AdapterState, Step, Strategy, StrategyConfig, StrategyContext
from .losses import entropy, prediction_stats
from .norm import layers_of
from .optim import GradientConfig, optimizer_step, zero_moments
from .registry import register
from .unmix_tns import NORM_LAYERS, NormSettings, forward_normalised, settings_components, thread_local_nets


class TentConfig(GradientConfig, NormSettings):
    """TENT's CIFAR settings: Adam, lr 1e-3, betas (0.9, 0.999), one step per batch. ``optimizer='sgd'`` with
    momentum 0.9 is its ImageNet choice (there with lr 2.5e-4)."""


@dataclass
class TentState(AdapterState):
    """The session's own BatchNorm affine parameters (γ, β by parameter name), their optimizer moments and, with
    ``norm='unmix_tns'``, the UnMix-TNS components. ``first``/``second`` are Adam's moments (SGD: the momentum
    buffer in ``first``, ``second`` empty); ``steps`` is also Adam's step count."""

    params: dict[str, torch.Tensor] = field(default_factory=dict)
    first: dict[str, torch.Tensor] = field(default_factory=dict)
    second: dict[str, torch.Tensor] = field(default_factory=dict)
    means: dict[str, torch.Tensor] = field(default_factory=dict)
    variances: dict[str, torch.Tensor] = field(default_factory=dict)


@register
class Tent(Strategy):
    """TENT: batch-statistics BN plus entropy minimisation on the BN affine parameters (γ, β) only.

    Each batch: forward with the session's γ/β, take the mean prediction entropy as the loss and make one
    optimizer step on γ/β. The returned logits are those of the forward *before* the update, as TENT's reference
    implementation returns them (the update benefits the next batch; predicting again would cost a second
    forward). Every other weight is the served model's, read-only.
    """

    name = "tent"
    config_cls = TentConfig
    stateful = True
    state_cls = TentState
    uses_gradients = True
    requires = ("batchnorm",)

    def __init__(self, model: torch.nn.Module, context: StrategyContext | None = None) -> None:
        super().__init__(model, context)
        self._nets = thread_local_nets(model)

    def init_state(self, config: StrategyConfig) -> TentState:
        assert isinstance(config, TentConfig)
        net = self._nets[config.norm].get()
        params = {
            f"{name}.{p}": getattr(layer, p).detach().clone()
            for name, layer in layers_of(net, NORM_LAYERS[config.norm])
            for p in ("weight", "bias")
            if getattr(layer, p) is not None
        }
        if not params:
            raise ValueError("tent needs BatchNorm2d layers with affine parameters")
        first, second = zero_moments(params, config)
        means, variances = settings_components(net, config, self.context.seed, self.context.device)
        return TentState(params=params, first=first, second=second, means=means, variances=variances)

    def step(self, state: AdapterState, x: torch.Tensor, config: StrategyConfig) -> Step:
        assert isinstance(state, TentState) and isinstance(config, TentConfig)
        net = self._nets[config.norm].get()
        trained = {k: v.detach().requires_grad_() for k, v in state.params.items()}
        with torch.enable_grad():
            logits, means, variances = forward_normalised(net, trained, x, state.means, state.variances, config)
            loss = entropy(logits).mean()
            grads = torch.autograd.grad(loss, list(trained.values()))
        steps = state.steps + 1
        params, first, second = optimizer_step(
            state.params, dict(zip(trained, grads, strict=True)), state.first, state.second, steps, config
        )
        new_state = TentState(steps=steps, params=params, first=first, second=second, means=means, variances=variances)
        logits = logits.detach()
        return Step(logits=logits, state=new_state, stats={**prediction_stats(logits), "loss": loss.item()})
