"""gRPC health checking follows the repository: models loaded or unloaded at run time, failed loads, the drain."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from support import cifar_resnet20_config, seeded_resnet20, start, write_model

from ttaserve.server.health_board import LIVENESS_SERVICE, HealthBoard

SERVING = "SERVING"
NOT_SERVING = "NOT_SERVING"


def status(stub: health_pb2_grpc.HealthStub, service: str) -> str:
    """The name of the status the server reports for ``service``; ``NOT_FOUND`` for a name it does not know."""
    try:
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    except grpc.RpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for name, seed in (("a", 0), ("b", 1)):
        write_model(root, name, cifar_resnet20_config(), {1: seeded_resnet20(seed).state_dict()})
    (root / "broken").mkdir()
    (root / "broken" / "config.yaml").write_text("name: broken\nplatform: pytorch\n")
    return root


def test_models_loaded_and_unloaded_at_run_time_are_reported(repo: Path) -> None:
    server = start(repo, models=("a",))
    try:
        url = f"127.0.0.1:{server.grpc_port}"
        client = tc.InferenceServerClient(url)
        with grpc.insecure_channel(url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert status(stub, "a") == SERVING
            assert status(stub, "b") == "NOT_FOUND"  # in the folder but never loaded: not a served name yet
            client.load_model("b")
            assert status(stub, "b") == SERVING
            client.unload_model("b")
            assert status(stub, "b") == NOT_SERVING
            with pytest.raises(tc.InferenceServerException, match="broken"):
                client.load_model("broken")
            assert status(stub, "broken") == NOT_SERVING
            client.load_model("b")
            assert status(stub, "b") == SERVING
            assert [status(stub, name) for name in ("", "inference.GRPCInferenceService", "a")] == [SERVING] * 3
    finally:
        server.stop()


@pytest.fixture
def board() -> Iterator[tuple[HealthBoard, health_pb2_grpc.HealthStub]]:
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield HealthBoard(servicer, ("", "svc")), health_pb2_grpc.HealthStub(channel)
    finally:
        server.stop(0).wait()


def test_the_drain_turns_every_name_but_liveness_off_for_good(board) -> None:
    health_board, stub = board
    health_board.model_changed("a", serving=True)
    health_board.model_changed("gone", serving=False)
    assert [status(stub, name) for name in ("", "svc", "a", "gone", LIVENESS_SERVICE)] == [
        SERVING,
        SERVING,
        SERVING,
        NOT_SERVING,
        SERVING,
    ]
    health_board.drain()
    assert [status(stub, name) for name in ("", "svc", "a", "gone")] == [NOT_SERVING] * 4
    assert status(stub, LIVENESS_SERVICE) == SERVING
    health_board.model_changed("late", serving=True)  # a load that finishes during the drain
    health_board.model_changed("a", serving=True)
    assert status(stub, "late") == NOT_SERVING and status(stub, "a") == NOT_SERVING
