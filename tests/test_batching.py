"""Dynamic batching: concurrent stateless requests share forward passes and each caller gets exactly its own rows."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from support import normalise, seeded_resnet20
from tritonclient.utils import InferenceServerException

from opskit.procs import wait_until
from ttaserve.server.batching import DynamicBatcher
from ttaserve.server.errors import Cancelled, DeadlineExceeded


def test_batcher_returns_each_callers_rows() -> None:
    calls: list[int] = []

    def run(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        time.sleep(0.005)  # long enough for followers to queue up behind the leader
        return x * 2.0

    batcher = DynamicBatcher(run, max_batch_size=16)
    requests = [np.full((1 + i % 3, 4), float(i), np.float32) for i in range(60)]
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(batcher.submit, requests))
    for sent, got in zip(requests, results, strict=True):
        np.testing.assert_array_equal(got.output, sent * 2.0)
    assert len(calls) < len(requests), "concurrent requests should have shared executions"
    assert max(calls) <= 16 and sum(calls) == sum(len(r) for r in requests)


def test_batcher_propagates_errors_to_every_caller() -> None:
    def run(x: np.ndarray) -> np.ndarray:
        time.sleep(0.005)
        raise ValueError("engine failed")

    batcher = DynamicBatcher(run, max_batch_size=8)
    errors: list[str] = []

    def submit() -> None:
        try:
            batcher.submit(np.zeros((1, 2), np.float32))
        except ValueError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert errors == ["engine failed"] * 6


def test_batcher_waits_max_queue_delay_for_more_rows() -> None:
    sizes: list[int] = []
    batcher = DynamicBatcher(lambda x: sizes.append(len(x)) or x, max_batch_size=4, max_queue_delay_us=200_000)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(batcher.submit, [np.zeros((1, 1), np.float32)] * 4))
    assert sizes == [4], "the leader should have waited for the other three rows"


class ConcurrencyProbe:
    """An engine that records how many of its runs overlap."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.sizes: list[int] = []

    def run(self, x: np.ndarray) -> np.ndarray:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.sizes.append(len(x))
        time.sleep(0.01)
        with self.lock:
            self.running -= 1
        return x + 1.0


@pytest.mark.parametrize("instances", [1, 2, 3])
def test_instances_bound_the_executions_that_overlap(instances: int) -> None:
    probe = ConcurrencyProbe()
    batcher = DynamicBatcher(probe.run, max_batch_size=4, instances=instances)
    requests = [np.full((1 + i % 2, 3), float(i), np.float32) for i in range(48)]
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(batcher.submit, requests))
    for sent, got in zip(requests, results, strict=True):
        np.testing.assert_array_equal(got.output, sent + 1.0)
    assert probe.most == instances, f"{probe.most} executions overlapped with {instances} instance(s)"
    assert max(probe.sizes) <= 4 and sum(probe.sizes) == sum(len(r) for r in requests)


def test_without_batching_each_execution_serves_one_request() -> None:
    """A model without dynamic batching is served through a batcher of one request per execution."""
    probe = ConcurrencyProbe()
    batcher = DynamicBatcher(probe.run, max_batch_size=1, instances=2)
    requests = [np.full((3, 2), float(i), np.float32) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(batcher.submit, requests))
    assert probe.sizes == [3] * 16 and probe.most == 2
    for sent, got in zip(requests, results, strict=True):
        np.testing.assert_array_equal(got.output, sent + 1.0)


def test_two_instances_with_a_queue_delay_serve_every_request_once() -> None:
    """Two leaders may wait for rows at once and one may find the queue emptied by the other: every request is
    still run exactly once and answered with its own rows."""
    probe = ConcurrencyProbe()
    batcher = DynamicBatcher(probe.run, max_batch_size=8, max_queue_delay_us=20_000, instances=2)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(batcher.submit, [np.full((1, 1), float(i), np.float32) for i in range(30)]))
    assert [float(r.output[0, 0]) for r in results] == [i + 1.0 for i in range(30)]
    assert min(probe.sizes) >= 1 and sum(probe.sizes) == 30


