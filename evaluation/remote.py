"""The gRPC backend: methods run on a ttaserve server through the SDK, one session per stream.

Each stream is a session (Triton's sequence): its first request, and the first request after every reset, carries
``sequence_start``, which makes the server start that sequence id from the source state. Images travel as uint8
tensors, so the server's preprocessing is the only one applied.
"""

from __future__ import annotations

import uuid

import numpy as np

from ttaserve.client import Client, Session, codec

from .methods import Method

#: more than any model's class count: the server caps ``top_k`` at the number of classes
_ALL_CLASSES = 1 << 20


class RemoteStream:
    def __init__(self, client: Client, method: Method, model: str, sequence_id: str) -> None:
        self._client = client
        self._method = method
        self._model = model
        self._sequence_id = sequence_id
        self._session: Session | None = None

    def predict(self, images: np.ndarray, reset: bool) -> np.ndarray:
        if reset or self._session is None:
            # a new Session object sends sequence_start with its first request: the server resets this id
            method = self._method
            self._session = self._client.session(self._sequence_id, self._model, method.strategy, method.settings)
        result = self._session.classify(images, top_k=1)
        return np.array([c.index for c in result], dtype=np.int64)

    def close(self) -> None:
        if self._session is not None:
            self._session.end()


class GrpcBackend:
    """Methods run on the server at ``url``; ``model`` is the served model methods use by default."""

    def __init__(self, url: str, model: str, timeout_s: float | None = None) -> None:
        self.url = url
        self.client = Client(url, timeout_s=timeout_s)
        self.model = model
        self._run = uuid.uuid4().hex[:8]

    def describe(self) -> str:
        return f"gRPC to {self.url}"

    def close(self) -> None:
        self.client.close()

    def input_shape(self, model: str) -> tuple[int, int, int]:
        metadata = self.client.metadata(model)
        shape = metadata.inputs[0].shape
        if codec.input_target(metadata).layout == "NHWC":
            return shape[1], shape[2], shape[3]
        return shape[2], shape[3], shape[1]

    def labels(self, model: str) -> tuple[str, ...]:
        """The model's labels by output index, from one stateless request that asks for every class."""
        probe = np.zeros((1, *self.input_shape(model)), np.uint8)  # the SDK sends NHWC arrays in the model's layout
        result = self.client.classify(probe, model, "none", top_k=_ALL_CLASSES)
        by_index = {p.index: p.label for p in result[0].top_k}
        return tuple(by_index[i] for i in range(len(by_index)))

    def open(self, method: Method, stream_id: str) -> RemoteStream:
        return RemoteStream(self.client, method, method.model or self.model, f"eval-{self._run}-{stream_id}")
