"""What a spilled session costs: streams round-robin over more sessions than the table holds, so that every request
restores its session from disk (and spills another), against the same streams on a server whose table holds them
all, measured in the same run (interleaved rounds, median ratio of per-request latency). The spilling server runs
twice: as it serves (spills written by the background writer) and with every spill written inside the request that
caused it (the writer's line set to 0), to show what writing in the background saves.

    python benchmarks/bench_session_spill.py [--rounds 5] [--requests 60] [--streams 8] [--batch-size 16]
                                             [--strategies tent rmt]

Both servers run in this process on the same PyTorch model (the shared ResNet-20 when ``../shared`` is there);
the tight one holds half the streams (``max_sessions``), with ``spill_evicted_sessions`` on, as by default.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as tc
from bench_serving import make_repository, percentile, resnet20

from ttaserve.server.app import ServerHandle, start_server
from ttaserve.server.settings import ServerSettings


def serve(repo: Path, snapshots: Path, max_sessions: int, background_spills: bool = True) -> ServerHandle:
    settings = ServerSettings(
        model_repository=repo,
        grpc_host="127.0.0.1",
        grpc_port=0,
        http_port=None,
        metrics_port=None,
        device="cpu",
        snapshot_dir=snapshots,
        max_sessions=max_sessions,
    )
    server = start_server(settings)
    if not background_spills:
        server.sessions.spill_writer.limit = 0
    return server


def round_robin(url: str, batch: np.ndarray, strategy: str, streams: int, requests: int, tag: str) -> list[float]:
    """Milliseconds per request, the streams taking turns (the first pass, which opens them, not timed)."""
    client = tc.InferenceServerClient(url)
    tensor = tc.InferInput("input", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    outputs = [tc.InferRequestedOutput("logits")]
    parameters = {"tta_strategy": strategy}
    latencies = []
    for i in range(streams + requests):
        t0 = time.perf_counter()
        client.infer("resnet20", [tensor], outputs=outputs, parameters=parameters, sequence_id=f"{tag}-{i % streams}")
        if i >= streams:
            latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--strategies", nargs="+", default=["tent", "rmt"])
    args = parser.parse_args()

    model, weights = resnet20()
    batch = np.random.default_rng(0).integers(0, 256, (args.batch_size, 32, 32, 3), dtype=np.uint8)
    p50s: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        make_repository(repo, b"", model.state_dict())
        servers = {
            "all live": serve(repo, Path(tmp) / "roomy", 4 * args.streams),
            "spilling": serve(repo, Path(tmp) / "tight", args.streams // 2),
            "spilling inline": serve(repo, Path(tmp) / "inline", args.streams // 2, background_spills=False),
        }
        try:
            for round_index in range(args.rounds):
                for strategy in args.strategies:
                    for label, server in servers.items():
                        url = f"127.0.0.1:{server.grpc_port}"
                        tag = f"{strategy}-{round_index}"
                        latencies = round_robin(url, batch, strategy, args.streams, args.requests, tag)
                        p50s.setdefault((strategy, label), []).append(percentile(latencies, 50))
            state_bytes = {s.key.strategy: s.state_bytes() for s in servers["all live"].sessions.sessions()}
            spills = {
                (strategy, label): servers[label].metrics.registry.get_sample_value(
                    "ttaserve_session_spills_total", {"model": "resnet20", "strategy": strategy}
                )
                for strategy in args.strategies
                for label in ("spilling", "spilling inline")
            }
        finally:
            for server in servers.values():
                server.stop()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, weights {weights}")
    print(f"{args.streams} streams round-robin, batch {args.batch_size}, {args.requests} timed requests per round")
    print("| strategy | state KiB | writes | all live p50 ms | spilling p50 ms | added ms | ratio | spills |")
    print("|---|---|---|---|---|---|---|---|")
    for strategy in args.strategies:
        live = statistics.median(p50s[(strategy, "all live")])
        for label, writes in (("spilling", "background"), ("spilling inline", "in the request")):
            spilling = statistics.median(p50s[(strategy, label)])
            print(
                f"| {strategy} | {state_bytes[strategy] / 1024:.0f} | {writes} | {live:.2f} | {spilling:.2f} | "
                f"{spilling - live:+.2f} | {spilling / live:.2f} | {spills[strategy, label]:.0f} |"
            )


if __name__ == "__main__":
    main()
