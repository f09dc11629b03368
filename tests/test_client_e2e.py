"""The SDK and the CLI against a real server on loopback (port 0), with one small grey-image model so that
``model=None`` resolves: every input kind, top-k, models, strategies, sessions, deadlines, errors, asyncio, and
session steps whose answers a lossy link loses."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lossy_link import LossyLink
from PIL import Image

from opskit.procs import wait_until
from ttaserve.client import (
    AsyncClient,
    BatchResult,
    Client,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    TtaserveError,
    Unavailable,
)
from ttaserve.server.app import ServerHandle, start_server
from ttaserve.server.architectures import build_architecture
from ttaserve.server.sessions import SessionKey
from ttaserve.server.settings import ServerSettings

LABELS = [f"class-{i}" for i in range(10)]
MODEL = "garments"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    repo = tmp_path_factory.mktemp("client_repo")
    (repo / MODEL / "1").mkdir(parents=True)
    config = {
        "platform": "pytorch",
        "architecture": "small_resnet",
        "input": {"height": 28, "width": 28, "channels": 1},
        "preprocessing": {"mean": [0.5], "std": [0.25]},
        "labels": LABELS,
    }
    (repo / MODEL / "config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    torch.save(build_architecture("small_resnet").state_dict(), repo / MODEL / "1" / "model.pt")
    handle = start_server(
        ServerSettings(
            model_repository=repo,
            grpc_host="127.0.0.1",
            grpc_port=0,
            http_port=None,
            metrics_port=None,
            snapshot_dir=tmp_path_factory.mktemp("client_snapshots"),
            log_level="WARNING",
        )
    )
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def url(server: ServerHandle) -> str:
    return f"127.0.0.1:{server.grpc_port}"


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[Client]:
    with Client(url, timeout_s=30, caller="tester") as c:
        yield c


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)


@pytest.fixture(scope="module")
def png_files(images: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("pngs")
    paths = []
    for i, image in enumerate(images):
        path = folder / f"img{i}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def test_server_and_model_queries(client: Client) -> None:
    assert client.live() and client.ready()
    (entry,) = client.models()
    assert (entry.name, entry.version, entry.state) == (MODEL, "1", "READY")
    metadata = client.metadata()
    assert metadata.name == MODEL and metadata.inputs[0].shape == (-1, 28, 28, 1)
    assert "logits" in {t.name for t in metadata.outputs}


def test_every_input_kind_gives_the_same_logits(client: Client, images: np.ndarray, png_files: list[Path]) -> None:
    reference = client.classify(images[..., None])
    assert [c.label for c in reference] == [LABELS[c.index] for c in reference]
    expected = np.stack([c.logits for c in reference])

    def logits(result: list) -> np.ndarray:
        return np.stack([c.logits for c in result])

    variants = {
        "float32 NHWC": client.classify(images[..., None].astype(np.float32) / 255.0),
        "list of (H, W) arrays": client.classify(list(images)),
        "PIL images": client.classify([Image.fromarray(image) for image in images]),
        "paths": client.classify([str(p) for p in png_files]),
        "Paths": client.classify(png_files),
        "encoded bytes": client.classify([p.read_bytes() for p in png_files]),
    }
    for name, result in variants.items():
        np.testing.assert_allclose(logits(result), expected, rtol=1e-5, atol=1e-5, err_msg=name)
    single = client.classify(Image.fromarray(images[1]))
    assert len(single) == 1
    np.testing.assert_allclose(single[0].logits, expected[1], rtol=1e-5, atol=1e-5)


def test_top_k(client: Client, images: np.ndarray) -> None:
    (result,) = client.classify(images[0], top_k=3)
    assert len(result.top_k) == 3
    scores = [p.score for p in result.top_k]
    assert scores == sorted(scores, reverse=True)
    assert result.top_k[0].index == int(np.argmax(result.logits))
    assert all(p.label == LABELS[p.index] for p in result.top_k)
    assert result.probabilities.sum() == pytest.approx(1.0, rel=1e-5)
    (capped,) = client.classify(images[0], top_k=100)
    assert len(capped.top_k) == len(LABELS)


def test_batch_result_reports_what_ran(client: Client, images: np.ndarray) -> None:
    result = client.classify(images, strategy="tbn")
    assert (result.model, result.version, result.strategy) == (MODEL, "1", "tbn")
    assert result.engine == "pytorch" and result.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert result.session_steps is None


def test_strategies(client: Client) -> None:
    strategies = {s.name: s for s in client.list_strategies()}
    assert {"none", "tent"} <= set(strategies)
    assert strategies["tent"].stateful and strategies["tent"].uses_gradients
    assert "lr" in strategies["tent"].defaults
    assert {s.name for s in client.list_strategies(MODEL)} <= set(strategies)


def test_session_lifecycle(client: Client, images: np.ndarray) -> None:
    batch = images[..., None]
    with client.session("cam-1", strategy="tent", settings={"lr": 1e-3}) as session:
        steps = [session.classify(batch).session_steps for _ in range(3)]
        assert steps == [1, 2, 3]
        info = session.info()
        assert (info.caller, info.model, info.strategy, info.sequence_id) == ("tester", MODEL, "tent", "cam-1")
        assert info.steps == 3 and info.settings["lr"] == pytest.approx(1e-3)
        snapshot = session.snapshot(return_data=True)
        assert snapshot.byte_size > 0 and snapshot.data
        assert session.reset().steps == 0
        assert session.classify(batch).session_steps == 1
        assert [s.sequence_id for s in client.sessions()] == ["cam-1"]
    assert client.sessions() == []
    with client.session("cam-1", strategy="tent") as again:
        assert again.classify(batch).session_steps == 1, "sequence_start must give a reused id a fresh state"
        again.classify(batch, end=True)
        assert client.sessions() == []


def test_errors_are_typed(client: Client, images: np.ndarray) -> None:
    with pytest.raises(NotFound):
        client.classify(images[0], model="no-such-model")
    with pytest.raises(InvalidArgument, match="bogus"):
        client.classify(images[0], strategy="bogus")
    with pytest.raises(InvalidArgument, match="shape"):
        client.classify(np.zeros((27, 28), np.uint8))
    with pytest.raises(NotFound):
        client.session("never-used", strategy="tent").info()


def test_tiny_deadline_is_deadline_exceeded(client: Client, images: np.ndarray) -> None:
    client.metadata()  # warm the caches so the deadline hits ModelInfer itself
    with pytest.raises(DeadlineExceeded) as caught:
        client.classify(np.repeat(images[..., None], 64, axis=0), timeout_s=1e-4)
    assert isinstance(caught.value, TtaserveError) and caught.value.code == "DEADLINE_EXCEEDED"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ttaserve.client.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_classify_models_strategies(url: str, png_files: list[Path]) -> None:
    done = _cli("classify", "--url", url, "--top-k", "2", *map(str, png_files[:2]))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["file", "label", "score", "top-2"]
    assert str(png_files[0]) in lines[2] and "class-" in lines[2]
    files = [str(p) for p in png_files[:2]]
    session = _cli("classify", "--url", url, "--strategy", "tent", "--session", "cli", "--batch-size", "1", *files)
    assert session.returncode == 0, session.stderr
    assert "strategy tent" in session.stdout and "entropy" in session.stdout
    models = _cli("models", "--url", url)
    assert models.returncode == 0 and MODEL in models.stdout and "READY" in models.stdout
    strategies = _cli("strategies", "--url", url)
    assert strategies.returncode == 0 and "tent" in strategies.stdout


def test_cli_lists_sessions(url: str, images: np.ndarray) -> None:
    with Client(url, caller="cli-lister") as owner, owner.session("cam-7", strategy="tent") as session:
        for _ in range(2):
            session.classify(images[..., None])
        mine = _cli("sessions", "--url", url, "--caller", "cli-lister")
        others = _cli("sessions", "--url", url, "--caller", "someone-else")
        everyone = _cli("sessions", "--url", url, "--caller", "someone-else", "--all-callers")
    assert mine.returncode == 0, mine.stderr
    header, _, row = mine.stdout.splitlines()
    assert header.split()[:4] == ["caller", "model", "strategy", "sequence"]
    assert row.split()[:6] == ["cli-lister", MODEL, "tent", "cam-7", "2", "0"]
    assert float(row.split()[6]) > 0 and "memory" in row
    assert "cam-7" not in others.stdout and "cam-7" in everyone.stdout


def test_a_resumed_session_continues_the_servers_state(url: str, images: np.ndarray) -> None:
    """A program that restarts and opens its session with ``resume`` continues the state; without it, the first
    batch starts afresh."""
    batch = images[..., None]
    with Client(url, caller="restarting") as before:
        gone = before.session("cam-r", strategy="tent")
        steps = [gone.classify(batch).session_steps for _ in range(2)]
        assert steps == [1, 2]
    with Client(url, caller="restarting") as after:
        with after.session("cam-r", strategy="tent", resume=True) as resumed:
            assert resumed.info().steps == 2
            continued = resumed.classify(batch)
        assert continued.session_steps == 3 and continued.session_event is None
        assert after.sessions() == [], "leaving the resumed session ended it"
        with after.session("cam-r", strategy="tent") as fresh:
            assert fresh.classify(batch).session_steps == 1


def test_cli_manages_one_session(url: str, png_files: list[Path], tmp_path: Path) -> None:
    key = ["--url", url, "--caller", "cli-owner", "--strategy", "tent"]
    files = [str(p) for p in png_files[:2]]
    opened = _cli("classify", *key, "--session", "cam-5", "--batch-size", "1", "--keep", *files)
    assert opened.returncode == 0, opened.stderr

    def field(output: str, name: str) -> str:
        line = next(line for line in output.splitlines() if line.startswith(name + " "))
        return line[len(name) :].strip()

    info = _cli("session", "info", "cam-5", *key)
    assert info.returncode == 0, info.stderr
    assert field(info.stdout, "steps") == "2" and field(info.stdout, "held in") == "memory"
    assert field(info.stdout, "caller") == "cli-owner" and "last entropy" in info.stdout
    saved = tmp_path / "cam-5.snapshot"
    snapshot = _cli("session", "snapshot", "cam-5", *key, "--file", str(saved))
    assert snapshot.returncode == 0 and saved.stat().st_size > 0 and str(saved) in snapshot.stdout
    more = _cli("classify", *key, "--session", "cam-5", "--resume", "--keep", files[0])
    assert more.returncode == 0, more.stderr
    assert field(_cli("session", "info", "cam-5", *key).stdout, "steps") == "3"
    reset = _cli("session", "reset", "cam-5", *key)
    assert reset.returncode == 0 and field(reset.stdout, "steps") == "0" and field(reset.stdout, "resets") == "1"
    restored = _cli("session", "restore", "cam-5", *key, "--file", str(saved))
    assert restored.returncode == 0 and field(restored.stdout, "steps") == "2", restored.stderr
    ended = _cli("session", "end", "cam-5", *key)
    assert ended.returncode == 0 and "ended" in ended.stdout
    missing = _cli("session", "info", "cam-5", *key)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr and "cam-5" in missing.stderr
    assert missing.stderr.count("\n") == 1


def test_cli_errors_are_one_line(url: str, png_files: list[Path]) -> None:
    done = _cli("classify", "--url", url, "--model", "nope", str(png_files[0]))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "NOT_FOUND" in done.stderr and "Traceback" not in done.stderr


def test_async_client(url: str, images: np.ndarray) -> None:
    async def run() -> None:
        async with AsyncClient(url, caller="async") as client:
            assert await client.live()
            assert (await client.models())[0].name == MODEL
            result = await client.classify(images[..., None], top_k=2)
            assert len(result) == 4 and len(result[0].top_k) == 2
            assert "tent" in {s.name for s in await client.list_strategies()}
            concurrent = await asyncio.gather(*(client.classify(image) for image in images))
            np.testing.assert_allclose(
                np.stack([r[0].logits for r in concurrent]), np.stack([c.logits for c in result]), rtol=1e-5, atol=1e-5
            )
            async with client.session("a-1", strategy="tent") as session:
                assert (await session.classify(images[..., None])).session_steps == 1
                assert (await session.classify(images[..., None])).session_steps == 2
                assert (await session.info()).caller == "async"
            left_open = client.session("a-2", strategy="tent")
            assert (await left_open.classify(images[..., None])).session_steps == 1
            async with client.session("a-2", strategy="tent", resume=True) as resumed:
                assert (await resumed.classify(images[..., None])).session_steps == 2
            assert await client.sessions() == []
            with pytest.raises(DeadlineExceeded):
                await client.classify(np.repeat(images[..., None], 64, axis=0), timeout_s=1e-4)

    asyncio.run(run())


def _lose_the_answer_of_step(server: ServerHandle, link: LossyLink, sequence_id: str, step: int) -> threading.Thread:
    """Hold the server's answers back until session ``sequence_id`` has applied ``step``, then cut the link."""
    key = SessionKey("anonymous", MODEL, "tent", sequence_id)

    def cut_after_the_step() -> None:
        wait_until(lambda: getattr(server.sessions.get(key), "steps", 0) >= step, 30, f"step {step} applied")
        link.cut()

    link.hold()
    cutter = threading.Thread(target=cut_after_the_step)
    cutter.start()
    return cutter


