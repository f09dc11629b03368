"""The Triton kernels behind ``gpu_kernels.GpuKernels`` (see there for why). Importing this module needs Triton.

Layouts: x and y are B × C × L (contiguous NCHW, L = H·W); components are K × C; weight and bias C values (read only
when their HAS_* flag is set: callers pass a placeholder pointer otherwise).
"""

import triton
import triton.language as tl


@triton.jit
def _channel_sums(x_ptr, c, first, last, C, L, shift, RB: tl.constexpr, LB: tl.constexpr):
    """Sum and sum of squares of channel c's x − shift over samples [first, last)."""
    rows = tl.arange(0, RB)
    cols = tl.arange(0, LB)
    total = tl.zeros((RB, LB), tl.float32)
    squares = tl.zeros((RB, LB), tl.float32)
    b0 = first
    while b0 < last:
        b = (b0 + rows).to(tl.int64)
        l0 = 0
        while l0 < L:
            col = l0 + cols
            mask = (b[:, None] < last) & (col[None, :] < L)
            v = tl.load(x_ptr + (b[:, None] * C + c) * L + col[None, :], mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, v - shift, 0.0)
            total += d
            squares += d * d
            l0 += LB
        b0 += RB
    return tl.sum(tl.sum(total, axis=1), axis=0), tl.sum(tl.sum(squares, axis=1), axis=0)


@triton.jit
def _channel_affine(
    c, shift, total, squares, inv_count, mean_ptr, var_ptr, weight_ptr, bias_ptr, alpha, eps,
    BLEND: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """(scale, offset) that normalise channel c from its shifted sums, blended with the source statistics when
    BLEND: γ/√(σ² + ε) and β − μ·γ/√(σ² + ε)."""
    offset = total * inv_count
    mean = shift + offset
    var = tl.maximum(squares * inv_count - offset * offset, 0.0)
    if BLEND:
        mean = (1.0 - alpha) * tl.load(mean_ptr + c).to(tl.float32) + alpha * mean
        var = (1.0 - alpha) * tl.load(var_ptr + c).to(tl.float32) + alpha * var
    scale = 1.0 / tl.sqrt(var + eps)
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + c).to(tl.float32)
    shift_out = -mean * scale
    if HAS_BIAS:
        shift_out = shift_out + tl.load(bias_ptr + c).to(tl.float32)
    return scale, shift_out


@triton.jit
def _channel_scale(x_ptr, y_ptr, c, first, last, C, L, scale, shift_out, RB: tl.constexpr, LB: tl.constexpr):
    """y = x·scale + shift_out over channel c of samples [first, last)."""
    rows = tl.arange(0, RB)
    cols = tl.arange(0, LB)
    b0 = first
    while b0 < last:
        b = (b0 + rows).to(tl.int64)
        l0 = 0
        while l0 < L:
            col = l0 + cols
            mask = (b[:, None] < last) & (col[None, :] < L)
            at = (b[:, None] * C + c) * L + col[None, :]
            v = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + at, v * scale + shift_out, mask=mask)
            l0 += LB
        b0 += RB


@triton.jit
def channel_norm(
    x_ptr, y_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, B, C, L, inv_count, alpha, eps,
    BLEND: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RB: tl.constexpr, LB: tl.constexpr,
):  # fmt: skip
    """One program per channel: its batch moments (around x[0, c, 0]), blended with the source statistics
    when BLEND, then γ(x − μ)/√(σ² + ε) + β over the channel. For inputs whose channels are small enough for one
    streaming multiprocessor each."""
    c = tl.program_id(0).to(tl.int64)
    shift = tl.load(x_ptr + c * L).to(tl.float32)
    total, squares = _channel_sums(x_ptr, c, 0, B, C, L, shift, RB, LB)
    scale, shift_out = _channel_affine(
        c, shift, total, squares, inv_count, mean_ptr, var_ptr, weight_ptr, bias_ptr, alpha, eps,
        BLEND, HAS_WEIGHT, HAS_BIAS,
    )  # fmt: skip
    _channel_scale(x_ptr, y_ptr, c, 0, B, C, L, scale, shift_out, RB, LB)