@pytest.mark.parametrize(("gives_up", "error"), [("deadline", DeadlineExceeded), ("client leaves", Cancelled)])
def test_a_request_nobody_waits_for_any_more_is_not_run(gives_up: str, error: type[Exception]) -> None:
    """Behind a running execution, a request whose deadline passes, or whose client goes away, is answered without
    taking a forward pass; the one queued with it still runs."""
    release, gone = threading.Event(), threading.Event()
    sizes: list[int] = []

    def run(x: np.ndarray) -> np.ndarray:
        sizes.append(len(x))
        release.wait(30)
        return x + 1.0

    batcher = DynamicBatcher(run, max_batch_size=8)
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(batcher.submit, np.zeros((1, 2), np.float32), None, gone.is_set)
        wait_until(lambda: sizes == [1], 10, "the first execution running")
        leaving = (time.monotonic() + 0.05, None) if gives_up == "deadline" else (None, gone.is_set)
        left = pool.submit(batcher.submit, np.zeros((2, 2), np.float32), *leaving)
        staying = pool.submit(batcher.submit, np.ones((3, 2), np.float32), time.monotonic() + 60, lambda: False)
        wait_until(lambda: len(batcher._queue) == 2, 10, "both requests queued")
        gone.set()  # the running execution is not interrupted
        time.sleep(0.1)  # past the deadline
        release.set()
        np.testing.assert_array_equal(staying.result(30).output, np.full((3, 2), 2.0, np.float32))
        with pytest.raises(error, match="in the queue"):
            left.result(30)
        assert running.result(30).output.shape == (1, 2)
    assert sizes == [1, 3], "the request nobody waited for took no rows in any execution"


def test_concurrent_grpc_clients_get_their_own_rows(url: str, real_images: np.ndarray, server) -> None:
    reference = seeded_resnet20(0)
    with torch.inference_mode():
        expected = reference(normalise(real_images[:64])).numpy()
    client = tc.InferenceServerClient(url)
    before = {s.batch_size for s in client.get_inference_statistics("resnet", "2").model_stats[0].batch_stats}

    def call(index: int) -> tuple[int, np.ndarray]:
        rows = slice(index, index + 1)
        tensor = tc.InferInput("input", [1, 32, 32, 3], "UINT8")
        tensor.set_data_from_numpy(real_images[rows])
        local = tc.InferenceServerClient(url)
        return index, local.infer("resnet", [tensor], outputs=[tc.InferRequestedOutput("logits")]).as_numpy("logits")

    with ThreadPoolExecutor(8) as pool:
        for index, logits in pool.map(call, list(range(64)) * 3):
            np.testing.assert_allclose(logits[0], expected[index], rtol=1e-4, atol=1e-4)
    stats = client.get_inference_statistics("resnet", "2").model_stats[0]
    sizes = {s.batch_size for s in stats.batch_stats}
    assert any(size > 1 for size in sizes - before), f"no batched execution happened: {sorted(sizes)}"


def test_the_triton_timeout_parameter_is_a_deadline(url: str, real_images: np.ndarray, server) -> None:
    """``tritonclient``'s ``timeout=`` (microseconds, sent as the ``timeout`` parameter): a request still waiting
    when it runs out is refused unrun, stateless or in a session (whose step is then not applied)."""
    client = tc.InferenceServerClient(url)
    tensor = tc.InferInput("input", [4, 32, 32, 3], "UINT8")
    tensor.set_data_from_numpy(real_images[:4])
    outputs = [tc.InferRequestedOutput("logits")]
    assert client.infer("resnet", [tensor], outputs=outputs, timeout=10_000_000).as_numpy("logits").shape == (4, 10)
    with pytest.raises(InferenceServerException) as expired:
        client.infer("resnet", [tensor], outputs=outputs, timeout=1)
    assert expired.value.status() == "StatusCode.DEADLINE_EXCEEDED" and "in the queue" in expired.value.message()
    session = {"sequence_id": "timeout-1", "parameters": {"tta_strategy": "tent"}}
    client.infer("resnet", [tensor], outputs=outputs, sequence_start=True, **session)
    with pytest.raises(InferenceServerException) as late_step:
        client.infer("resnet", [tensor], outputs=outputs, timeout=1, **session)
    assert late_step.value.status() == "StatusCode.DEADLINE_EXCEEDED" and "not applied" in late_step.value.message()
    after = client.infer("resnet", [tensor], outputs=outputs, sequence_end=True, **session)
    assert after.get_response().parameters["tta_session_steps"].int64_param == 2
    with pytest.raises(InferenceServerException) as negative:
        client.infer("resnet", [tensor], outputs=outputs, timeout=-5)
    assert negative.value.status() == "StatusCode.INVALID_ARGUMENT" and "'timeout'" in negative.value.message()
