"""The server's PyTorch work runs on one compute thread; the threads that hand it over stay single-threaded."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from support import start, write_model

from ttaserve.adapters import StrategyClosed
from ttaserve.adapters.rmt import RMTConfig
from ttaserve.adapters.tbn import TBN
from ttaserve.server import compute, pipeline, warmup
from ttaserve.server.architectures import build_architecture
from ttaserve.server.engines.torch_engine import TorchEngine
from ttaserve.server.errors import Unavailable


def test_jobs_run_on_the_compute_thread_with_its_thread_count() -> None:
    worker = compute.ComputeThread(threads=2, name="test-compute")
    try:
        name, threads = worker.run(lambda: (threading.current_thread().name, torch.get_num_threads()))
        assert (name, threads) == ("test-compute", 2)
        # a nested call from a job runs in place instead of waiting for itself
        assert worker.run(lambda: worker.run(lambda: threading.current_thread().name)) == "test-compute"
    finally:
        worker.close()


def test_a_failing_job_raises_in_the_caller_and_the_thread_carries_on() -> None:
    worker = compute.ComputeThread()
    try:
        with pytest.raises(ZeroDivisionError):
            worker.run(lambda: 1 / 0)
        assert worker.run(lambda x: x + 1, 41) == 42
    finally:
        worker.close()
    with pytest.raises(RuntimeError, match="compute thread has stopped"):
        worker.run(lambda: None)


def test_single_threaded_applies_to_the_calling_thread_only() -> None:
    def probe(out: list[int]) -> None:
        compute.single_threaded()
        out.append(torch.get_num_threads())

    seen: list[int] = []
    before = torch.get_num_threads()
    thread = threading.Thread(target=probe, args=(seen,))
    thread.start()
    thread.join()
    assert seen == [1]
    assert torch.get_num_threads() == before


def test_without_a_server_work_runs_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compute, "_shared", [])  # as in a process that never started a server
    assert compute.run(lambda: threading.current_thread()) is threading.current_thread()


def test_the_shared_thread_lives_while_a_server_uses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compute, "_shared", [])
    monkeypatch.setattr(compute, "_users", [0])
    first = compute.acquire()
    try:
        assert compute.acquire() is first
        compute.release()
        assert compute.run(lambda: threading.current_thread().name) == "ttaserve-compute"
    finally:
        compute.release()
    assert compute._shared == []
    with pytest.raises(RuntimeError, match="compute thread has stopped"):
        first.run(lambda: None)


def test_served_forwards_and_steps_run_on_the_compute_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    config = {
        "platform": "pytorch",
        "architecture": "small_resnet",
        "architecture_args": {"num_classes": 3, "in_channels": 3},
        "input": {"height": 4, "width": 4, "channels": 3, "layout": "NHWC"},
    }
    write_model(
        tmp_path, "tiny", config, {1: build_architecture("small_resnet", num_classes=3, in_channels=3).state_dict()}
    )
    seen: list[tuple[str, str, int]] = []
    step, forward = TBN.step, TorchEngine._forward

    def recorded_step(self: TBN, *args: object) -> object:
        seen.append(("step", threading.current_thread().name, torch.get_num_threads()))
        return step(self, *args)

    def recorded_forward(self: TorchEngine, x: np.ndarray) -> np.ndarray:
        seen.append(("forward", threading.current_thread().name, torch.get_num_threads()))
        return forward(self, x)

    def recorded_parse(*args: object) -> object:
        seen.append(("handler", threading.current_thread().name, torch.get_num_threads()))
        return parse(*args)

    parse = pipeline.parse_request
    monkeypatch.setattr(TBN, "step", recorded_step)
    monkeypatch.setattr(TorchEngine, "_forward", recorded_forward)
    monkeypatch.setattr(pipeline, "parse_request", recorded_parse)
    users = compute._users[0]  # other tests' servers may share the thread
    handle = start(tmp_path, metrics_port=None, torch_threads=2)
    try:
        compute_threads = compute.run(torch.get_num_threads)
        client = tc.InferenceServerClient(f"127.0.0.1:{handle.grpc_port}")
        tensor = tc.InferInput("input", [2, 4, 4, 3], "UINT8")
        tensor.set_data_from_numpy(np.zeros((2, 4, 4, 3), dtype=np.uint8))
        for strategy in ("none", "tbn"):
            client.infer("tiny", [tensor], parameters={"tta_strategy": strategy})
    finally:
        handle.stop()
    computed = {(name, threads) for kind, name, threads in seen if kind != "handler"}
    handlers = {(name.split("_")[0], threads) for kind, name, threads in seen if kind == "handler"}
    assert {kind for kind, _, _ in seen} == {"step", "forward", "handler"}
    assert computed == {("ttaserve-compute", compute_threads)}  # the load's probe forward too
    assert compute_threads == 2 or users > 0  # 2 as configured, unless another server had started the thread
    assert handlers == {("ttaserve-rpc", 1)}
    assert compute._users[0] == users


class _RecordingStrategy:
    name = "rmt"

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail
        self.seen: list[tuple[str, int]] = []

    def init_state(self, settings: object) -> str:
        self.seen.append((threading.current_thread().name, torch.get_num_threads()))
        if self.fail is not None:
            raise self.fail
        return "state"


def _from_a_single_threaded_handler(fn: Callable[[], object]) -> object:
    """``fn()`` on a thread set up like a gRPC worker; returns its result or the exception it raised."""
    outcome: list[object] = []

    def target() -> None:
        compute.single_threaded()
        try:
            outcome.append(fn())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    return outcome[0]


def test_a_state_that_may_warm_up_is_built_on_a_thread_that_may_use_every_core() -> None:
    model = SimpleNamespace(name="m", warmups={})
    strategy = _RecordingStrategy()
    fresh: list[int] = []
    probe = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    probe.start()
    probe.join()

    result = _from_a_single_threaded_handler(lambda: warmup.initial_state(model, strategy, RMTConfig(), None))
    assert result == "state"
    assert strategy.seen == [("ttaserve-init-state", fresh[0])]

    without_warmup = _from_a_single_threaded_handler(
        lambda: warmup.initial_state(model, strategy, RMTConfig(warmup_samples=0), None)
    )
    assert without_warmup == "state"
    assert strategy.seen[1][1] == 1  # no warm-up: built in place, on the single-threaded handler


def test_a_warm_up_interrupted_by_an_unload_is_answered_unavailable() -> None:
    model = SimpleNamespace(name="m", warmups={})
    strategy = _RecordingStrategy(fail=StrategyClosed("closed"))
    result = _from_a_single_threaded_handler(lambda: warmup.initial_state(model, strategy, RMTConfig(), None))
    assert isinstance(result, Unavailable) and "unloaded or reloaded" in str(result)
