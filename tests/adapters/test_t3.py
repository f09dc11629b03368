"""T3 / T3_B on real models: the shipped Fashion-MNIST default model (generalist) and an expert fine-tuned from it
on a shifted domain (inverted images) for a few steps."""

from __future__ import annotations

import copy
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from ttaserve.adapters import Adapter, StrategyContext, get_strategy_class
from ttaserve.adapters.t3 import T3Config
from ttaserve.server import fashion_mnist
from ttaserve.server.architectures import load_model
from ttaserve.server.model_config import load_model_config
from ttaserve.server.training import Normalizer, TrainSettings, to_nchw, train

MODEL_DIR = Path(__file__).resolve().parents[2] / "server" / "default_model" / "fashion_mnist"

pytestmark = pytest.mark.skipif(
    not (fashion_mnist.DEFAULT_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST missing at {fashion_mnist.DEFAULT_DIR} (apt-get install -y dataset-fashion-mnist)",
)


def _generalist() -> torch.nn.Module:
    config = load_model_config(MODEL_DIR)
    return load_model(config.architecture, MODEL_DIR / "1" / config.weights_filename, **config.architecture_args)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor, Normalizer]:
    """Test images of the shifted domain (inverted intensities), normalised, and their labels."""
    config = load_model_config(MODEL_DIR)
    images, labels = fashion_mnist.load_split("test", fashion_mnist.DEFAULT_DIR)
    pixels = to_nchw(255 - images[:1200])
    return (
        pixels,
        torch.from_numpy(labels[:1200]).long(),
        Normalizer(config.preprocessing.mean, config.preprocessing.std),
    )


@pytest.fixture(scope="module")
def models(data: tuple[torch.Tensor, torch.Tensor, Normalizer]) -> tuple[torch.nn.Module, torch.nn.Module]:
    pixels, labels, normalize = data
    generalist = _generalist()
    expert = train(
        copy.deepcopy(generalist),
        pixels[200:],
        labels[200:],
        normalize,
        TrainSettings(batch_size=64, lr=0.01, schedule="cosine", max_steps=15, seed=0),
        log=lambda _: None,
    )
    return generalist, expert


@pytest.fixture(scope="module")
def batch(data: tuple[torch.Tensor, torch.Tensor, Normalizer]) -> torch.Tensor:
    """Held-out samples: half of the shifted domain, half clean, so the two models agree on some and not others."""
    pixels, _, normalize = data
    clean = 255 - pixels[:12]
    return normalize(torch.cat([pixels[:12], clean]))


def _reference_lambda(js: float, config: T3Config) -> float:
    def s(j: float) -> float:
        return 1.0 / (1.0 + math.exp(-config.gamma * (j - config.centre)))

    u = (s(min(js / math.log(2), 1.0)) - s(0.0)) / (s(1.0) - s(0.0))
    return config.lambda_min + (config.lambda_max - config.lambda_min) * u


def _reference_merge(generalist: torch.nn.Module, expert: torch.nn.Module, lam: float) -> torch.nn.Module:
    """float64 network with weights (and BN buffers) λ·θ_g + (1 − λ)·θ_e, built without the adapter's code."""
    merged = copy.deepcopy(generalist).double().eval()
    g, e = generalist.state_dict(), expert.state_dict()
    merged.load_state_dict(
        {k: lam * g[k].double() + (1 - lam) * e[k].double() if g[k].is_floating_point() else g[k] for k in g}
    )
    return merged


def _js64(p: torch.Tensor, q: torch.Tensor) -> float:
    m = 0.5 * (p + q)
    return float(0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum())


def _adapter(name: str, models: tuple[torch.nn.Module, torch.nn.Module], **settings: float) -> Adapter:
    generalist, expert = models
    return Adapter(name, generalist, StrategyContext(partner=expert), **settings)


@pytest.mark.parametrize("name", ["t3", "t3_batch"])
def test_identical_models_give_that_models_output(
    name: str, models: tuple[torch.nn.Module, torch.nn.Module], batch: torch.Tensor
) -> None:
    generalist = models[0]
    adapter = Adapter(name, generalist, StrategyContext(partner=copy.deepcopy(generalist)))
    with torch.inference_mode():
        expected = generalist(batch)
    torch.testing.assert_close(adapter(batch), expected, atol=1e-5, rtol=1e-5)
    assert adapter.last_stats["js"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["t3", "t3_batch"])
