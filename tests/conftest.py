"""Shared fixtures: paths to ../shared, model repositories built in temporary folders, running servers on port 0."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
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


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with every platform: pytorch (2 versions, batching on), NCHW pytorch, TorchScript at 224x224,
    ONNX, and a model whose config is broken."""
    repo = tmp_path_factory.mktemp("repo")
    resnet = seeded_resnet20(0)
    write_model(
        repo,
        "resnet",
        {
            "platform": "pytorch",
            "architecture": "cifar_resnet20",
            "input": CIFAR_INPUT,
            "preprocessing": CIFAR_PREPROCESSING,
            "labels": list(CIFAR_LABELS),
            "max_batch_size": 64,
            "dynamic_batching": {"enabled": True, "max_batch_size": 64},
        },
        {1: seeded_resnet20(1).state_dict(), 2: resnet.state_dict()},
    )
    write_model(
        repo,
        "resnet_nchw",
        {
            "platform": "pytorch",
            "architecture": "cifar_resnet20",
            "input": {**CIFAR_INPUT, "layout": "NCHW"},
            "preprocessing": CIFAR_PREPROCESSING,
        },
        {1: resnet.state_dict()},
    )
    write_model(
        repo,
        "pool224",
        {
            "platform": "torchscript",
            "input": {"height": 224, "width": 224, "channels": 3},
            "max_batch_size": 64,
        },
        {1: torch.jit.script(PoolClassifier().eval())},
    )
    from ttaserve.server.onnx_export import export_onnx_bytes

    write_model(
        repo,
        "resnet_onnx",
        {"platform": "onnx", "input": CIFAR_INPUT, "preprocessing": CIFAR_PREPROCESSING, "labels": list(CIFAR_LABELS)},
        {1: export_onnx_bytes(resnet, (3, 32, 32))},
    )
    broken = repo / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text(
        "platform: pytorch\narchitecture: cifar_resnet20\ninput: {height: -3, width: 32}\n"
    )
    return repo


def start(repo: Path | None, **settings: object) -> ServerHandle:
    base = {"grpc_host": "127.0.0.1", "grpc_port": 0, "metrics_port": 0, "model_repository": repo}
    return start_server(ServerSettings(**{**base, **settings}))


@pytest.fixture(scope="session")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    handle = start(model_repo, snapshot_dir=tmp_path_factory.mktemp("snapshots"))
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def url(server: ServerHandle) -> str:
    return f"127.0.0.1:{server.grpc_port}"


@pytest.fixture(scope="session")
def cifar_test() -> tuple[np.ndarray, np.ndarray]:
    if not CIFAR_TEST.is_file():
        pytest.skip(f"needs the shared CIFAR-10 test set at {CIFAR_TEST} (not present)")
    with np.load(CIFAR_TEST) as data:
        return data["x"], data["y"]


def read_idx_images(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    count, rows, cols = (int.from_bytes(data[i : i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)


@pytest.fixture(scope="session")
def real_images() -> np.ndarray:
    """Real photographs at 32x32 RGB uint8: CIFAR-10 test images when ../shared is present, else Fashion-MNIST
    garments (Debian package) upsampled and repeated over three channels."""
    if CIFAR_TEST.is_file():
        with np.load(CIFAR_TEST) as data:
            return data["x"][::50][:200].copy()
    path = FASHION_MNIST / "t10k-images-idx3-ubyte.gz"
    if not path.is_file():
        pytest.skip("needs real images: ../shared CIFAR-10 or Debian's dataset-fashion-mnist")
    grey = read_idx_images(path)[:200]
    padded = np.pad(grey, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=3)


def normalise(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
