"""Following the model repository on disk: changed models reloaded, new folders loaded, removed ones unloaded, a
folder still being written left alone until it holds still, a broken change leaving the old versions serving."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import cifar_resnet20_config, seeded_resnet20, start, write_model

from opskit.procs import wait_until
from ttaserve.server.app import ServerHandle
from ttaserve.server.repository import ModelRepository
from ttaserve.server.repository_poller import RepositoryPoller, fingerprint


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_model(tmp_path / "repo", "a", cifar_resnet20_config(), {1: seeded_resnet20(0).state_dict()})
    return tmp_path / "repo"


class Loads:
    """The repository's ``load``, counting the models it was asked to load."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository
        self.names: list[str] = []

    def __call__(self, name: str) -> None:
        self.names.append(name)
        self.repository.load(name)


@pytest.fixture
def polled(repo: Path) -> Iterator[tuple[ModelRepository, RepositoryPoller, Loads]]:
    repository = ModelRepository(repo, torch.device("cpu"))
    try:
        repository.load_all()
        loads = Loads(repository)
        yield repository, RepositoryPoller(repository, 1.0, None, loads), loads
    finally:
        repository.close()


def add_model(repo: Path, name: str, seed: int) -> None:
    """Write the folder beside the repository and move it in, as a deployment tool would."""
    staging = repo.parent / f"staging-{name}"
    write_model(staging, name, cifar_resnet20_config(), {1: seeded_resnet20(seed).state_dict()})
    (staging / name).rename(repo / name)


def test_a_new_version_is_loaded_once_the_folder_holds_still(repo: Path, polled) -> None:
    repository, poller, loads = polled
    write_model(repo, "a", cifar_resnet20_config(), {2: seeded_resnet20(1).state_dict()})
    poller.poll()
    assert repository.versions("a") == [1] and loads.names == [], "a change is taken only once it held still"
    poller.poll()
    assert repository.versions("a") == [1, 2] and loads.names == ["a"]
    poller.poll()
    assert loads.names == ["a"], "unchanged files are not loaded again"


def test_a_folder_still_being_written_waits(repo: Path, polled) -> None:
    repository, poller, loads = polled
    weights = repo / "a" / "2" / "model.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"half")  # a copy in progress
    poller.poll()
    torch.save(seeded_resnet20(1).state_dict(), weights)  # ... completed before the next poll
    poller.poll()
    assert loads.names == [] and repository.versions("a") == [1]
    poller.poll()
    assert loads.names == ["a"] and repository.versions("a") == [1, 2]


def test_new_folders_are_loaded_and_removed_ones_unloaded(repo: Path, polled) -> None:
    repository, poller, loads = polled
    add_model(repo, "b", seed=2)
    poller.poll()
    poller.poll()
    assert repository.versions("b") == [1] and loads.names == ["b"]
    shutil.rmtree(repo / "b")
    poller.poll()
    assert repository.versions("b") == []
    assert [e.name for e in repository.index()] == ["a"]


def test_a_broken_change_keeps_the_loaded_versions_serving_and_is_not_retried(repo: Path, polled) -> None:
    repository, poller, loads = polled
    before = repository.get("a")
    config = cifar_resnet20_config()
    config["input"] = {**config["input"], "height": -1}
    (repo / "a" / "config.yaml").write_text(yaml.safe_dump(config))
    for _ in range(4):
        poller.poll()
    assert loads.names == ["a"], "the same broken files are tried once"
    assert repository.get("a") is before, "the versions loaded before still serve"
    (repo / "a" / "config.yaml").write_text(yaml.safe_dump(cifar_resnet20_config()))
    poller.poll()
    poller.poll()
    assert loads.names == ["a", "a"] and repository.get("a") is not before


def test_an_explicit_unload_is_not_undone(polled) -> None:
    repository, poller, loads = polled
    repository.unload("a")
    poller.poll()
    poller.poll()
    assert repository.versions("a") == [] and loads.names == []


def test_fingerprints_follow_links_and_skip_hidden_names(tmp_path: Path) -> None:
    """A Kubernetes volume: visible names are links into a hidden folder that is swapped in one step."""
    data = tmp_path / "..2026_11_23"
    data.mkdir()
    (data / "config.yaml").write_text("a: 1\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "..data").symlink_to(data)
    (model / "config.yaml").symlink_to(model / "..data" / "config.yaml")
    (model / ".partial.tmp").write_text("x")
    first = fingerprint(model)
    assert [entry[0] for entry in first] == ["config.yaml"]
    (data / "config.yaml").write_text("a: 22\n")
    assert fingerprint(model) != first


def model_health(server: ServerHandle, name: str) -> str:
    """What gRPC health checking says of ``name``."""
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def test_the_server_serves_what_lands_in_its_repository(repo: Path, real_images: np.ndarray) -> None:
    """End to end with ``repository_poll_s``: a model folder moved into the repository is served, its removal ends
    it; tritonclient and gRPC health checking see both."""
    server = start(repo, repository_poll_s=0.1)
    try:
        client = tc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        add_model(repo, "b", seed=2)
        wait_until(lambda: client.is_model_ready("b"), 30, "model b loaded from the repository")
        assert model_health(server, "b") == "SERVING"
        tensor = tc.InferInput("input", [2, 32, 32, 3], "UINT8")
        tensor.set_data_from_numpy(real_images[:2])
        assert client.infer("b", [tensor]).as_numpy("logits").shape == (2, 10)
        shutil.rmtree(repo / "b")
        wait_until(lambda: not client.is_model_ready("b"), 30, "model b unloaded")
        assert model_health(server, "b") == "NOT_SERVING"
        assert client.is_model_ready("a")
        assert server.metrics.registry.get_sample_value("ttaserve_model_ready", {"model": "b", "version": "1"}) == 0
    finally:
        server.stop()
