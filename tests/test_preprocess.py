"""The server's normalisation of raw pixels against a float64 reference, for every accepted dtype and layout."""

from __future__ import annotations

import numpy as np
import pytest

from ttaserve.server.errors import InvalidArgument
from ttaserve.server.model_config import InputSpec, Preprocessing
from ttaserve.server.preprocess import Preprocessor

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def preprocessor_for(height: int, width: int, layout: str = "NHWC") -> Preprocessor:
    return Preprocessor(
        InputSpec(height=height, width=width, channels=3, layout=layout), Preprocessing(mean=MEAN, std=STD)
    )


def reference(nchw_unit: np.ndarray) -> np.ndarray:
    """(x − mean) / std in float64, x in [0, 1], NCHW."""
    mean = np.asarray(MEAN, dtype=np.float64).reshape(1, 3, 1, 1)
    std = np.asarray(STD, dtype=np.float64).reshape(1, 3, 1, 1)
    return (nchw_unit.astype(np.float64) - mean) / std


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("batch", [1, 64])
def test_uint8_pixels_are_normalised_in_nchw(layout: str, batch: int) -> None:
    preprocessor = Preprocessor(
        InputSpec(height=5, width=7, channels=3, layout=layout), Preprocessing(mean=MEAN, std=STD)
    )
    pixels = np.random.default_rng(batch).integers(0, 256, (batch, 3, 5, 7), dtype=np.uint8)
    sent = pixels if layout == "NCHW" else pixels.transpose(0, 2, 3, 1).copy()
    out = preprocessor.from_array(sent, "input")
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == (batch, 3, 5, 7)
    np.testing.assert_allclose(out, reference(pixels / 255.0), rtol=1e-6, atol=1e-6)
    assert out.std() > 0.5  # real pixels spread over the range, not a constant


def test_fp32_pixels_are_normalised_and_the_input_is_left_alone() -> None:
    preprocessor = Preprocessor(
        InputSpec(height=4, width=4, channels=3, layout="NHWC"), Preprocessing(mean=MEAN, std=STD)
    )
    pixels = np.random.default_rng(0).random((2, 4, 4, 3), dtype=np.float32)
    sent = pixels.copy()
    out = preprocessor.from_array(sent, "input")
    np.testing.assert_allclose(out, reference(pixels.transpose(0, 3, 1, 2)), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(sent, pixels)


def test_read_only_request_buffers_are_accepted() -> None:
    """Tensors decoded from a request's bytes are read-only views: normalisation must not write into them."""
    preprocessor = Preprocessor(
        InputSpec(height=2, width=2, channels=3, layout="NHWC"), Preprocessing(mean=MEAN, std=STD)
    )
    pixels = np.frombuffer(bytes(range(12)), dtype=np.uint8).reshape(1, 2, 2, 3)
    out = preprocessor.from_array(pixels, "input")
    np.testing.assert_allclose(out, reference(pixels.transpose(0, 3, 1, 2) / 255.0), rtol=1e-6, atol=1e-6)


def test_other_dtypes_are_refused_by_name() -> None:
    preprocessor = Preprocessor(
        InputSpec(height=2, width=2, channels=3, layout="NHWC"), Preprocessing(mean=MEAN, std=STD)
    )
    with pytest.raises(InvalidArgument, match="datatype must be UINT8, FP32 or BYTES, got float64"):
        preprocessor.from_array(np.zeros((1, 2, 2, 3)), "input")
