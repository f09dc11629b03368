"""Real traffic against the embedded Fashion-MNIST model, scraped by a real Prometheus, drawn as the Grafana dashboard:
the picture in docs/dashboard.png. Run from the tests folder (scripts/dashboard_demo.sh does):

    python -m opskit.demo --seconds 150 --out ../docs/dashboard.png

The stream starts on clean test images and switches to Gaussian-noise-corrupted ones (corrupt-tta, severity 4) a
third of the way in: the entropy of the unadapted model (none) jumps while TENT sessions pull theirs back down. Beside
it: camera sessions, bursts of short-lived sessions that overflow the session table (spills to disk, then idle
expiry), a TENT stream with a reckless learning rate that the collapse guard resets (the demo's guard reacts within
about ten batches instead of the default hundred), manual resets, and a trickle of invalid requests.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as tc
import yaml
from tritonclient.utils import InferenceServerException

from opskit.dashboard import load_dashboard, render
from opskit.procs import prometheus
from ttaserve.evaluation.corruptions import corrupt_images
from ttaserve.protocol import adaptation_pb2 as apb
from ttaserve.protocol import adaptation_pb2_grpc
from ttaserve.server.app import start_server
from ttaserve.server.fashion_mnist import load_split
from ttaserve.server.repository import DEFAULT_REPOSITORY
from ttaserve.server.settings import ServerSettings

MODEL = "fashion_mnist"


def datasets(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clean and corrupted Fashion-MNIST test images, (N, 28, 28, 1) uint8."""
    images, _labels = load_split("test")
    images = images[np.random.default_rng(seed).permutation(len(images))[:2000]]
    rgb = np.repeat(images[..., None], 3, axis=3)
    noisy = corrupt_images(rgb, "gaussian_noise", 4, seed=seed).mean(axis=3).round().astype(np.uint8)
    return images[..., None], noisy[..., None]


class Traffic:
    def __init__(self, url: str, clean: np.ndarray, noisy: np.ndarray, seconds: float) -> None:
        self.url = url
        self.clean, self.noisy = clean, noisy
        self.started = time.monotonic()
        self.seconds = seconds
        self.rng = np.random.default_rng(1)
        self.lock = threading.Lock()

    def running(self) -> bool:
        return time.monotonic() - self.started < self.seconds

    def batch(self, size: int) -> np.ndarray:
        shifted = time.monotonic() - self.started > self.seconds / 3
        pool = self.noisy if shifted else self.clean
        with self.lock:
            rows = self.rng.choice(len(pool), size, replace=False)
        return pool[rows]

    def infer(
        self,
        client: tc.InferenceServerClient,
        size: int,
        strategy: str = "none",
        settings: dict[str, float] | None = None,
        **sequence: str | bool,
    ) -> None:
        tensor = tc.InferInput("input", [size, 28, 28, 1], "UINT8")
        tensor.set_data_from_numpy(self.batch(size))
        # a failed request is part of the picture (the operator thread sends bad ones on purpose)
        with contextlib.suppress(InferenceServerException):
            client.infer(MODEL, [tensor], parameters={"tta_strategy": strategy, **(settings or {})}, **sequence)

    # --- the clients ---------------------------------------------------------------------------------------------

    def plain(self, seed: int) -> None:
        client, rng = tc.InferenceServerClient(self.url), np.random.default_rng(seed)
        while self.running():
            self.infer(client, int(rng.choice([1, 2, 4, 8, 16, 32])))
            time.sleep(float(rng.uniform(0.0, 0.05)))

    def cameras(self) -> None:
        client, step = tc.InferenceServerClient(self.url), 0
        while self.running():
            for camera in range(4):
                self.infer(client, 16, "tent", sequence_id=f"camera-{camera}", sequence_start=step == 0)
            step += 1
            time.sleep(0.05)

    def episodic(self) -> None:
        client, rng = tc.InferenceServerClient(self.url), np.random.default_rng(3)
        while self.running():
            self.infer(client, 16, str(rng.choice(["tbn", "alpha_bn"])))
            time.sleep(0.1)

    def bursts(self) -> None:
        """Every 20 s, six short-lived sessions that never end: the table (10) overflows, then they expire."""
        client, burst = tc.InferenceServerClient(self.url), 0
        while self.running():
            for i in range(6):
                self.infer(client, 8, "unmix_tns", sequence_id=f"burst-{burst}-{i}", sequence_start=True)
            burst += 1
            self.sleep(20)

    def reckless(self) -> None:
        """TENT with a learning rate 500x the default: it collapses, the guard resets it, it collapses again."""
        client, step = tc.InferenceServerClient(self.url), 0
        while self.running():
            lr = {"tta_lr": 0.5}  # sent every time: a session evicted in between comes back just as reckless
            self.infer(client, 16, "tent", lr, sequence_id="reckless", sequence_start=step == 0)
            step += 1
            time.sleep(0.02)

    def operator(self) -> None:
        """A manual reset now and then, and a client that sends the wrong image size."""
        client, tick = tc.InferenceServerClient(self.url), 0
        with grpc.insecure_channel(self.url) as channel:
            stub = adaptation_pb2_grpc.AdaptationStub(channel)
            while self.running():
                bad = tc.InferInput("input", [2, 32, 32, 1], "UINT8")
                bad.set_data_from_numpy(np.zeros((2, 32, 32, 1), np.uint8))
                with contextlib.suppress(InferenceServerException):
                    client.infer(MODEL, [bad])
                if tick % 15 == 14:
                    key = apb.SessionKey(model_name=MODEL, strategy="tent", sequence_id="camera-0")
                    with contextlib.suppress(grpc.RpcError):
                        stub.ResetSession(apb.ResetSessionRequest(key=key))
                tick += 1
                self.sleep(2)

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.2)


def repository(root: Path) -> Path:
    """The embedded model with a quicker collapse guard than the default (a 10-batch horizon from step 20)."""
    shutil.copytree(DEFAULT_REPOSITORY, root)
    config_path = root / MODEL / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["sessions"] = {"collapse_marginal_momentum": 0.9, "collapse_min_steps": 20}
    config_path.write_text(yaml.safe_dump(config))
    return root


def run(seconds: float, out: Path) -> None:
    clean, noisy = datasets()
    with tempfile.TemporaryDirectory() as tmp:
        settings = ServerSettings(
            model_repository=repository(Path(tmp) / "repo"),
            grpc_host="127.0.0.1",
            grpc_port=0,
            http_port=None,
            metrics_port=0,
            snapshot_dir=Path(tmp) / "snapshots",
            max_sessions=10,
            session_idle_timeout_s=15,
        )
        server = start_server(settings)
        try:
            with prometheus(Path(tmp) / "prometheus", [f"127.0.0.1:{server.metrics_port}"]) as prom:
                traffic = Traffic(f"127.0.0.1:{server.grpc_port}", clean, noisy, seconds)
                clients: list[Callable[[], None]] = [
                    lambda: traffic.plain(10),
                    lambda: traffic.plain(11),
                    traffic.cameras,
                    traffic.episodic,
                    traffic.bursts,
                    traffic.reckless,
                    traffic.operator,
                ]
                start = time.time()
                threads = [threading.Thread(target=c, daemon=True) for c in clients]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(seconds + 60)
                end = time.time()
                prom.wait_scraped_after(end)
                render(prom, load_dashboard(), start, end, out)
        finally:
            server.stop()
    print(f"wrote {out} ({seconds:.0f}s of traffic)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "docs" / "dashboard.png")
    args = parser.parse_args()
    run(args.seconds, args.out)


if __name__ == "__main__":
    main()
