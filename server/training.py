"""A small, seeded supervised training loop, and the two commands that use it.

* ``default-model``: trains the embedded Fashion-MNIST model that ``ttaserve serve`` ships and serves when no
  repository is given (see ``docs/default_model.md`` for the command, time and accuracy);
* ``finetune-expert``: fine-tunes a T3 expert from a generalist checkpoint on one corruption domain.

Run as ``python -m ttaserve.server.training {default-model,finetune-expert} --help``.

Images stay uint8 (N, C, H, W) in memory and become normalised float batches on the fly, with augmentation done
as batched tensor indexing, so a CPU epoch spends its time in the network, not in data handling. Every random
draw (initialisation, shuffling, augmentation) comes from ``settings.seed``; with the same torch build and thread
count a run is repeatable bit for bit.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from . import fashion_mnist
from .architectures import build_architecture, load_model

Log = Callable[[str], None]

#: the normalisation of the shared CIFAR-10 ResNet-20 checkpoints
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
DEFAULT_MODEL_NAME = "fashion_mnist"


@dataclass(frozen=True)
class TrainSettings:
    epochs: float = 1.0
    batch_size: int = 128
    #: peak learning rate (one-cycle) or starting learning rate (cosine)
    lr: float = 0.1
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    #: random crop after zero padding by this many pixels (0 = no crop)
    crop_padding: int = 2
    flip: bool = True
    seed: int = 0
    #: stop after this many optimiser steps (quick runs and tests); None = ``epochs`` worth
    max_steps: int | None = None


class Normalizer:
    """uint8 (N, C, H, W) pixels -> ``(x / 255 - mean) / std`` float32, per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() / 255.0 - self.mean) / self.std


def set_threads(threads: int | None = None) -> int:
    """Use every core this process may run on (intra-op), unless told otherwise; returns the count."""
    count = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(count)
    return count


def augment(batch: torch.Tensor, settings: TrainSettings, generator: torch.Generator) -> torch.Tensor:
    """Random crop from a zero-padded copy and random horizontal flip, one draw per image, no Python loop."""
    n, c, h, w = batch.shape
    pad = settings.crop_padding
    if pad > 0:
        padded = F.pad(batch, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=generator)
        rows = dy + torch.arange(h).view(1, 1, h, 1)
        cols = dx + torch.arange(w).view(1, 1, 1, w)
        batch = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
    if settings.flip:
        flip = torch.rand(n, generator=generator) < 0.5
        batch = torch.where(flip.view(n, 1, 1, 1), batch.flip(3), batch)
    return batch


def _optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    # Weight decay on convolution and linear weights only: decaying BN affine and biases only hurts small nets.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if settings.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=settings.lr)
    return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=True)


def _scheduler(
    optimizer: torch.optim.Optimizer, settings: TrainSettings, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    # One-cycle needs at least one step to rise and one to fall; very short runs (tests) fall back to cosine.
    if settings.schedule == "onecycle" and total_steps >= 3:
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=settings.lr,
            total_steps=total_steps,
            pct_start=max(0.25, 2 / total_steps),
            div_factor=10.0,
        )
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    normalize: Normalizer,
    settings: TrainSettings,
    log: Log = print,
) -> nn.Module:
    """Train ``model`` in place on uint8 ``images`` (N, C, H, W) and int64 ``labels``; returns it in eval mode."""
    generator = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = math.ceil(len(images) / settings.batch_size)
    total_steps = settings.max_steps or max(1, round(settings.epochs * steps_per_epoch))
    optimizer = _optimizer(model, settings)
    scheduler = _scheduler(optimizer, settings, total_steps)
    model.train()
    step, start = 0, time.perf_counter()
    while step < total_steps:
        order = torch.randperm(len(images), generator=generator)
        loss_sum, correct, seen = 0.0, 0, 0
        for first in range(0, len(order), settings.batch_size):
            index = order[first : first + settings.batch_size]
            x = normalize(augment(images[index], settings, generator))
            y = labels[index]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(index)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(index)
            step += 1
            if step >= total_steps:
                break
        log(
            f"step {step}/{total_steps}  epoch {step / steps_per_epoch:.2f}  loss {loss_sum / seen:.4f}  "
            f"train acc {100 * correct / seen:.2f}%  {time.perf_counter() - start:.1f}s"
        )
    return model.eval()


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, normalize: Normalizer, batch_size: int = 1000) -> torch.Tensor:
    """Predicted class of every uint8 image (N, C, H, W), with the model in eval mode (source BN statistics)."""
    model.eval()
    return torch.cat(
        [model(normalize(images[i : i + batch_size])).argmax(1) for i in range(0, len(images), batch_size)]
    )


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize: Normalizer) -> float:
    return float((predict(model, images, normalize) == labels).float().mean())


