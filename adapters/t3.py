"""``t3`` and ``t3_batch``: test-time model merging (Imam et al. 2025), backpropagation-free.

The served model is the generalist θ_g; the model config's merge partner is the expert θ_e, fine-tuned from the
same initialisation (weights of independently trained models do not average). For an input x both predict,
p_g = softmax(f(x; θ_g)) and p_e = softmax(f(x; θ_e)), and their Jensen-Shannon divergence JS(p_g, p_e) (nats)
measures disagreement. Disagreement means x lies outside what the expert knows, so weight moves toward the
generalist; agreement keeps the expert's precision:

    θ(x) = λ(x)·θ_g + (1 − λ(x))·θ_e,     prediction = f(x; θ(x)).

**The λ mapping** (the paper's code uses λ_min + (λ_max − λ_min)·σ(γ·JS) on raw nats, which with γ = 0.5 only spans
σ(0)..σ(0.35) = 0.5..0.586 of the range, so it is made explicit here):

    j = JS / ln 2                    ∈ [0, 1]   (ln 2 is the largest JS two distributions can have)
    s(j) = σ(γ·(j − c))              c = ``centre``, γ = ``gamma``
    u(j) = (s(j) − s(0)) / (s(1) − s(0))                  ∈ [0, 1], u(0) = 0, u(1) = 1, increasing
    λ = λ_min + (λ_max − λ_min)·u(j)

so λ spans exactly [λ_min, λ_max] whatever γ and c: full agreement gives λ_min (mostly expert), total
disagreement λ_max (mostly generalist); c is where the sigmoid is steepest and γ how sharply it switches
(γ → 0 makes the mapping linear). The paper's λ_min/λ_max defaults could not be confirmed; the defaults here,
λ ∈ [0, 1], c = 0.5, γ = 10, switch from the pure expert to the pure generalist around half the largest
possible divergence.

**Buffers are merged too.** Every floating-point parameter *and* buffer is interpolated, so BatchNorm normalises
with λ·μ_g + (1 − λ)·μ_e and λ·σ²_g + (1 − λ)·σ²_e: the expert's statistics describe its domain and the merged
network must see statistics that match its merged weights (the interpolated variance ignores the spread between
the two means, the same approximation weight averaging makes). Integer buffers (BN's ``num_batches_tracked``)
are the generalist's. BN always uses these running statistics (eval mode), never batch statistics, so a sample's
prediction does not depend on the rest of its batch.

``t3`` merges per sample: ``torch.func.vmap`` over ``functional_call`` with each sample's own λ, so the
per-sample weights exist only ``chunk_size`` samples at a time (memory ≈ chunk_size × parameters). ``t3_batch``
takes one λ from the batch's mean JS, merges once into a serving thread's own copy of the model (two fused passes
over the weights, in place; memory: one model per serving thread) and runs one ordinary forward: the cheap variant.
Both cost three forwards per batch, keep no state and compute no gradients; the shared models are only read.
"""

from __future__ import annotations

import copy
import math
from abc import abstractmethod

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.func import functional_call, vmap

from .base import AdapterState, Step, Strategy, StrategyConfig, StrategyContext, ThreadLocalModule, share_weights_copy
from .registry import register


class T3Config(StrategyConfig):
    """λ = λ_min + (λ_max − λ_min)·u(JS / ln 2), u the sigmoid σ(γ(j − centre)) rescaled to map [0, 1] onto [0, 1]."""

    #: weight on the generalist when both models agree (JS = 0)
    lambda_min: float = Field(default=0.0, ge=0.0, le=1.0)
    #: weight on the generalist when they disagree completely (JS = ln 2)
    lambda_max: float = Field(default=1.0, ge=0.0, le=1.0)
    #: sharpness of the switch (0 would be linear; small values are close to it)
    gamma: float = Field(default=10.0, gt=0.0, le=1000.0)
    #: normalised JS where the switch is steepest
    centre: float = Field(default=0.5, ge=0.0, le=1.0)
    #: samples merged at once by ``t3`` (memory ≈ chunk_size × parameter count); ignored by ``t3_batch``
    chunk_size: int = Field(default=32, ge=1, le=4096)

    @model_validator(mode="after")
    def _ordered(self) -> T3Config:
        if self.lambda_min > self.lambda_max:
            raise ValueError(f"lambda_min ({self.lambda_min}) must not exceed lambda_max ({self.lambda_max})")
        return self


