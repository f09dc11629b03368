"""PNG plots of a report: error per domain and method, the running error along a stream, the batch-size sweep.

Figures are drawn with matplotlib's object API (no pyplot, no backend, no global state). The running error is
what shows adaptation happening: within each domain of a continual stream an adapting
method's batch errors fall while the source model's stay flat. Every method keeps one colour in every plot.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from .results import ProtocolResult, Report

_COLOURS = {
    "none": "#7f7f7f",
    "tbn": "#1f77b4",
    "alpha_bn": "#ff7f0e",
    "unmix_tns": "#2ca02c",
    "tent": "#d62728",
    "rmt": "#9467bd",
    "generalist": "#7f7f7f",
    "expert": "#8c564b",
    "merge50": "#e377c2",
    "t3": "#bcbd22",
    "t3_batch": "#17becf",
    "unmix_exact": "#98df8a",
}
#: colours for other labels: tab20's, minus those taken above and minus greys (grey is the source model's)
_SPARE = [
    colour
    for colour in map(matplotlib.colors.to_hex, matplotlib.colormaps["tab20"].colors)
    if colour not in _COLOURS.values() and colour not in ("#7f7f7f", "#c7c7c7")
]


def _colour(label: str) -> str:
    """A fixed colour per known method; others from the spare palette by a stable hash of the label."""
    return _COLOURS.get(label) or _SPARE[zlib.crc32(label.encode()) % len(_SPARE)]


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def domain_errors(result: ProtocolResult, path: Path) -> Path:
    """Grouped bars: one group per domain (and the mean), one bar per method."""
    groups = [*result.domains, "mean"]
    methods = result.methods
    width = 0.8 / len(methods)
    figure = Figure(figsize=(max(6.0, 0.75 * len(groups) + 2), 4.2))
    axes = figure.subplots()
    x = np.arange(len(groups))
    for i, method in enumerate(methods):
        values = [*(method.errors[d] for d in result.domains), method.mean]
        axes.bar(
            x + (i - (len(methods) - 1) / 2) * width, values, width, label=method.label, color=_colour(method.label)
        )
    axes.set_xticks(x, [g.replace("_", " ") for g in groups], rotation=35, ha="right")
    axes.set_ylabel("top-1 error (%)")
    axes.set_ylim(0, 100)
    axes.grid(axis="y", alpha=0.3)
    axes.set_title(f"{result.description} (top-1 error per domain)", fontsize=9)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return _save(figure, path)


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return np.asarray(values, dtype=float)
    padded = np.pad(np.asarray(values, dtype=float), (window // 2, window - 1 - window // 2), mode="edge")
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def running_error(result: ProtocolResult, path: Path, smooth_batches: int = 1) -> Path:
    """Batch error along the stream (x: images seen), domain boundaries as dotted lines with their names."""
    figure = Figure(figsize=(12, 4.2))
    axes = figure.subplots()
    for method in result.methods:
        edges = np.cumsum([0, *method.batch_sizes])
        values = _smooth(method.batch_errors, smooth_batches)
        axes.stairs(values, edges, label=method.label, lw=1.3, color=_colour(method.label), baseline=None)
    sizes = np.cumsum([0, *result.methods[0].batch_sizes]) if result.methods else np.zeros(1)
    for start, domain in zip(result.domain_starts, result.domains, strict=False):
        axes.axvline(sizes[start], color="grey", lw=0.6, ls=":")
        axes.text(sizes[start], 101, domain.replace("_", " "), rotation=45, fontsize=7, ha="left", va="bottom")
    axes.set_xlim(0, sizes[-1])
    axes.set_ylim(0, 100)
    axes.set_xlabel("images seen")
    axes.set_ylabel("batch top-1 error (%)")
    axes.grid(axis="y", alpha=0.3)
    smoothing = f", moving average over {smooth_batches} batches" if smooth_batches > 1 else ""
    title = f"{result.name}: error of each batch of {result.batch_size} along the stream{smoothing}"
    axes.set_title(title, fontsize=9, pad=64 if result.domain_starts else 6)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return _save(figure, path)


def batch_sweep(report: Report, path: Path) -> Path | None:
    """Mean error against batch size, one line per method, from the ``batch-N`` protocols (None if absent)."""
    sweep = sorted((r for r in report.protocols if r.name.startswith("batch-")), key=lambda r: r.batch_size)
    if not sweep:
        return None
    figure = Figure(figsize=(6.5, 4.2))
    axes = figure.subplots()
    for label in dict.fromkeys(m.label for r in sweep for m in r.methods):
        points = [(r.batch_size, r.method(label).mean) for r in sweep if label in {m.label for m in r.methods}]
        xs, ys = zip(*points, strict=True)
        axes.plot(xs, ys, marker="o", label=label, color=_colour(label))
    axes.set_xscale("log")
    sizes = [r.batch_size for r in sweep]
    axes.set_xticks(sizes, [str(s) for s in sizes])
    axes.set_xlabel("batch size")
    axes.set_ylabel("mean top-1 error over domains (%)")
    axes.grid(alpha=0.3)
    axes.set_title("batch-size sweep (i.i.d., reset per corruption)", fontsize=9)
    axes.legend(fontsize=8, frameon=False)
    return _save(figure, path)


def plot_report(report: Report, directory: Path, prefix: str = "", smooth_batches: int = 1) -> list[Path]:
    """Every plot of ``report`` into ``directory``: ``<prefix><protocol>-errors.png``, ``...-running.png``,
    ``<prefix>batch-sweep.png``."""
    paths = []
    for result in report.protocols:
        paths.append(domain_errors(result, directory / f"{prefix}{result.name}-errors.png"))
        if not result.name.startswith("batch-"):
            paths.append(running_error(result, directory / f"{prefix}{result.name}-running.png", smooth_batches))
    sweep = batch_sweep(report, directory / f"{prefix}batch-sweep.png")
    return [*paths, *([sweep] if sweep else [])]
