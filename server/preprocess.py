"""Client pixels -> the network's normalised float32 NCHW input.

Raw tensors must already have the model's height and width; encoded images are decoded, converted to the model's
channels and resized. Normalisation is ``(pixel - mean) / std`` with pixels in [0, 1].
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InvalidArgument
from .model_config import InputSpec, Preprocessing

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
#: refuse decompression bombs before decoding: far above any classifier input
MAX_IMAGE_PIXELS = 64_000_000


class Preprocessor:
    """Turns one request's pixels into the network's input for one model."""

    def __init__(self, spec: InputSpec, preprocessing: Preprocessing) -> None:
        self.spec = spec
        channels = spec.channels
        mean = np.broadcast_to(np.asarray(preprocessing.mean, dtype=np.float32), (channels,))
        std = np.broadcast_to(np.asarray(preprocessing.std, dtype=np.float32), (channels,))
        # x * scale + shift == (x - mean) / std, with x in [0, 1] (UINT8 pixels are x * 255)
        shape = (1, channels, 1, 1)
        self._scale = {
            np.dtype(np.float32): (1.0 / std).reshape(shape).astype(np.float32),
            np.dtype(np.uint8): (1.0 / (255.0 * std)).reshape(shape).astype(np.float32),
        }
        self._shift = (-mean / std).reshape(shape).astype(np.float32)
        self._resample = _RESAMPLE[preprocessing.resample]

    def from_array(self, array: np.ndarray, name: str) -> np.ndarray:
        """A raw UINT8 / FP32 batch in the declared layout -> normalised NCHW float32."""
        spec = self.spec
        if array.ndim != 4:
            raise InvalidArgument(
                f"input '{name}': expected 4 dimensions {spec.layout} {spec.shape()}, got shape {list(array.shape)}"
            )
        nchw = array if spec.layout == "NCHW" else array.transpose(0, 3, 1, 2)
        if nchw.shape[1:] != (spec.channels, spec.height, spec.width):
            raise InvalidArgument(
                f"input '{name}': expected shape {spec.shape()} ({spec.layout}), got {list(array.shape)}"
            )
        if array.dtype not in self._scale:
            raise InvalidArgument(f"input '{name}': datatype must be UINT8, FP32 or BYTES, got {array.dtype}")
        if array.dtype == np.float32 and not np.isfinite(array).all():
            raise InvalidArgument(f"input '{name}': contains NaN or Inf values")
        # One strided pass converts and reorders into a fresh contiguous array, two in-place passes scale and shift it:
        # 1.8x faster than a per-channel lookup table at batch 64. Single-threaded on purpose: waking PyTorch's
        # intra-op threads for this, between two engine runs, measured tail latencies of tens of milliseconds.
        out = np.empty(nchw.shape, dtype=np.float32)
        np.copyto(out, nchw, casting="unsafe")
        out *= self._scale[array.dtype]
        out += self._shift
        return out

    def from_encoded(self, images: list[bytes], name: str) -> np.ndarray:
        """Encoded JPEG/PNG images -> normalised NCHW float32 (decoded, converted, resized)."""
        spec = self.spec
        batch = np.empty((len(images), spec.height, spec.width, spec.channels), dtype=np.uint8)
        mode = "L" if spec.channels == 1 else "RGB"
        for index, data in enumerate(images):
            if not data:
                raise InvalidArgument(f"input '{name}': image {index} is empty (0 bytes)")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    image = Image.open(io.BytesIO(data))
                    if image.width * image.height > MAX_IMAGE_PIXELS:
                        raise InvalidArgument(
                            f"input '{name}': image {index} is {image.width}x{image.height}, "
                            f"above the {MAX_IMAGE_PIXELS} pixel limit"
                        )
                    image = image.convert(mode)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
                raise InvalidArgument(f"input '{name}': image {index} cannot be decoded: {exc}") from None
            if image.size != (spec.width, spec.height):
                image = image.resize((spec.width, spec.height), self._resample)
            pixels = np.asarray(image, dtype=np.uint8)
            batch[index] = pixels[..., None] if spec.channels == 1 else pixels
        nchw_layout = batch.transpose(0, 3, 1, 2) if spec.layout == "NCHW" else batch
        return self.from_array(np.ascontiguousarray(nchw_layout), name)