@triton.jit
def channel_partial_sums(x_ptr, partial_ptr, B, C, L, chunk, RB: tl.constexpr, LB: tl.constexpr):
    """Program (c, s): the shifted sums of channel c over samples [s·chunk, (s+1)·chunk), into partial[c, s, 0:2]."""
    c = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    first = s * chunk
    shift = tl.load(x_ptr + c * L).to(tl.float32)
    total, squares = _channel_sums(x_ptr, c, first, tl.minimum(first + chunk, B), C, L, shift, RB, LB)
    at = (c * tl.num_programs(1) + s) * 2
    tl.store(partial_ptr + at, total)
    tl.store(partial_ptr + at + 1, squares)


@triton.jit
def channel_norm_split(
    x_ptr, y_ptr, partial_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, B, C, L, chunk, inv_count, alpha, eps,
    BLEND: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SB: tl.constexpr, RB: tl.constexpr,
    LB: tl.constexpr,
):  # fmt: skip
    """Program (c, s): ``channel_norm`` for large inputs, after ``channel_partial_sums``: the channel's statistics
    from its partial sums, then the normalisation of samples [s·chunk, (s+1)·chunk)."""
    c = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    splits = tl.num_programs(1)
    parts = tl.arange(0, SB)
    at = (c * splits + parts) * 2
    total = tl.sum(tl.load(partial_ptr + at, mask=parts < splits, other=0.0), axis=0)
    squares = tl.sum(tl.load(partial_ptr + at + 1, mask=parts < splits, other=0.0), axis=0)
    shift = tl.load(x_ptr + c * L).to(tl.float32)
    scale, shift_out = _channel_affine(
        c, shift, total, squares, inv_count, mean_ptr, var_ptr, weight_ptr, bias_ptr, alpha, eps,
        BLEND, HAS_WEIGHT, HAS_BIAS,
    )  # fmt: skip
    first = s * chunk
    _channel_scale(x_ptr, y_ptr, c, first, tl.minimum(first + chunk, B), C, L, scale, shift_out, RB, LB)


@triton.jit
def unmix_sample(
    x_ptr, y_ptr, means_ptr, vars_ptr, weight_ptr, bias_ptr, inst_mean_ptr, inst_var_ptr, p_ptr,
    C, L, K, inv_length, inv_components, eps, inv_temperature,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, KB: tl.constexpr, CB: tl.constexpr, LB: tl.constexpr,
):  # fmt: skip
    """One program per sample: instance moments per channel, soft assignment p to the K components (softmax of
    cosine similarity / τ), the mixture's mean and variance per channel (law of total variance over the
    components pulled toward the sample), and the normalisation. Leaves the moments and p for the update."""
    b = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, KB)
    k_mask = ks < K
    chans = tl.arange(0, CB)
    cols = tl.arange(0, LB)
    base = b * C * L
    dots = tl.zeros((KB,), tl.float32)
    component_squares = tl.zeros((KB,), tl.float32)
    sample_squares = tl.zeros((CB,), tl.float32)
    c0 = 0
    while c0 < C:
        c = c0 + chans
        c_mask = c < C
        shift = tl.load(x_ptr + base + c * L, mask=c_mask, other=0.0).to(tl.float32)
        total = tl.zeros((CB, LB), tl.float32)
        squares = tl.zeros((CB, LB), tl.float32)
        l0 = 0
        while l0 < L:
            col = l0 + cols
            mask = c_mask[:, None] & (col[None, :] < L)
            v = tl.load(x_ptr + base + c[:, None] * L + col[None, :], mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, v - shift[:, None], 0.0)
            total += d
            squares += d * d
            l0 += LB
        offset = tl.sum(total, axis=1) * inv_length
        mean = shift + offset
        var = tl.maximum(tl.sum(squares, axis=1) * inv_length - offset * offset, 0.0)
        tl.store(inst_mean_ptr + b * C + c, mean, mask=c_mask)
        tl.store(inst_var_ptr + b * C + c, var, mask=c_mask)
        kc_mask = k_mask[:, None] & c_mask[None, :]
        mu = tl.load(means_ptr + ks[:, None] * C + c[None, :], mask=kc_mask, other=0.0).to(tl.float32)
        dots += tl.sum(mu * mean[None, :], axis=1)
        component_squares += tl.sum(mu * mu, axis=1)
        sample_squares += mean * mean
        c0 += CB
    sample_norm = tl.maximum(tl.sqrt(tl.sum(sample_squares, axis=0)), 1e-12)
    component_norms = tl.maximum(tl.sqrt(component_squares), 1e-12)
    logits = tl.where(k_mask, dots / (sample_norm * component_norms) * inv_temperature, -1e30)
    weights = tl.where(k_mask, tl.exp(logits - tl.max(logits, axis=0)), 0.0)
    p = weights / tl.sum(weights, axis=0)
    tl.store(p_ptr + b * K + ks, p, mask=k_mask)
    tl.debug_barrier()  # the moments just stored, by other threads of this program, are read back below
    c0 = 0
    while c0 < C:
        c = c0 + chans
        c_mask = c < C
        kc_mask = k_mask[:, None] & c_mask[None, :]
        mean = tl.load(inst_mean_ptr + b * C + c, mask=c_mask, other=0.0)
        var = tl.load(inst_var_ptr + b * C + c, mask=c_mask, other=0.0)
        mu = tl.load(means_ptr + ks[:, None] * C + c[None, :], mask=kc_mask, other=0.0).to(tl.float32)
        sigma = tl.load(vars_ptr + ks[:, None] * C + c[None, :], mask=kc_mask, other=0.0).to(tl.float32)
        keep = 1.0 - p[:, None]
        # component k pulled toward the sample, relative to the sample's mean: (1 − p_k)(μ_k − m)
        pulled = tl.where(kc_mask, keep * (mu - mean[None, :]), 0.0)
        first = tl.sum(pulled, axis=0) * inv_components
        between = tl.maximum(tl.sum(pulled * pulled, axis=0) * inv_components - first * first, 0.0)
        within = tl.sum(tl.where(kc_mask, keep * sigma + p[:, None] * var[None, :], 0.0), axis=0)
        scale = 1.0 / tl.sqrt(within * inv_components + between + eps)
        if HAS_WEIGHT:
            scale = scale * tl.load(weight_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
        shift_out = -(mean + first) * scale
        if HAS_BIAS:
            shift_out = shift_out + tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        l0 = 0
        while l0 < L:
            col = l0 + cols
            mask = c_mask[:, None] & (col[None, :] < L)
            at = base + c[:, None] * L + col[None, :]
            v = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + at, v * scale[:, None] + shift_out[:, None], mask=mask)
            l0 += LB
        c0 += CB


