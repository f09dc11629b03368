"""Mean and biased variance of activations, per channel (over N, H, W) or per sample and channel (over H, W).

On the CPU, PyTorch's moment kernels (``torch.var_mean``, BatchNorm's training kernel) run Welford updates that are
five to ten times slower than a plain vectorised sum over the contiguous H·W axis; on ResNet-20 that difference was
most of what test-time normalisation cost over an eval-mode forward. So on the CPU, for a contiguous NCHW input with
no gradient to carry, the moments come from one sum and one 2-norm per (sample, channel) row and the variance from
E[x²] − E[x]². That difference loses precision when the mean is large against the spread (relative error ≈ float32
rounding × E[x²]/Var[x]), so where any channel has mean² > ``CANCELLATION_LIMIT`` × variance the squares are summed
again around the mean (one more pass): the variance stays within ~2e-5 of float64's. Elsewhere (autograd, other
layouts, a GPU without the Triton kernels of ``gpu_kernels.py``) the fused library kernels are used: on a GPU they
are one launch per layer, which matters more there than the arithmetic.
"""

from __future__ import annotations

import torch

#: Below this many elements the fast path's fixed cost (a handful of small ops, ~30 µs) exceeds what it saves over
#: BatchNorm's one-call kernel (measured on ResNet-20's layer shapes, 2 CPU threads: break-even at ~32k).
SEPARATE_MOMENTS_MIN_ELEMENTS = 32768


def has_fast_moments(x: torch.Tensor) -> bool:
    """Whether the moments of ``x`` can take the fast CPU path: CPU, contiguous, no gradient to carry."""
    return x.device.type == "cpu" and x.is_contiguous() and not (torch.is_grad_enabled() and x.requires_grad)


def prefers_separate_moments(x: torch.Tensor) -> bool:
    """Whether per-channel moments followed by the fused eval-mode normalisation beat BatchNorm's training kernel."""
    return has_fast_moments(x) and x.numel() >= SEPARATE_MOMENTS_MIN_ELEMENTS


#: Largest mean²/variance for which E[x²] − E[x]² in float32 is trusted (then its relative error is below ~2e-5).
CANCELLATION_LIMIT = 100.0


def row_sums_and_norms(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum and the 2-norm of each row of an N×C×L tensor (over L): two fast vectorised reductions."""
    return rows.sum(-1), torch.linalg.vector_norm(rows, dim=-1)


def _row_moments(rows: torch.Tensor, over_samples: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance, mean) of an N×C×L tensor over L, and also over N when ``over_samples``.

    One pass: a sum and a 2-norm per row, the variance as E[x²] − E[x]². Where that is ill-conditioned (mean² >
    ``CANCELLATION_LIMIT`` × variance anywhere) the squares are summed again around the mean: one more pass, exact.
    """
    count = rows.shape[-1] * (rows.shape[0] if over_samples else 1)
    total, norms = row_sums_and_norms(rows)
    squares = norms.square_()
    if over_samples:
        total, squares = total.sum(0), squares.sum(0)
    mean = total.mul_(1 / count)
    mean_sq = mean * mean
    var = squares.mul_(1 / count).sub_(mean_sq).clamp_min_(0.0)
    if bool((mean_sq > CANCELLATION_LIMIT * var).any()):
        squares = torch.linalg.vector_norm(rows - mean[..., None], dim=-1).square_()
        var = (squares.sum(0) if over_samples else squares).mul_(1 / count)
    return var, mean


def channel_moments(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance, mean) per channel of an N×C×H×W tensor, as BatchNorm normalises with (biased variance)."""
    if prefers_separate_moments(x):
        return _row_moments(x.flatten(2), over_samples=True)
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.var_mean(x, dim=(0, 2, 3), correction=0)
    _, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
    return invstd.pow(-2) - eps, mean


def instance_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance, mean) per sample and channel of an N×C×H×W tensor (biased variance), each N×C."""
    if has_fast_moments(x):
        return _row_moments(x.flatten(2), over_samples=False)
    return torch.var_mean(x, dim=(2, 3), correction=0)
