"""Typed results: what the SDK hands back instead of protobuf messages."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class Classification:
    """One image's result: the best class first-hand, then the top-k, then the full logits and probabilities."""

    label: str
    index: int
    score: float
    top_k: list[Prediction]
    logits: np.ndarray = field(repr=False)
    probabilities: np.ndarray = field(repr=False)


class BatchResult(list[Classification]):
    """The classifications of one request, in input order, plus what the server says it applied.

    It is a list, so ``results[0].label`` and ``for c in results`` work; the response parameters ride along as
    attributes: ``strategy``, ``settings`` (effective strategy settings), ``stats`` (per-batch adaptation stats
    such as ``entropy``), ``session_steps``, ``session_reset`` (the collapse guard's reason), ``session_event``
    (what happened to the session: ``started``, ``created``, ``restored``, ``replayed`` — a retried batch answered
    again without adapting — or the collapse guard's reset), ``engine``, ``device``.
    """

    def __init__(
        self,
        classifications: Iterable[Classification] = (),
        *,
        model: str = "",
        version: str = "",
        strategy: str = "",
        settings: dict[str, Any] | None = None,
        stats: dict[str, float] | None = None,
        session_steps: int | None = None,
        session_reset: str | None = None,
        session_event: str | None = None,
        engine: str = "",
        device: str = "",
    ) -> None:
        super().__init__(classifications)
        self.model = model
        self.version = version
        self.strategy = strategy
        self.settings = settings or {}
        self.stats = stats or {}
        self.session_steps = session_steps
        self.session_reset = session_reset
        self.session_event = session_event
        self.engine = engine
        self.device = device


@dataclass(frozen=True)
class ModelEntry:
    """One row of the repository index."""

    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    #: JSON Schema of the settings (bounds, defaults, descriptions)
    schema: dict[str, Any]
    defaults: dict[str, Any]
    stateful: bool
    uses_gradients: bool
    requires: tuple[str, ...]


@dataclass(frozen=True)
class SessionInfo:
    caller: str
    model: str
    strategy: str
    sequence_id: str
    model_version: str
    steps: int
    resets: int
    state_bytes: int
    last_stats: dict[str, float]
    settings: dict[str, Any]
    created_unix: float
    last_used_unix: float
    #: out of memory: the server's session table was full, so the state went to disk; the next batch brings it back
    spilled: bool = False


@dataclass(frozen=True)
class Snapshot:
    path: str
    byte_size: int
    data: bytes = field(repr=False)
