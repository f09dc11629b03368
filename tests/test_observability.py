"""Metrics through a real Prometheus: known traffic (batch sizes, strategies, sessions, invalid requests, a collapse, an
eviction, a manual reset) and the counts Prometheus's query API then returns; the alert rules evaluated on the live
series; every Grafana panel query run and drawn."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from support import start
from tritonclient.utils import InferenceServerException

from opskit.dashboard import load_dashboard, panel_queries, render
from opskit.procs import Prometheus, prometheus, wait_until
from opskit.traffic import infer, write_resnet
from ttaserve.adapters import native
from ttaserve.protocol import adaptation_pb2 as apb
from ttaserve.protocol import adaptation_pb2_grpc
from ttaserve.server.app import ServerHandle

ALERTS = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "alerts.yml"
NONE_SIZES = (1, 2, 4, 8, 16)
#: successful requests and images per strategy of the traffic below
OK_REQUESTS = {"none": 5, "unmix_tns": 2, "tent": 9, "tbn": 2}
IMAGES = {"none": 31, "unmix_tns": 8, "tent": 60, "tbn": 8}
INVALID = {"wrong shape": 3, "unknown strategy": 1, "unknown model": 1}
#: panels that only have data under traffic this test does not send (T3 needs a merge partner)
#: panels that stay empty on the observed server: no T3 traffic; plaintext (their queries run on TLS series in
#: test_dashboard.py, and the alerts on the same series in deploy/prometheus/alerts_test.yml)
OPTIONAL_PANELS = {"T3 merge coefficient λ", "TLS certificates: time left", "TLS file reloads"}


@dataclass
class Observed:
    server: ServerHandle
    prometheus: Prometheus
    started: float
    finished: float


def send_known_traffic(url: str, images: np.ndarray, checkpoint: Callable[[], None]) -> None:
    """The traffic behind the expected counts, in two halves with a scrape between them: Prometheus sees the series
    before most of their increase, as it would in production."""
    client = tc.InferenceServerClient(url)
    batch4, batch8, bad = images[:4], images[8:16], np.zeros((2, 31, 31, 3), np.uint8)
    for size in NONE_SIZES[:2]:
        infer(client, images[:size])
    with pytest.raises(InferenceServerException):
        infer(client, bad)
    infer(client, batch4, "unmix_tns", "old", start=True)
    infer(client, batch8, "tent", "cam-a", start=True)
    checkpoint()
    for size in NONE_SIZES[2:]:
        infer(client, images[:size])
    for _ in range(2):
        infer(client, batch8, "tent", "cam-a")
    for i in range(2):
        infer(client, batch4, "tent", "cam-b", start=i == 0)
    for i in range(3):  # the guard of 'guarded' trips at the third step
        infer(client, batch8, "tent", "g", start=i == 0, model="guarded")
    infer(client, batch4, "unmix_tns", "new", start=True)  # a fifth live session: 'old' is spilled to disk
    infer(client, batch4, "tent", "cam-b", end=True)
    for _ in range(2):
        infer(client, batch4, "tbn")
    with grpc.insecure_channel(url) as channel:
        key = apb.SessionKey(model_name="resnet", strategy="tent", sequence_id="cam-a")
        adaptation_pb2_grpc.AdaptationStub(channel).ResetSession(apb.ResetSessionRequest(key=key))
    for _ in range(INVALID["wrong shape"] - 1):
        with pytest.raises(InferenceServerException):
            infer(client, bad)
    with pytest.raises(InferenceServerException):
        infer(client, batch4, "no_such_strategy")
    with pytest.raises(InferenceServerException):
        infer(client, batch4, model="no_such_model")


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory, real_images: np.ndarray) -> Iterator[Observed]:
    root = tmp_path_factory.mktemp("observability")
    write_resnet(root / "repo")
    write_resnet(root / "repo", "guarded", collapse_min_marginal_entropy=5.0, collapse_min_steps=2)
    server = start(root / "repo", snapshot_dir=root / "snapshots", max_sessions=4)
    try:
        with prometheus(root / "prometheus", [f"127.0.0.1:{server.metrics_port}"], [ALERTS]) as prom:
            started = time.time()
            send_known_traffic(
                f"127.0.0.1:{server.grpc_port}", real_images, lambda: prom.wait_scraped_after(time.time())
            )
            server.sessions.flush()  # 'old' written to its file by the background writer
            finished = time.time()
            prom.wait_scraped_after(finished)
            prom.wait_scraped_after(time.time())  # two samples since: rate() sees the last increase
            yield Observed(server, prom, started, finished)
    finally:
        server.stop()


def by_label(prom: Prometheus, expr: str, label: str) -> dict[str, float]:
    return {s["metric"].get(label, ""): float(s["value"][1]) for s in prom.query(expr)}


def test_request_counts_by_strategy_and_outcome(observed: Observed) -> None:
    prom = observed.prometheus
    ok = by_label(prom, 'sum by (strategy) (ttaserve_requests_total{outcome="ok"})', "strategy")
    assert ok == OK_REQUESTS
    assert by_label(prom, "sum by (strategy) (ttaserve_images_total)", "strategy") == IMAGES
    failed = by_label(prom, 'sum by (outcome) (ttaserve_requests_total{outcome!="ok"})', "outcome")
    assert failed == {"invalid": sum(INVALID.values())}
    # made-up names never become label values
    assert prom.value('sum(ttaserve_requests_total{model="unknown"})') == INVALID["unknown model"]
    assert prom.value('sum(ttaserve_requests_total{strategy="unknown"})') == INVALID["unknown strategy"]
    assert prom.query('ttaserve_requests_total{model="no_such_model"}') == []
    total = sum(OK_REQUESTS.values()) + sum(INVALID.values())
    assert prom.value("sum(ttaserve_request_latency_seconds_count)") == total
    assert prom.value("sum(ttaserve_queue_seconds_count)") == sum(OK_REQUESTS.values())
    assert prom.value("sum(ttaserve_compute_seconds_count)") == sum(OK_REQUESTS.values())
    adaptive = sum(OK_REQUESTS.values()) - OK_REQUESTS["none"]
    assert prom.value("sum(ttaserve_adaptation_step_seconds_count)") == adaptive
    assert prom.query('ttaserve_adaptation_step_seconds_count{strategy="none"}') == []
    assert prom.query("ttaserve_t3_lambda_count") == []  # no T3 traffic, so no empty series either
    assert prom.value("sum(ttaserve_prediction_entropy_count)") == sum(IMAGES.values())
    assert prom.value("sum(ttaserve_prediction_max_probability_count)") == sum(IMAGES.values())
    assert 0 < prom.value("sum(ttaserve_prediction_entropy_sum) / sum(ttaserve_prediction_entropy_count)") <= 1


def test_batch_size_histograms(observed: Observed) -> None:
    prom = observed.prometheus
    none = '{model="resnet", strategy="none"}'
    assert prom.value(f"ttaserve_request_batch_size_count{none}") == len(NONE_SIZES)
    assert prom.value(f"ttaserve_request_batch_size_sum{none}") == sum(NONE_SIZES)
    buckets = by_label(prom, f"ttaserve_request_batch_size_bucket{none}", "le")
    assert (buckets["1.0"], buckets["4.0"], buckets["16.0"]) == (1, 3, 5)
    # sequential requests are never merged: every engine execution held one request's rows
    executions = prom.value('sum(ttaserve_batch_size_count{model="resnet"})')
    assert executions == OK_REQUESTS["none"] + OK_REQUESTS["unmix_tns"] + OK_REQUESTS["tbn"] + 6
    assert prom.value('sum(ttaserve_batch_size_sum{model="resnet"})') == sum(IMAGES.values()) - 24


def test_session_metrics(observed: Observed) -> None:
    prom = observed.prometheus
    resets = by_label(prom, "sum by (reason) (ttaserve_session_resets_total)", "reason")
    # exported at 0 from the start
    assert resets == {"collapse": 1, "evicted": 0, "manual": 1, "expired": 0, "unloaded": 0, "reloaded": 0}
    assert prom.value("sum(ttaserve_session_spills_total)") == 1  # evicted to its snapshot file, not lost
    assert prom.value('ttaserve_session_resets_total{model="guarded", strategy="tent", reason="collapse"}') == 1
    opened = by_label(prom, "sum by (event) (ttaserve_sessions_opened_total)", "event")
    assert opened == {"started": 5, "created": 0, "restored": 0}
    # the first collapse of a (model, strategy) is a visible increase: its series existed (at 0) before it
    assert prom.value('sum(increase(ttaserve_session_resets_total{reason="collapse"}[5m]))') > 0
    live = {
        (s["metric"]["model"], s["metric"]["strategy"]): float(s["value"][1])
        for s in prom.query("ttaserve_active_sessions")
    }
    assert live == {("resnet", "tent"): 1, ("guarded", "tent"): 1, ("resnet", "unmix_tns"): 1}
    spilled = [
        (s["metric"]["model"], s["metric"]["strategy"], s["value"][1]) for s in prom.query("ttaserve_spilled_sessions")
    ]
    assert spilled == [("resnet", "unmix_tns", "1")]
    memory = by_label(prom, "sum by (strategy) (ttaserve_session_state_bytes)", "strategy")
    assert memory["tent"] > 0 and memory["unmix_tns"] > 0


def test_model_engine_and_server_info(observed: Observed) -> None:
    prom = observed.prometheus
    assert prom.value('ttaserve_model_ready{model="resnet", version="1"}') == 1
    engines = prom.query("ttaserve_engine_info")
    device = observed.server.repository.get("resnet").engine.device  # cpu here, cuda:0 on a GPU machine
    assert {(s["metric"]["model"], s["metric"]["engine"], s["metric"]["device"]) for s in engines} == {
        ("resnet", "pytorch", device),
        ("guarded", "pytorch", device),
    }
    assert prom.query("ttaserve_server_info")[0]["metric"]["torch"]
    kernels = "loaded" if native.kernels() is not None else "unavailable"  # the server runs in this process
    assert prom.query("ttaserve_server_info")[0]["metric"]["native_kernels"] == kernels
    assert prom.value("ttaserve_inflight_requests") == 0
    assert prom.value('up{job="ttaserve"}') == 1


def test_alert_rules_evaluate_on_live_series(observed: Observed) -> None:
    prom = observed.prometheus

    def evaluated() -> list[dict] | None:
        groups = prom._get("/api/v1/rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("2") for r in rules) else None

    rules = wait_until(evaluated, 15, "every alert rule evaluated")
    assert {r["name"] for r in rules} >= {"TtaserveModelNotReady", "TtaserveHighErrorRate", "TtaserveSessionCollapses"}
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]


def test_every_dashboard_query_runs(observed: Observed) -> None:
    empty, values = [], {}
    for query in panel_queries(load_dashboard()):
        result = observed.prometheus.query(query.expr)  # raises on a query Prometheus cannot parse or run
        if not result:
            empty.append(query.panel)
        values[(query.panel, query.ref)] = [float(s["value"][1]) for s in result]
    assert set(empty) <= OPTIONAL_PANELS, f"panels without data after the traffic: {sorted(set(empty))}"
    for panel in ("Throughput", "Images per second", "Errors", "Latency p50 / p99"):
        assert any(v > 0 for v in values[(panel, "A")]), panel  # NaN (no rate yet) compares False


def test_dashboard_renders(observed: Observed, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="drawing the dashboard needs matplotlib (the eval extra)")
    out = tmp_path / "dashboard.png"
    render(observed.prometheus, load_dashboard(), observed.started - 5, time.time(), out)
    from PIL import Image

    with Image.open(out) as image:
        assert image.width > 1500 and image.height > 1000
        # the panels drew something: far more than the two background colours
        assert len(image.convert("RGB").resize((400, 300)).getcolors(maxcolors=100_000) or []) > 50


def test_model_ready_follows_unload_and_load(observed: Observed) -> None:
    """Last in this module: it takes 'guarded' away for a moment."""
    prom = observed.prometheus
    client = tc.InferenceServerClient(f"127.0.0.1:{observed.server.grpc_port}")
    ready = 'ttaserve_model_ready{model="guarded", version="1"}'
    client.unload_model("guarded")
    wait_until(lambda: prom.value(ready) == 0, 15, "model_ready 0 after the unload")
    assert prom.query('ttaserve_engine_info{model="guarded"}') == []
    client.load_model("guarded")
    wait_until(lambda: prom.value(ready) == 1, 15, "model_ready 1 after the load")


def test_idle_sessions_expire_into_the_metric(tmp_path: Path, real_images: np.ndarray) -> None:
    """The sweeper (not a request) removes an idle session and counts it as 'expired'."""
    write_resnet(tmp_path / "repo")
    handle = start(tmp_path / "repo", snapshot_dir=tmp_path / "snapshots", session_idle_timeout_s=0.3)
    try:
        client = tc.InferenceServerClient(f"127.0.0.1:{handle.grpc_port}")
        infer(client, real_images[:4], "tent", "idle", start=True)
        labels = {"model": "resnet", "strategy": "tent"}
        expired = {**labels, "reason": "expired"}
        wait_until(
            lambda: handle.metrics.registry.get_sample_value("ttaserve_session_resets_total", expired) == 1,
            10,
            "an expired session counted",
        )
        assert handle.metrics.registry.get_sample_value("ttaserve_active_sessions", labels) is None
    finally:
        handle.stop()
