"""Network architectures a ``platform: pytorch`` model config can name, and the checkpoint loader.

* ``cifar_resnet20/32/44/56``: the CIFAR ResNets of He et al. (2016), "option A" shortcuts (subsample + zero-pad,
  no 1x1 convolution), BatchNorm after every convolution; parameter names ``conv1, bn1, layer{1,2,3}.{i}.{conv1,
  bn1,conv2,bn2}, linear`` so the widely shared CIFAR-10 checkpoints load as they are.
* ``small_resnet``: the same family, narrower and shallower, for small grey images (the embedded Fashion-MNIST
  default model).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _ZeroPadShortcut(nn.Module):
    """Option-A shortcut: halve the spatial size and zero-pad the new channels on both sides."""

    def __init__(self, pad_channels: int) -> None:
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_channels, self.pad_channels))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _ZeroPadShortcut((planes - in_planes) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Three stages of ``blocks_per_stage`` BasicBlocks with ``widths`` channels, global pooling, linear head."""

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages = []
        for index, planes in enumerate(widths):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(widths[2], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


def _cifar_resnet(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return CifarResNet((depth - 2) // 6, num_classes=num_classes, in_channels=in_channels)

    build.__doc__ = f"CIFAR ResNet-{depth} (option A)."
    return build


def small_resnet(num_classes: int = 10, in_channels: int = 1, blocks_per_stage: int = 1) -> nn.Module:
    """A narrow CIFAR-style ResNet (widths 16/32/64, one block a stage) for 28x28 grey images."""
    return CifarResNet(blocks_per_stage, num_classes=num_classes, in_channels=in_channels)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet20": _cifar_resnet(20),
    "cifar_resnet32": _cifar_resnet(32),
    "cifar_resnet44": _cifar_resnet(44),
    "cifar_resnet56": _cifar_resnet(56),
    "small_resnet": small_resnet,
}


def build_architecture(name: str, **kwargs: Any) -> nn.Module:
    try:
        factory = ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; available: {', '.join(sorted(ARCHITECTURES))}") from None
    return factory(**kwargs)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint as a plain state dict.

    Accepts a bare state dict or ``{"state_dict": ...}`` (the shared CIFAR checkpoints), and strips the
    ``module.`` prefix that ``nn.DataParallel`` adds. Loads with ``weights_only=True``: no pickled code runs.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def load_model(architecture: str, weights: Path, **kwargs: Any) -> nn.Module:
    """Build ``architecture`` and load ``weights`` strictly; returns the module in eval mode on the CPU."""
    model = build_architecture(architecture, **kwargs)
    state = load_state_dict(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{weights}: does not fit architecture {architecture!r}: {exc}") from exc
    return model.eval()
