"""Per model-version counters in the shape of Triton's ModelStatistics (durations in nanoseconds)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ttaserve.protocol import kserve_v2_pb2 as pb


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


class ModelStatistics:
    """Thread-safe counters: ``record_request`` per request, ``record_execution`` per engine run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, BatchDurations] = {}

    def record_request(
        self,
        *,
        ok: bool,
        total_ns: int,
        queue_ns: int = 0,
        input_ns: int = 0,
        infer_ns: int = 0,
        output_ns: int = 0,
        rows: int = 0,
    ) -> None:
        with self._lock:
            if not ok:
                self.fail.add(total_ns)
                return
            self.success.add(total_ns)
            self.queue.add(queue_ns)
            self.compute_input.add(input_ns)
            self.compute_infer.add(infer_ns)
            self.compute_output.add(output_ns)
            self.inference_count += rows
            self.last_inference_ms = int(time.time() * 1000)

    def record_execution(self, batch_size: int, infer_ns: int) -> None:
        with self._lock:
            self.execution_count += 1
            self.batches.setdefault(batch_size, BatchDurations()).compute_infer.add(infer_ns)

    def to_proto(self, name: str, version: str) -> pb.ModelStatistics:
        with self._lock:
            message = pb.ModelStatistics(
                name=name,
                version=version,
                last_inference=self.last_inference_ms,
                inference_count=self.inference_count,
                execution_count=self.execution_count,
            )
            stats = message.inference_stats
            for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
                duration: Duration = getattr(self, key)
                target = getattr(stats, key)
                target.count, target.ns = duration.count, duration.ns
            for size in sorted(self.batches):
                entry = message.batch_stats.add(batch_size=size)
                infer = self.batches[size].compute_infer
                entry.compute_infer.count, entry.compute_infer.ns = infer.count, infer.ns
            return message
