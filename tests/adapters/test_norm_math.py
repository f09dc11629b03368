"""alpha-BN, TBN and UnMix-TNS against the float64 references of ``reference.py``."""

from __future__ import annotations

import pytest
import torch
from reference import affine, alpha_norm, instance_norm, resnet20_forward, unmix_layer
from torch import nn

from ttaserve.adapters import Adapter
from ttaserve.adapters.norm import unmix_normalise
from ttaserve.adapters.unmix_tns import UnMixState

TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_alpha_bn_matches_reference(resnet20: nn.Module, batch: torch.Tensor, alpha: float) -> None:
    logits = Adapter("alpha_bn", resnet20, alpha=alpha)(batch)
    torch.testing.assert_close(logits.double(), resnet20_forward(resnet20, batch, alpha_norm(resnet20, alpha)), **TOL)


def test_alpha_zero_is_source_bn_and_one_is_tbn(resnet20: nn.Module, batch: torch.Tensor) -> None:
    torch.testing.assert_close(Adapter("alpha_bn", resnet20, alpha=0.0)(batch), Adapter("none", resnet20)(batch))
    torch.testing.assert_close(Adapter("alpha_bn", resnet20, alpha=1.0)(batch), Adapter("tbn", resnet20)(batch))
    # and the two ends really differ on this model, so the equalities above say something
    assert not torch.allclose(Adapter("none", resnet20)(batch), Adapter("tbn", resnet20)(batch), atol=1e-2)


def test_tbn_matches_reference(resnet20: nn.Module, batch: torch.Tensor) -> None:
    logits = Adapter("tbn", resnet20)(batch)
    torch.testing.assert_close(logits.double(), resnet20_forward(resnet20, batch, alpha_norm(resnet20, 1.0)), **TOL)


def test_alpha_bn_works_at_batch_size_one(resnet20: nn.Module, batch: torch.Tensor) -> None:
    one = batch[:1]
    logits = Adapter("alpha_bn", resnet20)(one)
    torch.testing.assert_close(logits.double(), resnet20_forward(resnet20, one, alpha_norm(resnet20, 0.1)), **TOL)


def test_unmix_layer_normalisation_and_update_match_reference() -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 4, 6, 6, generator=g) * 2 + 0.5
    means = torch.randn(3, 4, generator=g)
    variances = torch.rand(3, 4, generator=g) + 0.5
    weight, bias = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    settings = {"eps": 1e-5, "temperature": 0.07, "momentum": 0.1, "reference_batch": 64}
    y, (new_means, new_vars) = unmix_normalise(z, means, variances, weight, bias, **settings)
    ref_y, ref_means, ref_vars = unmix_layer(z, means, variances, **settings)
    ref_y = ref_y * weight.double()[None, :, None, None] + bias.double()[None, :, None, None]
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_means.double(), ref_means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new_vars.double(), ref_vars, rtol=1e-5, atol=1e-6)
    # m = 1 − 0.9^(5/64) is small but the components do move
    assert (new_means - means).abs().max() > 1e-4


def test_unmix_tns_full_model_matches_reference(resnet20: nn.Module, batch: torch.Tensor) -> None:
    adapter = Adapter("unmix_tns", resnet20)
    state = adapter.state
    assert isinstance(state, UnMixState)
    expected_means, expected_vars = {}, {}

    def norm(name: str, z: torch.Tensor) -> torch.Tensor:
        y, expected_means[name], expected_vars[name] = unmix_layer(
            z, state.means[name], state.variances[name], eps=1e-5, temperature=0.07, momentum=0.1, reference_batch=64
        )
        return affine(resnet20, name, y)

    logits = adapter(batch)
    torch.testing.assert_close(logits.double(), resnet20_forward(resnet20, batch, norm), **TOL)
    new_state = adapter.state
    assert isinstance(new_state, UnMixState)
    for name in expected_means:
        torch.testing.assert_close(new_state.means[name].double(), expected_means[name], **TOL)
        torch.testing.assert_close(new_state.variances[name].double(), expected_vars[name], **TOL)


def test_unmix_tns_single_component_is_instance_norm(resnet20: nn.Module, batch: torch.Tensor) -> None:
    logits = Adapter("unmix_tns", resnet20, num_components=1)(batch)
    torch.testing.assert_close(logits.double(), resnet20_forward(resnet20, batch, instance_norm(resnet20)), **TOL)


def test_unmix_tns_initial_components(resnet20: nn.Module) -> None:
    k, spread = 16, 0.5
    adapter = Adapter("unmix_tns", resnet20, num_components=k, spread=spread)
    state = adapter.state
    assert isinstance(state, UnMixState)
    generator = torch.Generator().manual_seed(0)  # StrategyContext's default seed
    bns = [(n, m) for n, m in resnet20.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert list(state.means) == [n for n, _ in bns]
    for name, bn in bns:
        noise = torch.randn(k, bn.num_features, generator=generator)
        expected = bn.running_mean + (spread * k / (k - 1)) ** 0.5 * bn.running_var.sqrt() * noise
        torch.testing.assert_close(state.means[name], expected)
        torch.testing.assert_close(state.variances[name], ((1 - spread) * bn.running_var).expand(k, -1))
    # a reset gives the very same components
    adapter(torch.randn(4, 3, 32, 32))
    adapter.reset()
    again = adapter.state
    assert isinstance(again, UnMixState)
    for name in state.means:
        assert torch.equal(again.means[name], state.means[name])
    single = Adapter("unmix_tns", resnet20, num_components=1).state
    assert isinstance(single, UnMixState)
    torch.testing.assert_close(single.means["bn1"], resnet20.bn1.running_mean[None])


def test_unmix_tns_exact_init_matches_source_statistics_exactly(resnet20: nn.Module) -> None:
    spread = 0.5
    state = Adapter("unmix_tns", resnet20, spread=spread, exact_init=True).state
    paper = Adapter("unmix_tns", resnet20, spread=spread).state
    assert isinstance(state, UnMixState) and isinstance(paper, UnMixState)
    for name, bn in resnet20.named_modules():
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        means, variances = state.means[name].double(), state.variances[name].double()
        # mixture mean = μ_s and mixture variance (within + between components) = σ²_s, channel by channel
        torch.testing.assert_close(means.mean(0), bn.running_mean.double(), rtol=1e-5, atol=1e-5)
        total = variances.mean(0) + means.var(0, correction=0)
        torch.testing.assert_close(total, bn.running_var.double(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(paper.means[name].double().mean(0), bn.running_mean.double(), atol=1e-3)


def test_unmix_tns_works_at_batch_size_one(resnet20: nn.Module, batch: torch.Tensor) -> None:
    adapter = Adapter("unmix_tns", resnet20)
    for i in range(3):
        assert torch.isfinite(adapter(batch[i : i + 1])).all()
    assert adapter.state.steps == 3
