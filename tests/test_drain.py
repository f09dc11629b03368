"""Graceful drain of a real server process: SIGTERM while a slow request is in flight. The server reports not-ready at
once (health NOT_SERVING, ServerReady false, the metrics port's ready probe 503; liveness stays SERVING), refuses
new requests with UNAVAILABLE, finishes the in-flight one, snapshots its live sessions and exits 0."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from opskit.procs import start_ttaserve, wait_serving, wait_until
from opskit.traffic import infer, write_resnet
from ttaserve.server.sessions import SessionKey
from ttaserve.server.tensor_pack import unpack

BIG_BATCH = 1024


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_snapshots_sessions(tmp_path: Path, real_images: np.ndarray) -> None:
    repo, snapshots = tmp_path / "repo", tmp_path / "snapshots"
    write_resnet(repo, max_batch_size=BIG_BATCH)  # no periodic snapshots: only the drain writes them
    server = start_ttaserve(tmp_path / "server", repo, snapshots)
    try:
        wait_serving(server)
        client = tc.InferenceServerClient(server.url)
        for i, sid in enumerate(("live-1", "live-2")):
            infer(client, real_images[8 * i : 8 * i + 8], "tent", sid, start=True)
        assert not snapshots.exists() or not any(snapshots.iterdir())
        assert server.probe("/v2/health/ready") == 200
        big = np.resize(real_images, (BIG_BATCH, *real_images.shape[1:]))
        with ThreadPoolExecutor(1) as pool:
            # a TENT step on a 1024-image batch: seconds of work on one torch thread
            slow = pool.submit(infer, tc.InferenceServerClient(server.url), big, "tent", timeout_s=120)
            wait_until(lambda: server.metric("ttaserve_inflight_requests") >= 1, 30, "the big request in flight")
            server.child.popen.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            wait_until(lambda: server.health() == "NOT_SERVING", 10, "health NOT_SERVING after SIGTERM")
            assert server.health("liveness") == "SERVING"  # Kubernetes must not restart a draining pod
            # the same over the metrics port's HTTP probes (what the chart probes when TLS is on)
            assert server.probe("/v2/health/ready") == 503 and server.probe("/v2/health/live") == 200
            assert not client.is_server_ready()
            with pytest.raises(InferenceServerException) as refused:
                infer(client, real_images[:2])
            assert refused.value.status() == "StatusCode.UNAVAILABLE" and "draining" in refused.value.message()
            assert not slow.done(), "the slow request finished before the drain was observed; make it slower"
            result = slow.result(timeout=120)
        assert result.as_numpy("logits").shape == (BIG_BATCH, 10)
        assert server.child.popen.wait(timeout=60) == 0
        assert time.monotonic() - signalled < 60
        for sid in ("live-1", "live-2"):
            path = snapshots / f"{SessionKey('anonymous', 'resnet', 'tent', sid).digest()}.pt"
            payload = torch.load(path, weights_only=True)
            assert payload["key"] == ["anonymous", "resnet", "tent", sid]
            assert unpack(payload["state"])["fields"]["steps"] == 1
        assert "drained: 2 session snapshot(s)" in server.child.log.read_text()
    finally:
        server.child.kill()
        print(server.child.log_tail())  # shown by pytest when the test failed
