"""Helpers shared by the tests: paths to ../shared, model repositories in temporary folders, servers on port 0.

Imported as ``support`` (not from conftest: two conftest modules would shadow each other on sys.path)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ttaserve.server.app import ServerHandle, start_server
from ttaserve.server.architectures import build_architecture
from ttaserve.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR_TEST = SHARED / "data" / "cifar10" / "test.npz"
CIFAR_TRAIN = SHARED / "data" / "cifar10" / "train10k.npz"
RESNET20 = SHARED / "models" / "cifar10" / "resnet20-12fca82f.th"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
CIFAR_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

requires_shared = pytest.mark.skipif(
    not (CIFAR_TEST.is_file() and RESNET20.is_file()),
    reason=f"needs the shared CIFAR-10 data and ResNet-20 checkpoint at {SHARED} (not present)",
)
requires_cifar_train = pytest.mark.skipif(
    not CIFAR_TRAIN.is_file(), reason=f"needs the shared CIFAR-10 training subset {CIFAR_TRAIN} (not present)"
)
requires_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"needs Debian's dataset-fashion-mnist at {FASHION_MNIST} (apt-get install -y dataset-fashion-mnist)",
)


def write_model(
    repo: Path,
    name: str,
    config: dict,
    weights: dict[int, object] | None = None,
) -> Path:
    """Write ``repo/name/config.yaml`` and one weights file per version (state dict, TorchScript or ONNX bytes)."""
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config))
    filename = {"pytorch": "model.pt", "torchscript": "model.ts", "onnx": "model.onnx"}[config["platform"]]
    for version, payload in (weights or {}).items():
        (model_dir / str(version)).mkdir(exist_ok=True)
        path = model_dir / str(version) / filename
        if isinstance(payload, torch.jit.ScriptModule):
            payload.save(str(path))
        elif isinstance(payload, bytes):
            path.write_bytes(payload)
        else:
            torch.save(payload, path)
    return model_dir


def seeded_resnet20(seed: int) -> torch.nn.Module:
    """A ResNet-20 with seeded random weights and non-trivial BN statistics (a model that needs no download)."""
    torch.manual_seed(seed)
    model = build_architecture("cifar_resnet20")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


class PoolClassifier(torch.nn.Module):
    """Global average pool + linear: cheap at any resolution (for the large-message test)."""

    def __init__(self, channels: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3)))


CIFAR_INPUT = {"height": 32, "width": 32, "channels": 3, "layout": "NHWC"}
CIFAR_PREPROCESSING = {"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)}


def cifar_resnet20_config(**extra: object) -> dict:
    """A model config of the CIFAR ResNet-20 (pytorch platform, CIFAR input, preprocessing and labels)."""
    base = {
        "platform": "pytorch",
        "architecture": "cifar_resnet20",
        "input": CIFAR_INPUT,
        "preprocessing": CIFAR_PREPROCESSING,
        "labels": list(CIFAR_LABELS),
    }
    return {**base, **extra}


def start(repo: Path | None, **settings: object) -> ServerHandle:
    base = {"grpc_host": "127.0.0.1", "grpc_port": 0, "http_port": 0, "metrics_port": 0, "model_repository": repo}
    return start_server(ServerSettings(**{**base, **settings}))


def read_idx_images(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    count, rows, cols = (int.from_bytes(data[i : i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)


def normalise(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)


def native_frontend_or_skip() -> None:
    """Skip unless the native gRPC front end builds here (it needs a C++ compiler, pkg-config and libgrpc++-dev)."""
    from ttaserve.server import native_frontend

    try:
        native_frontend.load_library()
    except (OSError, RuntimeError) as exc:
        pytest.skip(f"the native gRPC front end cannot be built here: {exc}")
