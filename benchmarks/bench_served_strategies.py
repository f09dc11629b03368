"""What an adaptive strategy costs a client end to end: each strategy served over gRPC (the real ``tritonclient``,
one client streaming UINT8 batches in a session) against ``none`` served by the same server and PyTorch model,
measured in the same run (interleaved rounds, median ratio of images/s).

    python benchmarks/bench_served_strategies.py [--rounds 5] [--seconds 2] [--batch-sizes 1 64]
                                                 [--strategies tbn alpha_bn unmix_tns]

``bench_strategies.py`` times the strategies' steps in process; this adds what serving them costs on top (parsing,
session lookup and locking, the collapse guard, response statistics), which is what a camera streaming to the
server sees.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as tc
from bench_serving import Measurement, free_port, make_repository, percentile, resnet20, start_server

from ttaserve.server.onnx_export import export_onnx_bytes

#: strategies whose state lives in a session (the others run stateless, one episode per request)
STATEFUL = {"unmix_tns", "tent", "rmt"}


def run_strategy(url: str, batch: np.ndarray, strategy: str, sequence_id: str, seconds: float) -> Measurement:
    client = tc.InferenceServerClient(url)
    tensor = tc.InferInput("input", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    outputs = [tc.InferRequestedOutput("logits")]
    session = {"sequence_id": sequence_id} if strategy in STATEFUL else {}
    parameters = {"tta_strategy": strategy}
    client.infer("resnet20", [tensor], outputs=outputs, parameters=parameters, **session)  # warm up, open the session
    latencies = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        client.infer("resnet20", [tensor], outputs=outputs, parameters=parameters, **session)
        latencies.append((time.perf_counter() - t0) * 1000)
    return Measurement(len(latencies) * len(batch) / (sum(latencies) / 1000), latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--strategies", nargs="+", default=["tbn", "alpha_bn", "unmix_tns"])
    args = parser.parse_args()

    model, weights = resnet20()
    labels = ["none", *args.strategies]
    rng = np.random.default_rng(0)
    batches = {b: rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8) for b in args.batch_sizes}
    served: dict[tuple[int, str], list[Measurement]] = {(b, s): [] for b in args.batch_sizes for s in labels}
    with tempfile.TemporaryDirectory() as tmp:
        make_repository(Path(tmp), export_onnx_bytes(model.eval(), (3, 32, 32)), model.state_dict())
        port = free_port()
        process = start_server(Path(tmp), port, "cpu")
        url = f"127.0.0.1:{port}"
        try:
            for round_index in range(args.rounds):
                for batch_size in args.batch_sizes:
                    for label in labels:
                        sequence_id = f"bench-{label}-{batch_size}-{round_index}"
                        measured = run_strategy(url, batches[batch_size], label, sequence_id, args.seconds)
                        served[(batch_size, label)].append(measured)
        finally:
            process.terminate()
            process.wait(timeout=30)

    print(
        f"ResNet-20 ({weights}), PyTorch {torch.__version__} CPU, {os.cpu_count()} cores, served over gRPC, "
        f"{args.rounds} interleaved rounds of {args.seconds:.1f} s"
    )
    print("| batch | strategy | served img/s | p50 ms | p99 ms | x none (median ratio of img/s) | added p50 ms |")
    print("|---|---|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        base = served[(batch_size, "none")]
        base_p50 = percentile([x for m in base for x in m.latencies_ms], 50)
        for label in labels:
            runs = served[(batch_size, label)]
            lat = [x for m in runs for x in m.latencies_ms]
            ratio = statistics.median(b.images_per_s / m.images_per_s for m, b in zip(runs, base, strict=True))
            p50 = percentile(lat, 50)
            print(
                f"| {batch_size} | {label} | {statistics.median(m.images_per_s for m in runs):.0f} | {p50:.3f} "
                f"| {percentile(lat, 99):.3f} | {ratio:.2f} | {p50 - base_p50:+.3f} |"
            )


if __name__ == "__main__":
    main()
