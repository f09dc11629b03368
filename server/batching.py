"""Dynamic batching of concurrent stateless requests to one model, and the model's concurrent executions.

Leader/follower, no extra thread: a request that finds an execution slot free runs at once, taking every request
queued behind it (up to ``max_batch_size`` rows) into the same forward pass; requests that arrive while every slot
is running wait and form the next batch. At low load this adds no latency (no hand-off between threads, no timer);
under load batches grow by themselves. ``max_queue_delay_us`` > 0 additionally lets a leader wait that long for more
rows, as Triton's dynamic batcher does, trading latency for larger batches. ``instances`` forward passes may run at
once (Triton's instance count); with ``max_batch_size`` 1 this is a plain bound on concurrent executions, which is
how a model without dynamic batching is served.

Each caller gets exactly its own rows back: rows are concatenated in queue order and split by the same offsets.
A request whose deadline passed while it was queued is answered DEADLINE_EXCEEDED instead of being run, and one
whose client went away (cancelled the call, or closed the connection) CANCELLED: under overload the forward passes
go to requests whose clients still wait for them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import Cancelled, DeadlineExceeded, ServingError


def no_longer_awaited(
    deadline: float | None, abandoned: Callable[[], bool] | None, now: float
) -> tuple[type[ServingError], str] | None:
    """Why a waiting request is not worth running any more (the error to answer and what happened), or None."""
    if deadline is not None and now >= deadline:
        return DeadlineExceeded, "the deadline passed"
    if abandoned is not None and abandoned():
        return Cancelled, "the client went away"
    return None


@dataclass
class _Item:
    rows: np.ndarray
    enqueued_ns: int
    #: ``time.monotonic()`` after which the request is not worth running (None: never)
    deadline: float | None = None
    #: True once the client no longer waits for the answer (None: it cannot tell)
    abandoned: Callable[[], bool] | None = None
    done: bool = False
    result: np.ndarray | None = None
    error: BaseException | None = None
    #: popped into a batch by a leader (this request's own thread or another)
    taken: bool = False
    queue_ns: int = 0
    batch_size: int = 0
    extra: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchedResult:
    output: np.ndarray
    queue_ns: int
    infer_ns: int
    batch_size: int


class DynamicBatcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int,
        max_queue_delay_us: int = 0,
        on_execution: Callable[[int, int], None] | None = None,
        instances: int = 1,
    ) -> None:
        self._run = run
        self._max_rows = max_batch_size
        self._instances = instances
        self._delay_s = max_queue_delay_us / 1e6
        self._on_execution = on_execution
        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._running = 0  # executions in progress, at most ``instances``

    def submit(
        self, rows: np.ndarray, deadline: float | None = None, abandoned: Callable[[], bool] | None = None
    ) -> BatchedResult:
        """Run ``rows`` in the next forward pass that has room; DeadlineExceeded when ``deadline`` (on the
        ``time.monotonic()`` clock) passes before one takes them, Cancelled when ``abandoned()`` says the client
        left by then."""
        item = _Item(rows=rows, enqueued_ns=time.perf_counter_ns(), deadline=deadline, abandoned=abandoned)
        with self._cond:
            self._queue.append(item)
            if self._delay_s > 0:
                self._cond.notify_all()  # a leader waiting for more rows counts this one
        while True:
            with self._cond:
                while not item.done and (item.taken or self._running >= self._instances):
                    self._cond.wait()
                if item.done:
                    return self._result(item)
                self._running += 1
                batch = self._take_batch()
            # this thread leads `batch` (its own item first unless the queue held earlier requests); the batch is
            # empty when, with several instances, other leaders took every row while this one waited for more
            try:
                if batch:
                    self._execute(batch)
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()

    def _take_batch(self) -> list[_Item]:
        """Pop up to max rows (called with the lock held); optionally wait ``max_queue_delay`` for more."""
        if self._delay_s > 0:
            deadline = time.perf_counter() + self._delay_s
            while self._queued_rows() < self._max_rows:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        batch: list[_Item] = []
        rows = 0
        now = time.monotonic()
        while self._queue:
            size = len(self._queue[0].rows)
            if batch and rows + size > self._max_rows:
                break
            taken = self._queue.popleft()
            taken.taken = True
            reason = no_longer_awaited(taken.deadline, taken.abandoned, now)
            if reason is not None:
                self._drop(taken, *reason)
                continue
            batch.append(taken)
            rows += size
        return batch

    def _drop(self, item: _Item, error: type[ServingError], what: str) -> None:
        """Answer a queued request that is no longer worth running without running it (called with the lock held)."""
        waited = (time.perf_counter_ns() - item.enqueued_ns) / 1e9
        item.error = error(f"{what} while the request waited {waited:.3f} s in the queue")
        item.done = True
        self._cond.notify_all()

    def _queued_rows(self) -> int:
        return sum(len(item.rows) for item in self._queue)

    def _execute(self, batch: list[_Item]) -> None:
        start = time.perf_counter_ns()
        try:
            stacked = batch[0].rows if len(batch) == 1 else np.concatenate([item.rows for item in batch])
            output = self._run(stacked)
        except BaseException as exc:  # every waiting caller must learn of the failure
            for item in batch:
                item.error, item.done = exc, True
            return
        infer_ns = time.perf_counter_ns() - start
        if self._on_execution is not None:
            self._on_execution(len(stacked), infer_ns)
        offset = 0
        for item in batch:
            count = len(item.rows)
            item.result = output[offset : offset + count]
            item.queue_ns = start - item.enqueued_ns
            item.batch_size = len(stacked)
            item.extra["infer_ns"] = infer_ns
            item.done = True
            offset += count

    @staticmethod
    def _result(item: _Item) -> BatchedResult:
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return BatchedResult(item.result, item.queue_ns, item.extra["infer_ns"], item.batch_size)
