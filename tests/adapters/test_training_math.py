"""TENT and RMT: losses, optimizer, EMA and predictions against float64 / torch.optim references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ttaserve.adapters import Adapter, SourceData, StrategyClosed, StrategyContext
from ttaserve.adapters.augment import rmt_augment
from ttaserve.adapters.losses import multi_view_contrastive, symmetric_cross_entropy
from ttaserve.adapters.optim import GradientConfig, optimizer_step, zero_moments
from ttaserve.adapters.rmt import RMT, RMTConfig, RMTState
from ttaserve.adapters.tent import TentState

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_symmetric_cross_entropy_matches_formula() -> None:
    g = torch.Generator().manual_seed(0)
    a, t = torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g) * 3
    a64, t64 = a.double(), t.double()
    pa = torch.exp(a64) / torch.exp(a64).sum(1, keepdim=True)
    pt = torch.exp(t64) / torch.exp(t64).sum(1, keepdim=True)
    expected = -0.5 * (pt * torch.log(pa)).sum(1) - 0.5 * (pa * torch.log(pt)).sum(1)
    torch.testing.assert_close(symmetric_cross_entropy(a, t).double(), expected, rtol=1e-5, atol=1e-5)
    # symmetric, and no smaller than the entropy of identical predictions
    torch.testing.assert_close(symmetric_cross_entropy(a, t), symmetric_cross_entropy(t, a))


def test_multi_view_contrastive_matches_formula() -> None:
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(4, 3, 5, generator=g), dim=-1)
    tau = 0.1
    flat = emb.reshape(12, 5).double()
    total = 0.0
    for i in range(12):
        denom = sum(math.exp(flat[i] @ flat[a] / tau) for a in range(12) if a != i)
        positives = [j for j in range(12) if j // 3 == i // 3 and j != i]
        total += -sum(math.log(math.exp(flat[i] @ flat[j] / tau) / denom) for j in positives) / len(positives)
    assert multi_view_contrastive(emb, tau).item() == pytest.approx(total / 12, rel=1e-5)


@pytest.mark.parametrize(
    ("settings", "reference"),
    [
        ({"optimizer": "adam", "lr": 1e-2}, lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.999))),
        (
            {"optimizer": "sgd", "lr": 1e-2, "nesterov": True},
            lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
        ),
        ({"optimizer": "sgd", "lr": 1e-2}, lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9)),
    ],
)
def test_functional_optimizer_matches_torch_optim(settings: dict, reference) -> None:  # type: ignore[no-untyped-def]
    config = GradientConfig(**settings)
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(5, generator=g), "b": torch.randn(2, 3, generator=g)}
    torch_params = [nn.Parameter(v.clone()) for v in params.values()]
    optimizer = reference(torch_params)
    first, second = zero_moments(params, config)
    for step in range(1, 6):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        params, first, second = optimizer_step(params, grads, first, second, step, config)
        for p, grad in zip(torch_params, grads.values(), strict=True):
            p.grad = grad.clone()
        optimizer.step()
    for mine, theirs in zip(params.values(), torch_params, strict=True):
        torch.testing.assert_close(mine, theirs.detach(), rtol=1e-6, atol=1e-7)


def _reference_tent(model: nn.Module, lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """TENT as its paper's reference configures a model: BN with batch statistics, only γ/β trainable, Adam."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    affine = []
    for module in ref.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.train()
            module.track_running_stats = False
            module.running_mean = module.running_var = None
            module.weight.requires_grad_(True)
            module.bias.requires_grad_(True)
            affine += [module.weight, module.bias]
    return ref, torch.optim.Adam(affine, lr=lr, betas=(0.9, 0.999))


def test_tent_matches_reference_and_leaves_shared_model_untouched(resnet20: nn.Module) -> None:
    before = {k: v.clone() for k, v in resnet20.state_dict().items()}
    adapter = Adapter("tent", resnet20, lr=1e-2)
    ref, optimizer = _reference_tent(resnet20, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 3, 32, 32, generator=g) for _ in range(3)]
    tbn_first = Adapter("tbn", resnet20)(batches[0])
    for i, x in enumerate(batches):
        logits = adapter(x)
        ref_logits = ref(x)
        loss = -(ref_logits.softmax(1) * ref_logits.log_softmax(1)).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        torch.testing.assert_close(logits, ref_logits.detach(), rtol=1e-4, atol=1e-4)
        assert adapter.last_stats["loss"] == pytest.approx(loss.item(), rel=1e-4)
        if i == 0:  # the prediction is the forward before the update: exactly TBN's on the first batch
            torch.testing.assert_close(logits, tbn_first)
    state = adapter.state
    assert isinstance(state, TentState)
    bn_names = {
        f"{n}.{p}" for n, m in resnet20.named_modules() if isinstance(m, nn.BatchNorm2d) for p in ("weight", "bias")
    }
    assert set(state.params) == bn_names
    ref_params = dict(ref.named_parameters())
    for name, value in state.params.items():
        torch.testing.assert_close(value, ref_params[name].detach(), rtol=1e-4, atol=1e-5)
        assert not torch.equal(value, before[name])  # γ/β did move
    after = resnet20.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in resnet20.parameters())
    assert all(not m.training for m in resnet20.modules())


def test_tent_with_unmix_trains_unmix_affine_and_moves_components(resnet20: nn.Module, batch: torch.Tensor) -> None:
    adapter = Adapter("tent", resnet20, norm="unmix_tns")
    start = adapter.state
    assert isinstance(start, TentState) and len(start.means) == 19
    adapter(batch)
    adapter(batch[:1])  # batch size one works
    state = adapter.state
    assert isinstance(state, TentState)
    assert all(not torch.equal(state.means[k], start.means[k]) for k in start.means)
    assert all(not torch.equal(state.params[k], start.params[k]) for k in start.params)


