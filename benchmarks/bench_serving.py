"""Serving overhead: strategy ``none`` over gRPC (the real ``tritonclient``) against the same ONNX model's in-process
ONNX Runtime forward, measured in the same run.

The server runs in its own process (as in production: the client's Python never shares the server's GIL). Rounds
alternate between the in-process baseline and each served scenario; the reported ratio is the median over rounds
of served images/s divided by in-process images/s at the same batch size. Clients send UINT8 NHWC pixels (what a
camera sends); the server decodes and normalises them, the baseline gets already-normalised float32 (the model's
cost alone), so the ratio charges the server for all of its work.

    python benchmarks/bench_serving.py [--rounds 5] [--seconds 2] [--engine onnx|torch-cuda]
                                       [--batch-sizes 1 64] [--clients 1 4] [--frontends native python]
                                       [--instances 1 2] [--transports message shm http]
                                       [--security plain tls]

Each gRPC front end (``--frontends``: the native C++ one and grpcio's Python server) and each model ``instances``
count (``--instances``: forwards that may run at once, each with cores / instances ONNX Runtime threads) gets a
server process of its own; all run throughout, and each round measures every one, so their ratios come from the
same rounds.

``--transports shm`` also measures clients that pass the batch and the logits through system shared memory (Triton's
shared-memory extension, for a client on the same host): the messages then carry only the tensors' descriptions.
``--transports http`` measures ``tritonclient.http`` against the server's v2 REST port (binary tensor data both
ways, the client's default).

``--security tls`` serves (and measures) each server also with TLS on both ports, from a throwaway CA (trustme):
what encrypting the requests and responses costs, against plaintext in the same rounds.

``--engine torch-cuda`` serves the PyTorch model on the GPU and compares with the same network's in-process CUDA
forward (synchronised), for machines whose ONNX Runtime has no CUDA provider.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import tritonclient.grpc as tc
import tritonclient.http as th
import tritonclient.utils.shared_memory as shm
import yaml

from ttaserve.server.architectures import build_architecture, load_state_dict
from ttaserve.server.onnx_export import export_onnx_bytes

ROOT = Path(__file__).resolve().parents[1]
RESNET20 = ROOT.parent / "shared" / "models" / "cifar10" / "resnet20-12fca82f.th"
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


@dataclass
class Measurement:
    images_per_s: float
    latencies_ms: list[float]


def resnet20() -> tuple[torch.nn.Module, str]:
    """The CIFAR ResNet-20 with the shared pretrained weights where ``../shared`` is there (else random ones: the
    cost is the same), and which weights it has."""
    model = build_architecture("cifar_resnet20")
    if not RESNET20.is_file():
        return model, "random (../shared missing)"
    model.load_state_dict(load_state_dict(RESNET20))
    return model, RESNET20.name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_repository(root: Path, onnx_bytes: bytes, state_dict: dict | None = None, instances: int = 1) -> None:
    """One model: the ONNX export, or (``state_dict`` given) the PyTorch network."""
    model_dir = root / "resnet20"
    (model_dir / "1").mkdir(parents=True)
    if state_dict is None:
        (model_dir / "1" / "model.onnx").write_bytes(onnx_bytes)
    else:
        torch.save(state_dict, model_dir / "1" / "model.pt")
    config = {
        "platform": "onnx" if state_dict is None else "pytorch",
        **({} if state_dict is None else {"architecture": "cifar_resnet20"}),
        "input": {"height": 32, "width": 32, "channels": 3, "layout": "NHWC"},
        "preprocessing": {"mean": MEAN.ravel().tolist(), "std": STD.ravel().tolist()},
        "max_batch_size": 256,
        "dynamic_batching": {"enabled": True, "max_batch_size": 64, "max_queue_delay_us": 0},
        "instances": instances,
    }
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config))


@dataclass(frozen=True)
class Pki:
    """A throwaway CA and a certificate for 127.0.0.1, as PEM files."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def create(cls, folder: Path) -> Pki:
        import trustme

        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1")
        ca.cert_pem.write_to_path(str(folder / "ca.pem"))
        leaf.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
        leaf.private_key_pem.write_to_path(str(folder / "key.pem"))
        return cls(folder / "ca.pem", folder / "cert.pem", folder / "key.pem")


