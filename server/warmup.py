"""Source warm-up in the background, right after a model loads.

A strategy that trains on the model's ``source_data`` before adapting (RMT: ``warmup_samples``, 50,000 images by
default) does so inside ``init_state`` the first time a session starts with given settings, and caches the result on
the model's shared Strategy object. On a CPU that takes minutes, far beyond a client's deadline. So each loaded version
whose config has ``source_data`` (and ``source_warmup_on_load``) runs ``init_state`` with the default settings on a
daemon thread, on the very Strategy object requests use: the cache is warm by the time clients arrive.

Readiness does not wait for it. A request that needs a warm-up still running waits for it no longer than its gRPC
deadline, then gets UNAVAILABLE. Unloading, reloading or stopping cancels it (``SourceWarmup.cancel`` closes the
Strategy object, whose warm-up loop stops at its next step with ``StrategyClosed``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ttaserve.adapters import (
    AdapterState,
    Strategy,
    StrategyClosed,
    StrategyConfig,
    get_strategy_class,
    strategy_names,
)

from .errors import Unavailable
from .loaded_model import uses_source_data
from .request import default_settings

if TYPE_CHECKING:
    from .loaded_model import LoadedModel

log = logging.getLogger(__name__)

#: the strategy setting that sizes a source warm-up (0 = none)
WARMUP_SETTING = "warmup_samples"
#: how long closing a model waits for a cancelled warm-up to let go (it stops after the training step in progress)
CANCEL_WAIT_S = 10.0
#: a request refused because of a running warm-up is answered this long before its deadline, so the client reads why
ANSWER_MARGIN_S = 0.05


@dataclass
class SourceWarmup:
    """One background warm-up: when it started and ended, why it failed, and the thread that runs it."""

    model: str
    version: int
    strategy: str
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    error: str = ""
    thread: threading.Thread | None = field(default=None, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: the Strategy object being warmed up, once the thread has it
    _strategy: Strategy | None = field(default=None, repr=False)
    _cancel_requested: bool = field(default=False, repr=False)

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    def seconds(self) -> float:
        """How long it ran, or has been running so far."""
        end = time.monotonic() if self.finished is None else self.finished
        return end - self.started

    def wait(self, timeout_s: float | None) -> bool:
        """True once it has finished; ``timeout_s`` (None: no limit) bounds the wait."""
        return self._done.wait(timeout_s)

    def cancel(self) -> None:
        """Stop the warm-up after its training step in progress: close the Strategy object it runs on (only a
        closing model's warm-ups are cancelled, and its Strategy objects are dropped with it)."""
        with self._lock:
            self._cancel_requested = True
            strategy = self._strategy
        if strategy is not None:
            strategy.close()

    def attach(self, strategy: Strategy) -> None:
        """Called by the warm-up's thread with the Strategy object it is about to warm up."""
        with self._lock:
            self._strategy = strategy
            cancelled = self._cancel_requested
        if cancelled:
            strategy.close()

    def finish(self, error: str = "") -> None:
        """Record the end (the first call counts)."""
        with self._lock:
            if self._done.is_set():
                return
            self.error = error
            self.finished = time.monotonic()
            self._done.set()


def warms_up(settings: StrategyConfig) -> bool:
    """Whether a state with these settings starts with training on source data (RMT's ``warmup_samples``)."""
    return int(getattr(settings, WARMUP_SETTING, 0)) > 0


def warmup_strategies(model: LoadedModel) -> list[str]:
    """The strategies that would warm up on this model's source data with their default settings."""
    if not (model.config.source_data and model.config.source_warmup_on_load and model.module is not None):
        return []
    names = []
    for name in strategy_names():
        cls = get_strategy_class(name)
        runnable = "batchnorm" not in cls.requires or model.has_batchnorm()
        if runnable and uses_source_data(cls) and warms_up(default_settings(cls.config_cls)):
            names.append(name)
    return names


def start_source_warmups(model: LoadedModel) -> None:
    """Start the default-settings warm-up of each strategy that needs one, each on its own daemon thread."""
    for name in warmup_strategies(model):
        warmup = SourceWarmup(model.name, model.version, name)
        warmup.thread = threading.Thread(
            target=_run_warmup,
            args=(model, warmup),
            name=f"ttaserve-warmup-{model.name}-{model.version}-{name}",
            daemon=True,
        )
        model.warmups[name] = warmup
        warmup.thread.start()


def _run_warmup(model: LoadedModel, warmup: SourceWarmup) -> None:
    label = f"model {warmup.model} version {warmup.version} strategy {warmup.strategy}"
    try:
        if model.closed:
            raise StrategyClosed(f"model {warmup.model} was closed before its warm-up started")
        log.info("%s: source warm-up started in the background (default settings)", label)
        strategy = model.strategy(warmup.strategy)
        warmup.attach(strategy)
        strategy.init_state(default_settings(strategy.config_cls))
        warmup.finish()
        log.info("%s: source warm-up finished in %.1fs", label, warmup.seconds())
    except StrategyClosed:
        warmup.finish("cancelled: the model was unloaded, reloaded or the server stopped")
        log.info("%s: source warm-up cancelled after %.1fs", label, warmup.seconds())
    except Exception as exc:  # a background thread has no caller to raise to; requests meet the same error
        warmup.finish(f"{type(exc).__name__}: {exc}")
        log.error("%s: source warm-up failed after %.1fs: %s", label, warmup.seconds(), warmup.error)


def cancel_warmups(model: LoadedModel) -> None:
    """Cancel the model's warm-ups and wait (briefly) for their threads to end: after an unload they would burn the
    CPU for nothing, and a process that exits while a daemon thread is still in torch code aborts."""
    warmups = list(model.warmups.values())
    for warmup in warmups:
        warmup.cancel()
    for warmup in warmups:
        if warmup.thread is None:
            continue
        warmup.thread.join(CANCEL_WAIT_S)
        if warmup.thread.is_alive():
            log.warning(
                "model %s version %d strategy %s: source warm-up still running %.0fs after its cancellation",
                warmup.model,
                warmup.version,
                warmup.strategy,
                CANCEL_WAIT_S,
            )


def initial_state(
    model: LoadedModel, strategy: Strategy, settings: StrategyConfig, deadline: float | None
) -> AdapterState:
    """``strategy.init_state(settings)``, after any warm-up of it still running in the background.

    The strategy serialises warm-ups behind one lock, so a state with a warm-up would block on the background one
    anyway; waiting here instead bounds the wait by the request's ``deadline`` (``time.monotonic()``; None: no
    limit) and says why the request was refused.
    """
    warmup = model.warmups.get(strategy.name)
    if warmup is not None and warmup.running and warms_up(settings):
        log.info(
            "model %s strategy %s: a request waits for the source warm-up (running for %.1fs)",
            model.name,
            strategy.name,
            warmup.seconds(),
        )
        timeout_s = None if deadline is None else max(0.0, deadline - time.monotonic() - ANSWER_MARGIN_S)
        if not warmup.wait(timeout_s):
            message = (
                f"model '{model.name}': strategy '{strategy.name}' is still warming up on the source data "
                f"(running for {warmup.seconds():.0f}s); retry later"
            )
            log.warning("request refused at its deadline: %s", message)
            raise Unavailable(message)
    try:
        if warms_up(settings):
            return _in_own_thread(strategy.init_state, settings)
        return strategy.init_state(settings)
    except StrategyClosed:
        raise Unavailable(f"model '{model.name}' was unloaded or reloaded while this request started") from None


def _in_own_thread(fn: Callable[[StrategyConfig], AdapterState], settings: StrategyConfig) -> AdapterState:
    """``fn(settings)`` on a short-lived thread of its own, waited for.

    A state that may start with a source warm-up (minutes of training) must not run on the compute thread, which
    would stall every other request, nor on the calling gRPC thread, which runs PyTorch single-threaded
    (``compute.py``). A thread of its own may use every core; its OpenMP team ends with it.
    """
    outcome: list[AdapterState | BaseException] = []

    def target() -> None:
        try:
            outcome.append(fn(settings))
        except BaseException as exc:  # re-raised in the waiting thread
            outcome.append(exc)

    thread = threading.Thread(target=target, name="ttaserve-init-state", daemon=True)
    thread.start()
    thread.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]
