"""RMT's test-time augmentation, written in plain torch (no torchvision at serving time).

One random transformation is drawn per batch and applied to every image of it, as torchvision transforms applied
to a batch tensor do in RMT's reference code. The pipeline follows RMT's CIFAR augmentation: colour jitter
(brightness, contrast, saturation, hue, gamma), edge padding + random affine, Gaussian blur, centre crop back,
horizontal flip, Gaussian noise, clip to [0, 1]. Differences, by choice: the colour operations run in a fixed
order (torchvision shuffles them), and hue is shifted by rotating the chroma plane in YIQ space rather than
through HSV, which is a linear, branch-free equivalent for small shifts. All randomness comes from the given
``torch.Generator`` so a session's stream of augmentations is reproducible and snapshot-able.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_GREY = torch.tensor([0.299, 0.587, 0.114])


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _grey(img: torch.Tensor) -> torch.Tensor:
    if img.shape[1] != 3:
        return img.mean(dim=1, keepdim=True)
    return (img * _GREY.to(img)[None, :, None, None]).sum(dim=1, keepdim=True)


def _hue_shift(img: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate hue by ``shift`` turns (±0.5 = half the colour wheel) in YIQ space."""
    angle = 2 * math.pi * shift
    cos, sin = math.cos(angle), math.sin(angle)
    rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    matrix = (torch.linalg.inv(_RGB_TO_YIQ) @ rotate @ _RGB_TO_YIQ).to(img)
    return torch.einsum("ij,njhw->nihw", matrix, img)


def _colour_jitter(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    img = (img * _uniform(g, 0.6, 1.4)).clamp(0, 1)
    contrast = _uniform(g, 0.7, 1.3)
    img = (contrast * img + (1 - contrast) * _grey(img).mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
    if img.shape[1] == 3:
        saturation = _uniform(g, 0.5, 1.5)
        img = (saturation * img + (1 - saturation) * _grey(img)).clamp(0, 1)
        img = _hue_shift(img, _uniform(g, -0.06, 0.06)).clamp(0, 1)
    return img ** _uniform(g, 0.7, 1.3)


def _affine(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Rotation ±15°, translation up to 1/16 of the (padded) size, scale 0.9–1.1; zeros outside."""
    angle = math.radians(_uniform(g, -15.0, 15.0))
    tx, ty = _uniform(g, -1 / 16, 1 / 16), _uniform(g, -1 / 16, 1 / 16)
    scale = _uniform(g, 0.9, 1.1)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    # grid_sample maps output to input coordinates: the inverse of "scale, rotate, then translate".
    # Normalised coordinates span 2, so a fraction t of the size is 2t.
    theta = torch.tensor([[cos, sin, -(cos * 2 * tx + sin * 2 * ty)], [-sin, cos, -(-sin * 2 * tx + cos * 2 * ty)]])
    grid = F.affine_grid(theta[None].to(img).expand(img.shape[0], -1, -1), list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _blur(img: torch.Tensor, sigma: float, size: int = 5) -> torch.Tensor:
    offsets = torch.arange(size, dtype=img.dtype, device=img.device) - (size - 1) / 2
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = img.shape[1]
    img = F.pad(img, (size // 2,) * 4, mode="reflect")
    img = F.conv2d(img, kernel.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    return F.conv2d(img, kernel.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)


def rmt_augment(
    x: torch.Tensor, generator: torch.Generator, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """One RMT augmentation of the normalised batch ``x`` (N, C, H, W); returns a normalised batch.

    ``mean``/``std`` are the input normalisation (one value, or one per channel): the transform works on pixel
    values in [0, 1]. ``generator`` must be a CPU generator; it is advanced.
    """
    channels = x.shape[1]
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise ValueError(f"input_mean/input_std need 1 or {channels} values, got {len(mean)} and {len(std)}")
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    img = (x * s + m).clamp(0, 1)
    img = _colour_jitter(img, generator)
    height, width = img.shape[-2:]
    img = F.pad(img, (width // 2, width // 2, height // 2, height // 2), mode="replicate")
    img = _affine(img, generator)
    img = _blur(img, _uniform(generator, 0.001, 0.5))
    img = img[..., height // 2 : height // 2 + height, width // 2 : width // 2 + width]
    if torch.rand((), generator=generator).item() < 0.5:
        img = img.flip(-1)
    noise = torch.randn(img.shape, generator=generator, dtype=img.dtype).to(img.device)
    img = (img + 0.005 * noise).clamp(0, 1)
    return (img - m) / s
