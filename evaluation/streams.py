"""Test streams: domains (a corruption applied to the same images) cut into batches in a chosen label order.

Orders:

* ``iid``: a seeded shuffle within each domain (the field's standard);
* ``dirichlet``: label-correlated, by Dirichlet sorting as in UnMix-TNS's and RoTTA's harnesses: the stream is
  split into as many consecutive time slots as there are classes; each class spreads its images over the slots
  with proportions drawn from Dirichlet(δ·1), and a slot plays its classes' parts one after another in random
  order. Small δ puts each class into one or two slots (long runs of one class); large δ spreads every class over
  every slot (short runs of all classes);
* ``sorted``: fully class-sorted, the extreme case (random order within a class).

Batches never straddle two domains except in a mixed stream, where all domains are pooled and ordered together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Order = Literal["iid", "dirichlet", "sorted"]


@dataclass(frozen=True)
class Domain:
    name: str
    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Batch:
    images: np.ndarray
    labels: np.ndarray
    #: per image, the index of its domain in ``Stream.domains``
    domains: np.ndarray
    #: start from the source state before this batch (a new session)
    reset: bool


@dataclass(frozen=True)
class Stream:
    domains: tuple[str, ...]
    batches: tuple[Batch, ...]

    @property
    def images(self) -> int:
        return sum(len(b.labels) for b in self.batches)

    def classes_per_batch(self) -> float:
        """Mean number of distinct labels in a batch: how label-correlated the stream is."""
        return float(np.mean([len(np.unique(b.labels)) for b in self.batches]))


def order_indices(labels: np.ndarray, order: Order, rng: np.random.Generator, delta: float, slots: int) -> np.ndarray:
    if order == "iid":
        return rng.permutation(len(labels))
    if order == "sorted":
        shuffled = rng.permutation(len(labels))
        return shuffled[np.argsort(labels[shuffled], kind="stable")]
    return dirichlet_indices(labels, delta, rng, slots)


def dirichlet_indices(labels: np.ndarray, delta: float, rng: np.random.Generator, slots: int) -> np.ndarray:
    """Dirichlet sorting: class c puts a share q_c,t ~ Dirichlet(δ·1) of its images into slot t; a slot holds its
    classes' parts as contiguous blocks in random order; the slots follow one another."""
    classes = np.unique(labels)
    shares = rng.dirichlet(np.full(slots, delta), size=len(classes))
    blocks: list[list[np.ndarray]] = [[] for _ in range(slots)]
    for label, share in zip(classes, shares, strict=True):
        members = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.rint(np.cumsum(share)[:-1] * len(members)).astype(int)
        for slot, part in enumerate(np.split(members, cuts)):
            blocks[slot].append(part)
    return np.concatenate([slot[i] for slot in blocks for i in rng.permutation(len(slot))])


def _cut(images: np.ndarray, labels: np.ndarray, domains: np.ndarray, size: int, reset_first: bool) -> list[Batch]:
    return [
        Batch(images[i : i + size], labels[i : i + size], domains[i : i + size], reset_first and i == 0)
        for i in range(0, len(labels), size)
    ]


def build_stream(
    domains: Sequence[Domain],
    batch_size: int,
    order: Order = "iid",
    *,
    reset_each_domain: bool = False,
    mixed: bool = False,
    delta: float = 0.1,
    seed: int = 0,
) -> Stream:
    """Order each domain (or, ``mixed``, all of them pooled) with a seeded generator and cut it into batches."""
    names = tuple(d.name for d in domains)
    batches: list[Batch] = []
    if mixed:
        images = np.concatenate([d.images for d in domains])
        labels = np.concatenate([d.labels for d in domains])
        ids = np.concatenate([np.full(len(d.labels), i) for i, d in enumerate(domains)])
        rng = np.random.default_rng([seed, len(domains)])
        index = order_indices(labels, order, rng, delta, len(np.unique(labels)))
        batches += _cut(images[index], labels[index], ids[index], batch_size, True)
    else:
        for i, domain in enumerate(domains):
            rng = np.random.default_rng([seed, i])
            index = order_indices(domain.labels, order, rng, delta, len(np.unique(domain.labels)))
            ids = np.full(len(index), i)
            reset = reset_each_domain or i == 0
            batches += _cut(domain.images[index], domain.labels[index], ids, batch_size, reset)
    return Stream(names, tuple(batches))
