"""The CPU fast path for activation moments against float64 ``var_mean``, on every route through it."""

from __future__ import annotations

import pytest
import torch

from ttaserve.adapters.moments import (
    SEPARATE_MOMENTS_MIN_ELEMENTS,
    channel_moments,
    has_fast_moments,
    instance_moments,
    prefers_separate_moments,
)


def activations(n: int, offset: float = 1.0) -> torch.Tensor:
    """Post-ReLU-like activations: non-negative, mean of the order of (or above) their spread."""
    generator = torch.Generator().manual_seed(n)
    return torch.randn(n, 16, 32, 32, generator=generator).relu() + offset


def reference(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.var_mean(x.double(), dim=dims, correction=0)


@pytest.mark.parametrize("n", [1, 4, 64])  # below, at and far above the separate-moments threshold
@pytest.mark.parametrize("offset", [0.0, 2.0, 10.0])  # up to a mean ~18x the spread: past the cancellation limit
def test_channel_moments_match_float64(n: int, offset: float) -> None:
    x = activations(n, offset)
    with torch.inference_mode():
        var, mean = channel_moments(x, 1e-5)
    ref_var, ref_mean = reference(x, (0, 2, 3))
    assert prefers_separate_moments(x) == (x.numel() >= SEPARATE_MOMENTS_MIN_ELEMENTS)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("offset", [0.0, 2.0, 10.0])
def test_instance_moments_match_float64(offset: float) -> None:
    x = activations(8, offset)
    with torch.inference_mode():
        var, mean = instance_moments(x)
    ref_var, ref_mean = reference(x, (2, 3))
    assert var.shape == mean.shape == (8, 16)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=2e-5, atol=1e-6)


def test_constant_channels_give_zero_not_negative_variance() -> None:
    x = torch.full((64, 16, 8, 8), 3.7)
    with torch.inference_mode():
        var, _ = channel_moments(x, 1e-5)
        inst_var, _ = instance_moments(x)
    assert (var >= 0).all() and (inst_var >= 0).all()
    assert var.abs().max() < 1e-5 and inst_var.abs().max() < 1e-5


def test_other_layouts_and_autograd_take_the_library_kernels_and_stay_correct() -> None:
    x = activations(64).contiguous(memory_format=torch.channels_last)
    assert not has_fast_moments(x)
    with torch.inference_mode():
        var, mean = channel_moments(x, 1e-5)
    # BatchNorm's own channels-last CPU kernel sums squares in float32 as well: ~2e-4 relative here.
    torch.testing.assert_close(var.double(), reference(x, (0, 2, 3))[0], rtol=1e-3, atol=1e-6)

    leaf = activations(64).requires_grad_()
    assert not has_fast_moments(leaf)
    var, mean = instance_moments(leaf)
    (var.sum() + mean.sum()).backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
