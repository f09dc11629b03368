"""What loading, reloading and unloading a model does to the state built on it, over the real protocol: sessions of
an unloaded or reloaded model end (their state was adapted on weights no longer served), and a model with source
data warms RMT up in the background right after loading instead of inside the first request."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from support import start, write_model
from tritonclient.utils import InferenceServerException

from opskit.procs import wait_until
from ttaserve.adapters.base import SourceData
from ttaserve.adapters.rmt import RMT, RMTConfig, RMTState
from ttaserve.protocol import adaptation_pb2 as apb
from ttaserve.protocol import adaptation_pb2_grpc
from ttaserve.server import pipeline
from ttaserve.server.app import ServerHandle
from ttaserve.server.architectures import build_architecture

#: 4x4 RGB images on a small ResNet: RMT's default warm-up (50,000 source images) takes seconds, not minutes
TINY_INPUT = {"height": 4, "width": 4, "channels": 3, "layout": "NHWC"}
DEFAULT_WARMUP = RMTConfig().warmup_samples


def tiny_config(**extra: object) -> dict:
    return {
        "platform": "pytorch",
        "architecture": "small_resnet",
        "architecture_args": {"num_classes": 3, "in_channels": 3},
        "input": TINY_INPUT,
        "labels": ["a", "b", "c"],
        **extra,
    }


def tiny_weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_architecture("small_resnet", num_classes=3, in_channels=3).state_dict()


def tiny_images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 4, 4, 3), dtype=np.uint8)


def infer(
    client: tc.InferenceServerClient,
    model: str,
    strategy: str,
    sequence_id: str,
    start: bool = False,
    version: str = "",
    timeout_s: float | None = None,
) -> tc.InferResult:
    tensor = tc.InferInput("input", [8, 4, 4, 3], "UINT8")
    tensor.set_data_from_numpy(tiny_images(8))
    return client.infer(
        model,
        [tensor],
        model_version=version,
        outputs=[tc.InferRequestedOutput("logits")],
        parameters={"tta_strategy": strategy},
        sequence_id=sequence_id,
        sequence_start=start,
        client_timeout=timeout_s,
    )


def session_steps(result: tc.InferResult) -> tuple[int, str]:
    params = result.get_response().parameters
    return params["tta_session_steps"].int64_param, params["tta_session_event"].string_param


def removed(handle: ServerHandle, model: str, strategy: str, reason: str) -> float | None:
    labels = {"model": model, "strategy": strategy, "reason": reason}
    return handle.metrics.registry.get_sample_value("ttaserve_session_resets_total", labels)


# --- sessions of an unloaded or reloaded model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    repo = tmp_path_factory.mktemp("lifecycle")
    write_model(repo, "tiny", tiny_config(), {1: tiny_weights(1), 2: tiny_weights(2)})
    write_model(repo, "bystander", tiny_config(), {1: tiny_weights(3)})
    handle = start(repo, metrics_port=None, snapshot_dir=tmp_path_factory.mktemp("lifecycle-snapshots"))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def adaptation(lifecycle: ServerHandle) -> Iterator[adaptation_pb2_grpc.AdaptationStub]:
    with grpc.insecure_channel(f"127.0.0.1:{lifecycle.grpc_port}") as channel:
        yield adaptation_pb2_grpc.AdaptationStub(channel)


def listed(adaptation: adaptation_pb2_grpc.AdaptationStub, model: str) -> set[tuple[str, str]]:
    request = apb.ListSessionsRequest(model_name=model, all_callers=True)
    return {(s.key.strategy, s.key.sequence_id) for s in adaptation.ListSessions(request).sessions}


def test_unload_ends_every_session_of_the_model(lifecycle: ServerHandle, adaptation) -> None:
    client = tc.InferenceServerClient(f"127.0.0.1:{lifecycle.grpc_port}")
    streams = (("1", "tent", "cam-1"), ("2", "tent", "cam-2"), ("2", "unmix_tns", "cam-1"))
    for version, strategy, sequence_id in streams:
        infer(client, "tiny", strategy, sequence_id, start=True, version=version)
        assert session_steps(infer(client, "tiny", strategy, sequence_id, version=version))[0] == 2
    infer(client, "bystander", "tent", "cam-1", start=True)
    # a snapshot must not bring the old state back after the model returns
    adaptation.SnapshotSession(
        apb.SnapshotSessionRequest(key=apb.SessionKey(model_name="tiny", strategy="tent", sequence_id="cam-1"))
    )
    assert listed(adaptation, "tiny") == {("tent", "cam-1"), ("tent", "cam-2"), ("unmix_tns", "cam-1")}

    client.unload_model("tiny")

    assert listed(adaptation, "tiny") == set()
    assert listed(adaptation, "bystander") == {("tent", "cam-1")}
    assert removed(lifecycle, "tiny", "tent", "unloaded") == 2
    assert removed(lifecycle, "tiny", "unmix_tns", "unloaded") == 1
    assert removed(lifecycle, "bystander", "tent", "unloaded") == 0

    client.load_model("tiny")
    assert session_steps(infer(client, "tiny", "tent", "cam-1")) == (1, "created")


def test_reload_ends_the_sessions_of_the_old_weights(lifecycle: ServerHandle, adaptation) -> None:
    client = tc.InferenceServerClient(f"127.0.0.1:{lifecycle.grpc_port}")
    infer(client, "tiny", "tent", "reload", start=True)
    assert session_steps(infer(client, "tiny", "tent", "reload"))[0] == 2
    live = sum(strategy == "tent" for strategy, _ in listed(adaptation, "tiny"))
    counted = removed(lifecycle, "tiny", "tent", "reloaded") or 0

    client.load_model("tiny")  # already loaded: a reload

    assert listed(adaptation, "tiny") == set()
    assert removed(lifecycle, "tiny", "tent", "reloaded") == counted + live
    assert session_steps(infer(client, "tiny", "tent", "reload")) == (1, "created")


def test_a_session_opened_on_weights_retired_mid_request_does_not_survive(
    lifecycle: ServerHandle, adaptation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request resolves the model, then a reload retires those weights (sweeping their sessions) before the
    request has opened its session: that session must not carry the old weights' state into the new ones."""
    url = f"127.0.0.1:{lifecycle.grpc_port}"
    client = tc.InferenceServerClient(url)
    reloaded = threading.Event()
    build_state = pipeline.initial_state

    def reload_meanwhile(*args: object, **kwargs: object) -> object:
        state = build_state(*args, **kwargs)
        if not reloaded.is_set():
            reloader = threading.Thread(target=lambda: tc.InferenceServerClient(url).load_model("tiny"))
            reloader.start()
            reloader.join()
            reloaded.set()
        return state

    monkeypatch.setattr(pipeline, "initial_state", reload_meanwhile)
    with pytest.raises(InferenceServerException) as raised:
        infer(client, "tiny", "tent", "race", start=True)
    assert reloaded.is_set()
    assert raised.value.status() == "StatusCode.UNAVAILABLE"
    assert "reloaded or unloaded while this request was in flight" in raised.value.message()
    assert ("tent", "race") not in listed(adaptation, "tiny")
    assert session_steps(infer(client, "tiny", "tent", "race")) == (1, "created")


