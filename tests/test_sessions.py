"""Per-stream sessions over the real protocol: isolation, order, lifecycle, eviction, expiry, snapshots across a
restart, the collapse guard, and the Adaptation service."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from support import CIFAR_INPUT, CIFAR_PREPROCESSING, cifar_resnet20_config, seeded_resnet20, start, write_model
from tritonclient.utils import InferenceServerException

from opskit.procs import wait_until
from ttaserve.client import Client
from ttaserve.protocol import adaptation_pb2 as apb
from ttaserve.protocol import adaptation_pb2_grpc
from ttaserve.server.app import ServerHandle
from ttaserve.server.sessions import FifoLock, SessionKey

STATEFUL = ("tent", "unmix_tns")


def stream_of(images: np.ndarray, seed: int, batches: int = 4, size: int = 8) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(images))[: batches * size]
    return [images[order[i * size : (i + 1) * size]] for i in range(batches)]


def infer(
    client: tc.InferenceServerClient,
    batch: np.ndarray,
    strategy: str,
    sequence_id: str | int = 0,
    start: bool = False,
    end: bool = False,
    model: str = "resnet",
    request_id: str = "",
    timeout_s: float | None = None,
    **settings: object,
) -> tc.InferResult:
    tensor = tc.InferInput("input", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    params = {"tta_strategy": strategy, **{f"tta_{k}": v for k, v in settings.items()}}
    return client.infer(
        model,
        [tensor],
        outputs=[tc.InferRequestedOutput("logits")],
        parameters=params,
        sequence_id=sequence_id,
        sequence_start=start,
        sequence_end=end,
        request_id=request_id,
        client_timeout=timeout_s,
    )


def run_stream(url: str, batches: list[np.ndarray], strategy: str, sequence_id: str) -> list[np.ndarray]:
    client = tc.InferenceServerClient(url)
    out = []
    for i, batch in enumerate(batches):
        result = infer(client, batch, strategy, sequence_id, start=i == 0, end=i == len(batches) - 1)
        out.append(result.as_numpy("logits"))
    return out


@pytest.fixture(scope="module")
def adaptation(url: str) -> Iterator[adaptation_pb2_grpc.AdaptationStub]:
    with grpc.insecure_channel(url) as channel:
        yield adaptation_pb2_grpc.AdaptationStub(channel)


@pytest.mark.parametrize("strategy", STATEFUL)
def test_concurrent_sessions_match_streams_run_alone(url: str, real_images: np.ndarray, strategy: str) -> None:
    streams = [stream_of(real_images, seed) for seed in range(4)]
    alone = [run_stream(url, batches, strategy, f"alone-{strategy}-{i}") for i, batches in enumerate(streams)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda i: run_stream(url, streams[i], strategy, f"together-{strategy}-{i}"), range(4)))
    for solo, mixed in zip(alone, together, strict=True):
        for a, b in zip(solo, mixed, strict=True):
            np.testing.assert_array_equal(a, b)
    # adaptation really happened: a session's later batch differs from the same batch run episodically
    client = tc.InferenceServerClient(url)
    episodic = infer(client, streams[0][-1], strategy).as_numpy("logits")
    assert not np.array_equal(episodic, alone[0][-1])


def test_session_lifecycle_and_response_parameters(url: str, real_images: np.ndarray, adaptation) -> None:
    client = tc.InferenceServerClient(url)
    batches = stream_of(real_images, 7)
    first = infer(client, batches[0], "tent", "life", start=True)
    params = first.get_response().parameters
    assert params["tta_session_steps"].int64_param == 1
    assert params["tta_session_event"].string_param == "started"
    assert json.loads(params["tta_settings"].string_param)["lr"] == 0.001
    assert params["tta_entropy"].double_param > 0 and "tta_loss" in params
    second = infer(client, batches[1], "tent", "life")
    assert second.get_response().parameters["tta_session_steps"].int64_param == 2
    info = adaptation.GetSession(
        apb.GetSessionRequest(key=apb.SessionKey(model_name="resnet", strategy="tent", sequence_id="life"))
    ).session
    assert info.steps == 2 and info.state_bytes > 0 and "entropy" in info.last_stats
    listed = adaptation.ListSessions(apb.ListSessionsRequest(model_name="resnet")).sessions
    assert "life" in {s.key.sequence_id for s in listed}
    # settings are fixed at sequence_start
    with pytest.raises(InferenceServerException) as excinfo:
        infer(client, batches[2], "tent", "life", lr=0.01)
    assert excinfo.value.status() == "StatusCode.INVALID_ARGUMENT" and "sequence_start" in excinfo.value.message()
    # a manual reset brings the source state back: the next output equals a fresh session's first output
    adaptation.ResetSession(
        apb.ResetSessionRequest(key=apb.SessionKey(model_name="resnet", strategy="tent", sequence_id="life"))
    )
    after_reset = infer(client, batches[0], "tent", "life")
    np.testing.assert_array_equal(after_reset.as_numpy("logits"), first.as_numpy("logits"))
    infer(client, batches[1], "tent", "life", end=True)
    with pytest.raises(grpc.RpcError) as rpc_error:
        adaptation.GetSession(
            apb.GetSessionRequest(key=apb.SessionKey(model_name="resnet", strategy="tent", sequence_id="life"))
        )
    assert rpc_error.value.code() == grpc.StatusCode.NOT_FOUND


def _steps(adaptation, sequence_id: str, strategy: str = "tent") -> int:
    key = apb.SessionKey(model_name="resnet", strategy=strategy, sequence_id=sequence_id)
    return adaptation.GetSession(apb.GetSessionRequest(key=key)).session.steps


def test_a_retried_request_gets_its_answer_again_and_adapts_once(url: str, real_images: np.ndarray, adaptation) -> None:
    """A client whose answer was lost retries with the same request id: the session is not stepped twice."""
    client = tc.InferenceServerClient(url)
    batches = stream_of(real_images, 11, batches=2)
    plain = run_stream(url, batches, "tent", "retry-reference")
    first = infer(client, batches[0], "tent", "retry", start=True, request_id="frame-1")
    again = infer(client, batches[0], "tent", "retry", request_id="frame-1")
    np.testing.assert_array_equal(again.as_numpy("logits"), first.as_numpy("logits"))
    params = again.get_response().parameters
    assert params["tta_session_steps"].int64_param == 1 and params["tta_session_event"].string_param == "replayed"
    assert again.get_response().id == "frame-1"
    assert _steps(adaptation, "retry") == 1
    with pytest.raises(InferenceServerException) as reused:
        infer(client, batches[1], "tent", "retry", request_id="frame-1")
    assert reused.value.status() == "StatusCode.INVALID_ARGUMENT" and "with other inputs" in reused.value.message()
    second = infer(client, batches[1], "tent", "retry", end=True, request_id="frame-2")
    # the same outputs as the stream sent once without ids: the retry adapted nothing
    np.testing.assert_array_equal(second.as_numpy("logits"), plain[1])
    assert second.get_response().parameters["tta_session_steps"].int64_param == 2
    # the request that ended the session is answered again too, and opens no new session
    ended_again = infer(client, batches[1], "tent", "retry", end=True, request_id="frame-2")
    np.testing.assert_array_equal(ended_again.as_numpy("logits"), plain[1])
    assert ended_again.get_response().parameters["tta_session_event"].string_param == "replayed"
    with pytest.raises(grpc.RpcError) as gone:
        _steps(adaptation, "retry")
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    # a new batch under the ended id starts a new session, which forgets the old one's last request
    infer(client, batches[0], "tent", "retry", request_id="frame-3")
    fresh = infer(client, batches[1], "tent", "retry", end=True, request_id="frame-2")
    assert fresh.get_response().parameters["tta_session_steps"].int64_param == 2
    assert fresh.get_response().parameters["tta_session_event"].string_param == ""


def test_a_request_whose_deadline_passes_while_it_waits_is_not_applied(tmp_path: Path, real_images: np.ndarray) -> None:
    """Its client has seen DEADLINE_EXCEEDED and will retry: applying it anyway would adapt on the batch twice."""
    config = cifar_resnet20_config(max_batch_size=1024)
    write_model(tmp_path / "repo", "resnet", config, {1: seeded_resnet20(0).state_dict()})

    server = start(tmp_path / "repo", snapshot_dir=tmp_path / "snapshots")
    url = f"127.0.0.1:{server.grpc_port}"
    try:
        client = tc.InferenceServerClient(url)
        infer(client, real_images[:8], "tent", "deadline", start=True)
        big = np.resize(real_images, (1024, *real_images.shape[1:]))  # a TENT step of seconds holds the session
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(infer, tc.InferenceServerClient(url), big, "tent", "deadline")
            wait_until(lambda: server.inflight.count >= 1, 30, "the slow step in flight")
            time.sleep(0.2)
            with pytest.raises(InferenceServerException) as late:
                infer(client, real_images[8:16], "tent", "deadline", timeout_s=0.3)
            assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED"
            assert slow.result(timeout=120).get_response().parameters["tta_session_steps"].int64_param == 2
        wait_until(lambda: server.inflight.count == 0, 30, "the late request answered by the server")
        key = SessionKey("anonymous", "resnet", "tent", "deadline")
        assert server.sessions.get(key).steps == 2
        timeouts = server.metrics.registry.get_sample_value(
            "ttaserve_requests_total", {"model": "resnet", "version": "1", "strategy": "tent", "outcome": "timeout"}
        )
        assert timeouts == 1
    finally:
        server.stop()


def test_settings_validated_against_schema(url: str, real_images: np.ndarray) -> None:
    client = tc.InferenceServerClient(url)
    with pytest.raises(InferenceServerException) as excinfo:
        infer(client, real_images[:2], "alpha_bn", alpha=1.5)
    message = excinfo.value.message()
    assert excinfo.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "tta_alpha" in message and "≤ 1" in message
    with pytest.raises(InferenceServerException) as excinfo:
        infer(client, real_images[:2], "alpha_bn", beta=0.5)
    assert "tta_beta" in excinfo.value.message() and "tta_alpha" in excinfo.value.message()
    result = infer(client, real_images[:2], "alpha_bn", alpha=0.3)
    assert json.loads(result.get_response().parameters["tta_settings"].string_param) == {"alpha": 0.3}


def test_list_strategies_has_schemas_and_defaults(adaptation) -> None:
    strategies = {s.name: s for s in adaptation.ListStrategies(apb.ListStrategiesRequest()).strategies}
    assert {"none", "tbn", "alpha_bn", "unmix_tns", "tent", "rmt", "t3", "t3_batch"} <= set(strategies)
    alpha = strategies["alpha_bn"]
    assert json.loads(alpha.defaults_json) == {"alpha": 0.1}
    assert json.loads(alpha.config_schema_json)["properties"]["alpha"]["maximum"] == 1.0
    assert strategies["tent"].stateful and strategies["tent"].uses_gradients
    assert "merge_partner" in strategies["t3"].requires
    # the 'resnet' model names no merge partner: T3 is not offered for it
    for_model = {s.name for s in adaptation.ListStrategies(apb.ListStrategiesRequest(model_name="resnet")).strategies}
    assert "t3" not in for_model and "tent" in for_model


def test_shared_weights_never_mutated(server: ServerHandle, url: str, real_images: np.ndarray) -> None:
    model = server.repository.get("resnet")
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    run_stream(url, stream_of(real_images, 3), "tent", "mutation-check")
    run_stream(url, stream_of(real_images, 4), "unmix_tns", "mutation-check")
    for key, value in model.module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_without_spilling_an_evicted_session_is_lost(model_repo: Path, tmp_path: Path, real_images: np.ndarray) -> None:
    handle = start(model_repo, models=("resnet",), max_sessions=2, snapshot_dir=tmp_path, spill_evicted_sessions=False)
    try:
        client = tc.InferenceServerClient(f"127.0.0.1:{handle.grpc_port}")
        for name in ("a", "b", "c"):
            infer(client, real_images[:4], "unmix_tns", name, start=True)
        assert sorted(s.key.sequence_id for s in handle.sessions.sessions()) == ["b", "c"]
        evicted = handle.metrics.session_resets.labels("resnet", "unmix_tns", "evicted")._value.get()
        assert evicted == 1
        assert list(tmp_path.glob("*.pt")) == []
        assert handle.sessions.expire_idle(now=handle.sessions.sessions()[0].last_used + 10_000) == 2
        assert len(handle.sessions) == 0
    finally:
        handle.stop()


@pytest.mark.parametrize("limit", ["sessions", "memory"])
def test_streams_beyond_the_table_keep_adapting_through_spills(
    model_repo: Path, tmp_path: Path, real_images: np.ndarray, limit: str
) -> None:
    """Six TENT streams through a table that holds two sessions (by count, or by bytes of state): an evicted
    session goes to disk, or is taken back by its next request while still waiting for the background writer, so
    every stream gives bit for bit the outputs it gives alone and nothing is lost. First the six run concurrently
    (requests racing the writer), then in turns with the writer flushed between them (every turn restores four
    sessions from their files)."""
    streams = [stream_of(real_images, seed) for seed in range(6)]
    roomy = start(model_repo, models=("resnet",), snapshot_dir=tmp_path / "roomy")
    try:
        url = f"127.0.0.1:{roomy.grpc_port}"
        alone = [run_stream(url, batches, "tent", f"cam-{i}") for i, batches in enumerate(streams)]
        infer(tc.InferenceServerClient(url), streams[0][0], "tent", "probe", start=True)
        (probe,) = roomy.sessions.sessions()
        size = probe.state_bytes()
    finally:
        roomy.stop()
    limits = {"max_sessions": 2} if limit == "sessions" else {"max_session_memory_mib": 2.5 * size / 2**20}
    snapshots = tmp_path / "tight"
    tight = start(model_repo, models=("resnet",), snapshot_dir=snapshots, **limits)
    labels = {"model": "resnet", "strategy": "tent"}

    def sample(name: str, **extra: str) -> float:
        return tight.metrics.registry.get_sample_value(name, {**labels, **extra}) or 0.0

    try:
        url = f"127.0.0.1:{tight.grpc_port}"
        with ThreadPoolExecutor(6) as pool:
            together = list(pool.map(lambda i: run_stream(url, streams[i], "tent", f"cam-{i}"), range(6)))
        tight.sessions.flush()
        assert len(tight.sessions) == 0 and list(snapshots.glob("*.pt")) == [], "ended streams leave nothing behind"

        client = tc.InferenceServerClient(url)
        in_turns: list[list[np.ndarray]] = [[] for _ in streams]
        spills_before, restored_before = (
            sample("ttaserve_session_spills_total"),
            sample("ttaserve_sessions_opened_total", event="restored"),
        )
        for step in range(4):
            for i, batches in enumerate(streams):
                result = infer(client, batches[step], "tent", f"turn-{i}", start=step == 0, end=step == 3)
                in_turns[i].append(result.as_numpy("logits"))
            tight.sessions.flush()
        for solo, mixed, turns in zip(alone, together, in_turns, strict=True):
            for a, b, c in zip(solo, mixed, turns, strict=True):
                np.testing.assert_array_equal(a, b)
                np.testing.assert_array_equal(a, c)
        assert sample("ttaserve_session_spills_total") - spills_before >= 4 * 3, "four of six to disk in each turn"
        assert sample("ttaserve_sessions_opened_total", event="restored") - restored_before >= 4 * 3
        assert sample("ttaserve_session_resets_total", reason="evicted") == 0
        assert len(tight.sessions) == 0 and list(snapshots.glob("*.pt")) == []
    finally:
        tight.stop()


def test_a_spilled_session_is_listed_found_ended_and_expired_like_a_live_one(
    model_repo: Path, tmp_path: Path, real_images: np.ndarray
) -> None:
    """Listing and inspecting sessions shows the spilled ones as such without bringing them back into memory."""
    handle = start(model_repo, models=("resnet",), max_sessions=2, snapshot_dir=tmp_path)
    try:
        url = f"127.0.0.1:{handle.grpc_port}"
        client = tc.InferenceServerClient(url)
        for name in ("a", "b", "c", "d"):
            infer(client, real_images[:4], "tent", name, start=True)
        handle.sessions.flush()
        assert sorted(s.key.sequence_id for s in handle.sessions.sessions()) == ["c", "d"]
        assert len(list(tmp_path.glob("*.pt"))) == 2
        with grpc.insecure_channel(url) as channel:
            stub = adaptation_pb2_grpc.AdaptationStub(channel)
            listed = stub.ListSessions(apb.ListSessionsRequest(model_name="resnet")).sessions
            assert {s.key.sequence_id: s.spilled for s in listed} == {"a": True, "b": True, "c": False, "d": False}
            key = apb.SessionKey(model_name="resnet", strategy="tent", sequence_id="a")
            found = stub.GetSession(apb.GetSessionRequest(key=key)).session
            assert found.spilled and found.steps == 1 and found.state_bytes > 0
            with Client(url) as sdk:
                assert {s.sequence_id: s.spilled for s in sdk.sessions("resnet")} == {
                    "a": True,
                    "b": True,
                    "c": False,
                    "d": False,
                }
            assert json.loads(found.settings_json) == json.loads(next(s for s in listed if s.spilled).settings_json)
            b = apb.SessionKey(model_name="resnet", strategy="tent", sequence_id="b")
            stub.EndSession(apb.EndSessionRequest(key=b))
            with pytest.raises(grpc.RpcError) as excinfo:
                stub.GetSession(apb.GetSessionRequest(key=b))
            assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND and "sequence id 'b'" in str(
                excinfo.value.details()
            )
        assert sorted(s.key.sequence_id for s in handle.sessions.sessions()) == ["c", "d"], "looking left 'a' on disk"
        assert len(list(tmp_path.glob("*.pt"))) == 1, "b's file went with it; a's is there"
        assert handle.sessions.expire_idle(now=time.time() + 10_000) == 3
        assert len(handle.sessions) == 0 and list(tmp_path.glob("*.pt")) == []
        expired = {"model": "resnet", "strategy": "tent", "reason": "expired"}
        assert handle.metrics.registry.get_sample_value("ttaserve_session_resets_total", expired) == 3
    finally:
        handle.stop()


def test_an_expired_session_continues_from_its_snapshot_and_an_ended_one_does_not(
    model_repo: Path, tmp_path: Path, real_images: np.ndarray
) -> None:
    """Expiry frees memory but keeps the snapshot a session asked for (its durable copy); ending deletes it."""
    handle = start(model_repo, models=("resnet",), snapshot_dir=tmp_path)
    try:
        url = f"127.0.0.1:{handle.grpc_port}"
        client = tc.InferenceServerClient(url)
        for i in range(2):
            infer(client, real_images[:4], "tent", "kept", start=i == 0)
        key = apb.SessionKey(model_name="resnet", strategy="tent", sequence_id="kept")
        with grpc.insecure_channel(url) as channel:
            adaptation_pb2_grpc.AdaptationStub(channel).SnapshotSession(apb.SnapshotSessionRequest(key=key))
        assert handle.sessions.expire_idle(now=time.time() + 10_000) == 1 and len(handle.sessions) == 0
        assert len(list(tmp_path.glob("*.pt"))) == 1
        parameters = infer(client, real_images[:4], "tent", "kept").get_response().parameters
        assert parameters["tta_session_event"].string_param == "restored"
        assert parameters["tta_session_steps"].int64_param == 3
        infer(client, real_images[:4], "tent", "kept", end=True)
        assert list(tmp_path.glob("*.pt")) == [] and len(handle.sessions) == 0
        parameters = infer(client, real_images[:4], "tent", "kept").get_response().parameters
        assert parameters["tta_session_steps"].int64_param == 1, "an ended session starts afresh"
    finally:
        handle.stop()


def test_evicted_sessions_on_their_way_to_disk_survive_a_stop(
    model_repo: Path, tmp_path: Path, real_images: np.ndarray
) -> None:
    """Spills are written in the background; stopping the server writes those still waiting, and a new server
    continues each stream from its spilled state exactly as the old one would have."""
    batches = stream_of(real_images, 21, batches=2, size=4)
    names = [f"cam-{i}" for i in range(5)]
    reference = start(model_repo, models=("resnet",), snapshot_dir=tmp_path / "reference")
    try:
        client = tc.InferenceServerClient(f"127.0.0.1:{reference.grpc_port}")
        expected = {
            n: [infer(client, b, "tent", n, start=i == 0).as_numpy("logits") for i, b in enumerate(batches)]
            for n in names
        }
    finally:
        reference.stop()
    snapshots = tmp_path / "snapshots"
    first = start(model_repo, models=("resnet",), max_sessions=1, snapshot_dir=snapshots)
    client = tc.InferenceServerClient(f"127.0.0.1:{first.grpc_port}")
    got = {n: [infer(client, batches[0], "tent", n, start=True).as_numpy("logits")] for n in names}
    first.stop()
    assert len(list(snapshots.glob("*.pt"))) == len(names) - 1, "every evicted session reached its file"
    second = start(model_repo, models=("resnet",), max_sessions=1, snapshot_dir=snapshots)
    try:
        client = tc.InferenceServerClient(f"127.0.0.1:{second.grpc_port}")
        for n in names[:-1]:
            got[n].append(infer(client, batches[1], "tent", n).as_numpy("logits"))
    finally:
        second.stop()
    for n in names[:-1]:
        for a, b in zip(expected[n], got[n], strict=True):
            np.testing.assert_array_equal(a, b)


def test_snapshot_survives_restart(model_repo: Path, tmp_path: Path, real_images: np.ndarray) -> None:
    """The restored session continues bit for bit, and knows its last request: a client that lost that answer to
    the restart and retries it is answered again, not adapted twice."""
    batches = stream_of(real_images, 11, batches=6)
    reference = run_stream_on(model_repo, tmp_path / "ref", batches)
    snapshots = tmp_path / "snapshots"
    first = start(model_repo, models=("resnet",), snapshot_dir=snapshots)
    url = f"127.0.0.1:{first.grpc_port}"
    client = tc.InferenceServerClient(url)
    outputs = [
        infer(client, batches[i], "tent", "cam-1", start=i == 0, request_id=f"b{i}").as_numpy("logits")
        for i in range(3)
    ]
    with grpc.insecure_channel(url) as channel:
        key = apb.SessionKey(model_name="resnet", strategy="tent", sequence_id="cam-1")
        snap = adaptation_pb2_grpc.AdaptationStub(channel).SnapshotSession(apb.SnapshotSessionRequest(key=key))
    assert Path(snap.path).is_file() and snap.byte_size > 0
    first.stop()
    second = start(model_repo, models=("resnet",), snapshot_dir=snapshots)
    try:
        client = tc.InferenceServerClient(f"127.0.0.1:{second.grpc_port}")
        retried = infer(client, batches[2], "tent", "cam-1", request_id="b2")
        np.testing.assert_array_equal(retried.as_numpy("logits"), outputs[2])
        parameters = retried.get_response().parameters
        assert parameters["tta_session_event"].string_param == "replayed"
        assert parameters["tta_session_steps"].int64_param == 3
        restored = {"model": "resnet", "strategy": "tent", "event": "restored"}
        assert second.metrics.registry.get_sample_value("ttaserve_sessions_opened_total", restored) == 1
        outputs += [infer(client, batches[i], "tent", "cam-1").as_numpy("logits") for i in range(3, 6)]
    finally:
        second.stop()
    for expected, got in zip(reference, outputs, strict=True):
        np.testing.assert_array_equal(expected, got)


def run_stream_on(repo: Path, snapshots: Path, batches: list[np.ndarray]) -> list[np.ndarray]:
    handle = start(repo, models=("resnet",), snapshot_dir=snapshots)
    try:
        client = tc.InferenceServerClient(f"127.0.0.1:{handle.grpc_port}")
        return [infer(client, b, "tent", "cam-1", start=i == 0).as_numpy("logits") for i, b in enumerate(batches)]
    finally:
        handle.stop()


def test_snapshot_bytes_restore_into_a_new_key(url: str, adaptation, real_images: np.ndarray) -> None:
    client = tc.InferenceServerClient(url)
    batches = stream_of(real_images, 5)
    for i in range(2):
        infer(client, batches[i], "unmix_tns", "orig", start=i == 0)
    key = apb.SessionKey(model_name="resnet", strategy="unmix_tns", sequence_id="orig")
    data = adaptation.SnapshotSession(apb.SnapshotSessionRequest(key=key, return_data=True)).data
    copy_key = apb.SessionKey(model_name="resnet", strategy="unmix_tns", sequence_id="copy")
    restored = adaptation.RestoreSession(apb.RestoreSessionRequest(key=copy_key, data=data)).session
    assert restored.steps == 2
    a = infer(client, batches[2], "unmix_tns", "orig").as_numpy("logits")
    b = infer(client, batches[2], "unmix_tns", "copy").as_numpy("logits")
    np.testing.assert_array_equal(a, b)
    with pytest.raises(grpc.RpcError) as excinfo:
        adaptation.RestoreSession(apb.RestoreSessionRequest(key=copy_key, data=b"garbage"))
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_collapse_guard_resets_and_reports(tmp_path: Path, real_images: np.ndarray) -> None:
    """A guard threshold above any reachable marginal entropy must reset the session at its first check."""
    config = {
        "platform": "pytorch",
        "architecture": "cifar_resnet20",
        "input": CIFAR_INPUT,
        "preprocessing": CIFAR_PREPROCESSING,
        "sessions": {"collapse_min_marginal_entropy": 5.0, "collapse_min_steps": 2},
    }
    write_model(tmp_path / "repo", "guarded", config, {1: seeded_resnet20(0).state_dict()})
    handle = start(tmp_path / "repo", snapshot_dir=tmp_path / "snap")
    try:
        client = tc.InferenceServerClient(f"127.0.0.1:{handle.grpc_port}")
        batches = stream_of(real_images, 2)
        events = []
        for i, batch in enumerate(batches):
            params = infer(client, batch, "tent", "g", start=i == 0, model="guarded").get_response().parameters
            events.append((params["tta_session_steps"].int64_param, params.get("tta_session_reset")))
        assert events[1][1] is None
        assert events[2][0] == 1 and "class-marginal entropy" in events[2][1].string_param
        assert handle.metrics.session_resets.labels("guarded", "tent", "collapse")._value.get() >= 1
    finally:
        handle.stop()


def test_a_waiter_that_gives_up_leaves_the_line_and_the_rest_keep_their_order() -> None:
    lock, order, leave = FifoLock(), [], threading.Event()

    def take(name: str, give_up: Callable[[], BaseException | None] | None = None) -> None:
        with lock.hold(give_up):
            order.append(name)

    with ThreadPoolExecutor(3) as pool, lock.hold():
        gives_up = pool.submit(take, "b", lambda: TimeoutError("b left") if leave.is_set() else None)
        wait_until(lambda: lock._next_ticket == 2, 10, "b in line")
        stays = pool.submit(take, "c")
        wait_until(lambda: lock._next_ticket == 3, 10, "c in line behind b")
        leave.set()
        with pytest.raises(TimeoutError, match="b left"):
            gives_up.result(10)
        assert order == [] and not stays.done(), "nobody passes the holder"
    stays.result(10)
    take("d")
    assert order == ["c", "d"]