@triton.jit
def unmix_update(
    means_ptr, vars_ptr, inst_mean_ptr, inst_var_ptr, p_ptr, new_means_ptr, new_vars_ptr, B, C, K, rate,
    BB: tl.constexpr, CB: tl.constexpr,
):  # fmt: skip
    """One program per component k: μ_k ← μ_k·(1 − rate·Σ_b p_bk) + rate·Σ_b p_bk·m_b, the same for σ²_k."""
    k = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BB)
    chans = tl.arange(0, CB)
    pulls = tl.zeros((BB,), tl.float32)
    b0 = 0
    while b0 < B:
        b = b0 + rows
        pulls += tl.load(p_ptr + b * K + k, mask=b < B, other=0.0)
        b0 += BB
    keep = 1.0 - rate * tl.sum(pulls, axis=0)
    c0 = 0
    while c0 < C:
        c = c0 + chans
        c_mask = c < C
        pulled_mean = tl.zeros((CB,), tl.float32)
        pulled_var = tl.zeros((CB,), tl.float32)
        b0 = 0
        while b0 < B:
            b = (b0 + rows).to(tl.int64)
            b_mask = b < B
            p = tl.load(p_ptr + b * K + k, mask=b_mask, other=0.0)
            at = b[:, None] * C + c[None, :]
            mask = b_mask[:, None] & c_mask[None, :]
            pulled_mean += tl.sum(p[:, None] * tl.load(inst_mean_ptr + at, mask=mask, other=0.0), axis=0)
            pulled_var += tl.sum(p[:, None] * tl.load(inst_var_ptr + at, mask=mask, other=0.0), axis=0)
            b0 += BB
        mu = tl.load(means_ptr + k * C + c, mask=c_mask, other=0.0).to(tl.float32)
        sigma = tl.load(vars_ptr + k * C + c, mask=c_mask, other=0.0).to(tl.float32)
        tl.store(new_means_ptr + k * C + c, mu * keep + rate * pulled_mean, mask=c_mask)
        tl.store(new_vars_ptr + k * C + c, sigma * keep + rate * pulled_var, mask=c_mask)
        c0 += CB
