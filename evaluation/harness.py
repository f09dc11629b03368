"""Runs protocols: builds each protocol's stream once, pushes it through every method, and records the errors.

Every method of a protocol sees the same stream (same images, same order, same batches), so their errors compare
directly. A method runs as one stream: one ``Backend.open`` (one server session), reset where the protocol says.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .cache import corrupted
from .corruptions import Constants
from .datasets import ImageSet, label_map
from .methods import Backend, Method
from .protocols import Protocol
from .results import MethodResult, ProtocolResult, Report
from .streams import Domain, Stream, build_stream


@dataclass(frozen=True)
class DomainSpec:
    """Which domains to build from a clean image set: corruption names (``clean`` allowed) at one severity."""

    corruptions: tuple[str, ...]
    severity: int = 5
    constants: Constants = "imagenet-c"
    #: images per domain (a class-balanced seeded subset, the same images in every domain); 0 = all
    images_per_domain: int = 0
    seed: int = 0


def make_domains(data: ImageSet, spec: DomainSpec, targets: np.ndarray, cache_dir: Path) -> list[Domain]:
    """The corrupted domains, labels mapped to the model's output indices (``targets``)."""
    indices = data.balanced_indices(spec.images_per_domain, spec.seed)
    labels = targets[data.labels[indices]]
    return [
        Domain(name, corrupted(data, name, spec.severity, spec.constants, spec.seed, cache_dir)[indices], labels)
        for name in spec.corruptions
    ]


def run_method(
    backend: Backend, method: Method, stream: Stream, stream_id: str, desc: str, progress: bool
) -> MethodResult:
    runner = backend.open(method, stream_id)
    wrong = np.zeros(len(stream.domains), dtype=np.int64)
    seen = np.zeros(len(stream.domains), dtype=np.int64)
    batch_errors: list[float] = []
    bar = tqdm(total=stream.images, desc=desc, unit="img", disable=not progress, leave=True, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for batch in stream.batches:
            predicted = runner.predict(batch.images, batch.reset)
            miss = predicted != batch.labels
            np.add.at(wrong, batch.domains, miss)
            np.add.at(seen, batch.domains, 1)
            batch_errors.append(round(100 * float(miss.mean()), 3))
            bar.update(len(batch.labels))
            bar.set_postfix(error=f"{100 * wrong.sum() / seen.sum():.1f}%")
    finally:
        seconds = time.perf_counter() - start
        bar.close()
        runner.close()
    errors = {name: round(100 * float(w / n), 3) for name, w, n in zip(stream.domains, wrong, seen, strict=True) if n}
    return MethodResult(
        label=method.label,
        strategy=method.strategy,
        model=method.model or backend.model,
        settings=dict(method.settings),
        errors=errors,
        batch_errors=batch_errors,
        batch_sizes=[len(b.labels) for b in stream.batches],
        images=stream.images,
        seconds=round(seconds, 2),
    )


def run_protocol(
    backend: Backend,
    protocol: Protocol,
    domains: Sequence[Domain],
    methods: Sequence[Method],
    seed: int = 0,
    progress: bool = True,
    name: str | None = None,
) -> ProtocolResult:
    """Every method on ``protocol``'s stream of ``domains``; ``name`` overrides the protocol's name in the result."""
    stream = build_stream(
        domains,
        protocol.batch_size,
        protocol.order,
        reset_each_domain=protocol.reset_each_domain,
        mixed=protocol.mixed,
        delta=protocol.delta,
        seed=seed,
    )
    name = name or protocol.name
    starts = (
        []
        if protocol.mixed
        else [next(i for i, b in enumerate(stream.batches) if b.domains[0] == d) for d in range(len(domains))]
    )
    result = ProtocolResult(
        name=name,
        description=protocol.description,
        batch_size=protocol.batch_size,
        order=protocol.order,
        reset_each_domain=protocol.reset_each_domain,
        mixed=protocol.mixed,
        domains=list(stream.domains),
        domain_starts=starts,
        images_per_domain=len(domains[0].labels) if domains else 0,
        classes_per_batch=round(stream.classes_per_batch(), 2),
    )
    for method in methods:
        settings = {**protocol.settings.get(method.strategy, {}), **method.settings}
        method = Method(method.label, method.strategy, method.model, settings)
        desc = f"{name}: {method.label}"
        result.methods.append(run_method(backend, method, stream, f"{name}-{method.label}", desc, progress))
    return result


def run_meta(backend: Backend, data: ImageSet, spec: DomainSpec) -> dict[str, object]:
    """How the run was made, for the JSON file: enough to repeat it and to judge its timings."""
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data": data.name,
        "data_images": len(data),
        "classes": list(data.classes),
        "skipped_files": [{"path": s.path, "reason": s.reason} for s in data.skipped],
        "model": backend.model,
        "backend": backend.describe(),
        "corruptions": list(spec.corruptions),
        "severity": spec.severity,
        "constants": spec.constants,
        "images_per_domain": spec.images_per_domain or len(data),
        "seed": spec.seed,
        "cpu_count": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def evaluate(
    backend: Backend,
    data: ImageSet,
    protocols: Sequence[Protocol],
    methods: Sequence[Method],
    spec: DomainSpec,
    cache_dir: Path,
    progress: bool = True,
) -> Report:
    """The Python API: every protocol over ``spec``'s domains of ``data``, every method, on ``backend``."""
    targets = label_map(data.classes, backend.labels(backend.model))
    domains = make_domains(data, spec, targets, cache_dir)
    report = Report(run_meta(backend, data, spec))
    start = time.perf_counter()
    for protocol in protocols:
        report.protocols.append(run_protocol(backend, protocol, domains, methods, spec.seed, progress))
    report.meta["seconds"] = round(time.perf_counter() - start, 1)
    return report
