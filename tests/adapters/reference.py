"""Independent float64 re-implementations, written from the equations in docs/methods.md, that the adapter tests
compare against: a functional ResNet-20 with a pluggable normalisation, and the per-layer normalisations."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Norm = Callable[[str, torch.Tensor], torch.Tensor]


def resnet20_forward(model: nn.Module, x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """ResNet-20 (option A) in float64 from ``model``'s weights, with ``norm(layer_name, z)`` at every BN."""
    w = {k: v.double() for k, v in model.state_dict().items()}

    def conv(name: str, z: torch.Tensor, stride: int) -> torch.Tensor:
        return F.conv2d(z, w[f"{name}.weight"], stride=stride, padding=1)

    out = F.relu(norm("bn1", conv("conv1", x.double(), 1)))
    in_planes = 16
    for stage, planes in enumerate((16, 32, 64), start=1):
        for block in range(3):
            p = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            h = F.relu(norm(f"{p}.bn1", conv(f"{p}.conv1", out, stride)))
            h = norm(f"{p}.bn2", conv(f"{p}.conv2", h, 1))
            if stride == 1 and in_planes == planes:
                shortcut = out
            else:
                shortcut = F.pad(out[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))
            out = F.relu(h + shortcut)
            in_planes = planes
    return out.mean(dim=(2, 3)) @ w["linear.weight"].T + w["linear.bias"]


def affine(model: nn.Module, name: str, y: torch.Tensor) -> torch.Tensor:
    bn = model.get_submodule(name)
    return y * bn.weight.double()[None, :, None, None] + bn.bias.double()[None, :, None, None]


def alpha_norm(model: nn.Module, alpha: float) -> Norm:
    """(1−α)·source + α·batch statistics (biased batch variance); α = 0 is source BN, α = 1 is TBN."""

    def norm(name: str, z: torch.Tensor) -> torch.Tensor:
        bn = model.get_submodule(name)
        n = z.shape[0] * z.shape[2] * z.shape[3]
        mean_t = z.sum(dim=(0, 2, 3)) / n
        var_t = ((z - mean_t[None, :, None, None]) ** 2).sum(dim=(0, 2, 3)) / n
        mean = (1 - alpha) * bn.running_mean.double() + alpha * mean_t
        var = (1 - alpha) * bn.running_var.double() + alpha * var_t
        y = (z - mean[None, :, None, None]) / torch.sqrt(var + bn.eps)[None, :, None, None]
        return affine(model, name, y)

    return norm


def instance_norm(model: nn.Module) -> Norm:
    def norm(name: str, z: torch.Tensor) -> torch.Tensor:
        mean = z.mean(dim=(2, 3), keepdim=True)
        var = ((z - mean) ** 2).mean(dim=(2, 3), keepdim=True)
        return affine(model, name, (z - mean) / torch.sqrt(var + model.get_submodule(name).eps))

    return norm


def unmix_layer(
    z: torch.Tensor,
    means: torch.Tensor,
    variances: torch.Tensor,
    *,
    eps: float,
    temperature: float,
    momentum: float,
    reference_batch: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UnMix-TNS for one layer, sample by sample and component by component, without affine.

    Returns (normalised z, updated means, updated variances)."""
    z, means, variances = z.double(), means.double(), variances.double()
    batch, k_count = z.shape[0], means.shape[0]
    out = torch.empty_like(z)
    assignments = []
    for b in range(batch):
        mu = z[b].mean(dim=(1, 2))
        var = ((z[b] - mu[:, None, None]) ** 2).mean(dim=(1, 2))
        cos = torch.stack([mu @ means[k] / (mu.norm() * means[k].norm()) for k in range(k_count)])
        p = torch.exp(cos / temperature) / torch.exp(cos / temperature).sum()
        mu_hat = [(1 - p[k]) * means[k] + p[k] * mu for k in range(k_count)]
        var_hat = [(1 - p[k]) * variances[k] + p[k] * var for k in range(k_count)]
        mu_bar = sum(mu_hat) / k_count
        var_bar = sum(var_hat) / k_count + sum(m * m for m in mu_hat) / k_count - mu_bar * mu_bar
        out[b] = (z[b] - mu_bar[:, None, None]) / torch.sqrt(var_bar + eps)[:, None, None]
        assignments.append((p, mu, var))
    m = 1 - (1 - momentum) ** (batch / reference_batch)
    new_means = torch.stack(
        [means[k] + m * sum(p[k] * (mu - means[k]) for p, mu, _ in assignments) / batch for k in range(k_count)]
    )
    new_vars = torch.stack(
        [variances[k] + m * sum(p[k] * (v - variances[k]) for p, _, v in assignments) / batch for k in range(k_count)]
    )
    return out, new_means, new_vars