def test_a_session_is_bound_to_the_version_it_started_on(lifecycle: ServerHandle) -> None:
    client = tc.InferenceServerClient(f"127.0.0.1:{lifecycle.grpc_port}")
    infer(client, "tiny", "tent", "versioned", start=True, version="1")
    with pytest.raises(InferenceServerException) as raised:
        infer(client, "tiny", "tent", "versioned", version="2")
    assert raised.value.status() == "StatusCode.FAILED_PRECONDITION"
    assert "runs on version 1 of model 'tiny', not version 2" in raised.value.message()
    assert session_steps(infer(client, "tiny", "tent", "versioned", version="1")) == (2, "")


# --- background source warm-up ----------------------------------------------------------------------------------


def write_source_models(repo: Path) -> None:
    """Three models: with source data, with source data and the warm-up on load turned off, without source data."""
    for name, extra in (
        ("with_source", {"source_data": "source.npz"}),
        ("warmup_off", {"source_data": "source.npz", "source_warmup_on_load": False}),
        ("source_free", {}),
    ):
        model_dir = write_model(repo, name, tiny_config(**extra), {1: tiny_weights(0)})
        np.savez(model_dir / "source.npz", x=tiny_images(30, seed=1), y=np.arange(30) % 3)


@dataclass
class HeldWarmups:
    """Every RMT warm-up is recorded and held at its start until ``release`` is set (in a loop that checks between
    steps whether the strategy was closed, as RMT's own warm-up loop does), so a test can watch the server while one
    runs, cancel it, and count the warm-ups RMT ran."""

    release: threading.Event
    samples: list[int]


