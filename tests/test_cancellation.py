"""A request whose client leaves while it waits in the batcher's queue or for its session is dropped unrun: on both
gRPC front ends the client's cancel reaches the server as the end of the call, over HTTP as the connection closing."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as httpclient
from support import cifar_resnet20_config, native_frontend_or_skip, seeded_resnet20, start, write_model

from opskit.procs import wait_until
from ttaserve.protocol import grpc_service_pb2_grpc
from ttaserve.server.app import ServerHandle


class Stall:
    """Wraps a served model's forward or a strategy's step: the first call holds until released, and every call's
    row count is recorded (which requests ran)."""

    def __init__(self, run: Callable[..., Any], rows_of: Callable[..., int]) -> None:
        self._run = run
        self._rows_of = rows_of
        self.sizes: list[int] = []
        self.release = threading.Event()

    def __call__(self, *args: Any) -> Any:
        self.sizes.append(self._rows_of(*args))
        self.release.wait(30)
        return self._run(*args)


@pytest.fixture(params=["python", "native"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerHandle]:
    if request.param == "native":
        native_frontend_or_skip()
    write_model(tmp_path / "repo", "m", cifar_resnet20_config(), {1: seeded_resnet20(0).state_dict()})
    handle = start(tmp_path / "repo", frontend=request.param)
    yield handle
    handle.stop()


def infer_request(images: np.ndarray) -> tc.service_pb2.ModelInferRequest:
    tensor = tc.InferInput("input", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    request = tc.service_pb2.ModelInferRequest(model_name="m")
    request.inputs.extend([tensor._get_tensor()])
    request.raw_input_contents.extend([tensor._get_content()])
    return request


def http_input(images: np.ndarray) -> httpclient.InferInput:
    tensor = httpclient.InferInput("input", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    return tensor


def test_a_cancelled_request_is_not_run(served: ServerHandle, real_images: np.ndarray) -> None:
    batcher = served.repository.get("m").batcher
    stalled = Stall(batcher._run, len)
    batcher._run = stalled
    url = f"127.0.0.1:{served.grpc_port}"
    with grpc.insecure_channel(url) as channel:
        infer = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        running = infer.future(infer_request(real_images[:1]))
        wait_until(lambda: stalled.sizes == [1], 10, "the first execution running")
        cancelled = infer.future(infer_request(real_images[1:3]))
        staying = infer.future(infer_request(real_images[3:6]))
        wait_until(lambda: len(batcher._queue) == 2, 10, "both requests queued")
        cancelled.cancel()
        left = next(item for item in batcher._queue if len(item.rows) == 2)
        wait_until(left.abandoned, 10, "the server seeing the client's cancel")
        stalled.release.set()
        assert running.result(30).outputs[0].shape == [1, 10]
        assert staying.result(30).outputs[0].shape == [3, 10]
        assert cancelled.cancelled()
    assert stalled.sizes == [1, 3], "the cancelled request's two rows took part in no forward pass"
    outcome = {"model": "m", "version": "1", "strategy": "none", "outcome": "cancelled"}
    wait_until(
        lambda: served.metrics.registry.get_sample_value("ttaserve_requests_total", outcome) == 1,
        10,
        "the cancelled request counted",
    )


def session_request(images: np.ndarray, **flags: bool) -> tc.service_pb2.ModelInferRequest:
    request = infer_request(images)
    request.parameters["tta_strategy"].string_param = "tent"
    request.parameters["sequence_id"].string_param = "cam-1"
    for name, value in flags.items():
        request.parameters[name].bool_param = value
    return request


@pytest.mark.parametrize("leaving", ["cancel", "deadline"])
def test_a_session_step_whose_client_left_while_waiting_for_its_session_is_not_applied(
    served: ServerHandle, real_images: np.ndarray, leaving: str
) -> None:
    """The step leaves the session's line as soon as its client cancels or its deadline passes, while the step ahead
    of it still runs, and is never applied."""
    strategy = served.repository.get("m").strategy("tent")
    stalled = Stall(strategy.step, lambda state, x, settings: len(x))
    strategy.step = stalled
    url = f"127.0.0.1:{served.grpc_port}"
    with grpc.insecure_channel(url) as channel:
        infer = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        first = infer.future(session_request(real_images[:1], sequence_start=True))
        wait_until(lambda: stalled.sizes == [1], 10, "the session's first step running")
        left = infer.future(session_request(real_images[1:3]), timeout=0.5 if leaving == "deadline" else None)
        wait_until(lambda: served.inflight.count == 2, 10, "the second step waiting for the session")
        if leaving == "cancel":
            left.cancel()
        outcome = {"model": "m", "version": "1", "strategy": "tent"}
        outcome["outcome"] = "cancelled" if leaving == "cancel" else "timeout"
        wait_until(
            lambda: served.metrics.registry.get_sample_value("ttaserve_requests_total", outcome) == 1,
            10,
            "the waiting step answered while the step ahead of it still runs",
        )
        assert stalled.sizes == [1] and not stalled.release.is_set()
        stalled.release.set()
        assert first.result(30).parameters["tta_session_steps"].int64_param == 1
        last = infer(session_request(real_images[3:6], sequence_end=True), timeout=30)
    assert last.parameters["tta_session_steps"].int64_param == 2, "the step whose client left was not applied"
    assert stalled.sizes == [1, 3]


def test_a_rest_request_whose_client_hung_up_is_not_run(
    served: ServerHandle, real_images: np.ndarray, capfd: pytest.CaptureFixture[str]
) -> None:
    """Over HTTP the client leaves by closing its connection; the queued request is dropped unrun, and the answer
    that cannot be delivered is no traceback on stderr."""
    batcher = served.repository.get("m").batcher
    stalled = Stall(batcher._run, len)
    batcher._run = stalled
    url = f"127.0.0.1:{served.http_port}"
    first, staying = (httpclient.InferenceServerClient(url) for _ in range(2))
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(first.infer, "m", [http_input(real_images[:1])])
        wait_until(lambda: stalled.sizes == [1], 10, "the first execution running")
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [2, 32, 32, 3],
                        "datatype": "UINT8",
                        "data": real_images[1:3].ravel().tolist(),
                    }
                ]
            }
        ).encode()
        with socket.create_connection(("127.0.0.1", served.http_port)) as hanging_up:
            hanging_up.sendall(
                b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            wait_until(lambda: len(batcher._queue) == 1, 10, "the request queued")
        left = batcher._queue[0]
        wait_until(left.abandoned, 10, "the server seeing the hang-up")
        waiting = pool.submit(staying.infer, "m", [http_input(real_images[3:6])])
        wait_until(lambda: len(batcher._queue) == 2, 10, "the second request queued")
        stalled.release.set()
        assert running.result(30).as_numpy("logits").shape == (1, 10)
        assert waiting.result(30).as_numpy("logits").shape == (3, 10)
    assert stalled.sizes == [1, 3], "the abandoned request's two rows took part in no forward pass"
    assert "Traceback" not in capfd.readouterr().err
