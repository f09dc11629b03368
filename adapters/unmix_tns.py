"""``unmix_tns``: Un-Mixing Test-Time Normalization Statistics (Tomar et al., ICLR 2024, arXiv:2401.08328)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from .base import AdapterState, Step, Strategy, StrategyConfig, StrategyContext, ThreadLocalModule
from .losses import prediction_stats
from .norm import (
    BatchStatNorm2d,
    UnMixNorm2d,
    assign_components,
    collect_components,
    init_unmix_components,
    replace_batchnorm,
    require_batchnorm,
)
from .registry import register


class UnMixConfig(StrategyConfig):
    """UnMix-TNS settings; defaults are the paper's CIFAR ones (K = 128 is its choice for mixed domains,
    B_max = 16 for ImageNet-scale models)."""

    num_components: int = Field(16, ge=1, le=1024, description="K: statistics components per BatchNorm2d layer")
    reference_batch: int = Field(64, ge=1, le=4096, description="B_max: batch size at which m equals BN momentum")
    temperature: float = Field(0.07, gt=0.0, le=10.0, description="τ of the cosine-similarity softmax")
    spread: float = Field(0.5, ge=0.0, lt=1.0, description="a: share of source variance spread between components")
    exact_init: bool = Field(
        False, description="centre and rescale the initial components' noise (not the paper; see docs/results.md)"
    )


class NormSettings(StrategyConfig):
    """How a training strategy (TENT, RMT) normalises: plain batch statistics, or UnMix-TNS components (then its
    γ, β are the trained parameters and the components live in the session state), as the UnMix-TNS paper
    combines them."""

    norm: Literal["batch", "unmix_tns"] = Field("batch", description="batch statistics or UnMix-TNS")
    unmix_components: int = Field(16, ge=1, le=1024, description="UnMix-TNS K (norm='unmix_tns')")
    unmix_reference_batch: int = Field(64, ge=1, le=4096, description="UnMix-TNS B_max (norm='unmix_tns')")
    unmix_temperature: float = Field(0.07, gt=0.0, le=10.0, description="UnMix-TNS τ (norm='unmix_tns')")
    unmix_spread: float = Field(0.5, ge=0.0, lt=1.0, description="UnMix-TNS a (norm='unmix_tns')")
    unmix_exact_init: bool = Field(False, description="UnMix-TNS exact_init (norm='unmix_tns')")


@dataclass
class UnMixState(AdapterState):
    """Per BatchNorm2d layer (keyed by its module name): the K component means and variances, each K×C."""

    means: dict[str, torch.Tensor] = field(default_factory=dict)
    variances: dict[str, torch.Tensor] = field(default_factory=dict)


def initial_components(
    net: torch.nn.Module, num_components: int, spread: float, seed: int, device: torch.device, exact: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Seeded component initialisation: a reset gives bit-identical components."""
    generator = torch.Generator().manual_seed(seed)
    means, variances = init_unmix_components(net, num_components, spread, generator, exact)
    return {k: v.to(device) for k, v in means.items()}, {k: v.to(device) for k, v in variances.items()}


#: The normalisation layer each ``NormSettings.norm`` value swaps in.
NORM_LAYERS: dict[str, type[BatchStatNorm2d] | type[UnMixNorm2d]] = {
    "batch": BatchStatNorm2d,
    "unmix_tns": UnMixNorm2d,
}


def thread_local_nets(
    model: nn.Module, build: Callable[[nn.Module, type[nn.Module]], nn.Module] = replace_batchnorm
) -> dict[str, ThreadLocalModule]:
    """Per ``norm`` choice, per-thread weight-sharing copies of ``model`` built by ``build(model, layer)``; a
    copy is only built when a thread first uses that choice."""
    require_batchnorm(model)
    return {kind: ThreadLocalModule(lambda layer=layer: build(model, layer)) for kind, layer in NORM_LAYERS.items()}


def settings_components(
    net: torch.nn.Module, settings: NormSettings, seed: int, device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Initial components for ``settings`` (empty when normalising with batch statistics)."""
    if settings.norm != "unmix_tns":
        return {}, {}
    return initial_components(
        net, settings.unmix_components, settings.unmix_spread, seed, device, settings.unmix_exact_init
    )


def forward_normalised(
    net: torch.nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    means: dict[str, torch.Tensor],
    variances: dict[str, torch.Tensor],
    settings: NormSettings,
    update: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``net(x)`` with ``params`` swapped in; with UnMix-TNS also returns the updated components."""
    if settings.norm == "unmix_tns":
        if not means:
            raise ValueError("this session's state has no UnMix-TNS components: it was started with norm='batch'")
        assign_components(
            net,
            means,
            variances,
            temperature=settings.unmix_temperature,
            reference_batch=settings.unmix_reference_batch,
            update=update,
        )
    logits = torch.func.functional_call(net, params, (x,))
    if settings.norm == "unmix_tns":
        means, variances = collect_components(net)
    return logits, means, variances


@register
class UnMixTNS(Strategy):
    """UnMix-TNS: per-sample normalisation with a mixture of K running statistics components per BN layer.

    Built for label-correlated (non-i.i.d.) streams and small batches, where plain batch statistics mix up
    classes. Each sample is softly assigned to components by the cosine similarity of its instance mean with the
    component means; the normalisation statistics combine the components pulled toward the sample (law of total
    variance), and afterwards every component moves toward the samples assigned to it with momentum
    m = 1 − (1 − m_BN)^(B/B_max). Instance variances are biased (as BatchNorm normalises). No gradients.
    """

    name = "unmix_tns"
    config_cls = UnMixConfig
    stateful = True
    state_cls = UnMixState
    requires = ("batchnorm",)

    def __init__(self, model: torch.nn.Module, context: StrategyContext | None = None) -> None:
        super().__init__(model, context)
        self._template = replace_batchnorm(model, UnMixNorm2d)
        self._net = ThreadLocalModule(lambda: replace_batchnorm(model, UnMixNorm2d))

    def variant(self, config: UnMixConfig) -> str:  # type: ignore[override]
        """``unmix_tns+exact_init`` when the initial components depart from the paper's random draw."""
        return f"{self.name}+exact_init" if config.exact_init else self.name

    def init_state(self, config: StrategyConfig) -> UnMixState:
        assert isinstance(config, UnMixConfig)
        means, variances = initial_components(
            self._template,
            config.num_components,
            config.spread,
            self.context.seed,
            self.context.device,
            config.exact_init,
        )
        return UnMixState(means=means, variances=variances)

    @torch.no_grad()
    def step(self, state: AdapterState, x: torch.Tensor, config: StrategyConfig) -> Step:
        assert isinstance(state, UnMixState) and isinstance(config, UnMixConfig)
        net = self._net.get()
        assign_components(
            net,
            state.means,
            state.variances,
            temperature=config.temperature,
            reference_batch=config.reference_batch,
        )
        logits = net(x)
        means, variances = collect_components(net)
        new_state = UnMixState(steps=state.steps + 1, means=means, variances=variances)
        return Step(logits=logits, state=new_state, stats=prediction_stats(logits))
