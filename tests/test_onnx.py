"""ONNX export and the ONNX Runtime engine: parity with PyTorch, providers, load errors, the export command."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ttaserve.server.architectures import build_architecture, load_model
from ttaserve.server.engines.onnx_engine import CPU_PROVIDER, CUDA_PROVIDER, OnnxEngine, OnnxLoadError
from ttaserve.server.engines.torch_engine import TorchEngine
from ttaserve.server.export_command import run_export
from ttaserve.server.loaded_model import load_version
from ttaserve.server.model_config import load_model_config
from ttaserve.server.onnx_export import ParityError, check_parity, export_for_serving, export_onnx, export_onnx_bytes

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CHECKPOINT = SHARED / "models" / "cifar10" / "resnet20-12fca82f.th"
CIFAR_TEST = SHARED / "data" / "cifar10" / "test.npz"
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
needs_shared = pytest.mark.skipif(not CHECKPOINT.is_file(), reason=f"../shared missing: no checkpoint at {CHECKPOINT}")


def _random_resnet20(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_architecture("cifar_resnet20").eval()


def _cifar_batch(count: int) -> np.ndarray:
    with np.load(CIFAR_TEST) as data:
        images = data["x"][np.random.default_rng(0).choice(len(data["x"]), count, replace=False)]
    pixels = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    mean = np.asarray(CIFAR_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(CIFAR_STD, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((pixels - mean) / std)


@pytest.fixture(scope="module")
def random_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    module = _random_resnet20()
    path = tmp_path_factory.mktemp("onnx") / "resnet20.onnx"
    report = export_onnx(module, (3, 32, 32), path)
    assert report.ok, report.summary()
    return module, path


@pytest.mark.parametrize("batch", [1, 64])
def test_onnx_engine_matches_torch_engine(random_export: tuple[torch.nn.Module, Path], batch: int) -> None:
    module, path = random_export
    onnx_engine = OnnxEngine(path, device="cpu")
    torch_engine = TorchEngine(module, torch.device("cpu"))
    x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32), dtype=np.float32)
    expected = torch_engine.infer(x)
    actual = onnx_engine.infer(x)
    assert actual.shape == (batch, 10) and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert (actual.argmax(1) == expected.argmax(1)).all()


def test_engine_reports_loaded_providers(random_export: tuple[torch.nn.Module, Path]) -> None:
    engine = OnnxEngine(random_export[1], device="auto")
    assert engine.providers == tuple(engine.session.get_providers())
    assert CPU_PROVIDER in engine.providers
    assert engine.device == ("cuda" if CUDA_PROVIDER in engine.providers else "cpu")
    assert engine.describe()["engine"] == "onnx"


def test_engine_converts_non_contiguous_input(random_export: tuple[torch.nn.Module, Path]) -> None:
    engine = OnnxEngine(random_export[1], device="cpu")
    x = np.random.default_rng(1).standard_normal((4, 32, 32, 3)).transpose(0, 3, 1, 2)  # float64, strided
    np.testing.assert_allclose(engine.infer(x), engine.infer(np.ascontiguousarray(x, dtype=np.float32)))


@pytest.mark.skipif(CUDA_PROVIDER in ort.get_available_providers(), reason="this ORT build has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_requested_without_cuda_is_an_error(random_export: tuple[torch.nn.Module, Path], device: str) -> None:
    with pytest.raises(OnnxLoadError, match=f"device '{device}' requested"):
        OnnxEngine(random_export[1], device=device)


@pytest.mark.parametrize("device", ["gpu", "cpu:1", "cuda:x"])
def test_unknown_device_is_rejected(random_export: tuple[torch.nn.Module, Path], device: str) -> None:
    with pytest.raises(ValueError, match="device must be"):
        OnnxEngine(random_export[1], device=device)


def test_concurrent_inference_shares_one_session(random_export: tuple[torch.nn.Module, Path]) -> None:
    engine = OnnxEngine(random_export[1], device="cpu", intra_op_threads=1)
    batches = [np.random.default_rng(i).standard_normal((8, 3, 32, 32), dtype=np.float32) for i in range(16)]
    expected = [engine.infer(x) for x in batches]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for got, want in zip(pool.map(engine.infer, batches), expected, strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("instances", [1, 2])
def test_instances_share_the_cores_and_serve_concurrent_callers(
    random_export: tuple[torch.nn.Module, Path], tmp_path: Path, instances: int
) -> None:
    """A model with ``instances: N`` runs up to N forwards at once, each with cores / N intra-op threads (ORT's own
    default for one instance); without dynamic batching every request is its own execution."""
    module, path = random_export
    model_dir = tmp_path / "m"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes(path.read_bytes())
    (model_dir / "config.yaml").write_text(
        f"platform: onnx\ninput: {{height: 32, width: 32, layout: NCHW}}\ninstances: {instances}\n"
    )
    loaded = load_version(model_dir, load_model_config(model_dir), 1, torch.device("cpu"))
    threads = loaded.engine.session.get_session_options().intra_op_num_threads
    assert threads == (0 if instances == 1 else max(1, len(os.sched_getaffinity(0)) // instances))
    batches = [np.random.default_rng(i).standard_normal((1 + i % 3, 3, 32, 32)).astype(np.float32) for i in range(24)]
    with torch.inference_mode():
        expected = [module(torch.from_numpy(b)).numpy() for b in batches]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(loaded.batcher.submit, batches))
    for got, want, batch in zip(answers, expected, batches, strict=True):
        np.testing.assert_allclose(got.output, want, rtol=1e-4, atol=1e-4)
        assert got.batch_size == len(batch)
    assert loaded.statistics.execution_count == len(batches)
    loaded.engine.close()


def test_engine_loads_from_bytes() -> None:
    engine = OnnxEngine(export_onnx_bytes(_random_resnet20(), (3, 32, 32)), device="cpu")
    assert engine.infer(np.zeros((2, 3, 32, 32), dtype=np.float32)).shape == (2, 10)


def test_corrupted_onnx_file_fails_clearly(random_export: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    corrupted = tmp_path / "corrupted.onnx"
    corrupted.write_bytes(random_export[1].read_bytes()[:1000])
    with pytest.raises(OnnxLoadError, match=r"corrupted\.onnx: cannot load as an ONNX model"):
        OnnxEngine(corrupted)
    with pytest.raises(OnnxLoadError, match="cannot load"):
        OnnxEngine(tmp_path / "missing.onnx")


def test_parity_check_catches_a_different_model() -> None:
    wrong = export_onnx_bytes(_random_resnet20(seed=1), (3, 32, 32))
    report = check_parity(_random_resnet20(seed=0), wrong, (3, 32, 32))
    assert not report.ok
    assert "FAILED" in report.summary()
    with pytest.raises(ParityError):
        report.raise_for_failure()


def test_export_for_serving_returns_loadable_bytes() -> None:
    data = export_for_serving(_random_resnet20(), (3, 32, 32))
    assert OnnxEngine(data, device="cpu").input_shape[1:] == (3, 32, 32)


def test_export_command_from_a_repository(tmp_path: Path) -> None:
    model_dir = tmp_path / "repo" / "fmnist"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "2").mkdir()
    (model_dir / "config.yaml").write_text(
        "platform: pytorch\narchitecture: small_resnet\ninput: {height: 28, width: 28, channels: 1}\n"
    )
    torch.save(build_architecture("small_resnet").state_dict(), model_dir / "1" / "model.pt")
    torch.save(build_architecture("small_resnet").state_dict(), model_dir / "2" / "model.pt")
    report = run_export(tmp_path / "repo", None, None, tmp_path / "out.onnx")
    assert report.ok, report.summary()
    assert OnnxEngine(tmp_path / "out.onnx", device="cpu").infer(np.zeros((3, 1, 28, 28), np.float32)).shape == (3, 10)
    with pytest.raises(ValueError, match="version 7 not found"):
        run_export(tmp_path / "repo", "fmnist", 7, tmp_path / "out.onnx")


@needs_shared
@pytest.mark.shared
def test_pretrained_resnet20_parity_on_cifar() -> None:
    module = load_model("cifar_resnet20", CHECKPOINT)
    data = export_onnx_bytes(module, (3, 32, 32))
    report = check_parity(module, data, (3, 32, 32), sample=_cifar_batch(256))
    assert report.ok, report.summary()
    sample_check = next(c for c in report.checks if c.name == "sample")
    assert sample_check.argmax_agreement == 1.0
    onnx_engine, torch_engine = OnnxEngine(data, device="cpu"), TorchEngine(module, torch.device("cpu"))
    for batch in (1, 64):
        x = _cifar_batch(batch)
        np.testing.assert_allclose(onnx_engine.infer(x), torch_engine.infer(x), rtol=1e-4, atol=1e-4)


def test_export_onnx_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ttaserve.client.cli import main

    model_dir = tmp_path / "repo" / "cifar"
    (model_dir / "3").mkdir(parents=True)
    (model_dir / "config.yaml").write_text(
        "platform: pytorch\narchitecture: cifar_resnet20\ninput: {height: 32, width: 32}\n"
        "preprocessing: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}\n"
    )
    torch.save(_random_resnet20().state_dict(), model_dir / "3" / "model.pt")
    sample = tmp_path / "sample.npz"
    np.savez(sample, x=np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "cifar.onnx"
    argv = ["export-onnx", "--model-repository", str(tmp_path / "repo"), "--out", str(out), "--sample", str(sample)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "sample" in printed and "parity: OK" in printed and out.is_file()
    assert main([*argv[:-2], "--model", "missing"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no such model" in error
