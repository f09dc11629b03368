"""Fixtures shared by the tests (helpers live in support.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from support import (
    CIFAR_INPUT,
    CIFAR_LABELS,
    CIFAR_PREPROCESSING,
    CIFAR_TEST,
    FASHION_MNIST,
    PoolClassifier,
    read_idx_images,
    seeded_resnet20,
    start,
    write_model,
)

from ttaserve.server.app import ServerHandle


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
        {
            "platform": "onnx",
            "input": CIFAR_INPUT,
            "preprocessing": CIFAR_PREPROCESSING,
            "labels": list(CIFAR_LABELS),
            "instances": 2,
        },
        {1: export_onnx_bytes(resnet, (3, 32, 32))},
    )
    broken = repo / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text(
        "platform: pytorch\narchitecture: cifar_resnet20\ninput: {height: -3, width: 32}\n"
    )
    return repo


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
