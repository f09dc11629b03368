"""Source warm-up in the background, right after a model loads.

A strategy that trains on the model's ``source_data`` before adapting (RMT: ``warmup_samples``, 50,000 images by
default) does so inside ``init_state`` the first time a session starts with given settings, and caches the result on
the model's shared Strategy object. On a CPU that takes minutes, far beyond a client's deadline. So each loaded version
whose config has ``source_data`` (and ``source_warmup_on_load``) runs ``init_state`` with the default settings on a
daemon thread, on the very Strategy object requests use: the cache is warm by the time clients arrive.

Readiness does not wait for it. A request that needs a warm-up still running waits for it no longer than its gRPC
deadline, then gets UNAVAILABLE. Unloading, reloading or stopping cancels it (``SourceWarmup.cancel``).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ttaserve.adapters import AdapterState, Strategy, StrategyConfig, get_strategy_class, strategy_names

from .errors import Unavailable
from .loaded_model import uses_source_data
from .request import default_settings

if TYPE_CHECKING:
    from .loaded_model import LoadedModel

log = logging.getLogger(__name__)

#: the strategy setting that sizes a source warm-up (0 = none)
WARMUP_SETTING = "warmup_samples"
#: how long closing a model waits for a cancelled warm-up to let go (it stops after the torch operation in progress)
CANCEL_WAIT_S = 10.0
#: a request refused because of a running warm-up is answered this long before its deadline, so the client reads why
ANSWER_MARGIN_S = 0.05


class WarmupCancelled(BaseException):
    """Raised inside a warm-up's thread to stop it. A BaseException, so no ``except Exception`` on the way up (in the
    adapter or in torch) swallows it."""


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
    #: the running thread's id while it is inside the strategy (where a cancellation may land), else None
    _cancellable: int | None = field(default=None, repr=False)
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
        """Stop the warm-up at the thread's next Python bytecode, i.e. after the torch operation in progress.

        The warm-up loop lives in the adapter, which offers no way to stop it; an exception raised in its thread
        unwinds it (its lock is released by ``with``, its cache is left as it was). Only a closing model's warm-ups
        are cancelled, so only a Strategy object that is dropped with its model sees the exception.
        """
        with self._lock:
            self._cancel_requested = True
            thread_id, self._cancellable = self._cancellable, None
        if thread_id is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(WarmupCancelled))

    def enter_strategy(self) -> None:
        """Called by the warm-up's thread before it runs strategy code: from here on a cancellation interrupts it."""
        with self._lock:
            if self._cancel_requested:
                raise WarmupCancelled
            self._cancellable = threading.get_ident()

    def finish(self, error: str = "") -> None:
        """Record the end (the first call counts) and make sure no cancellation is sent to the thread any more."""
        with self._lock:
            self._cancellable = None
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
            raise WarmupCancelled
        log.info("%s: source warm-up started in the background (default settings)", label)
        warmup.enter_strategy()
        strategy = model.strategy(warmup.strategy)
        strategy.init_state(default_settings(strategy.config_cls))
        warmup.finish()
        log.info("%s: source warm-up finished in %.1fs", label, warmup.seconds())
    except WarmupCancelled:
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
    return strategy.init_state(settings)