def _batch_stat_copy(model: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    """An independent copy with ``params`` loaded whose BN layers use batch statistics (train mode)."""
    ref = copy.deepcopy(model)
    ref.load_state_dict(params, strict=False)
    for module in ref.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.train()
    return ref


def _source(n: int = 64) -> SourceData:
    g = torch.Generator().manual_seed(5)
    return SourceData(images=torch.randn(n, 3, 32, 32, generator=g), labels=torch.arange(n) % 10)


def test_rmt_ema_and_prediction_is_student_plus_teacher(resnet20: nn.Module) -> None:
    adapter = Adapter("rmt", resnet20, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(16, 3, 32, 32, generator=g)
        state = adapter.state
        assert isinstance(state, RMTState)
        with torch.no_grad():
            expected = _batch_stat_copy(resnet20, state.student)(x) + _batch_stat_copy(resnet20, state.teacher)(x)
        logits = adapter(x)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        new = adapter.state
        assert isinstance(new, RMTState)
        for name, teacher in new.teacher.items():
            torch.testing.assert_close(teacher, 0.999 * state.teacher[name] + 0.001 * new.student[name])
        # every student parameter is trained
        assert all(not torch.equal(new.student[k], state.student[k]) for k in state.student)
    assert adapter.last_stats["source_free"] == 1.0 and adapter.last_stats["contrastive"] == 0.0
    strategy = adapter.strategy
    assert isinstance(strategy, RMT) and isinstance(adapter.config, RMTConfig)
    assert strategy.variant(adapter.config) == "sce"
    assert resnet20.state_dict().keys() == _batch_stat_copy(resnet20, {}).state_dict().keys()


def test_rmt_with_source_runs_every_part_and_caches_the_warm_up(
    resnet20: nn.Module, batch: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {k: v.clone() for k, v in resnet20.state_dict().items()}
    strategy = RMT(resnet20, StrategyContext(source=_source()))
    calls = []
    real_warm_up = strategy._warm_up
    monkeypatch.setattr(strategy, "_warm_up", lambda *a: calls.append(1) or real_warm_up(*a))
    config = strategy.make_config(warmup_samples=96, source_batch_size=32)
    assert isinstance(config, RMTConfig)
    first, second = strategy.init_state(config), strategy.init_state(config)
    assert len(calls) == 1
    assert isinstance(first, RMTState) and isinstance(second, RMTState)
    assert first.optimizer_steps == 3 and first.steps == 0
    assert all(torch.equal(first.student[k], second.student[k]) for k in first.student)
    assert not torch.equal(first.student["conv1.weight"], resnet20.conv1.weight)
    assert strategy.variant(config) == "sce+contrastive+replay+warmup"
    result = strategy.step(first, batch, config)
    assert result.stats["contrastive"] == 1.0 and result.stats["source_free"] == 0.0
    assert {"loss", "loss_st", "loss_cont", "loss_src", "entropy"} <= set(result.stats)
    assert result.state.projector["0.weight"].shape == (128, 64)
    assert not torch.equal(result.state.projector["0.weight"], first.projector["0.weight"])
    source_free = strategy.make_config(warmup_samples=0, lambda_src=0.0)
    assert isinstance(source_free, RMTConfig)
    assert strategy.variant(source_free) == "sce+contrastive"
    assert strategy.step(strategy.init_state(source_free), batch, source_free).stats["source_free"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in resnet20.state_dict().items())


def test_closing_rmt_stops_its_warm_up_between_steps(resnet20: nn.Module) -> None:
    strategy = RMT(resnet20, StrategyContext(source=_source()))
    steps: list[int] = []
    real_check = strategy.check_open

    def close_after_two_steps() -> None:
        steps.append(1)
        if len(steps) == 3:
            strategy.close()
        real_check()

    strategy.check_open = close_after_two_steps  # type: ignore[method-assign]
    config = strategy.make_config(warmup_samples=10_000_000, source_batch_size=8)
    with pytest.raises(StrategyClosed, match="rmt"):
        strategy.init_state(config)
    assert len(steps) == 3  # two training steps ran, the third check stopped the loop
    with pytest.raises(StrategyClosed):  # closed for good: the cache was never filled
        strategy.init_state(config)


def test_rmt_with_unmix_norm(resnet20: nn.Module, batch: torch.Tensor) -> None:
    adapter = Adapter("rmt", resnet20, norm="unmix_tns")
    start = adapter.state
    assert isinstance(start, RMTState)
    adapter(batch)
    state = adapter.state
    assert isinstance(state, RMTState)
    for k in start.student_means:
        assert not torch.equal(state.student_means[k], start.student_means[k])
        assert not torch.equal(state.teacher_means[k], start.teacher_means[k])


def test_rmt_augmentation_is_a_seeded_valid_image_transform() -> None:
    coarse = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    pixels = F.interpolate(coarse, size=32, mode="bilinear", align_corners=False)  # smooth, image-like
    x = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    one = rmt_augment(x, torch.Generator().manual_seed(7), MEAN, STD)
    two = rmt_augment(x, torch.Generator().manual_seed(7), MEAN, STD)
    other = rmt_augment(x, torch.Generator().manual_seed(8), MEAN, STD)
    assert torch.equal(one, two) and not torch.equal(one, other)
    back = one * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert one.shape == x.shape and back.min() >= -1e-6 and back.max() <= 1 + 1e-6
    # a mild transform: the augmented image still correlates strongly with the original
    corr = torch.corrcoef(torch.stack([back.flatten(), pixels.flatten()]))[0, 1]
    flipped = torch.corrcoef(torch.stack([back.flip(-1).flatten(), pixels.flatten()]))[0, 1]
    assert max(corr, flipped) > 0.5
