"""The IDX reader on hand-made files (always) and on the installed data set (when present)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from ttaserve.server import fashion_mnist


def _write(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload))
    return path


def test_reads_a_valid_file(tmp_path: Path) -> None:
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = _write(tmp_path / "x.gz", struct.pack(">BBBBIII", 0, 0, 8, 3, 2, 3, 4) + data.tobytes())
    out = fashion_mnist.read_idx(path, expected_ndim=3)
    np.testing.assert_array_equal(out, data)
    out[0, 0, 0] = 7  # writable


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (struct.pack(">BBBBI", 1, 0, 8, 1, 4), "magic"),
        (struct.pack(">BBBBI", 0, 0, 0x0D, 1, 4), "element type"),
        (struct.pack(">BBBBII", 0, 0, 8, 2, 2, 2), "dimensions"),
        (struct.pack(">BBBBI", 0, 0, 8, 1, 9), "implies"),
    ],
)
def test_rejects_malformed_files(tmp_path: Path, header: bytes, message: str) -> None:
    path = _write(tmp_path / "bad.gz", header + bytes(4))
    with pytest.raises(ValueError, match=message):
        fashion_mnist.read_idx(path, expected_ndim=1)


def test_missing_file_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist.load_split("test", tmp_path)


@pytest.mark.skipif(not fashion_mnist.DEFAULT_DIR.is_dir(), reason="Fashion-MNIST is not installed")
def test_installed_test_split() -> None:
    images, labels = fashion_mnist.load_split("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