@pytest.fixture
def held_warmups(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldWarmups]:
    held = HeldWarmups(threading.Event(), [])
    real_warm_up = RMT._warm_up

    def held_warm_up(self: RMT, state: RMTState, config: RMTConfig, source: SourceData) -> RMTState:
        held.samples.append(config.warmup_samples)
        deadline = time.monotonic() + 60
        while not held.release.is_set() and time.monotonic() < deadline:
            self.check_open()
            time.sleep(0.01)
        return real_warm_up(self, state, config, source)

    monkeypatch.setattr(RMT, "_warm_up", held_warm_up)
    yield held
    held.release.set()


def test_source_warmup_runs_in_the_background_after_load(tmp_path: Path, held_warmups: HeldWarmups) -> None:
    write_source_models(tmp_path / "repo")
    handle = start(tmp_path / "repo", metrics_port=None, snapshot_dir=tmp_path / "snapshots")
    try:
        client = tc.InferenceServerClient(f"127.0.0.1:{handle.grpc_port}")
        model = handle.repository.get("with_source")
        assert set(model.warmups) == {"rmt"}
        assert handle.repository.get("warmup_off").warmups == {}
        assert handle.repository.get("source_free").warmups == {}
        wait_until(lambda: held_warmups.samples == [DEFAULT_WARMUP], 60, "the background warm-up reached RMT")
        assert client.is_model_ready("with_source")  # readiness does not wait for it
        labels = {"model": "with_source", "version": "1", "strategy": "rmt"}
        assert handle.metrics.registry.get_sample_value("ttaserve_source_warmup_running", labels) == 1

        # a request that needs the warm-up waits for it no longer than its deadline
        with pytest.raises(InferenceServerException) as excinfo:
            infer(client, "with_source", "rmt", "early", start=True, timeout_s=1.0)
        refusal = (excinfo.value.status(), "still warming up" in (excinfo.value.message() or ""))
        assert refusal in {("StatusCode.UNAVAILABLE", True), ("StatusCode.DEADLINE_EXCEEDED", False)}
        refused = {**labels, "outcome": "unavailable"}
        wait_until(
            lambda: handle.metrics.registry.get_sample_value("ttaserve_requests_total", refused) == 1,
            10,
            "the server gave up on the request at its deadline",
        )

        held_warmups.release.set()
        wait_until(lambda: not model.warmups["rmt"].running, 300, "the background warm-up finished")
        assert model.warmups["rmt"].error == ""
        assert handle.metrics.registry.get_sample_value("ttaserve_source_warmup_running", labels) == 0
        assert handle.metrics.registry.get_sample_value("ttaserve_source_warmup_seconds", labels) > 0

        result = infer(client, "with_source", "rmt", "cam", start=True)
        assert session_steps(result) == (1, "started")
        assert result.get_response().parameters["tta_variant"].string_param.endswith("+warmup")
        assert held_warmups.samples == [DEFAULT_WARMUP]  # served from the background warm-up's cache
    finally:
        handle.stop()


def test_unload_cancels_a_running_warmup(tmp_path: Path, held_warmups: HeldWarmups) -> None:
    write_source_models(tmp_path / "repo")
    handle = start(tmp_path / "repo", models=("with_source",), metrics_port=None, snapshot_dir=tmp_path / "snap")
    try:
        warmup = handle.repository.get("with_source").warmups["rmt"]
        wait_until(lambda: held_warmups.samples == [DEFAULT_WARMUP], 60, "the background warm-up reached RMT")

        tc.InferenceServerClient(f"127.0.0.1:{handle.grpc_port}").unload_model("with_source")

        assert not warmup.running and warmup.error.startswith("cancelled")
        assert not any(t.name.startswith("ttaserve-warmup-") for t in threading.enumerate())
    finally:
        handle.stop()
