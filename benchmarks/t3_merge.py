"""T3 / T3_B against their two endpoints on a corrupted CIFAR-10 test stream.

    python benchmarks/t3_merge.py --expert <dir>/model.pt --corruption gaussian_noise --severity 5

The generalist is the shared ResNet-20; the expert comes from ``python -m ttaserve.server.training
finetune-expert`` on the same corruption applied to the shared training images, so the test images here are
held out from it. Prints top-1 error (%) and seconds per batch of: the generalist, the expert, ``t3`` and
``t3_batch`` (default settings unless overridden), on the corrupted test images and on the clean ones (where the
expert is out of its domain and merging should fall back towards the generalist).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ttaserve.adapters import Adapter, StrategyContext
from ttaserve.evaluation.corruptions import corrupt_images
from ttaserve.server.architectures import load_model
from ttaserve.server.training import CIFAR_MEAN, CIFAR_STD, Normalizer, set_threads, to_nchw

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _error(
    predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> tuple[float, float]:
    wrong, start = 0, time.perf_counter()
    for first in range(0, len(x), batch_size):
        logits = predict(x[first : first + batch_size])
        wrong += int((logits.argmax(1) != y[first : first + batch_size]).sum())
    batches = -(-len(x) // batch_size)
    return 100 * wrong / len(x), (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=SHARED / "models" / "cifar10" / "resnet20-12fca82f.th")
    parser.add_argument("--expert", type=Path, required=True)
    parser.add_argument("--test", type=Path, default=SHARED / "data" / "cifar10" / "test.npz")
    parser.add_argument("--corruption", default="gaussian_noise")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--images", type=int, default=2000, help="test images (a seeded random subset)")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="T3 settings, e.g. gamma=5")
    args = parser.parse_args()
    set_threads()
    torch.manual_seed(args.seed)
    with np.load(args.test) as data:
        order = np.random.default_rng(args.seed).permutation(len(data["y"]))[: args.images]
        clean, labels = data["x"][order], torch.from_numpy(data["y"][order].astype(np.int64))
    corrupted = corrupt_images(clean, args.corruption, args.severity, seed=args.seed)
    normalize = Normalizer(CIFAR_MEAN, CIFAR_STD)
    generalist = load_model("cifar_resnet20", args.base)
    expert = load_model("cifar_resnet20", args.expert)
    settings = {key: float(value) for key, value in (item.split("=", 1) for item in args.set)}
    context = StrategyContext(partner=expert)
    print(f"{args.images} test images, batch {args.batch_size}, T3 settings {settings or 'default'}")
    print(f"{'':>12} {args.corruption + '-' + str(args.severity):>22} {'clean':>22}")
    with torch.inference_mode():
        for name, predict in [
            ("generalist", generalist),
            ("expert", expert),
            ("t3", Adapter("t3", generalist, context, **settings)),
            ("t3_batch", Adapter("t3_batch", generalist, context, **settings)),
        ]:
            cells = []
            for images in (corrupted, clean):
                error, seconds = _error(predict, normalize(to_nchw(images)), labels, args.batch_size)
                cells.append(f"{error:6.2f}% {1000 * seconds:8.1f} ms/b")
            print(f"{name:>12} {cells[0]:>22} {cells[1]:>22}")


if __name__ == "__main__":
    main()
