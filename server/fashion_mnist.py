"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package: the data the embedded default model is trained on.

The package installs the original gzipped IDX files, so reading them needs nothing beyond numpy. IDX is a tiny
big-endian format: a magic number whose third byte is the element type (0x08 = uint8) and fourth the number of
dimensions, then one uint32 per dimension, then the raw elements.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

#: where ``apt-get install dataset-fashion-mnist`` puts the files
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_UINT8_TYPE = 0x08


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Read one gzipped IDX file of unsigned bytes; raises ``ValueError`` naming the file when it is not one."""
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: not found (install Fashion-MNIST with 'apt-get install -y dataset-fashion-mnist')"
        ) from None
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable gzip file: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: bad IDX magic number {data[:4].hex()!r}")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != _UINT8_TYPE:
        raise ValueError(f"{path}: IDX element type 0x{dtype_code:02x}, expected 0x08 (unsigned byte)")
    if ndim != expected_ndim:
        raise ValueError(f"{path}: IDX file has {ndim} dimensions, expected {expected_ndim}")
    header_end = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected_bytes = header_end + int(np.prod(shape))
    if len(data) != expected_bytes:
        raise ValueError(f"{path}: {len(data)} bytes, the header {shape} implies {expected_bytes}")
    # a copy: arrays over the decompressed bytes would be read-only
    return np.frombuffer(data, dtype=np.uint8, offset=header_end).reshape(shape).copy()


def load_split(split: str, directory: Path = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of the ``train`` (60,000) or ``test`` (10,000) split."""
    if split not in _FILES:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(_FILES)}")
    image_file, label_file = _FILES[split]
    images = read_idx(Path(directory) / image_file, expected_ndim=3)
    labels = read_idx(Path(directory) / label_file, expected_ndim=1)
    if len(images) != len(labels):
        raise ValueError(f"{directory}: {len(images)} {split} images but {len(labels)} labels")
    if labels.max(initial=0) >= len(CLASS_NAMES):
        raise ValueError(f"{directory}: label {labels.max()} out of range for {len(CLASS_NAMES)} classes")
    return images, labels
