"""What ``grpc.health.v1.Health`` answers, kept in step with the model repository and the drain.

Kubernetes (and Envoy, and grpc-health-probe) ask by service name: ``""`` for the server, the two gRPC services,
each model's name, and ``liveness``. A model's name answers SERVING while it has a version loaded, whether it was
loaded at start, by ``RepositoryModelLoad`` or by the repository poller, and NOT_SERVING once it is unloaded or its
load failed; a name that was never a model is unknown (NOT_FOUND). From the first moment of a drain every name but
``liveness`` is NOT_SERVING, and a model loaded during the drain does not turn SERVING.
"""

from __future__ import annotations

import threading

from grpc_health.v1 import health, health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

#: the name that stays SERVING while draining (Kubernetes liveness: a draining pod must not be restarted)
LIVENESS_SERVICE = "liveness"


class HealthBoard:
    def __init__(self, servicer: health.HealthServicer, services: tuple[str, ...]) -> None:
        """``services``: the server-wide names (``""`` and the gRPC services), SERVING until the drain."""
        self.servicer = servicer
        self._services = services
        self._models: set[str] = set()
        self._draining = False
        self._lock = threading.Lock()
        for name in (*services, LIVENESS_SERVICE):
            servicer.set(name, SERVING)

    def model_changed(self, name: str, serving: bool) -> None:
        """After a model's load, reload, failed load or unload: ``serving`` says whether a version now serves."""
        with self._lock:
            self._models.add(name)
            self.servicer.set(name, SERVING if serving and not self._draining else NOT_SERVING)

    def drain(self) -> None:
        """Every name but ``liveness`` turns NOT_SERVING, for good."""
        with self._lock:
            self._draining = True
            for name in (*self._services, *sorted(self._models)):
                self.servicer.set(name, NOT_SERVING)
