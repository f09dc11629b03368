"""What an evaluation measured, as plain dataclasses that round-trip through JSON (tables and plots read them)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class MethodResult:
    label: str
    strategy: str
    model: str
    settings: dict[str, Any]
    #: top-1 error (%) per domain
    errors: dict[str, float]
    #: top-1 error (%) of every batch, in stream order: the running error that shows adaptation
    batch_errors: list[float]
    batch_sizes: list[int]
    images: int
    seconds: float

    @property
    def mean(self) -> float:
        """The mean of the per-domain errors (the field's "mean over corruptions")."""
        return sum(self.errors.values()) / len(self.errors)


@dataclass
class ProtocolResult:
    name: str
    description: str
    batch_size: int
    order: str
    reset_each_domain: bool
    mixed: bool
    domains: list[str]
    #: index of each domain's first batch (empty for a mixed stream)
    domain_starts: list[int]
    images_per_domain: int
    classes_per_batch: float
    methods: list[MethodResult] = field(default_factory=list)

    def method(self, label: str) -> MethodResult:
        for result in self.methods:
            if result.label == label:
                return result
        raise KeyError(f"protocol {self.name!r} has no method {label!r}")


@dataclass
class Report:
    #: how the run was made: data, model, corruptions, severity, constants, backend, command, timings
    meta: dict[str, Any]
    protocols: list[ProtocolResult] = field(default_factory=list)

    def protocol(self, name: str) -> ProtocolResult:
        for result in self.protocols:
            if result.name == name:
                return result
        raise KeyError(f"no protocol {name!r} in this report")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: Path) -> Report:
        raw = json.loads(Path(path).read_text())
        protocols = [
            ProtocolResult(**{**p, "methods": [MethodResult(**m) for m in p["methods"]]}) for p in raw["protocols"]
        ]
        return cls(raw["meta"], protocols)
