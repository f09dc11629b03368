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

    At most ``limit`` jobs wait: a caller that finds the line full runs its job itself. That bounds what waiting
    jobs keep alive in memory (a spilled session's state until it is written) and slows whoever submits to the
    disk's pace instead of letting the line grow."""

    def __init__(self, limit: int, name: str) -> None:
        self.limit = limit
        self.name = name
        self._cond = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._running = False  # the thread is in a job
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, job: Job) -> None:
        """Queue ``job``; run it in the calling thread when the line is full or the writer closed."""
        with self._cond:
            queued = not self._closed and len(self._jobs) < self.limit
            if queued:
                self._jobs.append(job)
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
                job = self._jobs.popleft()
                self._running = True
            try:
                _run(job)
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()


def _run(job: Job) -> None:
    try:
        job()
    except Exception:
        log.exception("background job failed")
