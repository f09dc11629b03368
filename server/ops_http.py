"""The operations port (plaintext HTTP, 8002 by default): Prometheus metrics, and the two health probes that an
orchestrator can reach whatever the serving ports speak.

Kubernetes' gRPC probes cannot speak TLS, and an HTTPS probe cannot present a client certificate, so with TLS (or
mutual TLS) on the serving ports the probes come here: ``/v2/health/live`` and ``/v2/health/ready`` answer 200 or
503 with the same meaning as the REST routes of those names. Every other path serves the metrics.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

LIVE_PATH = "/v2/health/live"
READY_PATH = "/v2/health/ready"

Probe = Callable[[], bool]
StartResponse = Callable[..., Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[WSGIRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes and probes every few seconds would flood the log."""


def _with_probes(metrics: Callable[..., Iterable[bytes]], probes: Mapping[str, Probe]) -> Callable[..., Any]:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        probe = probes.get(environ.get("PATH_INFO", ""))
        if probe is None:
            return metrics(environ, start_response)
        status = "200 OK" if probe() else "503 Service Unavailable"
        start_response(status, [("Content-Length", "0"), ("Cache-Control", "no-store")])
        return [b""]

    return app


class OpsServer:
    """Serves in a background thread from construction; ``port`` is the bound port (``port`` 0 picks one)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, probes: Mapping[str, Probe]) -> None:
        app = _with_probes(make_wsgi_app(registry), probes)
        self._server = make_server(host.strip("[]"), port, app, _Server, handler_class=_QuietHandler)
        self.port: int = self._server.server_port
        threading.Thread(target=self._server.serve_forever, name="ttaserve-ops-http", daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
