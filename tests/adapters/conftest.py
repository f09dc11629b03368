"""Fixtures for the adapter tests: small real networks, and the shared CIFAR-10 data when it is present."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cifar_data import CHECKPOINT, CIFAR
from torch import nn

from ttaserve.server.architectures import build_architecture, load_model


def randomised_resnet20(seed: int = 0) -> nn.Module:
    """A ResNet-20 with random weights *and* random BN statistics/affines, so source and batch statistics differ
    and every BN quantity matters in a comparison."""
    torch.manual_seed(seed)
    model = build_architecture("cifar_resnet20")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture
def resnet20() -> nn.Module:
    return randomised_resnet20()


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def pretrained() -> nn.Module:
    if not CHECKPOINT.exists():
        pytest.skip(f"needs the shared pretrained ResNet-20 at {CHECKPOINT} (../shared beside the repo is missing)")
    return load_model("cifar_resnet20", CHECKPOINT)


@pytest.fixture(scope="session")
def cifar_test_set() -> tuple[np.ndarray, np.ndarray]:
    path = CIFAR / "test.npz"
    if not path.exists():
        pytest.skip(f"needs the shared CIFAR-10 test set at {path} (../shared beside the repo is missing)")
    data = np.load(path)
    return data["x"], data["y"].astype(np.int64)


@pytest.fixture(scope="session")
def cifar_source_set() -> tuple[np.ndarray, np.ndarray]:
    path = CIFAR / "train10k.npz"
    if not path.exists():
        pytest.skip(f"needs the shared CIFAR-10 training images at {path} (../shared beside the repo is missing)")
    data = np.load(path)
    return data["x"], data["y"].astype(np.int64)
