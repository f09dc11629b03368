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

import weakref
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import gpu_kernels, native
from .base import share_weights_copy
from .moments import (
    SEPARATE_MOMENTS_MIN_ELEMENTS,
    channel_moments,
    has_fast_moments,
    instance_moments,
    prefers_separate_moments,
    row_sums_and_norms,
)

#: BatchNorm's default momentum, used for UnMix-TNS when a layer has ``momentum=None`` (cumulative average).
DEFAULT_BN_MOMENTUM = 0.1


class LayerKernels(Protocol):
    """A whole normalisation layer in one call: ``native.NativeKernels`` (C, CPU) or ``gpu_kernels.GpuKernels``."""

    def channel_norm(
        self,
        x: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        alpha: float,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor: ...

    def unmix_layer(
        self,
        x: torch.Tensor,
        means: torch.Tensor,
        variances: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        temperature: float,
        rate: float,
        update: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def layer_kernels(x: torch.Tensor, *params: torch.Tensor | None) -> LayerKernels | None:
    """Fused kernels that do a whole layer per call where per-op dispatch is what the PyTorch ops cost: on a CUDA
    device (Triton, any size: there every op is a kernel launch) and on the CPU below
    ``SEPARATE_MOMENTS_MIN_ELEMENTS`` (C; above it PyTorch's multi-threaded ops win). None where neither can take
    the tensors as they are (gradients, other dtypes or layouts, no compiler or Triton): then the PyTorch ops run."""
    if x.is_cuda:
        return gpu_kernels.kernels() if gpu_kernels.accepts(x, *params) else None
    if x.numel() >= SEPARATE_MOMENTS_MIN_ELEMENTS or not native.accepts(x, *params):
        return None
    return native.kernels()


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
        weight, bias, eps = self.weight, self.bias, self.eps  # each module attribute read costs ~0.6 µs
        if prefers_separate_moments(x):  # no gradient through the statistics: moments, then the fused normalisation
            var, mean = channel_moments(x, eps)
            return F.batch_norm(x, mean, var, weight, bias, training=False, momentum=0.0, eps=eps)
        kernels = layer_kernels(x, weight, bias)
        if kernels is not None:
            return kernels.channel_norm(x, None, None, 1.0, weight, bias, eps)
        return F.batch_norm(x, None, None, weight, bias, training=True, momentum=0.0, eps=eps)


class AlphaNorm2d(_ReplacedBatchNorm):
    """alpha-BN: blend source and batch statistics, μ = (1−α)μ_s + αμ_t, σ² = (1−α)σ²_s + ασ²_t.

    ``alpha`` is a per-call setting the strategy assigns on its thread-local copy.
    """

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__(bn, needs_source_stats=True)
        self.alpha = 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias, eps, alpha = self.weight, self.bias, self.eps, self.alpha
        source_mean, source_var = self.running_mean, self.running_var
        kernels = layer_kernels(x, weight, bias, source_mean, source_var)
        if kernels is not None:
            return kernels.channel_norm(x, source_mean, source_var, alpha, weight, bias, eps)
        if prefers_separate_moments(x) or (torch.is_grad_enabled() and x.requires_grad):
            var_t, mean_t = channel_moments(x, eps)
        else:
            # Small input without the C kernels: BatchNorm's kernel gives invstd = 1/√(σ²_t + ε); blending
            # σ²_t + ε adds α·ε to the variance, which a final ε of (1 − α)·ε takes back.
            _, mean_t, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
            var_t, eps = invstd.pow(-2), (1 - alpha) * eps
        mean = torch.lerp(source_mean, mean_t, alpha)
        var = torch.lerp(source_var, var_t, alpha)
        # Given explicit statistics, eval-mode batch_norm is just the fused normalisation (no gradients needed).
        return F.batch_norm(x, mean, var, weight, bias, training=False, momentum=0.0, eps=eps)


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
        y, updated = unmix_normalise(
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
        set_plain_attributes(self, updated=updated)
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
    """One UnMix-TNS layer as a function: returns the normalised ``x`` and the (updated) components.

    The K mixed components of sample b, (1−p_bk)·μ_k + p_bk·μ̃_b, enter only through their mean and spread over k,
    which are computed in closed form with K-contractions (the softmax rows sum to one) instead of materialising
    B×K×C tensors; around the components' centre, so that the second-moment difference stays well conditioned.
    Without gradients, fused kernels compute the same statistics: on a CUDA device the Triton ones (the whole layer
    in two launches), on the CPU the C ones (the whole layer in one call for small inputs; the mixture statistics and
    update between PyTorch's moments and normalisation for large ones).
    """
    # m = 1 − (1 − m_BN)^(B/B_max), spread over the batch: each sample pulls its components with weight rate·p_bk
    rate = (1 - (1 - momentum) ** (x.shape[0] / reference_batch)) / x.shape[0]
    layer = layer_kernels(x, means, variances, weight, bias)
    if layer is not None:
        y, new_means, new_vars = layer.unmix_layer(x, means, variances, weight, bias, eps, temperature, rate, update)
        return y, (new_means, new_vars)
    kernels = native.kernels() if native.accepts(x, means, variances, weight, bias) else None
    if kernels is not None:
        rows = x.flatten(2)
        sums, norms = row_sums_and_norms(rows)
        stats = kernels.unmix_stats(sums, norms, rows.shape[-1], means, variances, temperature, rate, update)
        if stats is None:  # ill-conditioned sums: the moments around the mean
            inst_var, inst_mean = instance_moments(x)
            stats = kernels.unmix_stats(inst_mean, inst_var, 0, means, variances, temperature, rate, update)
        assert stats is not None
        mean, var, new_means, new_vars = stats
        return _normalise_per_sample(x, mean, var, weight, bias, eps), (new_means, new_vars)
    inst_var, inst_mean = instance_moments(x)  # B×C each
    num = means.shape[0]
    with torch.no_grad():
        similarity = F.normalize(inst_mean, dim=1) @ F.normalize(means, dim=1).T  # cosine, B×K
        p = torch.softmax(similarity / temperature, dim=1)  # B×K, rows sum to one
        q = 1 - p
        centre = means.mean(dim=0)
        centred = means - centre  # K×C, sums to zero over k
    inst = inst_mean - centre
    mean = (inst - p @ centred) / num
    # Σ_k [(1−p)·c_k + p·ĩ]² = (1−p)²·c² + 2p(1−p)·c·ĩ + p²·ĩ², summed over k by the matmuls
    second = torch.addcmul((q * q) @ centred.square(), (p * q) @ centred, inst, value=2.0)
    second = torch.addcmul(second, (p * p).sum(1, keepdim=True), inst.square())
    spread = (second / num - mean.square()).clamp_min(0.0)  # law of total variance: between-component part
    var = (variances.sum(dim=0) - p @ variances + inst_var) / num + spread
    y = _normalise_per_sample(x, mean + centre, var, weight, bias, eps)
    if not update:
        return y, (means, variances)
    with torch.no_grad():
        # μ_k + m·mean_b[p_bk(μ̃_b − μ_k)] = μ_k·(1 − (m/B)·Σ_b p_bk) + (m/B)·(pᵀμ̃)_k, and the same for σ²_k
        keep = p.sum(dim=0).mul_(-rate).add_(1.0)[:, None]  # K×1
        new_means = torch.addmm(means * keep, p.T, inst_mean.detach(), alpha=rate)
        new_vars = torch.addmm(variances * keep, p.T, inst_var.detach(), alpha=rate)
    return y, (new_means, new_vars)


def _normalise_per_sample(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """γ(x − μ_bc)/√(σ²_bc + ε) + β with statistics per sample and channel (B×C)."""
    if has_fast_moments(x) and not mean.requires_grad:
        # No gradient needed: the fused eval-mode BatchNorm kernel, seeing each (sample, channel) as a channel.
        b, c = x.shape[:2]
        flat = x.reshape(1, b * c, *x.shape[2:])
        w = None if weight is None else weight.expand(b, c).reshape(-1)
        shift = None if bias is None else bias.expand(b, c).reshape(-1)
        return F.batch_norm(flat, mean.reshape(-1), var.reshape(-1), w, shift, False, 0.0, eps).view_as(x)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return torch.addcmul(shift[..., None, None], x, scale[..., None, None])  # one pass over x: x·scale + shift


def init_unmix_components(
    module: nn.Module, num_components: int, spread: float, generator: torch.Generator, exact: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """UnMix-TNS initial components for every ``UnMixNorm2d`` in ``module`` (in module order).

    μ_k = μ_s + √(a·K/(K−1))·σ_s ⊙ ε_k, ε_k ~ N(0, I) drawn from ``generator``; σ²_k = (1−a)·σ²_s. With K = 1 the
    single component is the source statistics. The spread keeps the mixture's mean at μ_s and its total variance
    at σ²_s *in expectation*; with K = 16 and a few dozen channels the draw misses both by a lot (per channel, the
    mean by ~0.18·σ_s), which costs ResNet-20 ~10 points of clean accuracy until the components have adapted.
    ``exact`` (not the paper) centres and rescales the draw over k so that both hold exactly:
    μ_k = μ_s + √a·σ_s ⊙ ε̂_k with mean_k ε̂_k = 0 and mean_k ε̂_k² = 1.
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
        if exact:
            noise = noise - noise.mean(dim=0)
            noise = noise / noise.square().mean(dim=0).sqrt().clamp_min(1e-12)
            scale = spread**0.5
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
    for name, layer in replaced_layers(module, UnMixNorm2d):
        set_plain_attributes(
            layer,
            components=(means[name], variances[name]),
            temperature=temperature,
            reference_batch=reference_batch,
            update=update,
            updated=None,
        )


def collect_components(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The components every ``UnMixNorm2d`` left after the last forward."""
    means: dict[str, torch.Tensor] = {}
    variances: dict[str, torch.Tensor] = {}
    for name, layer in replaced_layers(module, UnMixNorm2d):
        if layer.updated is None:
            raise RuntimeError(f"UnMixNorm2d {name!r} was not run")
        means[name], variances[name] = layer.updated
    return means, variances


def layers_of(module: nn.Module, kind: type[nn.Module]) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, kind)]


_REPLACED_LAYERS: weakref.WeakKeyDictionary[nn.Module, dict[type[nn.Module], list[tuple[str, nn.Module]]]] = (
    weakref.WeakKeyDictionary()
)


def replaced_layers(module: nn.Module, kind: type[nn.Module]) -> list[tuple[str, nn.Module]]:
    """``layers_of`` for a strategy's per-thread copy, whose structure is final once built: cached, because steps
    set per-call settings on every layer and walking ~70 modules costs ~60 µs, 2 % of a batch-1 forward."""
    by_kind = _REPLACED_LAYERS.setdefault(module, {})
    if kind not in by_kind:
        by_kind[kind] = layers_of(module, kind)
    return by_kind[kind]


def set_plain_attributes(module: nn.Module, **values: object) -> None:
    """Set per-call settings (plain values, never parameters, buffers or modules) on a layer without
    ``nn.Module.__setattr__``'s registry checks: ~3 µs each, and a batch-1 UnMix-TNS step sets ~100 of them."""
    module.__dict__.update(values)


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
