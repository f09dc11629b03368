"""Normalisation layers that test-time strategies swap in for ``nn.BatchNorm2d``.

Each layer takes the affine parameters and source statistics of the BatchNorm it replaces *by reference* (the same
tensor objects, registered under the same names ``weight``, ``bias``, ``running_mean``, ``running_var``), so a
strategy's structural copy of the model shares every weight with the served model and
``torch.func.functional_call`` can swap a session's own γ/β in under the usual parameter names. No layer ever
writes a parameter or buffer, and none looks at ``self.training``: what a layer computes is decided by its class
and by the per-call settings a strategy assigns on its (thread-local) copy.

Moments are always computed explicitly from the input tensor; variances are the *biased* ones (divide by the
number of elements), as BatchNorm uses to normalise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import share_weights_copy

#: BatchNorm's default momentum, used for UnMix-TNS when a layer has ``momentum=None`` (cumulative average).
DEFAULT_BN_MOMENTUM = 0.1


class _ReplacedBatchNorm(nn.Module):
    """Common part: borrow γ, β and the source statistics of the BatchNorm being replaced."""

    def __init__(self, bn: nn.BatchNorm2d, needs_source_stats: bool) -> None:
        super().__init__()
        if needs_source_stats and bn.running_mean is None:
            raise ValueError(f"{type(self).__name__} needs source running statistics (track_running_stats=True)")
        self.num_features = bn.num_features
        self.eps = bn.eps
        self.momentum = DEFAULT_BN_MOMENTUM if bn.momentum is None else bn.momentum
        self.weight = bn.weight
        self.bias = bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)


class BatchStatNorm2d(_ReplacedBatchNorm):
    """Normalise with the current batch's statistics (TBN / "BN-1"), gradients flowing through them as in BN
    training, but the source running statistics are never updated."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__(bn, needs_source_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True, momentum=0.0, eps=self.eps)


class AlphaNorm2d(_ReplacedBatchNorm):
    """alpha-BN: blend source and batch statistics, μ = (1−α)μ_s + αμ_t, σ² = (1−α)σ²_s + ασ²_t.

    ``alpha`` is a per-call setting the strategy assigns on its thread-local copy.
    """

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__(bn, needs_source_stats=True)
        self.alpha = 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var_t, mean_t = batch_moments(x, self.eps)
        mean = (1 - self.alpha) * self.running_mean + self.alpha * mean_t
        var = (1 - self.alpha) * self.running_var + self.alpha * var_t
        # Given explicit statistics, eval-mode batch_norm is just the fused normalisation (no gradients needed).
        return F.batch_norm(x, mean, var, self.weight, self.bias, training=False, momentum=0.0, eps=self.eps)


