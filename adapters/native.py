"""The fused CPU kernels of ``kernels.c``: compiled on first use with the system C compiler, called through ctypes.

Why a C file and not more PyTorch: at batch 1 on the CPU, UnMix-TNS's ~75 small tensor operations per layer cost
~5 µs of dispatch each, several times the layer's arithmetic; one C call per layer does the same work in ~20 µs.
A plain C file (no PyTorch headers) compiles in well under a second, so there is no build step to install: the
shared library is built once into the cache folder (``$TTASERVE_CACHE``, default ``~/.cache/ttaserve``), keyed
by a hash of the source and the compiler command. Where no compiler is found, compilation fails, or
``TTASERVE_NATIVE_KERNELS=0`` is set, ``kernels()`` returns None (once, with a warning) and the layers keep their
PyTorch path, which computes the same statistics.

Callers pass contiguous float32 CPU tensors; the C side only reads and writes through their data pointers, with the
GIL released, so several serving threads can run kernels at once.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import subprocess
from pathlib import Path

import torch

from .load_once import LoadOnce, switched_off
from .moments import CANCELLATION_LIMIT
from .native_build import shared_library

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
#: Portable flags: no -march=native, so a cached library stays valid on any machine sharing the cache folder.
CFLAGS = ("-O3", "-fPIC", "-shared", "-std=c99")

_I64, _F64, _PTR = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


class NativeKernels:
    """Typed wrappers of the C functions; each takes and returns tensors, and validates nothing beyond what the
    callers in ``norm.py`` guarantee (contiguous float32 CPU tensors of consistent shapes)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._channel_norm = library.ttaserve_channel_norm
        self._channel_norm.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, _F64, _PTR, _PTR, _F64, _PTR]
        self._channel_norm.restype = None
        self._unmix_layer = library.ttaserve_unmix_layer
        self._unmix_layer.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _F64, _F64, _F64]
        self._unmix_layer.argtypes += [_PTR, _PTR, _PTR]
        self._unmix_layer.restype = ctypes.c_int
        self._unmix_stats = library.ttaserve_unmix_stats
        self._unmix_stats.argtypes = [_PTR, _PTR, _I64, _I64, _I64, _F64, _PTR, _PTR, _I64, _F64, _F64]
        self._unmix_stats.argtypes += [_PTR, _PTR, _PTR, _PTR]
        self._unmix_stats.restype = ctypes.c_int

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
        y = torch.empty_like(x)
        self._channel_norm(
            x.data_ptr(), b, c, _row_length(x), _ptr(running_mean), _ptr(running_var), alpha,
            _ptr(weight), _ptr(bias), eps, y.data_ptr(),
        )  # fmt: skip
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
        y = torch.empty_like(x)
        new_means, new_vars, outputs = _component_outputs(means, variances, update)
        status = self._unmix_layer(
            x.data_ptr(), b, c, _row_length(x), means.data_ptr(), variances.data_ptr(), means.shape[0],
            _ptr(weight), _ptr(bias), eps, temperature, rate, y.data_ptr(), *outputs,
        )  # fmt: skip
        _raise_if_out_of_memory(status, b, c)
        return y, new_means, new_vars

    def unmix_stats(
        self,
        first: torch.Tensor,
        second: torch.Tensor,
        row_length: int,
        means: torch.Tensor,
        variances: torch.Tensor,
        temperature: float,
        rate: float,
        update: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """UnMix-TNS statistics (mean, variance, new means, new variances) from each (sample, channel) row's sum
        and 2-norm over ``row_length`` elements, or (``row_length`` 0) from its mean and variance. None when the
        sums cannot give the variance precisely (a mean large against the spread): then pass the moments."""
        b, c = first.shape
        mean, var = torch.empty_like(first), torch.empty_like(second)
        new_means, new_vars, outputs = _component_outputs(means, variances, update)
        status = self._unmix_stats(
            first.data_ptr(), second.data_ptr(), b, c, row_length, CANCELLATION_LIMIT, means.data_ptr(),
            variances.data_ptr(), means.shape[0], temperature, rate, mean.data_ptr(), var.data_ptr(), *outputs,
        )  # fmt: skip
        if status == 1:
            return None
        _raise_if_out_of_memory(status, b, c)
        return mean, var, new_means, new_vars


def _component_outputs(
    means: torch.Tensor, variances: torch.Tensor, update: bool
) -> tuple[torch.Tensor, torch.Tensor, tuple[int | None, int | None]]:
    """The UnMix-TNS components a kernel call returns — fresh tensors it fills, or (not ``update``) the given ones
    unchanged — and the output pointers to pass it (NULL when not updating)."""
    if not update:
        return means, variances, (None, None)
    new_means, new_vars = torch.empty_like(means), torch.empty_like(variances)
    return new_means, new_vars, (new_means.data_ptr(), new_vars.data_ptr())


def _raise_if_out_of_memory(status: int, batch: int, channels: int) -> None:
    if status != 0:
        raise MemoryError(f"UnMix-TNS kernel: no memory for a batch of {batch}x{channels}")


def _row_length(x: torch.Tensor) -> int:
    """H·W of an N×C×H×W tensor (elements per (sample, channel) row)."""
    return math.prod(x.shape[2:])


def _ptr(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def accepts(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can take these tensors as they are: contiguous float32 on the CPU, none carrying a
    gradient (the kernels are outside autograd)."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or (grad and t.requires_grad):
            return False
    return True


def kernels() -> NativeKernels | None:
    """The compiled kernels, building them on the first call; None when they are turned off or cannot be built."""
    return _KERNELS.get()


def _load() -> NativeKernels | None:
    if switched_off("TTASERVE_NATIVE_KERNELS"):
        log.info("native kernels turned off by TTASERVE_NATIVE_KERNELS; normalisation layers use PyTorch ops")
        return None
    try:
        path = build_library()
        loaded = NativeKernels(ctypes.CDLL(str(path)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("native kernels unavailable (%s); normalisation layers use PyTorch ops (slower at batch 1)", exc)
        return None
    log.info("native normalisation kernels loaded from %s", path)
    return loaded


def build_library() -> Path:
    """Compile ``kernels.c`` into the cache folder unless a library of the same source and command is there (or,
    with no compiler, one of the same source)."""
    return shared_library(SOURCE, "kernels", lambda: ([os.environ.get("CC", "cc"), *CFLAGS], ["-lm"]))


_KERNELS: LoadOnce[NativeKernels | None] = LoadOnce(_load)
