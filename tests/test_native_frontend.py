"""The native gRPC front end (``server/frontend.cc``) against grpcio's Python server: the same answers, statuses and
stream behaviour for calls the servicers never see (unknown methods, unparseable bytes), for cancelled and
interrupted streams, and for many callers at once; ``frontend: auto`` falls back when the library cannot be built."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import native_races
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import native_frontend_or_skip, start

from ttaserve.adapters import native
from ttaserve.server import native_frontend
from ttaserve.server.app import ServerHandle

MODEL = "fashion_mnist"  # the embedded default model


@pytest.fixture(scope="module", params=["native", "python"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    if request.param == "native":
        native_frontend_or_skip()
    handle = start(None, metrics_port=None, frontend=request.param, snapshot_dir=tmp_path_factory.mktemp("snap"))
    yield handle
    handle.stop()


@pytest.fixture
def channel(served: ServerHandle) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as opened:
        yield opened


def images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 28, 28, 1), dtype=np.uint8)


def logits(client: tc.InferenceServerClient, batch: np.ndarray) -> np.ndarray:
    tensor = tc.InferInput("input", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    return client.infer(MODEL, [tensor], outputs=[tc.InferRequestedOutput("logits")]).as_numpy("logits")


def test_an_unknown_method_is_unimplemented(channel: grpc.Channel) -> None:
    call = channel.unary_unary("/inference.GRPCInferenceService/NoSuchMethod")
    with pytest.raises(grpc.RpcError) as raised:
        call(b"", timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_bytes_that_do_not_parse_are_internal_and_the_server_keeps_serving(
    channel: grpc.Channel, served: ServerHandle
) -> None:
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as raised:
        call(b"\xff\xff\xff\xff", timeout=10)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "deserializing" in (raised.value.details() or "")
    assert logits(tc.InferenceServerClient(f"127.0.0.1:{served.grpc_port}"), images(1, 0)).shape == (1, 10)


def test_a_status_set_without_abort_reaches_the_client(channel: grpc.Channel) -> None:
    """grpc-health's Check sets NOT_FOUND on its context and returns an empty response."""
    stub = health_pb2_grpc.HealthStub(channel)
    assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == 1  # SERVING
    with pytest.raises(grpc.RpcError) as raised:
        stub.Check(health_pb2.HealthCheckRequest(service="no-such-service"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_cancelled_watch_is_forgotten_by_the_servicer(channel: grpc.Channel, served: ServerHandle) -> None:
    """Cancelling a server stream runs the callbacks the handler registered on its context."""
    stub = health_pb2_grpc.HealthStub(channel)
    watchers = served.health.servicer._send_response_callbacks
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="liveness"))
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    assert eventually(lambda: len(watchers.get("liveness", ())) == 1)  # registered just after the first answer
    watch.cancel()
    assert eventually(lambda: not watchers["liveness"])


def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_watch_sees_a_status_change(channel: grpc.Channel, served: ServerHandle) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="watched"), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    served.health.servicer.set("watched", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()


def test_many_callers_at_once_each_get_their_own_answers(served: ServerHandle) -> None:
    url = f"127.0.0.1:{served.grpc_port}"
    batches = [images(1 + seed % 3, seed) for seed in range(48)]
    alone = [logits(tc.InferenceServerClient(url), batch) for batch in batches]

    def caller(first: int) -> list[np.ndarray]:
        client = tc.InferenceServerClient(url)
        return [logits(client, batches[i]) for i in range(first, len(batches), 8)]

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(caller, range(8)))
    for first, answers in enumerate(together):
        for i, answer in zip(range(first, len(batches), 8), answers, strict=True):
            np.testing.assert_allclose(answer, alone[i], rtol=1e-4, atol=1e-4)


def test_handlers_that_block_leave_a_thread_to_read_new_calls() -> None:
    """Only two of the pool's threads poll at once; each one that takes a call hands polling on, so five blocked
    handlers on a six-thread pool still leave one to read and answer a sixth call."""
    native_frontend_or_skip()
    release, entered = threading.Event(), threading.Semaphore(0)

    def blocking(request: bytes, context: grpc.ServicerContext) -> bytes:
        entered.release()
        release.wait(30)
        return b"late " + request

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"echo " + request

    handlers = {
        "Block": grpc.unary_unary_rpc_method_handler(blocking),
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
    }
    try:
        with native_races.probe_server(handlers, threads=6) as opened:
            block, echo_call = opened.unary_unary("/probe.Probe/Block"), opened.unary_unary("/probe.Probe/Echo")
            blocked = [block.future(bytes([i]), timeout=60) for i in range(5)]
            for _ in range(5):
                assert entered.acquire(timeout=30)
            assert echo_call(b"x", timeout=10) == b"echo x"
            release.set()
            assert sorted(f.result() for f in blocked) == [b"late " + bytes([i]) for i in range(5)]
            assert echo_call(b"y", timeout=10) == b"echo y"
    finally:
        release.set()


