"""Where the shared CIFAR-10 data and checkpoint live (``../shared`` beside the repo), and how images become model
inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).parents[2].parent / "shared"
CHECKPOINT = SHARED / "models" / "cifar10" / "resnet20-12fca82f.th"
CIFAR = SHARED / "data" / "cifar10"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8/float (N, H, W, 3) in [0, 255] -> normalised float32 (N, 3, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255).permute(0, 3, 1, 2)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