def merge_coefficient(js: torch.Tensor, config: T3Config) -> torch.Tensor:
    """λ for JS divergences ``js`` in nats (any shape), per the module docstring's mapping."""
    j = (js / math.log(2.0)).clamp(0.0, 1.0)

    def s(value: torch.Tensor | float) -> torch.Tensor:
        return torch.sigmoid(config.gamma * (torch.as_tensor(value, dtype=js.dtype) - config.centre))

    u = (s(j) - s(0.0)) / (s(1.0) - s(0.0))
    return config.lambda_min + (config.lambda_max - config.lambda_min) * u


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) between the softmaxes of two (N, K) logit tensors, per row."""
    log_a, log_b = F.log_softmax(logits_a, dim=1), F.log_softmax(logits_b, dim=1)
    log_m = torch.logaddexp(log_a, log_b) - math.log(2.0)
    kl_a = (log_a.exp() * (log_a - log_m)).sum(1)
    kl_b = (log_b.exp() * (log_b - log_m)).sum(1)
    return (0.5 * (kl_a + kl_b)).clamp(0.0, math.log(2.0))


def _entropy(logits: torch.Tensor) -> float:
    log_p = F.log_softmax(logits, dim=1)
    return float(-(log_p.exp() * log_p).sum(1).mean())


class _MergeStrategy(Strategy):
    """What ``t3`` and ``t3_batch`` share: the two weight sets, both predictions and the λ per sample."""

    config_cls = T3Config
    requires = ("merge_partner",)

    def __init__(self, model: nn.Module, context: StrategyContext | None = None) -> None:
        super().__init__(model, context)
        partner = self.context.partner
        if partner is None:
            raise ValueError(f"strategy {self.name!r} needs a merge partner (the expert; model config 'merge_partner')")
        generalist, expert = model.state_dict(), partner.state_dict()
        shapes_g = {k: (v.shape, v.dtype) for k, v in generalist.items()}
        shapes_e = {k: (v.shape, v.dtype) for k, v in expert.items()}
        if type(model) is not type(partner) or shapes_g != shapes_e:
            raise ValueError(f"strategy {self.name!r}: the merge partner's architecture differs from the model's")
        # Detached references (no copies) to what gets merged, and the integer buffers both keep as they are.
        self._generalist = {k: v.detach() for k, v in generalist.items() if v.is_floating_point()}
        self._expert = {k: expert[k].detach() for k in self._generalist}
        self._fixed = {k: v.detach() for k, v in generalist.items() if not v.is_floating_point()}
        self._module = ThreadLocalModule(lambda: share_weights_copy(model).eval())
        self._expert_module = ThreadLocalModule(lambda: share_weights_copy(partner).eval())

    def init_state(self, config: StrategyConfig) -> AdapterState:
        return AdapterState()

    def _run(self, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self._module.get(), {**weights, **self._fixed}, (x,))

    def _merged(self, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ_e + λ(θ_g − θ_e) for a scalar ``lam`` (a 0-d tensor, possibly batched by vmap)."""
        return {k: torch.lerp(self._expert[k], g, lam.to(g.dtype)) for k, g in self._generalist.items()}

    @torch.inference_mode()
    def step(self, state: AdapterState, x: torch.Tensor, config: StrategyConfig) -> Step:
        assert isinstance(config, T3Config)
        # This thread's copy holds the generalist's own tensors: a plain (eval-mode) forward, no parameter swapping.
        js = js_divergence(self._module.get()(x), self._expert_module.get()(x))
        lam, logits = self._merge_and_predict(js, x, config)
        stats = {
            "lambda": float(lam.mean()),
            "lambda_min": float(lam.min()),
            "lambda_max": float(lam.max()),
            "js": float(js.mean()),
            "entropy": _entropy(logits),
        }
        return Step(logits=logits, state=state, stats=stats)

    @abstractmethod
    def _merge_and_predict(
        self, js: torch.Tensor, x: torch.Tensor, config: T3Config
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """λ per sample (N,) and the merged network's logits (N, K)."""


@register
class T3(_MergeStrategy):
    """Test-time model merging: per-sample λ from generalist/expert disagreement, a merged network per sample."""

    name = "t3"

    def _merge_and_predict(
        self, js: torch.Tensor, x: torch.Tensor, config: T3Config
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lam = merge_coefficient(js, config)

        def one_sample(lam_i: torch.Tensor, x_i: torch.Tensor) -> torch.Tensor:
            return self._run(self._merged(lam_i), x_i.unsqueeze(0)).squeeze(0)

        return lam, vmap(one_sample, chunk_size=config.chunk_size)(lam, x)


@register
class T3Batch(_MergeStrategy):
    """Test-time model merging, batch variant: one λ from the batch's mean disagreement, one merge, one forward."""

    name = "t3_batch"

    def __init__(self, model: nn.Module, context: StrategyContext | None = None) -> None:
        super().__init__(model, context)
        names = list(self._generalist)
        self._expert_list = [self._expert[k] for k in names]
        self._generalist_list = [self._generalist[k] for k in names]
        self._merged = ThreadLocalModule(lambda: _MergedCopy(model, names))

    def _merge_and_predict(
        self, js: torch.Tensor, x: torch.Tensor, config: T3Config
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lam = merge_coefficient(js.mean(), config)
        merged = self._merged.get()
        # θ_e + λ(θ_g − θ_e) into this thread's copy: two fused passes over all tensors, no kernel per tensor.
        torch._foreach_copy_(merged.targets, self._expert_list)
        torch._foreach_lerp_(merged.targets, self._generalist_list, float(lam))
        return lam.expand(len(x)), merged(x)


class _MergedCopy(nn.Module):
    """A serving thread's own copy of the model whose floating-point weights and buffers (``targets``, in the
    order of ``names``) each ``t3_batch`` merge overwrites in place."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.net = copy.deepcopy(model).eval().requires_grad_(False)
        state = self.net.state_dict()
        self.targets = [state[name] for name in names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
