"""The gRPC front ends alone: what one call costs on the native C++ front end and on grpcio's Python server.

Both servers run ``ttaserve serve`` on the same repository, in their own processes, side by side. The client (the
real ``tritonclient``) alternates rounds between them and times calls that do almost no work in the handler —
``ServerLive`` and ``ModelMetadata`` — so what is measured is the transport: latency p50, and the server process's
CPU time per call (from /proc, Linux only).

    python benchmarks/bench_frontends.py [--rounds 5] [--calls 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tritonclient.grpc as tc
from bench_serving import free_port, make_repository, start_server

from ttaserve.server.architectures import build_architecture
from ttaserve.server.onnx_export import export_onnx_bytes

FRONTENDS = ("native", "python")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(call: Callable[[], object], pid: int, calls: int) -> tuple[float, float]:
    """(p50 latency ms, server CPU ms per call) over ``calls`` calls."""
    for _ in range(200):
        call()
    latencies = []
    cpu_before = cpu_seconds(pid)
    for _ in range(calls):
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)
    cpu_ms = (cpu_seconds(pid) - cpu_before) / calls * 1000
    return float(np.percentile(latencies, 50) * 1000), cpu_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    onnx_bytes = export_onnx_bytes(build_architecture("cifar_resnet20").eval(), (3, 32, 32))
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_repository(Path(tmp), onnx_bytes)
        ports = {frontend: free_port() for frontend in FRONTENDS}
        processes = {frontend: start_server(Path(tmp), port, "cpu", frontend) for frontend, port in ports.items()}
        try:
            for _ in range(args.rounds):
                for frontend in FRONTENDS:
                    client = tc.InferenceServerClient(f"127.0.0.1:{ports[frontend]}")
                    pid = processes[frontend].pid
                    calls = {
                        "ServerLive": client.is_server_live,
                        "ModelMetadata": lambda c=client: c.get_model_metadata("resnet20"),
                    }
                    for name, call in calls.items():
                        results.setdefault((name, frontend), []).append(measure(call, pid, args.calls))
        finally:
            for process in processes.values():
                process.terminate()
                process.wait(timeout=30)
    print(f"{os.cpu_count()} cores, {args.rounds} alternating rounds of {args.calls} calls (medians over rounds)")
    print("| call | front end | p50 ms | server CPU ms per call |")
    print("|---|---|---|---|")
    for (name, frontend), rounds in results.items():
        p50 = statistics.median(r[0] for r in rounds)
        cpu = statistics.median(r[1] for r in rounds)
        print(f"| {name} | {frontend} | {p50:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
