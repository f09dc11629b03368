"""Layer inputs, settings and float64 expectations shared by the tests of the fused kernels (C and Triton)."""

from __future__ import annotations

import torch
from reference import alpha_norm
from torch import nn

SETTINGS = {"eps": 1e-5, "temperature": 0.07, "momentum": 0.1, "reference_batch": 64}


def layer_inputs(
    b: int, c: int, h: int, w: int, seed: int, offset: float = 0.5, k: int = 4
) -> tuple[torch.Tensor, ...]:
    """(x, component means, component variances, weight, bias) of one layer, on the CPU, seeded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g) * 2 + offset
    means = torch.randn(k, c, generator=g) + offset
    variances = torch.rand(k, c, generator=g) + 0.5
    weight, bias = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    return x, means, variances, weight, bias


def rate(batch: int) -> float:
    """UnMix-TNS's per-sample component rate for ``SETTINGS`` at this batch size."""
    return (1 - (1 - SETTINGS["momentum"]) ** (batch / SETTINGS["reference_batch"])) / batch


def with_affine(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """γ·y + β in float64 on the CPU (the references normalise without the affine part)."""
    return y * weight.double().cpu()[None, :, None, None] + bias.double().cpu()[None, :, None, None]


def blended_norm_case(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, alpha: float, offset: float, seed: int = 0
) -> tuple[nn.BatchNorm2d, torch.Tensor]:
    """A CPU BatchNorm with ``weight``, ``bias`` and source statistics around ``offset`` (seeded: a test's case must
    not depend on which tests ran before it), and the float64 alpha-BN of ``x`` through it (the expected output of
    a kernel's ``channel_norm``)."""
    bn = nn.BatchNorm2d(x.shape[1]).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.normal_(offset, 1.0, generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
        bn.weight.copy_(weight.cpu())
        bn.bias.copy_(bias.cpu())
    model = nn.Sequential()
    model.add_module("bn", bn)
    return bn, alpha_norm(model, alpha)("bn", x.double().cpu())


def channel_norm_atol(x: torch.Tensor, weight: torch.Tensor, bn: nn.BatchNorm2d) -> float:
    """The absolute tolerance of a float32 ``channel_norm`` against float64: the kernels (like PyTorch's BatchNorm)
    compute x·scale + shift, two terms of size up to |x|·γ/σ that cancel, each good to half an ulp; 4 ulps of that
    size, on top of 1e-5. For inputs around 40 that is ~5e-5, for inputs around 0 ~2e-5; an error in the statistics
    (float32 sums losing a mean 20x the spread) is ~1e-3 and still fails."""
    smallest_std = float(bn.running_var.min().clamp_max(1.0)) ** 0.5
    size = float(x.abs().max()) * float(weight.abs().max()) / smallest_std
    return 1e-5 + 4 * torch.finfo(torch.float32).eps * size
