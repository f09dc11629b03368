"""Jobs run in the background, in the order they came, so that a request does not wait for a disk write it caused
(a session spilled to disk when the session table overflows)."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

Job = Callable[[], None]


class WriteBehind:
    """One daemon thread, started on first use, runs the jobs one at a time.

    At most ``limit`` jobs wait, and with ``max_size`` the sizes their callers gave (the bytes each keeps alive)
    add up to at most that, the running job's included: a caller that finds no room in the line runs its job
    itself. That bounds what waiting jobs keep alive in memory (a spilled session's state until it is written) and
    slows whoever submits to the disk's pace instead of letting the line grow."""

    def __init__(self, limit: int, name: str, max_size: int | None = None) -> None:
        self.limit = limit
        self.max_size = max_size
        self.name = name
        self._cond = threading.Condition()
        self._jobs: deque[tuple[Job, int]] = deque()
        self._running = False  # the thread is in a job
        self._size = 0  # of the jobs waiting and running
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, job: Job, size: int = 0) -> None:
        """Queue ``job``, which keeps ``size`` bytes alive until it has run; run it in the calling thread when the
        line has no room for it or the writer closed."""
        with self._cond:
            fits = self.max_size is None or self._size + size <= self.max_size
            queued = not self._closed and len(self._jobs) < self.limit and fits
            if queued:
                self._jobs.append((job, size))
                self._size += size
                if self._thread is None:
                    self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                    self._thread.start()
                self._cond.notify_all()
        if not queued:
            _run(job)

    def pending(self) -> int:
        """Jobs queued or running."""
        with self._cond:
            return len(self._jobs) + self._running

    def flush(self) -> None:
        """Wait until every job submitted so far has run."""
        with self._cond:
            while self._jobs or self._running:
                self._cond.wait()

    def close(self) -> None:
        """Run what is queued, then stop the thread; jobs submitted later run in their callers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                job, size = self._jobs.popleft()
                self._running = True
            try:
                _run(job)
            finally:
                with self._cond:
                    self._running = False
                    self._size -= size
                    self._cond.notify_all()


def _run(job: Job) -> None:
    try:
        job()
    except Exception:
        log.exception("background job failed")
