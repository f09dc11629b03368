"""PyTorch engine: eager (or TorchScript) modules on CUDA when available, else the CPU."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import compute
from .base import Engine


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when a GPU is usable; ``cuda`` without one is an error, not a silent fallback."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    return device


class TorchEngine(Engine):
    kind = "pytorch"

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.torch_device = device
        self.module = module.to(device).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.device = str(device)
        self.providers = (f"torch-{torch.__version__}",)

    def infer(self, x: np.ndarray) -> np.ndarray:
        return compute.run(self._forward, x)

    @torch.inference_mode()
    def _forward(self, x: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(x).to(self.torch_device, non_blocking=True)
        return self.module(tensor).float().cpu().numpy()
