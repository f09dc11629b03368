"""Cost per batch of each adaptation strategy relative to ``none`` (plain inference), on ResNet-20.

For each batch size, every strategy adapts its own stream of the same batch; each round times ``none`` and then
every strategy once, in that order, and the reported ratio is the median over rounds of (strategy time / ``none``
time in the same round), so machine-load drift cancels. Uses the shared pretrained checkpoint when
``../shared`` is beside the repo, else random weights (the cost is the same). T3's expert is the model with
perturbed weights (a stand-in for a fine-tuned copy: the cost does not depend on the values).

    python benchmarks/bench_strategies.py [--rounds 7] [--batch-sizes 1 64 200] [--device cpu] [--strategies tbn ...]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttaserve.adapters import Adapter, StrategyContext
from ttaserve.server.architectures import build_architecture, load_model

CHECKPOINT = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "cifar10" / "resnet20-12fca82f.th"
STRATEGIES: dict[str, tuple[str, dict[str, Any]]] = {
    "tbn": ("tbn", {}),
    "alpha_bn": ("alpha_bn", {}),
    "unmix_tns": ("unmix_tns", {}),
    "tent": ("tent", {}),
    "tent+unmix": ("tent", {"norm": "unmix_tns"}),
    "rmt": ("rmt", {}),
    "rmt+unmix": ("rmt", {"norm": "unmix_tns"}),
    "t3": ("t3", {}),
    "t3_batch": ("t3_batch", {}),
}


def _model(device: torch.device) -> tuple[nn.Module, str]:
    if CHECKPOINT.exists():
        return load_model("cifar_resnet20", CHECKPOINT).to(device), "pretrained"
    torch.manual_seed(0)
    return build_architecture("cifar_resnet20").eval().to(device), "random weights"


def _perturbed(model: nn.Module) -> nn.Module:
    expert = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in expert.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return expert


def _timed(adapter: Adapter, x: torch.Tensor, device: torch.device, repeats: int = 1) -> float:
    """Mean seconds per call over ``repeats`` back-to-back calls (a stateful stream advances with each)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        adapter(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def bench(
    batch_size: int, rounds: int, model: nn.Module, device: torch.device, labels: list[str]
) -> dict[str, tuple[float, float]]:
    """name -> (median seconds per batch, median ratio to ``none``)."""
    x = torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(batch_size)).to(device)
    context = StrategyContext(partner=_perturbed(model), device=device)
    adapters = {"none": Adapter("none", model, context)}
    for label in labels:
        name, settings = STRATEGIES[label]
        adapters[label] = Adapter(name, model, context, **settings)
    for adapter in adapters.values():  # warm-up: lazy per-thread copies, allocator, kernels
        adapter(x)
        adapter(x)
    # Small batches are timed over several calls so that a measurement spans >= 50 ms of `none`: single
    # millisecond-long calls are at the mercy of every scheduler hiccup.
    repeats = max(1, math.ceil(0.05 / _timed(adapters["none"], x, device, 3)))
    times: dict[str, list[float]] = {label: [] for label in adapters}
    ratios: dict[str, list[float]] = {label: [] for label in adapters}
    for _ in range(rounds):
        base = _timed(adapters["none"], x, device, repeats)
        times["none"].append(base)
        ratios["none"].append(1.0)
        for label, adapter in adapters.items():
            if label != "none":
                seconds = _timed(adapter, x, device, repeats)
                times[label].append(seconds)
                ratios[label].append(seconds / base)
    return {label: (statistics.median(times[label]), statistics.median(ratios[label])) for label in adapters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 200])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    args = parser.parse_args()
    device = torch.device(args.device)
    model, weights = _model(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"ResNet-20 ({weights}), {where}, torch {torch.__version__}, {args.rounds} interleaved rounds, medians")
    results = {b: bench(b, args.rounds, model, device, args.strategies) for b in args.batch_sizes}
    header = "".join(f" | {f'batch {b}':>21}" for b in args.batch_sizes)
    print(f"{'strategy':<12}{header}")
    print(f"{'':<12}" + "".join(f" | {'ms/batch':>10} {'x none':>10}" for _ in args.batch_sizes))
    for label in results[args.batch_sizes[0]]:
        cells = "".join(f" | {results[b][label][0] * 1e3:>10.2f} {results[b][label][1]:>10.2f}" for b in results)
        print(f"{label:<12}{cells}")


if __name__ == "__main__":
    main()