def save_state_dict(model: nn.Module, path: Path) -> None:
    """A plain float32 state dict (what ``architectures.load_model`` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.float() if v.is_floating_point() else v).detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, path)


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> uint8 tensor (N, C, H, W), contiguous."""
    if images.ndim == 3:
        images = images[:, :, :, None]
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


# ---------------------------------------------------------------------------------------------------------------
# default-model


def default_model_config(mean: float, std: float, test_accuracy: float) -> dict:
    return {
        "platform": "pytorch",
        "architecture": "small_resnet",
        "architecture_args": {"in_channels": 1},
        "input": {"height": 28, "width": 28, "channels": 1, "layout": "NHWC"},
        "preprocessing": {"mean": [round(mean, 6)], "std": [round(std, 6)]},
        "labels": list(fashion_mnist.CLASS_NAMES),
        "dynamic_batching": {"enabled": True, "max_batch_size": 64, "max_queue_delay_us": 500},
        "description": f"Embedded default model (docs/default_model.md): {100 * test_accuracy:.2f}% test accuracy",
    }


def train_default_model(args: argparse.Namespace) -> float:
    threads = set_threads(args.threads)
    torch.manual_seed(args.seed)
    train_x, train_y = fashion_mnist.load_split("train", args.data_dir)
    test_x, test_y = fashion_mnist.load_split("test", args.data_dir)
    mean, std = float(train_x.mean() / 255.0), float(train_x.std() / 255.0)
    normalize = Normalizer((mean,), (std,))
    model = build_architecture("small_resnet", in_channels=1)
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"small_resnet ({params} parameters), {len(train_x)} images, {settings}, {threads} threads")
    start = time.perf_counter()
    train(model, to_nchw(train_x), torch.from_numpy(train_y).long(), normalize, settings)
    elapsed = time.perf_counter() - start
    test_accuracy = accuracy(model, to_nchw(test_x), torch.from_numpy(test_y).long(), normalize)
    model_dir = Path(args.out) / DEFAULT_MODEL_NAME
    save_state_dict(model, model_dir / "1" / "model.pt")
    config = default_model_config(mean, std, test_accuracy)
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=120))
    print(f"trained in {elapsed:.1f}s; test accuracy {100 * test_accuracy:.2f}%; wrote {model_dir}")
    return test_accuracy


# ---------------------------------------------------------------------------------------------------------------
# finetune-expert


def corrupt_family(images: np.ndarray, names: Sequence[str], severity: int, seed: int) -> np.ndarray:
    """An expert's training domain: image ``i`` gets corruption ``names[i % len(names)]`` (one name: all of them), so
    a family expert (e.g. ``gaussian_noise,shot_noise,impulse_noise``) sees each member equally often."""
    from ttaserve.evaluation.corruptions import corrupt_images

    out = np.empty_like(images)
    for i, name in enumerate(names):
        out[i :: len(names)] = corrupt_images(images[i :: len(names)], name, severity, seed=seed + i)
    return out


