"""Seeded image corruptions: the maintained ``corrupt-tta`` library, plus CIFAR-10-C's constants where they are known.

Two sets of severity constants, selectable per call, because the numbers are only comparable within one choice:

* ``imagenet-c`` (default): ``corrupt-tta`` 0.1.7, whose functions take only ``(image, severity)`` with the
  ImageNet-C constants built in. At 32×32 its severity 5 is far harsher than CIFAR-10-C (the blurs leave almost
  nothing of a CIFAR image).
* ``cifar10c``: the milder constants CIFAR-10-C itself used, implemented here for the five corruptions whose
  constants are documented (gaussian noise, contrast, brightness, JPEG, pixelate); the same transforms as the
  ImageNet-C ones, only the constants differ.

``corrupt-tta`` draws from numpy's global generator, except impulse noise, which calls scikit-image's
``random_noise`` with a fresh unseeded generator; both are pinned here so that a corrupted set is regenerated
bit-identically from ``(name, severity, seed)``. It is an optional dependency (the ``eval`` and ``test`` extras).
Grey images (N, H, W, 1) are corrupted as RGB copies and converted back with the ITU-R 601 luma weights.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from types import ModuleType
from typing import Literal
from unittest import mock

import numpy as np
from PIL import Image

Constants = Literal["imagenet-c", "cifar10c"]
CONSTANTS: tuple[Constants, ...] = ("imagenet-c", "cifar10c")

#: the 15 corruptions of the continual benchmark, in the field's order (methods.md)
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)

#: ImageNet-C's four families
FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": CORRUPTIONS[0:3],
    "blur": CORRUPTIONS[3:7],
    "weather": CORRUPTIONS[7:11],
    "digital": CORRUPTIONS[11:15],
}

#: the uncorrupted domain's name wherever a corruption name is expected
CLEAN = "clean"

#: CIFAR-10-C's constants for severities 1-5 (Hendrycks & Dietterich 2019, as listed in methods.md)
CIFAR10C_CONSTANTS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
}

_LUMA = np.array([0.299, 0.587, 0.114])


def _library() -> ModuleType:
    try:
        import corrupt_tta
    except ImportError:
        raise ImportError("corruptions need the 'corrupt-tta' package: pip install 'ttaserve[eval]'") from None
    return corrupt_tta


def corruption_names(constants: Constants = "imagenet-c") -> list[str]:
    if constants == "cifar10c":
        return sorted(CIFAR10C_CONSTANTS)
    return sorted(_library().corruption_dict)


def corrupt_images(
    images: np.ndarray, name: str, severity: int, seed: int = 0, constants: Constants = "imagenet-c"
) -> np.ndarray:
    """Corrupt uint8 images (N, H, W, 3) or grey (N, H, W, 1) with ``name`` at ``severity`` (1-5); same shape out."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, H, W, 3) or (N, H, W, 1), got {images.dtype} {images.shape}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be 1-5, got {severity}")
    if constants not in CONSTANTS:
        raise ValueError(f"unknown constants {constants!r}; expected one of {', '.join(CONSTANTS)}")
    if name not in corruption_names(constants):
        available = ", ".join(corruption_names(constants))
        raise ValueError(f"unknown corruption {name!r} for {constants} constants; available: {available}")
    grey = images.shape[-1] == 1
    rgb = np.repeat(images, 3, axis=3) if grey else images
    if constants == "cifar10c":
        out = _CIFAR10C[name](rgb, CIFAR10C_CONSTANTS[name][severity - 1], np.random.default_rng(seed))
    else:
        out = _imagenet_c(rgb, name, severity, seed)
    if grey:
        return np.clip(np.rint(out @ _LUMA), 0, 255).astype(np.uint8)[..., None]
    return out


def _imagenet_c(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    library = _library()
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


# CIFAR-10-C's transforms, vectorised over the batch where the transform allows it.


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)


def _gaussian_noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    x = images / 255.0
    return _to_uint8(np.clip(x + rng.normal(scale=sigma, size=x.shape), 0, 1))


def _contrast(images: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    x = images / 255.0
    means = x.mean(axis=(1, 2), keepdims=True)
    return _to_uint8(np.clip((x - means) * factor + means, 0, 1))


def _brightness(images: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
    """HSV value + ``shift``: RGB is V times a function of (H, S), so scaling RGB by V'/V is the same round trip."""
    x = images / 255.0
    value = x.max(axis=3, keepdims=True)
    brighter = np.clip(value + shift, 0, 1)
    scaled = np.divide(x * brighter, value, out=np.broadcast_to(brighter, x.shape).copy(), where=value > 0)
    return _to_uint8(np.clip(scaled, 0, 1))


def _per_image(transform: Callable[[Image.Image, float], Image.Image]) -> Callable[..., np.ndarray]:
    def apply(images: np.ndarray, constant: float, rng: np.random.Generator) -> np.ndarray:
        return np.stack([np.asarray(transform(Image.fromarray(image), constant)) for image in images])

    return apply


def _jpeg(image: Image.Image, quality: float) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(quality))
    return Image.open(buffer).convert("RGB")


def _pixelate(image: Image.Image, factor: float) -> Image.Image:
    width, height = image.size
    small = image.resize((int(width * factor), int(height * factor)), Image.Resampling.BOX)
    return small.resize((width, height), Image.Resampling.BOX)


_CIFAR10C: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "contrast": _contrast,
    "brightness": _brightness,
    "jpeg_compression": _per_image(_jpeg),
    "pixelate": _per_image(_pixelate),
}
