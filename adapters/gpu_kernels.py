"""Fused GPU kernels (Triton) for the test-time normalisation layers: one launch per layer for TBN and alpha-BN, two
for UnMix-TNS.

Why: on a GPU a small network such as ResNet-20 is launch-bound. Its eval-mode forward is ~70 kernels of a few
microseconds each, and what it costs is the host's work of issuing them. As PyTorch ops, alpha-BN issues five per
layer where BatchNorm issues one (1.9–2.1× the forward on an H100), UnMix-TNS about twenty (6.6–7.2×). These
kernels compute a layer's statistics and normalise in one launch (UnMix-TNS: a second one moves the components).

The arithmetic is that of ``kernels.c`` and of the PyTorch path in ``norm.py``, in float32 with every sum taken
around a shift (the row's first element) so that E[x²] − E[x]² keeps its precision when the mean is large against
the spread. Used when the input is on a CUDA device and Triton imports (PyTorch's CUDA wheels bring it);
``TTASERVE_TRITON_KERNELS=0`` turns them off. Outside autograd, like the C kernels: float32, contiguous NCHW.
The tests also run them on the CPU through Triton's interpreter.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from types import ModuleType
from typing import Any

import torch

from .load_once import LoadOnce, switched_off

log = logging.getLogger(__name__)

#: Elements a program holds per tile (rows × columns): enough to keep a streaming multiprocessor's loads in flight
#: without spilling registers.
TILE_ELEMENTS = 2048
#: Above this many elements per channel, a channel's statistics are summed by several programs (a second launch)
#: instead of one: one program per channel leaves most of the GPU idle (batch 200 of 16×32×32: 105 µs a layer
#: against 7 µs for an eval-mode BatchNorm).
SPLIT_MIN_ELEMENTS = 32768
#: Elements of a channel each program sums and normalises when split.
CHUNK_ELEMENTS = 16384


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=1024)
def _tile(rows: int, columns: int) -> tuple[int, int]:
    """(row block, column block), powers of two, for a rows × columns walk over at most ``TILE_ELEMENTS``."""
    column_block = min(_pow2(columns), TILE_ELEMENTS)
    return max(1, min(_pow2(rows), TILE_ELEMENTS // column_block)), column_block


class _Launcher:
    """Launches one jitted kernel with less host work than ``kernel[grid](...)``.

    Triton's launch path binds and specialises every argument, hashes a cache key and looks the compiled kernel up
    on each call. Here the compiled kernel is kept per device, integer values and constexpr values, for tensors
    that are all 16-byte aligned (what Triton specialises on, given float32 tensors: ``accepts``), and launched
    directly. The first launch of a key, a launch with an unaligned tensor and every launch under Triton's
    interpreter (which compiles nothing) take Triton's own path. The kernels take their arguments in the order
    tensors, integers, floats, constexprs.
    """

    def __init__(self, kernel: Any) -> None:
        self._kernel = kernel
        self._compiled: dict[tuple[object, ...], Any] = {}

    def __call__(
        self,
        grid: tuple[int, int],
        tensors: tuple[torch.Tensor, ...],
        ints: tuple[int, ...],
        floats: tuple[float, ...],
        constants: tuple[object, ...],
    ) -> None:
        device = tensors[0].get_device()
        aligned = all(t.data_ptr() % 16 == 0 for t in tensors)
        key = (device, ints, constants)
        compiled = self._compiled.get(key) if aligned else None
        if compiled is None:
            compiled = self._kernel[grid](*tensors, *ints, *floats, *constants)
            if aligned and hasattr(compiled, "packed_metadata"):  # None or another object under the interpreter
                self._compiled[key] = compiled
            return
        # the raw handle of PyTorch's current stream, as Triton's own launch path takes it
        stream = torch._C._cuda_getCurrentRawStream(device)
        compiled.run(
            grid[0], grid[1], 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
            *tensors, *ints, *floats, *constants,
        )  # fmt: skip


class GpuKernels:
    """The same calls as ``native.NativeKernels`` (what ``norm.py`` uses), run as Triton kernels on the tensors'
    device. Callers pass contiguous float32 tensors of consistent shapes (``accepts``)."""

    def __init__(self, kernels: ModuleType) -> None:
        # the module ``triton_kernels``
        self._channel_norm = _Launcher(kernels.channel_norm)
        self._channel_partial_sums = _Launcher(kernels.channel_partial_sums)
        self._channel_norm_split = _Launcher(kernels.channel_norm_split)
        self._unmix_sample = _Launcher(kernels.unmix_sample)
        self._unmix_update = _Launcher(kernels.unmix_update)

    def channel_norm(
        self,
        x: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        alpha: float,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor:
        """Normalise with per-channel batch statistics blended as (1−α)·source + α·batch (α = 1: TBN)."""
        b, c = x.shape[:2]
        length = math.prod(x.shape[2:])
        y = torch.empty_like(x)
        blend = alpha != 1.0
        sources = (running_mean if blend else x, running_var if blend else x, _or(weight, x), _or(bias, x))
        floats = (1.0 / (b * length), float(alpha), float(eps))
        flags = (blend, weight is not None, bias is not None)
        if b * length <= SPLIT_MIN_ELEMENTS:
            self._channel_norm((c, 1), (x, y, *sources), (b, c, length), floats, (*flags, *_tile(b, length)))
            return y
        chunk = max(1, CHUNK_ELEMENTS // length)  # samples per program
        splits = -(-b // chunk)
        partial = torch.empty(c * splits * 2, dtype=torch.float32, device=x.device)
        tile = _tile(min(b, chunk), length)
        self._channel_partial_sums((c, splits), (x, partial), (b, c, length, chunk), (), tile)
        self._channel_norm_split(
            (c, splits), (x, y, partial, *sources), (b, c, length, chunk), floats, (*flags, _pow2(splits), *tile)
        )
        return y

    def unmix_layer(
        self,
        x: torch.Tensor,
        means: torch.Tensor,
        variances: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        temperature: float,
        rate: float,
        update: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A whole UnMix-TNS layer: (normalised x, new means, new variances); the components as given when not
        ``update``."""
        b, c = x.shape[:2]
        length = math.prod(x.shape[2:])
        k = means.shape[0]
        y = torch.empty_like(x)
        inst_mean = torch.empty((b, c), dtype=torch.float32, device=x.device)
        inst_var = torch.empty_like(inst_mean)
        p = torch.empty((b, k), dtype=torch.float32, device=x.device)
        component_block = _pow2(k)
        channels, columns = _tile(c, length)
        channels = max(1, min(channels, TILE_ELEMENTS // component_block))
        self._unmix_sample(
            (b, 1),
            (x, y, means, variances, _or(weight, x), _or(bias, x), inst_mean, inst_var, p),
            (c, length, k),
            (1.0 / length, 1.0 / k, float(eps), 1.0 / temperature),
            (weight is not None, bias is not None, component_block, channels, columns),
        )
        if not update:
            return y, means, variances
        new_means, new_vars = torch.empty_like(means), torch.empty_like(variances)
        moments = (inst_mean, inst_var, p)
        outputs = (new_means, new_vars)
        self._unmix_update((k, 1), (means, variances, *moments, *outputs), (b, c, k), (float(rate),), _tile(b, c))
        return y, new_means, new_vars


def _or(tensor: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """A pointer argument for an optional tensor: the kernels never read the placeholder (their HAS_* flag is off)."""
    return placeholder if tensor is None else tensor


def accepts(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether the kernels can take these tensors as they are: contiguous float32 on ``x``'s CUDA device, none
    carrying a gradient (the kernels are outside autograd). Called per layer: cheap checks only."""
    if not x.is_cuda:
        return False
    device = x.get_device()
    grad = torch.is_grad_enabled()
    for t in (x, *params):
        if t is not None and (
            t.dtype is not torch.float32
            or t.get_device() != device
            or not t.is_contiguous()
            or (grad and t.requires_grad)
        ):
            return False
    return True


def kernels() -> GpuKernels | None:
    """The kernels, jitted on first use of each shape; None when Triton is missing or they are turned off."""
    return _KERNELS.get()


def _load() -> GpuKernels | None:
    if switched_off("TTASERVE_TRITON_KERNELS"):
        log.info("GPU kernels turned off by TTASERVE_TRITON_KERNELS; normalisation layers use PyTorch ops")
        return None
    if importlib.util.find_spec("triton") is None:
        log.warning("Triton is not installed: GPU normalisation layers use PyTorch ops (more kernel launches)")
        return None
    from . import triton_kernels

    return GpuKernels(triton_kernels)


_KERNELS: LoadOnce[GpuKernels | None] = LoadOnce(_load)
