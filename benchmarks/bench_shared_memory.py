"""What system shared memory saves a client on the same host: one tritonclient sends batches of H×W RGB uint8 images
to ``ttaserve serve --allow-shared-memory``, each request either carrying the pixels in the message or naming a
shared-memory region the client has just written them into. Rounds alternate between the two; the figures are
medians over rounds of p50 latency, images/s, and CPU per request of the client process and the server process.

The model is a global average pool and a linear layer (a TorchScript file), so the request path is what is timed:
decoding, normalising H×W×3 values per image, and the transport.

    python benchmarks/bench_shared_memory.py [--rounds 5] [--seconds 2] [--size 224] [--batch-sizes 1 16 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as tc
import tritonclient.utils.shared_memory as shm
import yaml

MODEL = "pool"


class PoolLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3)))


@dataclass
class Round:
    p50_ms: float
    images_per_s: float
    client_cpu_ms: float
    server_cpu_ms: float


def write_repository(root: Path, size: int) -> None:
    model_dir = root / MODEL
    (model_dir / "1").mkdir(parents=True)
    torch.jit.script(PoolLinear().eval()).save(str(model_dir / "1" / "model.ts"))
    config = {
        "platform": "torchscript",
        "input": {"height": size, "width": size, "channels": 3, "layout": "NHWC"},
        "max_batch_size": 256,
    }
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config))


def start_server(repo: Path) -> tuple[subprocess.Popen, int]:
    """The server on a free port, read from its start-up log line."""
    command = [sys.executable, "-m", "ttaserve.client.cli", "serve", "--model-repository", str(repo)]
    command += [
        "--grpc-port",
        "0",
        "--no-http",
        "--host",
        "127.0.0.1",
        "--no-metrics",
        "--device",
        "cpu",
        "--allow-shared-memory",
    ]
    log = repo / "server.log"
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=sink, cwd=repo)
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None:
        for line in log.read_text().splitlines():
            if "ttaserve listening on" in line:
                return process, int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    client: tc.InferenceServerClient, batch: np.ndarray, transport: str, seconds: float, server_pid: int
) -> Round:
    """Requests back to back for ``seconds``; each one first puts the batch where it travels from."""
    tensor = tc.InferInput("input", list(batch.shape), "UINT8")
    outputs = [tc.InferRequestedOutput("logits")]
    tag = uuid.uuid4().hex[:12]
    handle = None
    if transport == "shm":
        handle = shm.create_shared_memory_region(tag, f"/bench-{tag}", batch.nbytes)
        client.register_system_shared_memory(tag, f"/bench-{tag}", batch.nbytes)
        tensor.set_shared_memory(tag, batch.nbytes)
    try:
        latencies = []
        client_start, server_start = time.process_time(), process_cpu_s(server_pid)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            if handle is None:
                tensor.set_data_from_numpy(batch)
            else:
                shm.set_shared_memory_region(handle, [batch])
            client.infer(MODEL, [tensor], outputs=outputs)
            latencies.append(time.perf_counter() - t0)
        count = len(latencies)
        return Round(
            p50_ms=statistics.median(latencies) * 1000,
            images_per_s=count * len(batch) / sum(latencies),
            client_cpu_ms=(time.process_time() - client_start) / count * 1000,
            server_cpu_ms=(process_cpu_s(server_pid) - server_start) / count * 1000,
        )
    finally:
        if handle is not None:
            client.unregister_system_shared_memory(tag)
            shm.destroy_shared_memory_region(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    batches = {b: rng.integers(0, 256, (b, args.size, args.size, 3), dtype=np.uint8) for b in args.batch_sizes}
    transports = ("message", "shm")
    rounds: dict[tuple[int, str], list[Round]] = {(b, t): [] for b in args.batch_sizes for t in transports}
    with tempfile.TemporaryDirectory() as tmp:
        write_repository(Path(tmp), args.size)
        server, port = start_server(Path(tmp))
        try:
            client = tc.InferenceServerClient(f"127.0.0.1:{port}")
            for batch in batches.values():  # warm-up: first calls, allocations
                measure(client, batch, "message", 0.2, server.pid)
            for _ in range(args.rounds):
                for (batch_size, transport), results in rounds.items():
                    results.append(measure(client, batches[batch_size], transport, args.seconds, server.pid))
        finally:
            server.terminate()
            server.wait(timeout=30)

    print(
        f"{args.size}x{args.size} RGB uint8 images, torch {torch.__version__}, {os.cpu_count()} cores, "
        f"{args.rounds} interleaved rounds of {args.seconds:.1f} s, one client"
    )
    print("| batch | MB per batch | tensors in | p50 ms | img/s | client CPU ms/request | server CPU ms/request |")
    print("|---|---|---|---|---|---|---|")
    for (batch_size, transport), results in rounds.items():
        print(
            f"| {batch_size} | {batches[batch_size].nbytes / 1e6:.1f} | {transport} "
            f"| {statistics.median(r.p50_ms for r in results):.2f} "
            f"| {statistics.median(r.images_per_s for r in results):.0f} "
            f"| {statistics.median(r.client_cpu_ms for r in results):.2f} "
            f"| {statistics.median(r.server_cpu_ms for r in results):.2f} |"
        )
    print()
    for batch_size in args.batch_sizes:
        pairs = zip(rounds[(batch_size, "shm")], rounds[(batch_size, "message")], strict=True)
        speedup = statistics.median(s.images_per_s / m.images_per_s for s, m in pairs)
        print(f"batch {batch_size}: shared memory / message throughput (median of per-round ratios) {speedup:.2f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
