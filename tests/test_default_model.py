"""The embedded default model: the shipped weights and config reach the accuracy docs/default_model.md states."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from support import start

import ttaserve.server
from ttaserve.server import fashion_mnist
from ttaserve.server.architectures import load_model
from ttaserve.server.model_config import load_model_config
from ttaserve.server.training import Normalizer, accuracy, to_nchw

#: the figure docs/default_model.md documents for the shipped weights
DOCUMENTED_TEST_ACCURACY = 0.9128
MODEL_DIR = Path(ttaserve.server.__file__).parent / "default_model" / "fashion_mnist"


def test_config_is_valid_and_describes_fashion_mnist() -> None:
    config = load_model_config(MODEL_DIR)
    assert config.architecture == "small_resnet"
    assert config.input.channels == 1 and (config.input.height, config.input.width) == (28, 28)
    assert config.labels == fashion_mnist.CLASS_NAMES
    assert config.dynamic_batching.enabled
    state = torch.load(MODEL_DIR / "1" / config.weights_filename, weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


@pytest.mark.skipif(
    not (fashion_mnist.DEFAULT_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST missing at {fashion_mnist.DEFAULT_DIR} (apt-get install -y dataset-fashion-mnist)",
)
def test_shipped_weights_reach_documented_test_accuracy() -> None:
    config = load_model_config(MODEL_DIR)
    model = load_model(config.architecture, MODEL_DIR / "1" / config.weights_filename, **config.architecture_args)
    images, labels = fashion_mnist.load_split("test")
    assert images.shape == (10000, 28, 28)
    normalize = Normalizer(config.preprocessing.mean, config.preprocessing.std)
    measured = accuracy(model, to_nchw(images), torch.from_numpy(labels).long(), normalize)
    assert measured == pytest.approx(DOCUMENTED_TEST_ACCURACY, abs=0.001)


@pytest.mark.skipif(
    not (fashion_mnist.DEFAULT_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST missing at {fashion_mnist.DEFAULT_DIR} (apt-get install -y dataset-fashion-mnist)",
)
@pytest.mark.parametrize("strategy", ["tbn", "alpha_bn", "unmix_tns", "tent", "rmt", "t3_batch"])
def test_every_strategy_serves_the_one_channel_default_model(strategy: str) -> None:
    """The embedded model is greyscale: strategies must take its normalisation from its config (RMT augments in
    pixel space), not assume RGB. T3 has no expert to merge with here and must say so."""
    images, labels = fashion_mnist.load_split("test")
    batch = np.ascontiguousarray(images[:64, :, :, None])
    handle = start(None, metrics_port=None)
    try:
        client = tc.InferenceServerClient(f"127.0.0.1:{handle.grpc_port}")
        model = client.get_model_repository_index().models[0].name
        tensor = tc.InferInput("input", list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch)
        params = {"tta_strategy": strategy}
        if strategy == "t3_batch":
            with pytest.raises(tc.InferenceServerException, match="merge_partner"):
                client.infer(model, [tensor], parameters=params)
            return
        for _ in range(2):  # a session: the second step adapts from the first's state
            result = client.infer(model, [tensor], parameters=params, sequence_id=f"cam-{strategy}")
        logits = result.as_numpy("logits")
        assert logits.shape == (64, 10) and np.isfinite(logits).all()
        accuracy = float((logits.argmax(1) == labels[:64]).mean())
        assert accuracy > 0.6, f"{strategy} on clean Fashion-MNIST: {accuracy:.2f}"
    finally:
        handle.stop()