def _session_logits(url: str, sequence_id: str, batches: list[np.ndarray]) -> list[np.ndarray]:
    with Client(url, timeout_s=30) as client, client.session(sequence_id, strategy="tent") as session:
        return [np.stack([c.logits for c in session.classify(batch)]) for batch in batches]


def _replays(server: ServerHandle) -> float:
    labels = {"model": MODEL, "strategy": "tent"}
    return server.metrics.registry.get_sample_value("ttaserve_session_replays_total", labels) or 0.0


def test_a_session_step_whose_answer_was_lost_is_retried_and_applied_once(
    server: ServerHandle, url: str, images: np.ndarray
) -> None:
    """The connection drops after the server applied the step: the client retries on its own, the server knows the
    request id and answers again, and the stream goes on exactly as if nothing had happened."""
    batches = [np.roll(images, shift, axis=0)[..., None] for shift in range(3)]
    reference = _session_logits(url, "lossless", batches)
    replays = _replays(server)
    with (
        LossyLink(server.grpc_port) as link,
        Client(f"127.0.0.1:{link.port}", timeout_s=30) as client,
        client.session("lossy", strategy="tent") as session,
    ):
        got = [session.classify(batches[0])]
        cutter = _lose_the_answer_of_step(server, link, "lossy", 2)
        got.append(session.classify(batches[1]))
        cutter.join()
        got.append(session.classify(batches[2]))
    assert [r.session_event for r in got] == ["started", "replayed", None]
    assert [r.session_steps for r in got] == [1, 2, 3]
    for expected, result in zip(reference, got, strict=True):
        np.testing.assert_array_equal(np.stack([c.logits for c in result]), expected)
    assert _replays(server) == replays + 1


