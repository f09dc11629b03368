"""Markdown tables from a report: error per domain × method per protocol, summaries, the batch-size sweep, timings.

Markdown because the same text goes to the terminal, to ``results.md`` beside the JSON, and into docs/results.md.
The best (lowest) error of each row is bold, so the ordering of the methods reads at a glance.
"""

from __future__ import annotations

from collections.abc import Sequence

from .corruptions import CLEAN
from .results import ProtocolResult, Report


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)
    return "\n".join([_row(header), _row(align), *(_row(r) for r in rows)])


def _errors(values: Sequence[float | None]) -> list[str]:
    """Errors to one decimal, the lowest in bold; ``None`` (a method a protocol did not run) as a dash."""
    best = min((v for v in values if v is not None), default=None)
    return ["–" if v is None else f"**{v:.1f}**" if v == best else f"{v:.1f}" for v in values]


def protocol_table(result: ProtocolResult) -> str:
    """Rows: domains then the mean; columns: methods; top-1 error (%)."""
    labels = [m.label for m in result.methods]
    rows = [[domain, *_errors([m.errors[domain] for m in result.methods])] for domain in result.domains]
    rows.append(["**mean**", *_errors([m.mean for m in result.methods])])
    return _table(["domain", *labels], rows)


def summary_table(results: Sequence[ProtocolResult]) -> str:
    """Rows: protocols; columns: methods; the mean error over domains."""
    labels = list(dict.fromkeys(m.label for r in results for m in r.methods))
    rows = []
    for result in results:
        by_label = {m.label: m.mean for m in result.methods}
        rows.append([result.name, *_errors([by_label.get(label) for label in labels])])
    return _table(["protocol", *labels], rows)


def timing_table(results: Sequence[ProtocolResult]) -> str:
    """Seconds per protocol and method (the stream only), and milliseconds per image."""
    labels = list(dict.fromkeys(m.label for r in results for m in r.methods))
    rows = []
    for result in results:
        by_label = {m.label: m for m in result.methods}
        cells = []
        for label in labels:
            m = by_label.get(label)
            cells.append(f"{m.seconds:.0f} s ({1000 * m.seconds / m.images:.1f} ms/img)" if m else "–")
        rows.append([result.name, *cells])
    return _table(["protocol", *labels], rows)


def describe(report: Report) -> str:
    meta = report.meta
    corruptions = ", ".join(meta["corruptions"])
    if set(meta["corruptions"]) != {CLEAN}:
        corruptions += f"; severity {meta['severity']}, {meta['constants']} constants"
    lines = [
        f"- data: {meta['data']} ({meta['data_images']} images), {meta['images_per_domain']} images per domain",
        f"- domains: {corruptions}",
        f"- model: {meta['model']}; backend: {meta['backend']}; {meta['cpu_count']} CPU cores",
    ]
    if meta.get("skipped_files"):
        lines.append(f"- {len(meta['skipped_files'])} unreadable file(s) skipped (listed in the JSON)")
    return "\n".join(lines)


def markdown(report: Report) -> str:
    """The whole report: what ran, then one table per protocol, the summary and the timings."""
    parts = ["# Evaluation results", "", describe(report), ""]
    for result in report.protocols:
        parts += [
            f"## {result.name}",
            "",
            f"{result.description}; {result.classes_per_batch} classes per batch on average. Top-1 error (%).",
            "",
            protocol_table(result),
            "",
        ]
    parts += ["## Mean error per protocol", "", summary_table(report.protocols), ""]
    parts += ["## Run time", "", timing_table(report.protocols), ""]
    return "\n".join(parts)
