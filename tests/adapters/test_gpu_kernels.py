"""The Triton kernels of ``adapters/triton_kernels.py`` against the float64 references.

On a CUDA machine they run compiled, on the GPU, and the strategies are checked end to end with and without them;
elsewhere the same kernel code runs on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``), which executes
every program of the grid with NumPy: slower, but the same indexing, masking and arithmetic.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
from collections.abc import Iterator

import pytest
import torch
from kernel_cases import SETTINGS, blended_norm_case, channel_norm_atol, layer_inputs, rate, with_affine
from reference import alpha_norm, resnet20_forward, unmix_layer
from torch import nn

from ttaserve.adapters import Adapter, StrategyContext, gpu_kernels

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture
def exact_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Convolutions and matmuls in full float32: with TensorFloat-32 (PyTorch's default for cuDNN convolutions)
    a difference of one float32 rounding in a layer's output grows to ~1e-3 in the logits."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.fixture(scope="module")
def kernels() -> Iterator[gpu_kernels.GpuKernels]:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (it comes with PyTorch's CUDA wheels and the 'test' extra)")
    with pytest.MonkeyPatch.context() as patch:
        if not CUDA:
            patch.setenv("TRITON_INTERPRET", "1")  # read when the kernels are decorated: import them now
        module = importlib.reload(importlib.import_module("ttaserve.adapters.triton_kernels"))
        yield gpu_kernels.GpuKernels(module)


def _layer_inputs(b: int, c: int, h: int, w: int, seed: int, offset: float = 0.5, k: int = 4) -> tuple:
    """``kernel_cases.layer_inputs`` on the device under test."""
    return tuple(t.to(DEVICE) for t in layer_inputs(b, c, h, w, seed, offset, k))


# one row per channel; rows of 21 elements (no power of two); 64 channels of 8x8 (several row blocks); channels
# summed by several programs: 3 programs of 16, 16 and 8 samples; 3 of one sample with rows longer than a chunk
SHAPES = [(1, 16, 32, 32), (3, 5, 7, 3), (40, 64, 8, 8), (40, 4, 32, 32), (3, 2, 130, 130)]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset", [0.0, 40.0])  # a mean 20x the spread: unshifted float32 sums would lose it
def test_channel_norm_matches_float64(
    kernels: gpu_kernels.GpuKernels, alpha: float, shape: tuple, offset: float
) -> None:
    x, _, _, weight, bias = _layer_inputs(*shape, seed=1, offset=offset)
    bn, expected = blended_norm_case(x, weight, bias, alpha, offset)
    source_mean, source_var = bn.running_mean.to(DEVICE), bn.running_var.to(DEVICE)
    y = kernels.channel_norm(x, source_mean, source_var, alpha, weight, bias, bn.eps)
    assert y.device == x.device and y.shape == x.shape
    torch.testing.assert_close(y.double().cpu(), expected, rtol=1e-5, atol=channel_norm_atol(x, weight, bn))


def test_channel_norm_without_affine_or_source_statistics_is_plain_batch_normalisation(
    kernels: gpu_kernels.GpuKernels,
) -> None:
    x = _layer_inputs(2, 4, 5, 5, seed=2)[0]
    expected = torch.nn.functional.batch_norm(x.double().cpu(), None, None, training=True, eps=1e-5)
    y = kernels.channel_norm(x, None, None, 1.0, None, None, 1e-5)
    torch.testing.assert_close(y.double().cpu(), expected, rtol=1e-5, atol=1e-5)


# a whole 32x32 layer; rows that are no power of two; 64 channels in several blocks; K = 16 (the default) and 3
@pytest.mark.parametrize(("shape", "k"), [((1, 16, 32, 32), 16), ((5, 4, 6, 6), 3), ((9, 64, 8, 8), 16)])
@pytest.mark.parametrize("update", [True, False])
def test_unmix_layer_matches_float64(kernels: gpu_kernels.GpuKernels, shape: tuple, k: int, update: bool) -> None:
    x, means, variances, weight, bias = _layer_inputs(*shape, seed=3, k=k)
    y, new_means, new_vars = kernels.unmix_layer(
        x, means, variances, weight, bias, SETTINGS["eps"], SETTINGS["temperature"], rate(shape[0]), update
    )
    ref_y, ref_means, ref_vars = unmix_layer(x.cpu(), means.cpu(), variances.cpu(), **SETTINGS)
    torch.testing.assert_close(y.double().cpu(), with_affine(ref_y, weight, bias), rtol=1e-5, atol=1e-5)
    if update:
        torch.testing.assert_close(new_means.double().cpu(), ref_means, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(new_vars.double().cpu(), ref_vars, rtol=1e-5, atol=1e-6)
        assert (new_means - means).abs().max() > 1e-5  # the components really moved
    else:
        assert new_means is means and new_vars is variances


def test_unmix_layer_with_a_large_mean_and_no_affine_matches_float64(kernels: gpu_kernels.GpuKernels) -> None:
    x, means, variances, _, _ = _layer_inputs(3, 6, 5, 5, seed=8)
    x[1, 2] = x[1, 2] * 0.01 + 30.0  # one row with a mean 1,500x its spread
    y, new_means, _ = kernels.unmix_layer(x, means, variances, None, None, 1e-5, 0.07, rate(3), True)
    ref_y, ref_means, _ = unmix_layer(x.cpu(), means.cpu(), variances.cpu(), **SETTINGS)
    torch.testing.assert_close(y.double().cpu(), ref_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new_means.double().cpu(), ref_means, rtol=1e-5, atol=1e-5)


def test_accepts_only_what_the_kernels_can_take() -> None:
    x = torch.randn(2, 3, 4, 4)
    assert not gpu_kernels.accepts(x)  # not on a GPU: the CPU has its own kernels
    if CUDA:
        on_gpu = x.cuda()
        assert gpu_kernels.accepts(on_gpu, None, torch.ones(3, device="cuda"))
        assert not gpu_kernels.accepts(on_gpu.half())
        assert not gpu_kernels.accepts(on_gpu.transpose(2, 3))
        assert not gpu_kernels.accepts(on_gpu, torch.ones(3))  # a parameter left on the CPU
        with torch.enable_grad():
            assert not gpu_kernels.accepts(on_gpu.requires_grad_())


def test_turned_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTASERVE_TRITON_KERNELS", "0")
    assert gpu_kernels._load() is None


@pytest.mark.skipif(not CUDA, reason="the strategies reach the Triton kernels only with inputs on a CUDA device")
@pytest.mark.parametrize("strategy", ["tbn", "alpha_bn", "unmix_tns"])
@pytest.mark.parametrize("batch_size", [1, 16])
@pytest.mark.usefixtures("exact_float32")
def test_strategies_on_the_gpu_give_the_same_outputs_with_and_without_the_kernels(
    kernels: gpu_kernels.GpuKernels,
    monkeypatch: pytest.MonkeyPatch,
    resnet20: nn.Module,
    strategy: str,
    batch_size: int,
) -> None:
    model = copy.deepcopy(resnet20).to(DEVICE)
    x = torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    calls: list[int] = []
    original = kernels.unmix_layer if strategy == "unmix_tns" else kernels.channel_norm

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "unmix_layer" if strategy == "unmix_tns" else "channel_norm", counted)
    monkeypatch.setattr(gpu_kernels, "kernels", lambda: kernels)
    context = StrategyContext(device=DEVICE)
    with_kernels = Adapter(strategy, model, context)
    fast = [with_kernels(x) for _ in range(3)]  # a stateful stream advances: its state must match too
    assert len(calls) == 3 * 19  # every BatchNorm2d of ResNet-20, every step
    monkeypatch.setattr(gpu_kernels, "kernels", lambda: None)
    without = Adapter(strategy, model, context)
    slow = [without(x) for _ in range(3)]
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.usefixtures("exact_float32")
def test_tbn_on_the_gpu_matches_float64(kernels: gpu_kernels.GpuKernels, resnet20: nn.Module) -> None:
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    expected = resnet20_forward(resnet20, x, alpha_norm(resnet20, 1.0))
    logits = Adapter("tbn", copy.deepcopy(resnet20).to(DEVICE))(x.to(DEVICE))
    torch.testing.assert_close(logits.double().cpu(), expected, rtol=1e-4, atol=1e-4)