def test_the_async_client_retries_a_lost_session_answer_too(server: ServerHandle, url: str, images: np.ndarray) -> None:
    """The asyncio client shares the retry policy and the request ids: the same lost answer, the same stream."""
    batches = [np.roll(images, shift, axis=0)[..., None] for shift in range(3)]
    reference = _session_logits(url, "lossless-async", batches)

    async def run(link: LossyLink) -> list[BatchResult]:
        async with (
            AsyncClient(f"127.0.0.1:{link.port}", timeout_s=30) as client,
            client.session("lossy-async", strategy="tent") as session,
        ):
            got = [await session.classify(batches[0])]
            cutter = _lose_the_answer_of_step(server, link, "lossy-async", 2)
            got.append(await session.classify(batches[1]))
            cutter.join()
            got.append(await session.classify(batches[2]))
            return got

    with LossyLink(server.grpc_port) as link:
        got = asyncio.run(run(link))
    assert [(r.session_event, r.session_steps) for r in got] == [("started", 1), ("replayed", 2), (None, 3)]
    for expected, result in zip(reference, got, strict=True):
        np.testing.assert_array_equal(np.stack([c.logits for c in result]), expected)


def test_a_failed_batch_sent_again_keeps_its_request_id(server: ServerHandle, url: str, images: np.ndarray) -> None:
    """Without automatic retries the application sees the failure; sending the same batch again is then safe,
    and a different batch after a failure is a new step."""
    batches = [np.roll(images, shift, axis=0)[..., None] for shift in range(3)]
    reference = _session_logits(url, "lossless-manual", batches)
    with (
        LossyLink(server.grpc_port) as link,
        Client(f"127.0.0.1:{link.port}", timeout_s=30, retries=0) as client,
        client.session("lossy-manual", strategy="tent") as session,
    ):
        first = session.classify(batches[0])
        cutter = _lose_the_answer_of_step(server, link, "lossy-manual", 2)
        with pytest.raises(Unavailable):
            session.classify(batches[1])
        cutter.join()
        again = session.classify(batches[1])
        assert (again.session_event, again.session_steps) == ("replayed", 2)
        third = session.classify(batches[2])
    assert third.session_steps == 3
    for expected, result in zip(reference, [first, again, third], strict=True):
        np.testing.assert_array_equal(np.stack([c.logits for c in result]), expected)