def test_lambda_stays_in_bounds(
    name: str, models: tuple[torch.nn.Module, torch.nn.Module], batch: torch.Tensor
) -> None:
    adapter = _adapter(name, models, lambda_min=0.3, lambda_max=0.6, gamma=4.0, centre=0.1)
    adapter(batch)
    stats = adapter.last_stats
    assert 0.3 <= stats["lambda_min"] <= stats["lambda"] <= stats["lambda_max"] <= 0.6
    assert stats["js"] > 0.0


def test_lambda_spans_the_configured_range() -> None:
    from ttaserve.adapters.t3 import merge_coefficient

    config = T3Config(lambda_min=0.1, lambda_max=0.9, gamma=0.5, centre=0.0)
    ends = merge_coefficient(torch.tensor([0.0, math.log(2.0)], dtype=torch.float64), config)
    torch.testing.assert_close(ends, torch.tensor([0.1, 0.9], dtype=torch.float64))


def test_per_sample_merge_equals_merging_each_sample_alone(
    models: tuple[torch.nn.Module, torch.nn.Module], batch: torch.Tensor
) -> None:
    generalist, expert = models
    config = T3Config(chunk_size=5)
    adapter = _adapter("t3", models, **config.model_dump())
    logits = adapter(batch)
    g64, e64 = copy.deepcopy(generalist).double(), copy.deepcopy(expert).double()
    lambdas, expected = [], []
    with torch.no_grad():
        for x in batch.double():
            p_g, p_e = g64(x[None]).softmax(1)[0], e64(x[None]).softmax(1)[0]
            lam = _reference_lambda(_js64(p_g, p_e), config)
            lambdas.append(lam)
            expected.append(_reference_merge(generalist, expert, lam)(x[None])[0])
    assert max(lambdas) - min(lambdas) > 0.2, "the batch should exercise different merges"
    torch.testing.assert_close(logits.double(), torch.stack(expected), atol=2e-4, rtol=1e-4)
    assert adapter.last_stats["lambda"] == pytest.approx(float(np.mean(lambdas)), abs=1e-5)


def test_batch_variant_equals_one_manual_merge(
    models: tuple[torch.nn.Module, torch.nn.Module], batch: torch.Tensor
) -> None:
    generalist, expert = models
    config = T3Config()
    adapter = _adapter("t3_batch", models)
    logits = adapter(batch)
    with torch.no_grad():
        x = batch.double()
        g64, e64 = copy.deepcopy(generalist).double(), copy.deepcopy(expert).double()
        p_g, p_e = g64(x).softmax(1), e64(x).softmax(1)
        mean_js = float(np.mean([_js64(p_g[i], p_e[i]) for i in range(len(x))]))
        lam = _reference_lambda(mean_js, config)
        expected = _reference_merge(generalist, expert, lam)(x)
    torch.testing.assert_close(logits.double(), expected, atol=2e-4, rtol=1e-4)
    assert adapter.last_stats["lambda"] == pytest.approx(lam, abs=1e-6)


def test_shared_models_untouched_under_concurrent_steps(
    models: tuple[torch.nn.Module, torch.nn.Module], batch: torch.Tensor
) -> None:
    generalist, expert = models
    before = [copy.deepcopy(m.state_dict()) for m in models]
    strategies = [get_strategy_class(n)(generalist, StrategyContext(partner=expert)) for n in ("t3", "t3_batch")]
    config = T3Config()
    expected = [s.step(s.init_state(config), batch, config).logits for s in strategies]
    failures: list[str] = []

    def worker() -> None:
        for _ in range(3):
            for strategy, want in zip(strategies, expected, strict=True):
                got = strategy.step(strategy.init_state(config), batch, config).logits
                if not torch.allclose(got, want, atol=1e-5):
                    failures.append(strategy.name)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    for model, state in zip(models, before, strict=True):
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key
        assert not model.training


def test_needs_a_partner_of_the_same_architecture(models: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    from ttaserve.server.architectures import build_architecture

    with pytest.raises(ValueError, match="merge partner"):
        Adapter("t3", models[0])
    with pytest.raises(ValueError, match="architecture differs"):
        Adapter("t3_batch", models[0], StrategyContext(partner=build_architecture("small_resnet", blocks_per_stage=2)))


def test_config_rejects_inverted_bounds() -> None:
    with pytest.raises(ValidationError, match="lambda_min"):
        T3Config(lambda_min=0.8, lambda_max=0.2)
