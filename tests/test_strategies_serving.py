"""Strategies that need more than the network, through the server: T3 with a configured merge partner, RMT fed
from a configured source data set, and clear refusals where a model cannot run a strategy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from support import (
    CIFAR_INPUT,
    CIFAR_PREPROCESSING,
    CIFAR_TRAIN,
    requires_cifar_train,
    requires_shared,
    seeded_resnet20,
    start,
    write_model,
)
from tritonclient.utils import InferenceServerException

from ttaserve.server.app import ServerHandle


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float) -> dict[str, torch.Tensor]:
    """A stand-in for a fine-tuned expert: the same initialisation, weights moved a little."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: value + scale * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in state.items()
    }


def base_config(**extra: object) -> dict:
    return {
        "platform": "pytorch",
        "architecture": "cifar_resnet20",
        "input": CIFAR_INPUT,
        "preprocessing": CIFAR_PREPROCESSING,
        **extra,
    }


@pytest.fixture(scope="module")
def t3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    repo = tmp_path_factory.mktemp("t3repo")
    generalist = seeded_resnet20(0).state_dict()
    write_model(repo, "generalist", base_config(merge_partner="expert"), {1: generalist})
    write_model(repo, "expert", base_config(), {1: perturbed(generalist, 1, 0.02)})
    write_model(repo, "twin", base_config(merge_partner="generalist"), {1: generalist})
    handle = start(repo, metrics_port=None, snapshot_dir=tmp_path_factory.mktemp("snap"))
    yield handle
    handle.stop()


def infer(url: str, model: str, images: np.ndarray, **params: object) -> tc.InferResult:
    client = tc.InferenceServerClient(url)
    tensor = tc.InferInput("input", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    return client.infer(model, [tensor], outputs=[tc.InferRequestedOutput("logits")], parameters=params)


def test_t3_merges_with_the_configured_partner(t3_server: ServerHandle, real_images: np.ndarray) -> None:
    url = f"127.0.0.1:{t3_server.grpc_port}"
    images = real_images[:16]
    for strategy in ("t3", "t3_batch"):
        result = infer(url, "generalist", images, tta_strategy=strategy, tta_lambda_min=0.2, tta_lambda_max=0.8)
        params = result.get_response().parameters
        assert params["tta_variant"].string_param == strategy
        assert 0.2 <= params["tta_lambda"].double_param <= 0.8
        assert json.loads(params["tta_settings"].string_param)["lambda_max"] == 0.8
        source = infer(url, "generalist", images).as_numpy("logits")
        expert = infer(url, "expert", images).as_numpy("logits")
        merged = result.as_numpy("logits")
        assert not np.allclose(merged, source, atol=1e-4) and not np.allclose(merged, expert, atol=1e-4)


def test_t3_with_an_identical_partner_is_the_model(t3_server: ServerHandle, real_images: np.ndarray) -> None:
    url = f"127.0.0.1:{t3_server.grpc_port}"
    images = real_images[:8]
    source = infer(url, "twin", images).as_numpy("logits")
    for strategy in ("t3", "t3_batch"):
        merged = infer(url, "twin", images, tta_strategy=strategy).as_numpy("logits")
        np.testing.assert_allclose(merged, source, rtol=1e-4, atol=1e-4)


def test_strategy_a_model_cannot_run_is_refused(t3_server: ServerHandle, real_images: np.ndarray) -> None:
    url = f"127.0.0.1:{t3_server.grpc_port}"
    with pytest.raises(InferenceServerException) as excinfo:
        infer(url, "expert", real_images[:2], tta_strategy="t3")
    assert excinfo.value.status() == "StatusCode.FAILED_PRECONDITION"
    assert "merge_partner" in excinfo.value.message()


def test_adaptive_strategy_on_an_onnx_model_is_refused(url: str, real_images: np.ndarray) -> None:
    with pytest.raises(InferenceServerException) as excinfo:
        infer(url, "resnet_onnx", real_images[:2], tta_strategy="tbn")
    assert excinfo.value.status() == "StatusCode.FAILED_PRECONDITION"
    assert "'onnx'" in excinfo.value.message() and "none" in excinfo.value.message()


@requires_shared
@requires_cifar_train
def test_rmt_reports_which_variant_ran(tmp_path: Path, real_images: np.ndarray) -> None:
    with np.load(CIFAR_TRAIN) as data:
        picks = np.random.default_rng(0).permutation(len(data["y"]))[:400]
        np.savez(tmp_path / "source.npz", x=data["x"][picks], y=data["y"][picks])
    generalist = seeded_resnet20(0).state_dict()
    # no background warm-up with the default 50,000 images: the requests below bring their own (small) settings
    with_source = base_config(source_data=str(tmp_path / "source.npz"), source_warmup_on_load=False)
    write_model(tmp_path / "repo", "with_source", with_source, {1: generalist})
    write_model(tmp_path / "repo", "source_free", base_config(), {1: generalist})
    handle = start(tmp_path / "repo", metrics_port=None, snapshot_dir=tmp_path / "snap")
    try:
        url = f"127.0.0.1:{handle.grpc_port}"
        images = real_images[:16]
        cases = {
            ("source_free", 0): "sce",
            ("with_source", 0): "sce+contrastive+replay",
            ("with_source", 200): "sce+contrastive+replay+warmup",
        }
        for (model, warmup), expected in cases.items():
            params = {"tta_strategy": "rmt", "tta_warmup_samples": warmup, "tta_source_batch_size": 100}
            response = infer(url, model, images, **params).get_response()
            assert response.parameters["tta_variant"].string_param == expected
            assert np.isfinite(response.parameters["tta_loss"].double_param)
    finally:
        handle.stop()
