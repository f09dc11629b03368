"""The model repository an evaluation runs on, written in the server's layout so a server can serve it unchanged.

* ``cifar10_resnet20``: the shared pretrained ResNet-20 with its normalisation and labels, the shared training
  images as ``source_data`` (RMT's class prototypes), and the session collapse guard off: the guard would reset
  sessions on the class-sorted streams, which would make a run through a server differ from the in-process one.
* For T3, per expert ``<family>``: ``expert_<family>`` (the fine-tuned expert), ``merge50_<family>`` (the static
  50/50 weight average, BatchNorm statistics included) and ``t3_<family>`` (the generalist again, with the expert
  as its ``merge_partner``).

The Fashion-MNIST evaluations use the server's embedded default model repository as it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from ttaserve.server.architectures import load_model
from ttaserve.server.repository import DEFAULT_REPOSITORY
from ttaserve.server.training import CIFAR_MEAN, CIFAR_STD, save_state_dict

from .datasets import CIFAR10_CLASSES

CIFAR_MODEL = "cifar10_resnet20"
FASHION_MODEL = "fashion_mnist"
FASHION_REPOSITORY = DEFAULT_REPOSITORY
_ARCHITECTURE = "cifar_resnet20"


def _config(source_data: Path | None = None, merge_partner: str | None = None) -> dict[str, object]:
    config: dict[str, object] = {
        "platform": "pytorch",
        "architecture": _ARCHITECTURE,
        "input": {"height": 32, "width": 32, "channels": 3, "layout": "NHWC"},
        "preprocessing": {"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)},
        "labels": list(CIFAR10_CLASSES),
        "max_batch_size": 256,
        "sessions": {"collapse_min_marginal_entropy": 0.0},
    }
    if source_data is not None:
        config["source_data"] = str(Path(source_data).resolve())
        # the evaluated RMT runs without a warm-up: a served model must not spend minutes on the default one
        config["source_warmup_on_load"] = False
    if merge_partner is not None:
        config["merge_partner"] = merge_partner
    return config


def _write(root: Path, name: str, config: dict[str, object], weights: Path | None = None) -> Path:
    directory = root / name
    (directory / "1").mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if weights is not None:
        shutil.copyfile(weights, directory / "1" / "model.pt")
    return directory / "1" / "model.pt"


def write_cifar_repository(root: Path, checkpoint: Path, source_data: Path | None = None) -> Path:
    """``root/cifar10_resnet20`` from the shared checkpoint; returns ``root``."""
    _write(root, CIFAR_MODEL, _config(source_data), checkpoint)
    return root


def add_t3_models(root: Path, family: str, expert_weights: Path) -> dict[str, str]:
    """The T3 models of one expert next to ``cifar10_resnet20``; returns their names by role."""
    generalist_weights = root / CIFAR_MODEL / "1" / "model.pt"
    names = {"expert": f"expert_{family}", "merge50": f"merge50_{family}", "t3": f"t3_{family}"}
    _write(root, names["expert"], _config(), expert_weights)
    _write(root, names["t3"], _config(merge_partner=names["expert"]), generalist_weights)
    generalist = load_model(_ARCHITECTURE, generalist_weights).state_dict()
    expert = load_model(_ARCHITECTURE, expert_weights).state_dict()
    merged = {
        key: (value + expert[key]) / 2 if value.is_floating_point() else value for key, value in generalist.items()
    }
    network = load_model(_ARCHITECTURE, generalist_weights)
    network.load_state_dict(merged)
    save_state_dict(network, _write(root, names["merge50"], _config()))
    return names
