"""T3 experts: fine-tuned from the generalist on a corruption family with ``finetune-expert``, cached on disk.

An expert is trained by ``python -m ttaserve.server.training finetune-expert`` in a child process (the documented
command, with its defaults: 9,000 of the 10,000 shared training images, 2 epochs), on the family's corruptions in
equal shares, and cached at ``<cache>/experts/<family>-s<severity>-seed<seed>/model.pt``: a later run reuses it.
The T3 comparison then runs five methods on a mixed stream of clean images and the family's corruptions.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .corruptions import CLEAN, FAMILIES
from .methods import Method
from .repository import CIFAR_MODEL


def expert_path(cache_dir: Path, family: str, severity: int, seed: int) -> Path:
    return cache_dir / "experts" / f"{family}-s{severity}-seed{seed}" / "model.pt"


def ensure_expert(
    family: str, severity: int, seed: int, base: Path, train_data: Path, cache_dir: Path, epochs: float = 2.0
) -> Path:
    """The cached expert for ``family``, fine-tuned first if absent (minutes on a CPU; the log goes to a file)."""
    path = expert_path(cache_dir, family, severity, seed)
    if path.is_file():
        return path
    if family not in FAMILIES:
        raise ValueError(f"unknown corruption family {family!r}; known: {', '.join(FAMILIES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    command = [
        sys.executable,
        "-m",
        "ttaserve.server.training",
        "finetune-expert",
        *("--base", str(base), "--architecture", "cifar_resnet20", "--data", str(train_data)),
        *("--corruption", ",".join(FAMILIES[family]), "--severity", str(severity), "--seed", str(seed)),
        *("--epochs", str(epochs), "--out", str(partial)),
    ]
    log = path.with_name("finetune.log")
    print(f"fine-tuning the {family} expert (log: {log}): {' '.join(command)}", file=sys.stderr)
    with log.open("w") as handle:
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT)
    partial.replace(path)
    return path


def t3_domains(family: str) -> tuple[str, ...]:
    """The T3 stream's domains: clean images (where the expert is out of its domain) and the family's corruptions."""
    return (CLEAN, *FAMILIES[family])


def t3_methods(names: dict[str, str]) -> list[Method]:
    """Generalist alone, expert alone, the static 50/50 merge, and T3 per sample and per batch (``names`` from
    ``repository.add_t3_models``)."""
    return [
        Method("generalist", "none", CIFAR_MODEL),
        Method("expert", "none", names["expert"]),
        Method("merge50", "none", names["merge50"]),
        Method("t3", "t3", names["t3"]),
        Method("t3_batch", "t3_batch", names["t3"]),
    ]
