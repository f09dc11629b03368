"""Dynamic batching: concurrent stateless requests share forward passes and each caller gets exactly its own rows."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import tritonclient.grpc as tc
from support import normalise, seeded_resnet20

from ttaserve.server.batching import DynamicBatcher


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
