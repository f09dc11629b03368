"""Scale-out with sticky sessions: two real server processes sharing a snapshot folder behind a real nginx that
consistent-hashes the ``ttaserve-session`` header. Sessions stick to one replica; after one replica is SIGKILLed its
sessions resume on the other from their last snapshot, with the outputs of an uninterrupted run."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

from opskit.procs import ServerProcess, nginx_grpc_proxy, require_binary, ttaserve_replicas
from opskit.traffic import infer, session_event, session_header, write_resnet
from ttaserve.client import Client

STEPS_BEFORE_FAILOVER = 2
MAX_SESSIONS_TRIED = 24


def owners(replicas: list[ServerProcess]) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """(caller, sequence id) -> [(replica index, steps)] for every live session, asked of each replica directly."""
    found: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for index, replica in enumerate(replicas):
        with Client(replica.url) as client:
            for info in client.sessions(all_callers=True):
                found[(info.caller, info.sequence_id)].append((index, info.steps))
    return found


@pytest.mark.slow
def test_sessions_stick_to_a_replica_and_fail_over(tmp_path: Path, real_images: np.ndarray) -> None:
    require_binary("nginx", "nginx-light")
    repo = tmp_path / "repo"
    write_resnet(repo, snapshot_every_steps=1)
    rng = np.random.default_rng(0)
    batches = [real_images[rng.permutation(len(real_images))[:8]] for _ in range(4)]
    with (
        ttaserve_replicas(tmp_path, repo, tmp_path / "snapshots", count=2) as replicas,
        nginx_grpc_proxy(tmp_path / "nginx", [r.grpc_port for r in replicas]) as proxy,
    ):
        client = tc.InferenceServerClient(proxy.url)
        # open sessions through the proxy until each replica owns at least two
        ids: list[str] = []
        while len(ids) < MAX_SESSIONS_TRIED:
            sid = f"cam-{len(ids)}"
            for step in range(STEPS_BEFORE_FAILOVER):
                infer(client, batches[step], "tent", sid, start=step == 0, headers=session_header(sid))
            ids.append(sid)
            placed = owners(replicas)
            per_replica = [sum(1 for where in placed.values() if where[0][0] == i) for i in range(2)]
            if min(per_replica) >= 2:
                break
        assert min(per_replica) >= 2, f"consistent hashing put {per_replica} sessions on the replicas"

        # the SDK sets the routing header itself
        with Client(proxy.url, caller="sdk-user") as sdk, sdk.session("sdk-cam", "resnet", "tent") as session:
            session.classify(batches[0])
            session.classify(batches[1])
            placed = owners(replicas)
            assert [steps for _, steps in placed[("sdk-user", "sdk-cam")]] == [2]

        # every session lives on exactly one replica and all its requests landed there
        placed = owners(replicas)
        for sid in ids:
            where = placed[("anonymous", sid)]
            assert len(where) == 1 and where[0][1] == STEPS_BEFORE_FAILOVER, (sid, where)
        upstreams: dict[str, set[str]] = defaultdict(set)
        for header, upstream in proxy.routes():
            upstreams[header].add(upstream)
        port_of = {i: str(r.grpc_port) for i, r in enumerate(replicas)}
        for sid in ids:
            (upstream,) = upstreams[f"anonymous/resnet/{sid}"]
            assert upstream.endswith(":" + port_of[placed[("anonymous", sid)][0][0]])

        victim, survivor = replicas
        moved = [sid for sid in ids if placed[("anonymous", sid)][0][0] == 0]
        stayed = [sid for sid in ids if placed[("anonymous", sid)][0][0] == 1]
        direct = tc.InferenceServerClient(survivor.url)
        reference = [
            infer(direct, batches[k], "tent", "uninterrupted", start=k == 0).as_numpy("logits") for k in range(4)
        ]

        victim.child.kill()  # SIGKILL: no drain, no goodbye; the per-step snapshots are all that is left
        for sid in moved:
            for step in (2, 3):
                result = infer(client, batches[step], "tent", sid, headers=session_header(sid))
                assert session_event(result) == ("restored" if step == 2 else ""), sid
                assert result.get_response().parameters["tta_session_steps"].int64_param == step + 1
                np.testing.assert_array_equal(result.as_numpy("logits"), reference[step])
        for sid in stayed:  # the survivor's own sessions carry on untouched
            result = infer(client, batches[2], "tent", sid, headers=session_header(sid))
            assert session_event(result) == ""
            np.testing.assert_array_equal(result.as_numpy("logits"), reference[2])
        with Client(survivor.url) as admin:
            on_survivor = {s.sequence_id: s.steps for s in admin.sessions(all_callers=True)}
        assert all(on_survivor[sid] == 4 for sid in moved)
        assert survivor.metric("ttaserve_sessions_opened_total", event="restored") == len(moved)
