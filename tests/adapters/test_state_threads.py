"""Session state is data (snapshot -> restore continues bit-identically), steps are pure and deterministic, and one
strategy object serves concurrent sessions from several threads without them seeing each other."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import torch
from torch import nn

from ttaserve.adapters import AdapterState, SourceData, Strategy, StrategyConfig, StrategyContext, get_strategy_class

T = TypeVar("T")

CASES: list[tuple[str, dict[str, Any], bool]] = [
    ("tbn", {}, False),
    ("alpha_bn", {}, False),
    ("unmix_tns", {}, False),
    ("tent", {}, False),
    ("tent", {"norm": "unmix_tns", "optimizer": "sgd", "lr": 1e-2}, False),
    ("rmt", {}, False),
    ("rmt", {"norm": "unmix_tns"}, False),
    ("rmt", {"warmup_samples": 32, "source_batch_size": 16}, True),
]
IDS = [
    f"{name}-{'-'.join(f'{k}={v}' for k, v in settings.items()) or 'default'}{'-source' * src}"
    for name, settings, src in CASES
]


def _make(model: nn.Module, name: str, settings: dict[str, Any], with_source: bool) -> tuple[Strategy, StrategyConfig]:
    source = None
    if with_source:
        g = torch.Generator().manual_seed(5)
        source = SourceData(images=torch.randn(40, 3, 16, 16, generator=g), labels=torch.arange(40) % 10)
    strategy = get_strategy_class(name)(model, StrategyContext(source=source))
    return strategy, strategy.make_config(**settings)


def _stream(seed: int, n: int = 4, size: int = 6) -> list[torch.Tensor]:
    """16x16 images: the network runs at any size, and the tests stay cheap."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 16, 16, generator=g) for _ in range(n)]


def _run(strategy: Strategy, config: StrategyConfig, state: AdapterState, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for x in xs:
        result = strategy.step(state, x, config)
        out.append(result.logits)
        state = result.state
    return out


def _assert_same_state(a: AdapterState, b: AdapterState) -> None:
    ta, tb = list(a.tensors()), list(b.tensors())
    assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb, strict=True))


@pytest.mark.parametrize(("name", "settings", "with_source"), CASES, ids=IDS)
def test_snapshot_restore_continues_identically(
    resnet20: nn.Module, name: str, settings: dict[str, Any], with_source: bool
) -> None:
    strategy, config = _make(resnet20, name, settings, with_source)
    state = strategy.init_state(config)
    xs = _stream(0)
    for x in xs[:2]:
        state = strategy.step(state, x, config).state
    buffer = io.BytesIO()
    torch.save(state.to_dict(), buffer)
    buffer.seek(0)
    assert type(state) is strategy.state_cls  # what a server restores snapshots into
    restored = strategy.state_cls.from_dict(torch.load(buffer, weights_only=True))
    _assert_same_state(state, restored)
    for x in xs[2:]:
        a, b = strategy.step(state, x, config), strategy.step(restored, x, config)
        assert torch.equal(a.logits, b.logits) and a.stats == b.stats
        state, restored = a.state, b.state
    _assert_same_state(state, restored)
    assert state.steps == 4
    if strategy.stateful:
        assert state.nbytes() > 0


@pytest.mark.parametrize(("name", "settings", "with_source"), CASES, ids=IDS)
def test_step_is_pure_and_deterministic(
    resnet20: nn.Module, name: str, settings: dict[str, Any], with_source: bool
) -> None:
    strategy, config = _make(resnet20, name, settings, with_source)
    state = strategy.init_state(config)
    x = _stream(1, n=1)[0]
    state = strategy.step(state, x, config).state
    snapshot = state.clone()
    a, b = strategy.step(state, x, config), strategy.step(state, x, config)
    assert torch.equal(a.logits, b.logits)
    _assert_same_state(a.state, b.state)
    _assert_same_state(state, snapshot)  # the input state was not modified in place
    # a fresh strategy object (another server process) reproduces the same stream
    other, _ = _make(resnet20, name, settings, with_source)
    assert all(
        torch.equal(p, q)
        for p, q in zip(
            _run(strategy, config, strategy.init_state(config), _stream(2)),
            _run(other, config, other.init_state(config), _stream(2)),
            strict=True,
        )
    )


def _in_new_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a thread of its own, as the concurrent streams run. PyTorch's CPU thread count is an OpenMP
    setting per thread: a new thread starts from the process default, while the main thread may have been set
    otherwise by earlier tests (an in-process server), and on many cores a different thread count changes how
    the backward pass's reductions are split, hence the last bits of a training strategy's outputs."""
    result: list[T] = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    assert result, "the stream raised in its thread (see the warning above)"
    return result[0]


@pytest.mark.parametrize(("name", "settings", "with_source"), CASES, ids=IDS)
def test_two_threads_interleaved_equal_streams_alone(
    resnet20: nn.Module, name: str, settings: dict[str, Any], with_source: bool
) -> None:
    strategy, config = _make(resnet20, name, settings, with_source)
    streams = [_stream(10), _stream(11)]
    alone = [_in_new_thread(lambda xs=xs: _run(strategy, config, strategy.init_state(config), xs)) for xs in streams]
    together: list[list[torch.Tensor]] = [[], []]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def serve(i: int) -> None:
        try:
            state = strategy.init_state(config)
            for x in streams[i]:
                barrier.wait()
                result = strategy.step(state, x, config)
                together[i].append(result.logits)
                state = result.state
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        assert all(torch.equal(p, q) for p, q in zip(alone[i], together[i], strict=True))