def batch_moments(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel biased variance and mean of ``x`` over (N, H, W).

    Without autograd, BatchNorm's own fused training kernel computes them about twice as fast on the CPU as
    ``torch.var_mean`` over three dimensions (its normalised output is discarded; the variance comes back from
    ``invstd = 1/sqrt(var + eps)``). With autograd the plain reduction keeps gradients flowing through the moments.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.var_mean(x, dim=(0, 2, 3), correction=0)
    _, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
    return invstd.pow(-2) - eps, mean


class UnMixNorm2d(_ReplacedBatchNorm):
    """UnMix-TNS: normalise each sample with a mixture of K statistics components, then update the components.

    Before a forward the strategy assigns ``components = (means, variances)`` (each K×C) and the settings
    ``temperature`` and ``reference_batch`` (B_max); the forward leaves the updated components in ``updated``
    (or the same components when ``update`` is False). The components never carry gradients; the instance
    statistics of the input do, so γ, β and earlier layers can be trained through this layer.
    """

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__(bn, needs_source_stats=True)
        self.temperature = 0.07
        self.reference_batch = 64
        self.update = True
        self.components: tuple[torch.Tensor, torch.Tensor] | None = None
        self.updated: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.components is None:
            raise RuntimeError("UnMixNorm2d needs its components assigned before a forward")
        means, variances = self.components
        y, self.updated = unmix_normalise(
            x,
            means,
            variances,
            self.weight,
            self.bias,
            eps=self.eps,
            temperature=self.temperature,
            momentum=self.momentum,
            reference_batch=self.reference_batch,
            update=self.update,
        )
        return y


def unmix_normalise(
    x: torch.Tensor,
    means: torch.Tensor,
    variances: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    eps: float,
    temperature: float,
    momentum: float,
    reference_batch: int,
    update: bool = True,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One UnMix-TNS layer as a function: returns the normalised ``x`` and the (updated) components."""
    inst_var, inst_mean = torch.var_mean(x, dim=(2, 3), correction=0)  # B×C each
    with torch.no_grad():
        similarity = F.normalize(inst_mean, dim=1) @ F.normalize(means, dim=1).T  # cosine, B×K
        p = torch.softmax(similarity / temperature, dim=1)[..., None]  # B×K×1
    mix_mean = (1 - p) * means + p * inst_mean[:, None, :]  # B×K×C
    mix_var = (1 - p) * variances + p * inst_var[:, None, :]
    # Law of total variance over the K mixed components.
    spread, mean = torch.var_mean(mix_mean, dim=1, correction=0)
    scale = torch.rsqrt(mix_var.mean(dim=1) + spread + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    y = torch.addcmul(shift[..., None, None], x, scale[..., None, None])  # one pass over x: x·scale + shift
    if not update:
        return y, (means, variances)
    with torch.no_grad():
        m = 1 - (1 - momentum) ** (x.shape[0] / reference_batch)
        new_means = means + m * (p * (inst_mean.detach()[:, None, :] - means)).mean(dim=0)
        new_vars = variances + m * (p * (inst_var.detach()[:, None, :] - variances)).mean(dim=0)
    return y, (new_means, new_vars)


def init_unmix_components(
    module: nn.Module, num_components: int, spread: float, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """UnMix-TNS initial components for every ``UnMixNorm2d`` in ``module`` (in module order).

    μ_k = μ_s + √(a·K/(K−1))·σ_s ⊙ ε_k, ε_k ~ N(0, I) drawn from ``generator``; σ²_k = (1−a)·σ²_s. With K = 1 the
    single component is the source statistics. The spread keeps the mixture's total variance equal to σ²_s in
    expectation.
    """
    means: dict[str, torch.Tensor] = {}
    variances: dict[str, torch.Tensor] = {}
    for name, layer in layers_of(module, UnMixNorm2d):
        mu_s, var_s = layer.running_mean.detach(), layer.running_var.detach()
        if num_components == 1:
            means[name], variances[name] = mu_s[None].clone(), var_s[None].clone()
            continue
        noise = torch.randn(num_components, layer.num_features, generator=generator).to(mu_s)
        scale = (spread * num_components / (num_components - 1)) ** 0.5
        means[name] = mu_s + scale * var_s.sqrt() * noise
        variances[name] = ((1 - spread) * var_s).expand(num_components, -1).clone()
    return means, variances


def assign_components(
    module: nn.Module,
    means: dict[str, torch.Tensor],
    variances: dict[str, torch.Tensor],
    *,
    temperature: float,
    reference_batch: int,
    update: bool = True,
) -> None:
    """Give every ``UnMixNorm2d`` of a (thread-local) copy its components and settings for the next forward."""
    for name, layer in layers_of(module, UnMixNorm2d):
        layer.components = (means[name], variances[name])
        layer.temperature = temperature
        layer.reference_batch = reference_batch
        layer.update = update
        layer.updated = None


def collect_components(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The components every ``UnMixNorm2d`` left after the last forward."""
    means: dict[str, torch.Tensor] = {}
    variances: dict[str, torch.Tensor] = {}
    for name, layer in layers_of(module, UnMixNorm2d):
        if layer.updated is None:
            raise RuntimeError(f"UnMixNorm2d {name!r} was not run")
        means[name], variances[name] = layer.updated
    return means, variances


def layers_of(module: nn.Module, kind: type[nn.Module]) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, kind)]


def require_batchnorm(model: nn.Module) -> None:
    """Fail when a strategy is built, not on the first request, for a model these strategies cannot adapt."""
    if not layers_of(model, nn.BatchNorm2d):
        raise ValueError("this strategy needs a model with BatchNorm2d layers")


def replace_batchnorm(model: nn.Module, factory: Callable[[nn.BatchNorm2d], nn.Module]) -> nn.Module:
    """A structural copy of ``model`` (sharing every weight) whose ``BatchNorm2d`` layers are ``factory(bn)``.

    The copy is put in eval mode (its own flag; the served model is untouched) so layers other than the replaced
    ones (dropout, BatchNorm1d) behave as at inference. Raises if the model has no ``BatchNorm2d``: these
    strategies would silently be the source model.
    """
    require_batchnorm(model)
    copy = share_weights_copy(model).eval()
    for name, bn in layers_of(copy, nn.BatchNorm2d):
        parent_name, _, child = name.rpartition(".")
        parent = copy.get_submodule(parent_name) if parent_name else copy
        setattr(parent, child, factory(bn))
    return copy
