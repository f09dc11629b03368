"""Optimisers written as pure functions over tensor dicts, so a session's optimizer state is plain tensors.

``torch.optim`` keeps its moments inside the optimizer object; a session's state must instead be data the server
can snapshot and restore, and one strategy object serves many sessions. The updates below reproduce
``torch.optim.Adam`` (no weight decay, no AMSGrad) and ``torch.optim.SGD`` (momentum, optional Nesterov, no
dampening) up to floating-point rounding.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .base import StrategyConfig


class GradientConfig(StrategyConfig):
    """Optimiser settings shared by the strategies that train (TENT, RMT)."""

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="learning rate")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam β1")
    beta2: float = Field(0.999, ge=0.0, lt=1.0, description="Adam β2")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    nesterov: bool = Field(False, description="SGD Nesterov momentum")


def zero_moments(
    params: dict[str, torch.Tensor], config: GradientConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Fresh optimizer moments: Adam keeps two per parameter, SGD one (its momentum buffer)."""
    first = {k: torch.zeros_like(v) for k, v in params.items()}
    second = {k: torch.zeros_like(v) for k, v in params.items()} if config.optimizer == "adam" else {}
    return first, second


def optimizer_step(
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    first: dict[str, torch.Tensor],
    second: dict[str, torch.Tensor],
    step: int,
    config: GradientConfig,
    lr: float | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One update; ``step`` counts from 1 (Adam's bias correction). Returns new (params, first, second)."""
    lr = config.lr if lr is None else lr
    new_params: dict[str, torch.Tensor] = {}
    new_first: dict[str, torch.Tensor] = {}
    new_second: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, p in params.items():
            g = grads[name]
            if config.optimizer == "adam":
                m = first[name] * config.beta1 + g * (1 - config.beta1)
                v = second[name] * config.beta2 + g * g * (1 - config.beta2)
                denom = v.sqrt() / (1 - config.beta2**step) ** 0.5 + 1e-8
                new_params[name] = p - (lr / (1 - config.beta1**step)) * (m / denom)
                new_first[name], new_second[name] = m, v
            else:
                buf = first[name] * config.momentum + g
                direction = g + config.momentum * buf if config.nesterov else buf
                new_params[name] = p - lr * direction
                new_first[name] = buf
    return new_params, new_first, new_second