def finetune_expert(args: argparse.Namespace) -> tuple[float, float]:
    """Fine-tune a copy of ``--base`` on corrupted training images; returns (generalist, expert) held-out error."""
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    with np.load(args.data) as data:
        images, labels = data["x"], data["y"].astype(np.int64)
    order = np.random.default_rng(args.seed).permutation(len(images))
    if args.limit:
        order = order[: args.limit]
    holdout, train_idx = order[: args.holdout], order[args.holdout :]
    if len(train_idx) == 0:
        raise ValueError(f"--holdout {args.holdout} leaves no training images out of {len(order)}")
    print(f"corrupting {len(order)} images with {args.corruption} severity {args.severity} (seed {args.seed})")
    corrupted = to_nchw(corrupt_family(images[order], args.corruption.split(","), args.severity, args.seed))
    held_x, train_x = corrupted[: len(holdout)], corrupted[len(holdout) :]
    held_y, train_y = torch.from_numpy(labels[holdout]), torch.from_numpy(labels[train_idx])
    normalize = Normalizer(args.mean, args.std)
    model = load_model(args.architecture, Path(args.base), **args.architecture_args)
    generalist_error = 1 - accuracy(model, held_x, held_y, normalize) if len(holdout) else float("nan")
    settings = TrainSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        schedule="cosine",
        crop_padding=4,
        seed=args.seed,
        max_steps=args.max_steps,
    )
    print(f"fine-tuning {args.architecture} from {args.base} on {len(train_idx)} images, {settings}")
    train(model, train_x, train_y, normalize, settings)
    expert_error = 1 - accuracy(model, held_x, held_y, normalize) if len(holdout) else float("nan")
    save_state_dict(model, Path(args.out))
    print(
        f"held-out {args.corruption}-{args.severity} error on {len(holdout)} images: generalist "
        f"{100 * generalist_error:.2f}%, expert {100 * expert_error:.2f}%; wrote {args.out}"
    )
    return generalist_error, expert_error


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ttaserve.server.training", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    default = commands.add_parser("default-model", help="train the embedded Fashion-MNIST default model")
    default.add_argument("--out", type=Path, required=True, help="repository folder; writes <out>/fashion_mnist/")
    default.add_argument("--data-dir", type=Path, default=fashion_mnist.DEFAULT_DIR)
    default.add_argument("--epochs", type=float, default=5.0)
    default.add_argument("--batch-size", type=int, default=128)
    default.add_argument("--lr", type=float, default=0.2)
    default.add_argument("--seed", type=int, default=0)
    default.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    default.set_defaults(run=train_default_model)

    expert = commands.add_parser("finetune-expert", help="fine-tune a T3 expert on one corruption domain")
    expert.add_argument("--base", type=Path, required=True, help="generalist checkpoint (state dict)")
    expert.add_argument("--architecture", required=True)
    expert.add_argument(
        "--architecture-args", type=yaml.safe_load, default={}, help="YAML mapping, e.g. '{in_channels: 3}'"
    )
    expert.add_argument("--data", type=Path, required=True, help=".npz with x uint8 (N, H, W, 3) and y")
    expert.add_argument(
        "--corruption", required=True, help="a corruption, or several comma-separated (a family) in equal shares"
    )
    expert.add_argument("--severity", type=int, default=5)
    expert.add_argument("--out", type=Path, required=True, help="where to write the expert's state dict")
    expert.add_argument("--mean", type=float, nargs="+", default=CIFAR_MEAN)
    expert.add_argument("--std", type=float, nargs="+", default=CIFAR_STD)
    expert.add_argument("--epochs", type=float, default=2.0)
    expert.add_argument("--max-steps", type=int, default=None)
    expert.add_argument("--batch-size", type=int, default=128)
    expert.add_argument("--lr", type=float, default=0.01)
    expert.add_argument("--limit", type=int, default=0, help="use only this many images (0 = all)")
    expert.add_argument("--holdout", type=int, default=1000, help="images kept out of training for evaluation")
    expert.add_argument("--seed", type=int, default=0)
    expert.add_argument("--threads", type=int, default=None)
    expert.set_defaults(run=finetune_expert)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
