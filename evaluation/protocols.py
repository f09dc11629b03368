"""The benchmark protocols of methods.md ("Benchmark protocols to reproduce"), as data.

A protocol fixes how the domains become a stream: batch size, label order, whether the adaptation state is reset
at each domain, whether the domains are mixed. Which domains (corruptions, severity, constants) and how many
images per domain are chosen per run, so that a protocol can run in full or on a documented subset.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .streams import Order

Settings = Mapping[str, bool | int | float | str]


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    batch_size: int
    order: Order = "iid"
    reset_each_domain: bool = False
    mixed: bool = False
    #: Dirichlet concentration δ (``order="dirichlet"``)
    delta: float = 0.1
    #: settings a protocol implies for a strategy, e.g. UnMix-TNS's K = 128 on mixed domains (its paper's choice)
    settings: Mapping[str, Settings] = field(default_factory=dict)


SWEEP_BATCH_SIZES = (1, 16, 64, 200)

PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("continual", "continual: the corruptions one after another, batch 200, never reset", 200),
        Protocol("reset", "per-corruption reset: batch 200, the source state at each corruption", 200, "iid", True),
        Protocol(
            "dirichlet",
            "label-correlated: Dirichlet-sorted classes (δ = 0.1) in each corruption, batch 64, reset per corruption",
            64,
            "dirichlet",
            True,
        ),
        Protocol(
            "sorted", "fully class-sorted within each corruption, batch 64, reset per corruption", 64, "sorted", True
        ),
        Protocol(
            "mixed",
            "mixed domains: all corruptions shuffled into one stream, batch 200 (UnMix-TNS with K = 128)",
            200,
            mixed=True,
            settings={"unmix_tns": {"num_components": 128}},
        ),
        *(
            Protocol(f"batch-{size}", f"batch size {size}, i.i.d., reset per corruption", size, "iid", True)
            for size in SWEEP_BATCH_SIZES
        ),
    )
}

#: names that stand for several protocols
GROUPS: dict[str, tuple[str, ...]] = {
    "sweep": tuple(f"batch-{size}" for size in SWEEP_BATCH_SIZES),
    "all": ("continual", "reset", "dirichlet", "sorted", "mixed", *(f"batch-{size}" for size in SWEEP_BATCH_SIZES)),
}


def resolve(names: list[str]) -> list[Protocol]:
    """Protocol names and group names -> protocols, in order, without repeats."""
    expanded: list[str] = []
    for name in names:
        for item in GROUPS.get(name, (name,)):
            if item not in PROTOCOLS:
                known = ", ".join([*PROTOCOLS, *GROUPS])
                raise ValueError(f"unknown protocol {item!r}; known: {known}")
            if item not in expanded:
                expanded.append(item)
    return [PROTOCOLS[name] for name in expanded]
