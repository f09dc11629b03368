"""The training loop is repeatable from its seed, and ``finetune-expert`` yields an expert that beats its generalist
on the corruption it was tuned for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ttaserve.server import fashion_mnist
from ttaserve.server.architectures import build_architecture, load_model
from ttaserve.server.training import Normalizer, TrainSettings, main, to_nchw, train

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_TRAIN = SHARED / "data" / "cifar10" / "train10k.npz"
RESNET20 = SHARED / "models" / "cifar10" / "resnet20-12fca82f.th"


def _short_run(seed: int) -> dict[str, torch.Tensor]:
    images, labels = fashion_mnist.load_split("test")
    torch.manual_seed(seed)
    model = build_architecture("small_resnet", in_channels=1)
    settings = TrainSettings(batch_size=32, lr=0.05, max_steps=4, seed=seed)
    train(model, to_nchw(images[:256]), torch.from_numpy(labels[:256]).long(), Normalizer((0.29,), (0.35,)), settings)
    return model.state_dict()


@pytest.mark.skipif(not fashion_mnist.DEFAULT_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_training_is_repeatable_from_its_seed() -> None:
    first, again, other = _short_run(0), _short_run(0), _short_run(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["conv1.weight"], other["conv1.weight"])


@pytest.mark.slow
@pytest.mark.skipif(
    not (CIFAR_TRAIN.is_file() and RESNET20.is_file()),
    reason=f"needs the shared CIFAR-10 training images and ResNet-20 checkpoint at {SHARED} (not present)",
)
def test_finetuned_expert_beats_the_generalist_on_its_corruption(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "expert" / "model.pt"
    # 500 images: 200 held out (corrupted, never trained on), 300 to fine-tune on for 10 steps of 32.
    args = ["finetune-expert", "--base", str(RESNET20), "--architecture", "cifar_resnet20", "--data", str(CIFAR_TRAIN)]
    args += ["--corruption", "gaussian_noise", "--severity", "5", "--out", str(out)]
    args += ["--limit", "500", "--holdout", "200", "--max-steps", "10", "--batch-size", "32"]
    main(args)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    found = re.search(r"generalist ([\d.]+)%, expert ([\d.]+)%", line)
    assert found, line
    generalist_error, expert_error = float(found[1]), float(found[2])
    assert expert_error < generalist_error - 5.0, line
    expert = load_model("cifar_resnet20", out)
    generalist = load_model("cifar_resnet20", RESNET20)
    assert expert.state_dict().keys() == generalist.state_dict().keys()