def start_server(
    repo: Path, port: int, http_port: int, device: str, frontend: str, pki: Pki | None
) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "ttaserve.client.cli",
        "serve",
        "--model-repository",
        str(repo),
        "--grpc-port",
        str(port),
        "--http-port",
        str(http_port),
        "--host",
        "127.0.0.1",
        "--device",
        device,
        "--metrics-port",
        str(free_port()),
        "--frontend",
        frontend,
        "--allow-shared-memory",
    ]
    if pki is not None:
        command += ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key)]
    # cwd: the server writes session snapshots under its working directory
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=repo)
    client = grpc_client(f"127.0.0.1:{port}", pki)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if client.is_model_ready("resnet20"):
                return process
        except Exception:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"server did not start: {process.stderr.read().decode() if process.stderr else ''}")


def onnx_forward(session: ort.InferenceSession) -> Callable[[np.ndarray], object]:
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def cuda_forward(model: torch.nn.Module) -> Callable[[np.ndarray], object]:
    """Host array in, logits back on the host: the same round trip the server makes."""
    gpu = model.cuda().eval()

    @torch.inference_mode()
    def forward(x: np.ndarray) -> object:
        return gpu(torch.from_numpy(x).cuda()).cpu()

    return forward


def run_in_process(forward: Callable[[np.ndarray], object], batch: np.ndarray, seconds: float) -> Measurement:
    x = ((batch.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32)
    x = np.ascontiguousarray(x)
    latencies = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        forward(x)
        latencies.append((time.perf_counter() - t0) * 1000)
    total_s = sum(latencies) / 1000
    return Measurement(len(latencies) * len(batch) / total_s, latencies)


@contextmanager
def request_tensors(
    client: tc.InferenceServerClient, batch: np.ndarray, transport: str
) -> Iterator[tuple[list[tc.InferInput], list[tc.InferRequestedOutput]]]:
    """The request's input and output: in the messages, or in shared-memory regions of this client's own."""
    tensor = tc.InferInput("input", list(batch.shape), "UINT8")
    output = tc.InferRequestedOutput("logits")
    if transport == "message":
        tensor.set_data_from_numpy(batch)
        yield [tensor], [output]
        return
    tag = uuid.uuid4().hex[:12]
    logits_bytes = len(batch) * 10 * 4
    regions = {"in": batch.nbytes, "out": logits_bytes}
    handles = {
        role: shm.create_shared_memory_region(f"{role}-{tag}", f"/bench-{role}-{tag}", size)
        for role, size in regions.items()
    }
    try:
        shm.set_shared_memory_region(handles["in"], [batch])
        for role, size in regions.items():
            client.register_system_shared_memory(f"{role}-{tag}", f"/bench-{role}-{tag}", size)
        tensor.set_shared_memory(f"in-{tag}", batch.nbytes)
        output.set_shared_memory(f"out-{tag}", logits_bytes)
        yield [tensor], [output]
    finally:
        for role, handle in handles.items():
            client.unregister_system_shared_memory(f"{role}-{tag}")
            shm.destroy_shared_memory_region(handle)


def grpc_client(url: str, pki: Pki | None) -> tc.InferenceServerClient:
    if pki is None:
        return tc.InferenceServerClient(url)
    return tc.InferenceServerClient(url, ssl=True, root_certificates=str(pki.ca))


def http_client(url: str, pki: Pki | None) -> th.InferenceServerClient:
    if pki is None:
        return th.InferenceServerClient(url)
    context = ssl.create_default_context(cafile=str(pki.ca))
    return th.InferenceServerClient(url, ssl=True, ssl_context_factory=lambda: context)


@contextmanager
def connected(
    urls: dict[str, str], batch: np.ndarray, transport: str, pki: Pki | None
) -> Iterator[tuple[Callable[..., object], list[object], list[object]]]:
    """A client of the transport (over TLS when ``pki`` is given), with the request's input and output ready."""
    if transport == "http":
        with http_client(urls["http"], pki) as client:
            tensor = th.InferInput("input", list(batch.shape), "UINT8")
            tensor.set_data_from_numpy(batch)
            yield client.infer, [tensor], [th.InferRequestedOutput("logits")]
        return
    with grpc_client(urls["grpc"], pki) as client, request_tensors(client, batch, transport) as tensors:
        yield client.infer, *tensors


def run_served(
    urls: dict[str, str], batch: np.ndarray, clients: int, seconds: float, transport: str, pki: Pki | None
) -> Measurement:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(index: int) -> None:
        with connected(urls, batch, transport, pki) as (infer, inputs, outputs):
            infer("resnet20", inputs, outputs=outputs)  # warm the connection
            barrier.wait()
            while time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                infer("resnet20", inputs, outputs=outputs)
                latencies[index].append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds + 0.05
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    flat = [x for per_client in latencies for x in per_client]
    return Measurement(len(flat) * len(batch) / elapsed, flat)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--engine", choices=("onnx", "torch-cuda"), default="onnx")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--frontends", nargs="+", choices=("native", "python"), default=["native", "python"])
    parser.add_argument("--instances", type=int, nargs="+", default=[1])
    parser.add_argument("--transports", nargs="+", choices=("message", "shm", "http"), default=["message"])
    parser.add_argument("--security", nargs="+", choices=("plain", "tls"), default=["plain"])
    args = parser.parse_args()

    model, weights = resnet20()
    onnx_bytes = export_onnx_bytes(model.eval(), (3, 32, 32))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    on_gpu = args.engine == "torch-cuda"
    if on_gpu:
        torch.backends.cudnn.allow_tf32 = False  # the server's deterministic default
        torch.backends.cudnn.deterministic = True
    forward = cuda_forward(model) if on_gpu else onnx_forward(session)

    rng = np.random.default_rng(0)
    servers = [(f, n, sec) for f in args.frontends for n in args.instances for sec in args.security]
    scenarios = [
        (f, n, sec, b, c, t)
        for b in args.batch_sizes
        for c in args.clients
        for f, n, sec in servers
        for t in args.transports
    ]
    batches = {b: rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8) for b in args.batch_sizes}
    ratios: dict[tuple[str, int, str, int, int, str], list[float]] = {s: [] for s in scenarios}
    served: dict[tuple[str, int, str, int, int, str], list[Measurement]] = {s: [] for s in scenarios}
    baseline: dict[int, list[Measurement]] = {b: [] for b in args.batch_sizes}

    with tempfile.TemporaryDirectory() as tmp:
        for instances in args.instances:
            repo = Path(tmp) / f"instances-{instances}"
            make_repository(repo, onnx_bytes, model.state_dict() if on_gpu else None, instances)
        pki = Pki.create(Path(tmp)) if "tls" in args.security else None
        ports = {server: (free_port(), free_port()) for server in servers}
        processes = [
            start_server(
                Path(tmp) / f"instances-{instances}",
                *server_ports,
                "cuda" if on_gpu else "cpu",
                frontend,
                pki if security == "tls" else None,
            )
            for (frontend, instances, security), server_ports in ports.items()
        ]
        try:
            for _ in range(args.rounds):
                for scenario in scenarios:
                    frontend, instances, security, batch_size, clients, transport = scenario
                    reference = run_in_process(forward, batches[batch_size], args.seconds)
                    grpc_port, http_port = ports[(frontend, instances, security)]
                    urls = {"grpc": f"127.0.0.1:{grpc_port}", "http": f"127.0.0.1:{http_port}"}
                    scenario_pki = pki if security == "tls" else None
                    measured = run_served(urls, batches[batch_size], clients, args.seconds, transport, scenario_pki)
                    baseline[batch_size].append(reference)
                    served[scenario].append(measured)
                    ratios[scenario].append(measured.images_per_s / reference.images_per_s)
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=30)

    if on_gpu:
        engine = f"PyTorch {torch.__version__} on {torch.cuda.get_device_name(0)}"
    else:
        engine = f"ONNX Runtime {ort.__version__} CPU"
    print(
        f"ResNet-20 ({weights}), {engine}, {os.cpu_count()} cores, "
        f"{args.rounds} interleaved rounds of {args.seconds:.1f} s"
    )
    print(
        "| front end | instances | security | tensors in | batch | clients | served img/s | in-process img/s "
        "| ratio (median) | served p50 ms | served p99 ms | in-process p50 ms | added p50 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for scenario in scenarios:
        frontend, instances, security, batch_size, clients, transport = scenario
        runs = served[scenario]
        refs = baseline[batch_size]
        lat = [x for m in runs for x in m.latencies_ms]
        ref_lat = [x for m in refs for x in m.latencies_ms]
        p50, ref_p50 = percentile(lat, 50), percentile(ref_lat, 50)
        print(
            f"| {frontend} | {instances} | {security} | {transport} | {batch_size} | {clients} "
            f"| {statistics.median(m.images_per_s for m in runs):.0f} "
            f"| {statistics.median(m.images_per_s for m in refs):.0f} "
            f"| {statistics.median(ratios[scenario]):.2f} | {p50:.3f} "
            f"| {percentile(lat, 99):.3f} | {ref_p50:.3f} | {p50 - ref_p50:+.3f} |"
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
