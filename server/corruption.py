"""Seeded image corruptions from the maintained ``corrupt-tta`` library (ImageNet-C constants, ``(image, severity)``).

``corrupt-tta`` draws from numpy's global generator, except impulse noise, which calls scikit-image's
``random_noise`` with a fresh unseeded generator; both are pinned here so that a corrupted set is regenerated
bit-identically from ``(name, severity, seed)``. It is an optional dependency (the ``eval`` and ``test`` extras).
"""

from __future__ import annotations

import functools
from types import ModuleType
from unittest import mock

import numpy as np


def _library() -> ModuleType:
    try:
        import corrupt_tta
    except ImportError:
        raise ImportError("corruptions need the 'corrupt-tta' package: pip install 'ttaserve[eval]'") from None
    return corrupt_tta


def corruption_names() -> list[str]:
    return sorted(_library().corruption_dict)


def corrupt_images(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt uint8 RGB images (N, H, W, 3) with ``name`` at ``severity`` (1-5); returns uint8 (N, H, W, 3)."""
    library = _library()
    if name not in library.corruption_dict:
        raise ValueError(f"unknown corruption {name!r}; available: {', '.join(corruption_names())}")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    function = library.corruption_dict[name]
    rng = np.random.default_rng(seed)
    seeded_noise = functools.partial(library.corruptions.random_noise, rng=rng)
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        with mock.patch.object(library.corruptions, "random_noise", seeded_noise):
            out = [np.clip(np.rint(function(image, severity)), 0, 255).astype(np.uint8) for image in images]
    finally:
        np.random.set_state(state)
    return np.stack(out)