def test_streams_cancelled_while_the_server_writes_leave_it_serving() -> None:
    native_frontend_or_skip()
    native_races.cancel_streams_while_the_server_writes(300)


def test_no_freed_call_is_touched_under_address_sanitizer(tmp_path: Path) -> None:
    """The same races with frontend.cc built with AddressSanitizer, in a process of its own: a write or status for a
    call that the done tag freed a moment before is reported there (it once was, in ttaserve_frontend_write), where
    in a plain build it corrupts memory silently, or not at all."""
    native_frontend_or_skip()
    runtime = subprocess.run(["c++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not Path(runtime).is_absolute():
        pytest.skip("the C++ compiler here has no AddressSanitizer runtime (libasan)")
    compiler = tmp_path / "c++-asan"
    compiler.write_text('#!/bin/sh\nexec c++ -fsanitize=address -fno-omit-frame-pointer "$@"\n')
    compiler.chmod(0o755)
    environment = {
        **os.environ,
        "CXX": str(compiler),
        "TTASERVE_CACHE": str(tmp_path / "cache"),
        "LD_PRELOAD": runtime,
        "ASAN_OPTIONS": "detect_leaks=0",  # the interpreter keeps its objects to the end; only memory errors count
    }
    script = Path(native_races.__file__)
    done = subprocess.run(
        [sys.executable, str(script), "300"], env=environment, capture_output=True, text=True, timeout=600
    )
    assert "AddressSanitizer" not in done.stderr, done.stderr[-4000:]
    assert done.returncode == 0 and "no race found" in done.stdout, done.stderr[-4000:]


def test_stop_ends_open_streams(tmp_path: Path) -> None:
    native_frontend_or_skip()
    handle = start(None, metrics_port=None, frontend="native", snapshot_dir=tmp_path)
    with grpc.insecure_channel(f"127.0.0.1:{handle.grpc_port}") as opened:
        watch = health_pb2_grpc.HealthStub(opened).Watch(health_pb2.HealthCheckRequest(service="liveness"))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopping = threading.Thread(target=handle.stop)
        stopping.start()
        stopping.join(timeout=30)
        assert not stopping.is_alive()
        with pytest.raises(grpc.RpcError) as raised:
            for _ in watch:
                pass
        assert raised.value.code() in {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}


def test_the_server_reports_its_front_end(tmp_path: Path) -> None:
    native_frontend_or_skip()
    handle = start(None, metrics_port=None, frontend="auto", snapshot_dir=tmp_path)
    try:
        (info,) = [f for f in handle.metrics.registry.collect() if f.name == "ttaserve_server"]
        assert info.samples[0].labels["frontend"] == "native"
        assert isinstance(handle.server, native_frontend.NativeServer)
    finally:
        handle.stop()


def test_auto_falls_back_to_the_python_server_when_the_library_cannot_be_built(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(native_frontend, "_library", [])
    monkeypatch.setenv("TTASERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "no-such-compiler-ttaserve")
    with pytest.raises(RuntimeError, match="frontend 'native' asked for, but it cannot be built"):
        start(None, metrics_port=None, frontend="native", snapshot_dir=tmp_path)
    with caplog.at_level(logging.WARNING):
        handle = start(None, metrics_port=None, frontend="auto", snapshot_dir=tmp_path)
    try:
        assert "native gRPC front end unavailable" in caplog.text
        assert "no compiler 'no-such-compiler-ttaserve'" in caplog.text
        assert isinstance(handle.server, grpc.Server)
        assert logits(tc.InferenceServerClient(f"127.0.0.1:{handle.grpc_port}"), images(2, 1)).shape == (2, 10)
    finally:
        handle.stop()


def test_a_prebuilt_front_end_serves_where_it_cannot_be_built(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A runtime image: the library was built into the cache folder (with the compiler, headers and pkg-config of a
    build stage); the running server has none of those and still gets the native front end."""
    native_frontend_or_skip()
    monkeypatch.setenv("TTASERVE_CACHE", str(tmp_path / "cache"))
    built = native_frontend.build_library()
    native.build_library()  # the C kernels too, so that nothing this server loads needs a compiler
    monkeypatch.setattr(native_frontend, "_library", [])
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools-here"))
    assert shutil.which("pkg-config") is None and shutil.which("c++") is None
    assert native_frontend.build_library() == built
    handle = start(None, metrics_port=None, frontend="native", snapshot_dir=tmp_path)
    try:
        assert isinstance(handle.server, native_frontend.NativeServer)
        assert logits(tc.InferenceServerClient(f"127.0.0.1:{handle.grpc_port}"), images(3, 2)).shape == (3, 10)
    finally:
        handle.stop()


@pytest.mark.parametrize("frontend", ["native", "python"])
def test_a_port_in_use_fails_with_its_address(frontend: str, tmp_path: Path) -> None:
    if frontend == "native":
        native_frontend_or_skip()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"cannot bind gRPC port 127.0.0.1:{port}"):
            start(None, metrics_port=None, frontend=frontend, grpc_port=port, snapshot_dir=tmp_path)
