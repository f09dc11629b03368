"""Prometheus metrics. Units are seconds; labels are bounded (model, version, strategy, outcome, reason) — never a
session or request id. Each server owns its own registry, so several servers can live in one process (tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_UNIT_BUCKETS = tuple(i / 20 for i in range(1, 21))


@dataclass(frozen=True)
class RequestSeries:
    """The labelled children one (model, version, strategy) touches on every successful request, resolved once:
    ``labels()`` costs a dictionary lookup and a lock per call, too much to repeat eight times per request."""

    requests_ok: Any
    latency_ok: Any
    queue: Any
    compute: Any
    images: Any
    adaptation_step: Any
    entropy: Any
    max_probability: Any
    t3_lambda: Any


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
        self.batch_size = Histogram(
            "ttaserve_batch_size",
            "Rows per engine execution",
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
            ("model", "version", "strategy"),
            buckets=_UNIT_BUCKETS,
            registry=r,
        )
        self.active_sessions = Gauge("ttaserve_active_sessions", "Live adaptation sessions", registry=r)
        self.session_state_bytes = Gauge(
            "ttaserve_session_state_bytes", "Bytes of adaptation state held by live sessions", registry=r
        )
        self.session_resets = Counter(
            "ttaserve_session_resets", "Sessions reset or removed, by reason", ("strategy", "reason"), registry=r
        )
        self.model_ready = Gauge(
            "ttaserve_model_ready", "1 when a model version is loaded and ready", ("model", "version"), registry=r
        )
        self.engine_info = Info(
            "ttaserve_engine", "Engine and device of each loaded model", ("model", "version"), registry=r
        )

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
                adaptation_step=self.adaptation_step_time.labels(*key),
                entropy=self.entropy.labels(*key),
                max_probability=self.max_probability.labels(*key),
                t3_lambda=self.t3_lambda.labels(*key),
            )
            self._series[key] = series
        return series

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the HTTP endpoint; returns the bound port (``port`` 0 picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http_server = server
        return int(server.server_port)

    def close(self) -> None:
        server = getattr(self, "_http_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
