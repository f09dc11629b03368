"""The Grafana dashboard outside Grafana: its panel queries with the template variables filled in, run against a real
Prometheus, and drawn with matplotlib in the dashboard's own grid layout (docs/dashboard.png)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procs import Prometheus

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "ttaserve.json"
SCHEMA = ROOT / "deploy" / "grafana" / "dashboard.schema.json"

#: what Grafana would put in for the variables: every model, and windows over all of a test's traffic
VARIABLES = {"model": ".+", "__rate_interval": "5m", "__interval": "5s", "__range": "5m"}
#: for drawing a few minutes scraped every second: the window Grafana's $__rate_interval would be at that zoom
RENDER_VARIABLES = {**VARIABLES, "__rate_interval": "20s"}
_GRID_COLUMNS = 24


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    kind: str
    ref: str
    expr: str
    legend: str
    instant: bool


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


def substitute(expr: str, variables: dict[str, str] | None = None) -> str:
    values = variables or VARIABLES

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"dashboard variable ${name} has no value for the tests")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, expr)


def panel_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(
            panel=panel["title"],
            kind=panel["type"],
            ref=target["refId"],
            expr=substitute(target["expr"]),
            legend=target.get("legendFormat", ""),
            instant=bool(target.get("instant")),
        )
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def legend_of(template: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()
    return text or ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"


# --- rendering ------------------------------------------------------------------------------------------------------

_BACKGROUND = "#111217"
_PANEL = "#181b1f"
_TEXT = "#ccccdc"
_GRID = "#2c3235"
_PALETTE = ("#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#fade2a", "#37872d")


def _format_value(value: float, unit: str) -> str:
    if value != value:  # NaN
        return "–"
    if unit == "s":
        return f"{value * 1e3:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"
    if unit == "bytes":
        for suffix, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {suffix}"
        return f"{value:.0f} B"
    if unit == "percentunit":
        return f"{value * 100:.3g}%"
    if unit == "reqps":
        return f"{value:.3g} req/s"
    return f"{value:.3g}"


def render(
    prometheus: Prometheus,
    dashboard: dict[str, Any],
    start: float,
    end: float,
    out: Path,
    variables: dict[str, str] = RENDER_VARIABLES,
) -> None:
    """Draw every panel from ``query_range`` (timeseries) and instant queries (stat, table) over [start, end]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_w, unit_h = 0.92, 0.42  # inches per grid column / row
    fig = plt.figure(figsize=(_GRID_COLUMNS * unit_w, rows * unit_h), facecolor=_BACKGROUND)
    step = max(1.0, (end - start) / 240)

    def axes_for(grid: dict[str, int]) -> Any:
        """The panel's box in figure coordinates, leaving room for the title above and tick labels left and below."""
        left = grid["x"] / _GRID_COLUMNS + 0.045
        width = grid["w"] / _GRID_COLUMNS - 0.055
        bottom = 1 - (grid["y"] + grid["h"]) / rows + 0.9 / rows
        height = (grid["h"] - 1.6) / rows
        return fig.add_axes((left, bottom, width, height), facecolor=_PANEL)

    for panel in panels:
        grid = panel["gridPos"]
        if panel["type"] == "row":
            fig.text(0.006, 1 - (grid["y"] + 0.55) / rows, panel["title"], color=_TEXT, fontsize=15, weight="bold")
            continue
        ax = axes_for(grid)
        ax.set_title(panel["title"], color=_TEXT, fontsize=11, loc="left")
        for spine in ax.spines.values():
            spine.set_color(_GRID)
        unit = panel["fieldConfig"]["defaults"]["unit"]
        if panel["type"] == "timeseries":
            _draw_timeseries(ax, prometheus, panel, (start, end, step), variables, unit, FuncFormatter)
        elif panel["type"] == "stat":
            _draw_stat(ax, prometheus, panel, variables)
        else:
            _draw_table(ax, prometheus, panel, variables)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72, facecolor=_BACKGROUND)
    plt.close(fig)


def _draw_timeseries(
    ax: Any,
    prometheus: Prometheus,
    panel: dict,
    window: tuple[float, float, float],
    variables: dict[str, str],
    unit: str,
    formatter: Any,
) -> None:
    start, end, step = window
    ax.tick_params(colors=_TEXT, labelsize=8)
    ax.grid(color=_GRID, linewidth=0.6)
    drawn = 0
    for target in panel["targets"]:
        for series in prometheus.query_range(substitute(target["expr"], variables), start, end, step):
            times = [float(t) - start for t, _ in series["values"]]
            values = [float(v) for _, v in series["values"]]
            label = legend_of(target.get("legendFormat", ""), series["metric"])
            color = _PALETTE[drawn % len(_PALETTE)]
            if panel["fieldConfig"]["defaults"].get("custom", {}).get("drawStyle") == "bars":
                ax.bar(times, values, width=step, color=color, label=label)
            else:
                ax.plot(times, values, color=color, linewidth=1.4, label=label)
            drawn += 1
    ax.set_xlim(0, end - start)
    if "min" in panel["fieldConfig"]["defaults"]:
        ax.set_ylim(bottom=panel["fieldConfig"]["defaults"]["min"])
    ax.xaxis.set_major_formatter(formatter(lambda x, _pos: f"{x:.0f}s"))
    ax.yaxis.set_major_formatter(formatter(lambda y, _pos: _format_value(y, unit)))
    if drawn:
        ax.legend(loc="upper left", fontsize=7, facecolor=_PANEL, edgecolor=_GRID, labelcolor=_TEXT, ncol=2)
    else:
        ax.text(0.5, 0.5, "No data", color=_TEXT, ha="center", va="center", transform=ax.transAxes)


def _draw_stat(ax: Any, prometheus: Prometheus, panel: dict, variables: dict[str, str]) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    target = panel["targets"][0]
    samples = sorted(prometheus.query(substitute(target["expr"], variables)), key=lambda s: sorted(s["metric"].items()))
    mappings = panel["fieldConfig"]["defaults"].get("mappings", [{}])[0].get("options", {})
    width = 1 / max(1, len(samples))
    for i, sample in enumerate(samples):
        value = float(sample["value"][1])
        mapped = mappings.get(f"{value:g}", {})
        box = ax.inset_axes((i * width + 0.01, 0.05, width - 0.02, 0.8))
        box.set_facecolor({"red": "#c4162a", "green": "#1a7f4b"}.get(mapped.get("color", ""), _GRID))
        box.set_xticks([])
        box.set_yticks([])
        box.text(0.5, 0.65, legend_of(target.get("legendFormat", ""), sample["metric"]), ha="center", color="white")
        box.text(0.5, 0.3, mapped.get("text", f"{value:g}"), ha="center", color="white", fontsize=16, weight="bold")


def _draw_table(ax: Any, prometheus: Prometheus, panel: dict, variables: dict[str, str]) -> None:
    ax.axis("off")
    hidden = {"__name__", "job"}
    samples = prometheus.query(substitute(panel["targets"][0]["expr"], variables))
    columns = sorted({k for s in samples for k in s["metric"]} - hidden)
    if not samples:
        ax.text(0.5, 0.5, "No data", color=_TEXT, ha="center", va="center")
        return
    cells = [[s["metric"].get(c, "") for c in columns] for s in samples]
    table = ax.table(cellText=cells, colLabels=columns, loc="upper center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for cell in table.get_celld().values():
        cell.set_facecolor(_PANEL)
        cell.set_edgecolor(_GRID)
        cell.get_text().set_color(_TEXT)
