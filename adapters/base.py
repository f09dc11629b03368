"""The one interface every test-time adaptation strategy implements.

A strategy is three things:

* a **config**: a frozen pydantic model with the method's settings, their defaults (from the paper / reference
  code) and bounds; the server validates per-request overrides against it;
* a **state**: a dataclass of tensors that is everything a stream has learned so far. It is plain data, so the
  server can count its bytes, deep-copy it, snapshot it to disk and restore it;
* a **step**: ``step(state, x, config) -> Step(logits, state, stats)`` for one batch.

A ``Strategy`` object is built once per served model (it may precompute things, e.g. a structural copy of the
network whose normalisation layers are replaced); one object serves every session of that model concurrently,
so ``step`` must be safe to call from several threads with *different* states. The shared model's weights are
never mutated: a strategy that trains keeps its own copy of the parameters it owns inside the state.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class StrategyConfig(BaseModel):
    """Base of every strategy's settings: unknown fields are errors and values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class AdapterState:
    """Base of every strategy's state. Subclasses add tensor (or nested dict/list of tensor) fields.

    ``steps`` counts the batches the state has been adapted on.
    """

    steps: int = 0

    def fields(self) -> dict[str, Any]:
        """The state's fields by name, the values themselves (``dataclasses.asdict`` would deep-copy every tensor:
        a whole model's worth for RMT, each time a session's bytes are counted or it is snapshotted)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor held in the state, however nested."""
        yield from _iter_tensors(self.fields())

    def nbytes(self) -> int:
        """Bytes of tensor storage the state holds (what a session costs in memory)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to_dict(self) -> dict[str, Any]:
        """A dict of tensors, numbers and strings that ``torch.save`` writes and ``torch.load(weights_only=True)``
        reads back."""
        return {"type": type(self).__name__, "fields": _to_cpu(self.fields())}

    @classmethod
    def from_dict(cls, data: dict[str, Any], device: torch.device | str = "cpu") -> AdapterState:
        if data.get("type") != cls.__name__:
            raise ValueError(f"snapshot holds a {data.get('type')!r} state, expected {cls.__name__!r}")
        return cls(**_to_device(data["fields"], torch.device(device)))

    def clone(self) -> AdapterState:
        return copy.deepcopy(self)


def _iter_tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _iter_tensors(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _iter_tensors(v)


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


def _to_cpu(value: Any) -> Any:
    return _map_tensors(value, lambda t: t.detach().cpu().clone())


def _to_device(value: Any, device: torch.device) -> Any:
    # Generator states (uint8 byte tensors named *rng*) must stay on the CPU; strategies restore them themselves.
    return _map_tensors(value, lambda t: t if t.dtype == torch.uint8 else t.to(device))


@dataclass
class Step:
    """What one adaptation step returns: the batch's logits (N, classes), the new state and scalar stats
    (e.g. ``entropy``, ``loss``, ``lambda``) for responses and metrics."""

    logits: torch.Tensor
    state: AdapterState
    stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceData:
    """Labelled source-domain images some strategies can use (RMT warm-up, replay, class prototypes).

    ``images`` are already normalised model inputs (N, C, H, W) float32; ``labels`` int64 (N,).
    """

    images: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class StrategyContext:
    """What a model brings besides its network: a merge partner (T3's expert), source data (RMT) and how its inputs
    are normalised (RMT augments in pixel space: it undoes and redoes the normalisation)."""

    partner: nn.Module | None = None
    source: SourceData | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    #: per-channel mean and std the inputs were normalised with (a server fills them from the model's config)
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None


class Strategy(ABC):
    """A test-time adaptation method bound to one model. See the module docstring for the contract."""

    name: ClassVar[str]
    config_cls: ClassVar[type[StrategyConfig]]
    stateful: ClassVar[bool] = False
    #: the class of the states ``init_state`` returns: what a snapshot is restored into without building a state
    state_cls: ClassVar[type[AdapterState]] = AdapterState
    uses_gradients: ClassVar[bool] = False
    #: what the model must offer: "batchnorm", "merge_partner", "source_data"
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, context: StrategyContext | None = None) -> None:
        self.model = model
        self.context = context or StrategyContext()
        self._closed = threading.Event()

    def close(self) -> None:
        """Stop long-running work of this strategy (a source warm-up) at its next step; it then raises
        ``StrategyClosed``. A server calls this when the model it belongs to is unloaded."""
        self._closed.set()

    def check_open(self) -> None:
        """Called between the steps of long-running work: raises ``StrategyClosed`` once ``close`` was called."""
        if self._closed.is_set():
            raise StrategyClosed(f"strategy {self.name!r} was closed")

    @classmethod
    def description(cls) -> str:
        return (cls.__doc__ or cls.name).strip().splitlines()[0]

    def variant(self, config: StrategyConfig) -> str:
        """Which form of the method runs with ``config`` on this model (e.g. RMT with or without its source parts);
        reported in responses. Most strategies have one form: their name."""
        return self.name

    def make_config(self, **overrides: Any) -> StrategyConfig:
        return self.config_cls(**overrides)

    @abstractmethod
    def init_state(self, config: StrategyConfig) -> AdapterState:
        """The source state a new (or reset) session starts from; deterministic for a given config and seed."""

    @abstractmethod
    def step(self, state: AdapterState, x: torch.Tensor, config: StrategyConfig) -> Step:
        """Adapt on and predict one batch ``x`` (N, C, H, W), normalised, on the context's device."""


class StrategyClosed(RuntimeError):
    """Long-running strategy work (a source warm-up) stopped because the strategy was closed under it."""


ModuleT = TypeVar("ModuleT", bound=nn.Module)


class ThreadLocalModule(Generic[ModuleT]):
    """Per-thread structural copies of a module that share the original's parameters and buffers.

    Strategies that replace layers or swap parameters in (``torch.func.functional_call``) temporarily change a
    module's attributes; giving each serving thread its own shallow copy keeps concurrent sessions apart without
    copying any weights.
    """

    def __init__(self, build: Callable[[], ModuleT]) -> None:
        self._build = build
        self._local = threading.local()

    def get(self) -> ModuleT:
        module = getattr(self._local, "module", None)
        if module is None:
            module = self._build()
            self._local.module = module
        return module


def share_weights_copy(model: nn.Module) -> nn.Module:
    """A deep structural copy of ``model`` whose parameters and buffers are the original tensors (no weight copy)."""
    memo: dict[int, Any] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        memo[id(tensor)] = tensor
    return copy.deepcopy(model, memo)
