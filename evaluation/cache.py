"""Corrupted copies of an image set, generated once and cached on disk.

The whole set is corrupted (not a subset), so every subset size of a later run reads the same corrupted pixels and
results at different sizes stay comparable. Files are keyed by the set's content hash, the constants, the
corruption, the severity and the seed:
``<cache>/corruptions/<fingerprint>/<constants>/<name>-s<severity>-seed<seed>.npy``.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from .corruptions import CLEAN, Constants, corrupt_images
from .datasets import ImageSet


def corruption_seed(name: str, seed: int) -> int:
    """One seed per corruption (methods.md: "seed numpy per corruption"), stable across runs and Python versions."""
    return (zlib.crc32(name.encode()) + seed) % 2**32


def corrupted(data: ImageSet, name: str, severity: int, constants: Constants, seed: int, cache_dir: Path) -> np.ndarray:
    """``data.images`` corrupted with ``name`` (or unchanged for ``clean``), from the cache when present."""
    if name == CLEAN:
        return data.images
    path = cache_dir / "corruptions" / data.fingerprint() / constants / f"{name}-s{severity}-seed{seed}.npy"
    if path.is_file():
        cached = np.load(path)
        if cached.shape == data.images.shape and cached.dtype == np.uint8:
            return cached
    images = corrupt_images(data.images, name, severity, seed=corruption_seed(name, seed), constants=constants)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    with partial.open("wb") as handle:
        np.save(handle, images)
    partial.replace(path)  # atomic: a concurrent or interrupted run never reads half a file
    return images
