"""Labelled image sets a protocol streams: CIFAR-10 (.npz), Fashion-MNIST (Debian's IDX files), a folder of images.

Everything becomes uint8 (N, H, W, C) pixels plus int64 labels and class names, the form both runners send (the
server preprocesses uint8 tensors exactly as the in-process runner does). A folder of images is a long-lived,
user-made thing, so a file that cannot be read is reported and skipped rather than ending the evaluation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ttaserve.server import fashion_mnist

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass(frozen=True)
class ImageSet:
    """Clean labelled images: ``images`` uint8 (N, H, W, C), ``labels`` int64 indices into ``classes``."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    #: files of a folder that could not be read, with the reason (never fatal)
    skipped: tuple[Skipped, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        """A content hash: the key of the corruption cache, so a changed folder is never served stale corruptions."""
        digest = hashlib.sha1(np.ascontiguousarray(self.images).data)
        digest.update(np.ascontiguousarray(self.labels).data)
        return digest.hexdigest()[:16]

    def balanced_indices(self, count: int, seed: int) -> np.ndarray:
        """``count`` indices (all when 0 or more than there are), as equal per class as possible, seeded.

        The same indices serve every corruption, so per-corruption errors compare the same images, as CIFAR-10-C's
        15 copies of one test set do.
        """
        if count <= 0 or count >= len(self):
            return np.arange(len(self))
        rng = np.random.default_rng(seed)
        per_class = [rng.permutation(np.flatnonzero(self.labels == c)) for c in np.unique(self.labels)]
        # round-robin over classes until ``count``: balanced, and still fills up when a class runs out
        longest = max(len(p) for p in per_class)
        interleaved = [p[i] for i in range(longest) for p in per_class if i < len(p)]
        return np.sort(np.array(interleaved[:count]))

    def select(self, indices: np.ndarray) -> ImageSet:
        return replace(self, images=self.images[indices], labels=self.labels[indices])


def load_cifar10(path: Path) -> ImageSet:
    """The shared CIFAR-10 layout: an .npz with ``x`` uint8 (N, 32, 32, 3) and ``y`` (N,)."""
    with np.load(path) as data:
        images, labels = data["x"], data["y"].astype(np.int64)
    return ImageSet(f"cifar10:{Path(path).name}", images, labels, CIFAR10_CLASSES)


def load_fashion_mnist(directory: Path = fashion_mnist.DEFAULT_DIR, split: str = "test") -> ImageSet:
    images, labels = fashion_mnist.load_split(split, directory)
    return ImageSet(f"fashion-mnist:{split}", images[..., None], labels.astype(np.int64), fashion_mnist.CLASS_NAMES)


def load_image_folder(root: Path, height: int, width: int, channels: int = 3, resample: str = "bilinear") -> ImageSet:
    """``root/<class name>/<image>`` files, decoded, converted to ``channels`` and resized to ``height`` × ``width``.

    Classes are the sub-folder names in sorted order; files are searched recursively inside each. Files that PIL
    cannot decode, and files outside any class folder, are listed in ``skipped``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    mode = {1: "L", 3: "RGB"}[channels]
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    skipped = [Skipped(str(p), "not inside a class folder") for p in sorted(root.iterdir()) if p.is_file()]
    images: list[np.ndarray] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        for path in sorted(p for p in (root / name).rglob("*") if p.is_file()):
            try:
                with Image.open(path) as image:
                    converted = image.convert(mode).resize((width, height), _RESAMPLE[resample])
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                skipped.append(Skipped(str(path), f"{type(exc).__name__}: {exc}"))
                continue
            pixels = np.asarray(converted, dtype=np.uint8)
            images.append(pixels[..., None] if channels == 1 else pixels)
            labels.append(index)
    if not images:
        raise ValueError(f"{root}: no readable image in any class folder ({len(skipped)} file(s) skipped)")
    return ImageSet(f"folder:{root.name}", np.stack(images), np.array(labels, dtype=np.int64), classes, tuple(skipped))


def label_map(classes: tuple[str, ...], model_labels: tuple[str, ...]) -> np.ndarray:
    """Index ``i`` of the data's classes -> the model's output index for the same name (case-insensitive).

    A model that was served without label names reports its indices as names; then the order is taken as is.
    """
    if model_labels == tuple(str(i) for i in range(len(model_labels))) and len(classes) <= len(model_labels):
        return np.arange(len(classes))
    lookup = {label.lower(): i for i, label in enumerate(model_labels)}
    missing = [c for c in classes if c.lower() not in lookup]
    if missing:
        raise ValueError(f"classes {missing} are not among the model's labels {list(model_labels)}")
    return np.array([lookup[c.lower()] for c in classes], dtype=np.int64)
