"""Prometheus metrics. Units are seconds and bytes; labels are bounded (model, version, strategy, outcome, reason,
event, certificate, result) — never a session or request id, and a model name a client made up is reported as
``unknown``. Each server owns its own registry, so several servers can live in one process (tests).
docs/operations.md lists every metric.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ttaserve.adapters import get_strategy_class, strategy_names

from .ops_http import OpsServer, Probe

if TYPE_CHECKING:
    from .repository import ModelRepository
    from .sessions import SessionKey, SessionTable
    from .tls import TlsConfig, TlsReloader

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_UNIT_BUCKETS = tuple(i / 20 for i in range(1, 21))

#: the ``reason`` label of session_resets and the ``event`` label of sessions_opened
RESET_REASONS = ("manual", "collapse", "evicted", "expired", "unloaded", "reloaded")
OPEN_EVENTS = ("started", "created", "restored")
#: the ``result`` label of tls_reloads
TLS_RELOAD_RESULTS = ("loaded", "rejected")
#: the label value of a model or strategy name that does not exist (clients choose names: no unbounded labels)
UNKNOWN = "unknown"


def outcome_of(status_name: str) -> str:
    """The ``outcome`` label of a failed request from its gRPC status name (``ok`` marks the others): invalid (the
    client's fault: INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, FAILED_PRECONDITION), unavailable (model not
    ready, server draining), timeout (DEADLINE_EXCEEDED: the deadline passed while the request waited in the
    batcher's queue or for its session), cancelled (CANCELLED: the client left before the request ran) or error
    (INTERNAL: the server's fault)."""
    if status_name == "UNAVAILABLE":
        return "unavailable"
    if status_name == "DEADLINE_EXCEEDED":
        return "timeout"
    if status_name == "CANCELLED":
        return "cancelled"
    if status_name in ("INTERNAL", "UNKNOWN"):
        return "error"
    return "invalid"


def observe_all(histogram: Any, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every ``v`` in ``values``, in one pass for a large batch.

    prometheus_client has no bulk observe, and the per-image histograms cost 0.16 ms per batch-64 request as 128
    ``observe`` calls. Here one ``searchsorted`` finds each value's bucket (the first upper bound >= it, as
    ``observe`` does; a NaN lands in none) and each bucket that got values is incremented once. This reads the
    histogram's ``_upper_bounds``, ``_buckets`` and ``_sum``; a prometheus_client without them takes the loop.
    """
    if len(values) <= 8 or not all(hasattr(histogram, a) for a in ("_upper_bounds", "_buckets", "_sum")):
        for value in values.tolist():
            histogram.observe(value)
        return
    bounds = histogram._upper_bounds
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(values.sum()))
    for index in np.flatnonzero(counts[: len(bounds)]).tolist():
        histogram._buckets[index].inc(int(counts[index]))


@dataclass(frozen=True)
class RequestSeries:
    """The labelled children one (model, version, strategy) touches on every successful request, resolved once:
    ``labels()`` costs a dictionary lookup and a lock per call, too much to repeat on every request. Children that
    would stay empty are not made (a labelled child is exported as soon as it exists): no adaptation step time for
    strategy none, and T3's λ is resolved only when a step reports one."""

    requests_ok: Any
    latency_ok: Any
    queue: Any
    compute: Any
    images: Any
    request_batch_size: Any
    batch_size: Any
    adaptation_step: Any  # None for strategy none
    entropy: Any
    max_probability: Any


class _SessionCollector(Collector):
    """Live sessions and the bytes of their state per (model, strategy), counted when Prometheus scrapes, so the
    gauges never lag behind ends, evictions or expiries."""

    def __init__(self, table: SessionTable) -> None:
        self._table = table

    def collect(self) -> Iterator[GaugeMetricFamily]:
        count: Tally[tuple[str, str]] = Tally()
        state_bytes: Tally[tuple[str, str]] = Tally()
        for session in self._table.sessions():
            key = (session.key.model, session.key.strategy)
            count[key] += 1
            state_bytes[key] += session.state_bytes()
        spilled: Tally[tuple[str, str]] = Tally()
        for spilled_key in self._table.spilled_keys():
            spilled[spilled_key.model, spilled_key.strategy] += 1
        sessions, memory, on_disk = self.describe()
        for key in sorted(count):
            sessions.add_metric(key, count[key])
            memory.add_metric(key, state_bytes[key])
        for key in sorted(spilled):
            on_disk.add_metric(key, spilled[key])
        yield sessions
        yield memory
        yield on_disk

    def describe(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        labels = ("model", "strategy")
        return (
            GaugeMetricFamily("ttaserve_active_sessions", "Live adaptation sessions", labels=labels),
            GaugeMetricFamily(
                "ttaserve_session_state_bytes", "Bytes of adaptation state held by live sessions", labels=labels
            ),
            GaugeMetricFamily(
                "ttaserve_spilled_sessions",
                "Sessions out of memory: spilled to their snapshot files because the session table was full",
                labels=labels,
            ),
        )


class _WarmupCollector(Collector):
    """The background source warm-ups of the loaded model versions (``warmup.py``), read when Prometheus scrapes:
    whether each is still running and how long it ran (or has run so far)."""

    def __init__(self, repository: ModelRepository) -> None:
        self._repository = repository

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running, seconds = self.describe()
        for model in self._repository.loaded():
            for strategy, warmup in sorted(model.warmups.items()):
                labels = (model.name, str(model.version), strategy)
                running.add_metric(labels, 1 if warmup.running else 0)
                seconds.add_metric(labels, warmup.seconds())
        yield running
        yield seconds

    def describe(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        labels = ("model", "version", "strategy")
        return (
            GaugeMetricFamily(
                "ttaserve_source_warmup_running", "1 while a background source warm-up runs, else 0", labels=labels
            ),
            GaugeMetricFamily(
                "ttaserve_source_warmup_seconds",
                "Duration of the background source warm-up (so far, while it runs)",
                labels=labels,
            ),
        )


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._series: dict[tuple[str, str, str], RequestSeries] = {}
        r = self.registry
        model_labels = ("model", "version", "strategy")
        self.requests = Counter(
            "ttaserve_requests", "Inference requests by outcome", (*model_labels, "outcome"), registry=r
        )
        self.request_latency = Histogram(
            "ttaserve_request_latency_seconds",
            "End-to-end request handling time",
            (*model_labels, "outcome"),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "ttaserve_queue_seconds",
            "Time waiting for the engine (dynamic batching, session order)",
            model_labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_time = Histogram(
            "ttaserve_compute_seconds",
            "Forward / adaptation step time of a request",
            model_labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter("ttaserve_images", "Images classified", model_labels, registry=r)
        self.request_batch_size = Histogram(
            "ttaserve_request_batch_size",
            "Images per successful request",
            model_labels,
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "ttaserve_batch_size",
            "Rows of the engine execution that served a request (dynamic batching merges concurrent requests)",
            ("model", "version"),
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.adaptation_step_time = Histogram(
            "ttaserve_adaptation_step_seconds",
            "Adaptation step time (strategies other than none)",
            model_labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.entropy = Histogram(
            "ttaserve_prediction_entropy",
            "Per-image prediction entropy, normalised by log(classes)",
            model_labels,
            buckets=_UNIT_BUCKETS,
            registry=r,
        )
        self.max_probability = Histogram(
            "ttaserve_prediction_max_probability",
            "Per-image top-1 probability",
            model_labels,
            buckets=_UNIT_BUCKETS,
            registry=r,
        )
        self.t3_lambda = Histogram(
            "ttaserve_t3_lambda",
            "T3 merge coefficient (weight of the generalist)",
            model_labels,
            buckets=_UNIT_BUCKETS,
            registry=r,
        )
        self.sessions_opened = Counter(
            "ttaserve_sessions_opened",
            "Sessions opened: started (sequence_start), created (first request without it), restored (snapshot)",
            ("model", "strategy", "event"),
            registry=r,
        )
        self.session_resets = Counter(
            "ttaserve_session_resets",
            "Sessions reset (manual, collapse) or removed (evicted, expired, unloaded, reloaded)",
            ("model", "strategy", "reason"),
            registry=r,
        )
        self.session_spills = Counter(
            "ttaserve_session_spills",
            "Sessions evicted from a full table (sessions or memory) to their snapshot file, to be restored on use",
            ("model", "strategy"),
            registry=r,
        )
        self.session_replays = Counter(
            "ttaserve_session_replays",
            "Session requests answered again without adapting: retries of a step whose answer the client lost",
            ("model", "strategy"),
            registry=r,
        )
        self.inflight = Gauge("ttaserve_inflight_requests", "Inference requests being handled", registry=r)
        self.model_ready = Gauge(
            "ttaserve_model_ready",
            "1 when a model version is loaded and ready, else 0",
            ("model", "version"),
            registry=r,
        )
        self.engine_info = Info(
            "ttaserve_engine", "Engine and device of each loaded model version", ("model", "version"), registry=r
        )
        self.server_info = Info("ttaserve_server", "Server version, torch version and compute device", registry=r)
        self._seen_versions: dict[str, set[str]] = {}
        self._models_lock = threading.Lock()

    def request_series(self, model: str, version: str, strategy: str) -> RequestSeries:
        key = (model, version, strategy)
        series = self._series.get(key)
        if series is None:
            series = RequestSeries(
                requests_ok=self.requests.labels(model, version, strategy, "ok"),
                latency_ok=self.request_latency.labels(model, version, strategy, "ok"),
                queue=self.queue_time.labels(*key),
                compute=self.compute_time.labels(*key),
                images=self.images.labels(*key),
                request_batch_size=self.request_batch_size.labels(*key),
                batch_size=self.batch_size.labels(model, version),
                adaptation_step=self.adaptation_step_time.labels(*key) if strategy != "none" else None,
                entropy=self.entropy.labels(*key),
                max_probability=self.max_probability.labels(*key),
            )
            self._series[key] = series
        return series

    def record_failure(self, model: str, version: str, strategy: str, status_name: str, seconds: float) -> None:
        labels = (model, version, strategy, outcome_of(status_name))
        self.requests.labels(*labels).inc()
        self.request_latency.labels(*labels).observe(seconds)

    def watch_sessions(self, table: SessionTable) -> None:
        self.registry.register(_SessionCollector(table))

    def watch_warmups(self, repository: ModelRepository) -> None:
        self.registry.register(_WarmupCollector(repository))

    def watch_tls(self, reloader: TlsReloader) -> None:
        """Export when the served certificate chain (``server``) and the client CA bundle (``client_ca``, mutual TLS)
        expire, kept current on reload, and count reloads: changed files ``loaded``, or ``rejected`` (unusable, or
        unreadable; the served set stays). Called only with TLS on: a plaintext server has nothing to report. Both
        counters start at 0, like the session counters, so the first rejected rotation shows as an increase."""
        expiry = Gauge(
            "ttaserve_tls_certificate_expiry_timestamp_seconds",
            "Earliest notAfter (Unix time) of the served certificate chain (server) and of the client CA (client_ca)",
            ("certificate",),
            registry=self.registry,
        )
        reloads = Counter(
            "ttaserve_tls_reloads",
            "TLS file changes taken (loaded) or refused as unusable or unreadable (rejected)",
            ("result",),
            registry=self.registry,
        )
        loaded, rejected = (reloads.labels(result) for result in TLS_RELOAD_RESULTS)

        def show_expiry(config: TlsConfig) -> None:
            for certificate, when in (("server", config.cert_expiry), ("client_ca", config.client_ca_expiry)):
                if when is not None:
                    expiry.labels(certificate).set(when)
                else:  # unreadable: no stale date left behind by a rotation
                    expiry.remove(certificate)

        def reloaded(config: TlsConfig) -> None:
            loaded.inc()
            show_expiry(config)

        show_expiry(reloader.config)
        reloader.on_reload(reloaded)
        reloader.on_rejected(rejected.inc)

    def watch_inflight(self, count: Callable[[], int]) -> None:
        self.inflight.set_function(count)

    def update_model(self, repository: ModelRepository, name: str) -> None:
        """After ``name`` was loaded, reloaded, unloaded or failed to load: each version it ever served reads 1 when
        ready, else 0 (and loses its engine info); a model that never loaded reads 0 with an empty version."""
        with self._models_lock:
            ready = {str(m.version): m for m in repository.loaded() if m.name == name}
            seen = self._seen_versions.setdefault(name, set())
            seen.update(ready)
            if not seen:
                self.model_ready.labels(name, "").set(0)
                return
            if ready:
                self._zero_session_counters(name)
            self.model_ready.remove(name, "")
            for version in seen:
                self.model_ready.labels(name, version).set(1 if version in ready else 0)
                if version in ready:
                    self.engine_info.labels(name, version).info(ready[version].engine.describe())
                else:
                    self.engine_info.remove(name, version)

    def _zero_session_counters(self, model: str) -> None:
        """Export the rare session counters at 0 from the start: a counter whose first sample is already 1 shows no
        increase, so the first collapse or eviction of a (model, strategy) would never reach a rate or an alert."""
        for strategy in strategy_names():
            if not get_strategy_class(strategy).stateful:
                continue
            for reason in RESET_REASONS:
                self.session_resets.labels(model, strategy, reason)
            for event in OPEN_EVENTS:
                self.sessions_opened.labels(model, strategy, event)
            self.session_replays.labels(model, strategy)
            self.session_spills.labels(model, strategy)

    def session_removed(self, key: SessionKey, reason: str) -> None:
        """Count a session leaving the table: a spill, or a reset reason (an ended session is not counted)."""
        if reason == "spilled":
            self.session_spills.labels(key.model, key.strategy).inc()
        elif reason != "ended":
            self.session_resets.labels(key.model, key.strategy, reason).inc()

    def serve(self, port: int, host: str = "0.0.0.0", probes: Mapping[str, Probe] | None = None) -> int:
        """Start the operations endpoint (metrics, and the health ``probes`` by path); returns the bound port
        (``port`` 0 picks one)."""
        self._http_server = OpsServer(self.registry, host, port, probes or {})
        return self._http_server.port

    def close(self) -> None:
        server: OpsServer | None = getattr(self, "_http_server", None)
        if server is not None:
            server.close()
