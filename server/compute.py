"""One thread runs the server's PyTorch computation; every other server thread runs PyTorch single-threaded.

Why: PyTorch's CPU ops parallelise with OpenMP, and OpenMP gives every thread that starts a parallel region its own
team of worker threads. A server that ran its forwards on whichever gRPC thread took the request ended up with
several teams; once they outnumber the cores, libgomp stops letting idle workers spin and every one of a forward's
~60 parallel regions pays a futex wake-up. Measured on 2 cores (ResNet-20, batch 1): 2.4 ms per forward from one
thread, 7–9 ms once a second thread had run one — the served PyTorch model was 3.5× slower than in process.

So the heavy work (engine forwards, adaptation steps, model loading) is handed to one long-lived thread, the only
long-lived OpenMP master with more than one thread (``torch_threads``, default all cores), and the gRPC worker threads
that hand it over run ``single_threaded()`` first, so the light tensor work they still do (parsing, initial states,
snapshots) never starts a team. The hand-over costs ~30–60 µs per call. Source warm-ups (in the background after a
load, or for a state whose settings need a new one) run on threads of their own: they compete for the cores anyway
while they run, and their teams end with their threads.

OpenMP teams belong to the process, so the compute thread does too: servers started in one process (tests) share it
(``acquire`` / ``release`` count them), and without a server (the adapters as a library, the evaluation harness,
tools) ``run`` calls in place.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_Job = tuple[Future, Callable[..., Any], tuple[Any, ...]]


def single_threaded() -> None:
    """Make PyTorch's CPU ops on the calling thread single-threaded (the setting is per thread under OpenMP)."""
    torch.set_num_threads(1)


class ComputeThread:
    """Runs callables one at a time on its own thread, with ``threads`` intra-op threads for PyTorch (0: its default,
    every core). A call from the compute thread itself runs in place, so nested calls cannot deadlock."""

    def __init__(self, threads: int = 0, name: str = "ttaserve-compute") -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = threads
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        if threading.current_thread() is self._thread:
            return fn(*args)
        if not self._thread.is_alive():
            raise RuntimeError("the compute thread has stopped")
        future: Future[T] = Future()
        self._jobs.put((future, fn, args))
        return future.result()

    def close(self) -> None:
        """Let queued jobs finish, then end the thread."""
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)

    def _loop(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller, who re-raises it in its own thread
                future.set_exception(exc)


_lock = threading.Lock()
_shared: list[ComputeThread] = []
_users = [0]


def acquire(threads: int = 0) -> ComputeThread:
    """The process's compute thread, started on first use (``threads`` applies then)."""
    with _lock:
        if not _shared:
            _shared.append(ComputeThread(threads))
        _users[0] += 1
        return _shared[0]


def release() -> None:
    """One user fewer; the last one stops the thread."""
    with _lock:
        _users[0] -= 1
        if _users[0] > 0 or not _shared:
            return
        thread = _shared.pop()
    thread.close()


def run(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the process's compute thread when a server runs one, else in place."""
    shared = _shared[0] if _shared else None
    return fn(*args) if shared is None else shared.run(fn, *args)
