"""The Grafana dashboard, offline: valid against the JSON Schema of the dashboard model subset it uses, a sound grid,
the panels operators need, and only metrics the server exports (tests/test_observability.py runs the queries)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import trustme

from opskit.dashboard import SCHEMA, load_dashboard, panel_queries
from ttaserve.server.metrics import Metrics
from ttaserve.server.sessions import SessionTable
from ttaserve.server.tls import TlsConfig, TlsReloader, load_tls

REQUIRED_PANELS = (
    "Throughput",
    "Latency p50 / p99",
    "Errors",
    "Adaptation step time by strategy",
    "Prediction entropy (drift)",
    "Collapses",
    "Sessions: live and spilled",
    "Session state memory",
    "Model ready",
)


def tls_files(folder: Path) -> TlsConfig:
    """A server certificate and key, and a client CA, as a mutual-TLS server loads them."""
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    cert, key, client_ca = folder / "tls.crt", folder / "tls.key", folder / "ca.crt"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(client_ca))
    config = load_tls(cert, key, client_ca)
    assert config is not None
    return config


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_dashboard_matches_the_schema(validator: jsonschema.Draft202012Validator) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(load_dashboard())]
    assert not errors, "\n".join(errors[:10])


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d["panels"][1]["targets"][0].update(exp="typo"),
        lambda d: d["panels"][1]["gridPos"].update(w=30),
        lambda d: d["panels"][1]["fieldConfig"]["defaults"].update(unit="seconds"),
        lambda d: d["panels"][1].update(type="graph"),
        lambda d: d.pop("uid"),
    ],
    ids=["unknown key", "wider than the grid", "unknown unit", "retired panel type", "no uid"],
)
def test_schema_rejects_broken_dashboards(validator: jsonschema.Draft202012Validator, break_it) -> None:
    dashboard = copy.deepcopy(load_dashboard())
    break_it(dashboard)
    assert not validator.is_valid(dashboard)


def test_grid_is_sound() -> None:
    panels = load_dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    taken: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]
    for panel in panels:
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]


def test_operators_panels_are_there() -> None:
    titles = {p["title"] for p in load_dashboard()["panels"]}
    assert set(REQUIRED_PANELS) <= titles


def test_queries_use_only_exported_metrics(tmp_path: Path) -> None:
    metrics = Metrics()
    metrics.watch_sessions(SessionTable(1, 1.0, tmp_path))
    metrics.watch_tls(TlsReloader(tls_files(tmp_path), interval_s=60))  # what a TLS server adds
    exported = set()
    for family in metrics.registry.collect():
        exported.add(family.name)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",)}
        exported.update(family.name + s for s in suffixes.get(family.type, ()))
    used = {name for q in panel_queries(load_dashboard()) for name in re.findall(r"\bttaserve_[a-z0-9_]+", q.expr)}
    assert used and used <= exported, sorted(used - exported)


def test_dashboard_is_shipped_by_the_chart() -> None:
    chart_copy = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "ttaserve" / "files" / "ttaserve.json"
    assert chart_copy.resolve() == (Path(SCHEMA).parent / "ttaserve.json").resolve()
