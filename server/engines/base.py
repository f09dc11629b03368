"""What the server needs from an inference engine: normalised images in, logits out."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Engine(ABC):
    """Runs a classifier's plain forward pass.

    ``infer`` takes a C-contiguous float32 array (N, C, H, W), already normalised, and returns float32 logits
    (N, classes). ``device`` and ``providers`` say where it really runs (reported in metadata and logs).
    """

    kind: str
    device: str
    providers: tuple[str, ...] = ()

    @abstractmethod
    def infer(self, x: np.ndarray) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release engine resources; the default has none."""

    def describe(self) -> dict[str, str]:
        return {"engine": self.kind, "device": self.device, "providers": ",".join(self.providers)}
