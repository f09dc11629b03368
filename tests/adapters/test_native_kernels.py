"""The C kernels of ``adapters/kernels.c`` against the float64 references, and their fallback to PyTorch ops."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import pytest
import torch
from kernel_cases import SETTINGS, blended_norm_case, channel_norm_atol, layer_inputs, rate, with_affine
from reference import alpha_norm, resnet20_forward, unmix_layer
from torch import nn

from ttaserve.adapters import Adapter, native
from ttaserve.adapters.norm import unmix_normalise


@pytest.fixture(scope="module")
def kernels() -> native.NativeKernels:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler 'cc' on this machine: the kernels cannot be built (the PyTorch path is tested)")
    built = native.kernels()
    assert built is not None, "a C compiler is present but the kernels did not build; see the warning logged"
    return built


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("shape", [(1, 16, 32, 32), (3, 5, 7, 3)])  # rows of 1,024 and of 21 (not a multiple of 8)
@pytest.mark.parametrize("offset", [0.0, 40.0])  # a mean 20x the spread: E[x²] − E[x]² in float32 would lose it
def test_channel_norm_matches_float64(kernels: native.NativeKernels, alpha: float, shape: tuple, offset: float) -> None:
    x, _, _, weight, bias = layer_inputs(*shape, seed=1, offset=offset)
    bn, expected = blended_norm_case(x, weight, bias, alpha, offset)
    y = kernels.channel_norm(x, bn.running_mean, bn.running_var, alpha, weight, bias, bn.eps)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=channel_norm_atol(x, weight, bn))


def test_channel_norm_without_affine_or_source_statistics_is_plain_batch_normalisation(
    kernels: native.NativeKernels,
) -> None:
    x = layer_inputs(2, 4, 5, 5, seed=2)[0]
    expected = torch.nn.functional.batch_norm(x.double(), None, None, training=True, eps=1e-5)
    torch.testing.assert_close(kernels.channel_norm(x, None, None, 1.0, None, None, 1e-5).double(), expected)


@pytest.mark.parametrize("shape", [(1, 16, 32, 32), (5, 4, 6, 6), (2, 64, 3, 3)])
@pytest.mark.parametrize("update", [True, False])
def test_unmix_layer_matches_float64(kernels: native.NativeKernels, shape: tuple, update: bool) -> None:
    x, means, variances, weight, bias = layer_inputs(*shape, seed=3)
    y, new_means, new_vars = kernels.unmix_layer(
        x, means, variances, weight, bias, SETTINGS["eps"], SETTINGS["temperature"], rate(shape[0]), update
    )
    ref_y, ref_means, ref_vars = unmix_layer(x, means, variances, **SETTINGS)
    torch.testing.assert_close(y.double(), with_affine(ref_y, weight, bias), rtol=1e-5, atol=1e-5)
    if update:
        torch.testing.assert_close(new_means.double(), ref_means, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(new_vars.double(), ref_vars, rtol=1e-5, atol=1e-6)
        assert (new_means - means).abs().max() > 1e-5  # the components really moved
    else:
        assert new_means is means and new_vars is variances


@pytest.mark.parametrize("from_sums", [True, False])
def test_unmix_stats_match_float64(kernels: native.NativeKernels, from_sums: bool) -> None:
    x, means, variances, _, _ = layer_inputs(6, 8, 4, 4, seed=4)
    rows = x.flatten(2)
    if from_sums:
        first, second, length = rows.sum(-1), torch.linalg.vector_norm(rows, dim=-1), rows.shape[-1]
    else:
        second, first = torch.var_mean(x, dim=(2, 3), correction=0)
        length = 0
    stats = kernels.unmix_stats(first, second, length, means, variances, SETTINGS["temperature"], rate(6), True)
    assert stats is not None
    mean, var, new_means, new_vars = stats
    ref_y, ref_means, ref_vars = unmix_layer(x, means, variances, **SETTINGS)
    # the reference gives the normalised x; the statistics it used are recovered from it and x
    y = (x.double() - mean.double()[..., None, None]) / torch.sqrt(var.double() + SETTINGS["eps"])[..., None, None]
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_means.double(), ref_means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new_vars.double(), ref_vars, rtol=1e-5, atol=1e-6)


def test_unmix_layer_without_affine_matches_float64(kernels: native.NativeKernels) -> None:
    x, means, variances, _, _ = layer_inputs(3, 6, 5, 5, seed=8)
    y, _, _ = kernels.unmix_layer(x, means, variances, None, None, 1e-5, 0.07, rate(3), False)
    ref_y, _, _ = unmix_layer(x, means, variances, **SETTINGS)
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)


def test_unmix_stats_refuse_sums_that_cannot_give_a_precise_variance(kernels: native.NativeKernels) -> None:
    x, means, variances, _, _ = layer_inputs(2, 4, 8, 8, seed=5)
    x[1, 2] = x[1, 2] * 0.01 + 30.0  # one row with a mean 1,500x its spread
    rows = x.flatten(2)
    sums, norms = rows.sum(-1), torch.linalg.vector_norm(rows, dim=-1)
    assert kernels.unmix_stats(sums, norms, rows.shape[-1], means, variances, 0.07, rate(2), True) is None


def test_unmix_layer_with_a_large_mean_matches_float64_through_the_fallback() -> None:
    """A large input whose row sums are ill-conditioned: the moments are computed around the mean instead."""
    x, means, variances, weight, bias = layer_inputs(16, 16, 16, 16, seed=6)
    x[3, 5] = x[3, 5] * 0.01 + 30.0
    y, (new_means, new_vars) = unmix_normalise(x, means, variances, weight, bias, **SETTINGS)
    ref_y, ref_means, ref_vars = unmix_layer(x, means, variances, **SETTINGS)
    torch.testing.assert_close(y.double(), with_affine(ref_y, weight, bias), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new_means.double(), ref_means, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_vars.double(), ref_vars, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["tbn", "alpha_bn", "unmix_tns"])
@pytest.mark.parametrize("batch_size", [1, 2, 16])  # whole-layer kernels, a mix, and the PyTorch moments throughout
def test_strategies_give_the_same_outputs_with_and_without_the_kernels(
    kernels: native.NativeKernels, monkeypatch: pytest.MonkeyPatch, resnet20: nn.Module, strategy: str, batch_size: int
) -> None:
    x = torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with_kernels = Adapter(strategy, resnet20)
    fast = [with_kernels(x) for _ in range(3)]  # a stateful stream advances: its state must match too
    monkeypatch.setattr(native, "kernels", lambda: None)
    without = Adapter(strategy, resnet20)
    slow = [without(x) for _ in range(3)]
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_tbn_at_batch_one_uses_the_kernels_and_matches_float64(
    kernels: native.NativeKernels, resnet20: nn.Module
) -> None:
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    calls = []
    original = kernels.channel_norm

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return original(*args, **kwargs)

    kernels.channel_norm = counted  # type: ignore[method-assign]
    try:
        logits = Adapter("tbn", resnet20)(x)
    finally:
        del kernels.channel_norm
    assert len(calls) == 19  # every BatchNorm2d of ResNet-20 at batch 1
    torch.testing.assert_close(
        logits.double(), resnet20_forward(resnet20, x, alpha_norm(resnet20, 1.0)), rtol=1e-4, atol=1e-4
    )


def test_kernels_run_concurrently_from_threads(kernels: native.NativeKernels) -> None:
    x, means, variances, weight, bias = layer_inputs(1, 16, 32, 32, seed=7)
    expected = kernels.unmix_layer(x, means, variances, weight, bias, 1e-5, 0.07, rate(1), True)
    results: list[tuple[torch.Tensor, ...]] = []
    lock = threading.Lock()

    def run() -> None:
        for _ in range(200):
            out = kernels.unmix_layer(x, means, variances, weight, bias, 1e-5, 0.07, rate(1), True)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 800
    for out in results:
        for a, b in zip(out, expected, strict=True):
            assert torch.equal(a, b)


def test_a_failing_build_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TTASERVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-ttaserve")
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native._load() is None
    assert "no compiler 'no-such-compiler-ttaserve'" in caplog.text
    assert not list(tmp_path.glob("*.so"))


def test_a_compiler_error_falls_back_with_its_message(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler 'cc' on this machine")
    broken = tmp_path / "kernels.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    monkeypatch.setenv("TTASERVE_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native._load() is None
    assert "cc failed on kernels.c" in caplog.text


def test_kernels_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTASERVE_NATIVE_KERNELS", "0")
    assert native._load() is None


def test_the_library_is_built_once_and_reused_without_the_compiler(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Built once (e.g. into an image); a later process finds it even where no compiler is installed."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler 'cc' on this machine")
    monkeypatch.setenv("TTASERVE_CACHE", str(tmp_path))
    first = native.build_library()
    stamp = first.stat().st_mtime_ns
    assert native.build_library() == first and first.stat().st_mtime_ns == stamp
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools-here"))
    assert shutil.which("cc") is None
    loaded = native._load()
    assert loaded is not None
    x = torch.randn(1, 4, 3, 3)
    expected = torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-5)
    torch.testing.assert_close(loaded.channel_norm(x, None, None, 1.0, None, None, 1e-5), expected)


def test_without_a_compiler_a_library_prebuilt_from_the_same_source_is_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An image built with one compiler command, run where another (or none) is configured: the library built from
    this very source is taken; one built from another source never is."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler 'cc' on this machine")
    monkeypatch.setenv("TTASERVE_CACHE", str(tmp_path))
    stale = tmp_path / "kernels-0123456789abcdef-00000000.so"
    stale.write_bytes(b"built from another kernels.c")
    monkeypatch.setenv("CC", "no-such-compiler-ttaserve")
    with pytest.raises(RuntimeError, match="no kernels library prebuilt from this source"):
        native.build_library()
    monkeypatch.setenv("CC", "cc")
    built = native.build_library()
    monkeypatch.setenv("CC", "no-such-compiler-ttaserve")
    with caplog.at_level(logging.INFO, logger="ttaserve.adapters.native_build"):
        assert native.build_library() == built
    assert f"using the one prebuilt at {built}" in caplog.text
    assert native._load() is not None
