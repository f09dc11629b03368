"""Assembling and running the server: repository, pipeline, gRPC services, health, reflection, metrics, drain."""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

import ttaserve.protocol
from ttaserve.adapters import native
from ttaserve.protocol import adaptation_pb2_grpc, grpc_service_pb2_grpc

from . import compute
from .adaptation_service import AdaptationServicer
from .engines.torch_engine import resolve_device
from .health_board import HealthBoard
from .http_server import HttpFrontend
from .inference_service import InferenceServicer, InflightTracker, server_version
from .metrics import Metrics
from .native_frontend import NativeServer
from .ops_http import LIVE_PATH, READY_PATH
from .pipeline import Pipeline
from .repository import ModelRepository
from .repository_poller import RepositoryPoller
from .server_logging import configure_logging
from .sessions import SessionTable
from .settings import ServerSettings
from .shared_memory import SharedMemoryRegistry
from .tls import TlsReloader, load_tls

log = logging.getLogger(__name__)

INFERENCE_SERVICE = "inference.GRPCInferenceService"
ADAPTATION_SERVICE = "ttaserve.v1.Adaptation"
_SWEEP_INTERVAL_S = 5.0


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """A private descriptor pool with every service we expose. The v2 service is declared in package ``inference``,
    which ``tritonclient`` also registers in protobuf's default pool; a private pool lets both live in one process."""
    pool = descriptor_pool.DescriptorPool()
    files = descriptor_pb2.FileDescriptorSet()
    files.ParseFromString((Path(ttaserve.protocol.__file__).parent / "descriptor_set.binpb").read_bytes())
    for file in files.file:
        pool.Add(file)
    for module in (health_pb2, reflection_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    return pool


@dataclass
class ServerHandle:
    """A running server. ``drain`` is what SIGTERM triggers; ``stop`` ends it at once."""

    settings: ServerSettings
    server: grpc.Server | NativeServer
    grpc_port: int
    metrics_port: int | None
    repository: ModelRepository
    sessions: SessionTable
    metrics: Metrics
    health: HealthBoard
    inflight: InflightTracker
    http: HttpFrontend | None
    tls: TlsReloader | None
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def http_port(self) -> int | None:
        """The REST front end's port; None when it is off."""
        return None if self.http is None else self.http.port

    def drain(self) -> None:
        """Not-ready first, finish in-flight requests, snapshot live sessions, then stop."""
        log.info("draining: reporting not-ready")
        self.inflight.draining = True
        self.health.drain()
        if not self.inflight.wait_idle(self.settings.drain_timeout_s):
            log.warning("drain timeout: requests still in flight after %.1fs", self.settings.drain_timeout_s)
        self.sessions.flush()  # evicted sessions still on their way to disk
        saved = 0
        for session in self.sessions.sessions():
            with session.lock.hold():
                self.sessions.snapshot(session)
            saved += 1
        log.info("drained: %d session snapshot(s) written to %s", saved, self.sessions.snapshot_dir)
        self.stop(grace_s=1.0)

    def stop(self, grace_s: float = 0.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.http is not None:
            self.http.stop()
        if self.tls is not None:
            self.tls.stop()
        self.server.stop(grace_s).wait()
        self.sessions.close()
        self.metrics.close()
        self.repository.close()
        compute.release()

    def wait(self, timeout_s: float | None = None) -> bool:
        """True once the server has stopped; ``timeout_s`` bounds the wait."""
        return self._stopped.wait(timeout_s)


def _grpc_server(settings: ServerSettings) -> tuple[grpc.Server | NativeServer, str]:
    """The gRPC server the settings ask for, and which front end it is ('native' or 'python')."""
    limit = settings.max_message_mb * 1024 * 1024
    if settings.frontend != "python":
        try:
            native_server = NativeServer(
                threads=settings.workers, max_message_bytes=limit, thread_initializer=compute.single_threaded
            )
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            if settings.frontend == "native":
                raise RuntimeError(f"frontend 'native' asked for, but it cannot be built: {exc}") from exc
            log.warning("native gRPC front end unavailable (%s); serving with grpcio's Python server", exc)
        else:
            return native_server, "native"
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=settings.workers, thread_name_prefix="ttaserve-rpc", initializer=compute.single_threaded
        ),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    return server, "python"


def _bind_and_start(server: grpc.Server | NativeServer, address: str, tls: TlsReloader | None) -> int:
    """Bind ``address`` (with TLS when ``tls`` is given), start serving, and return the bound port; RuntimeError when
    the address cannot be bound."""
    if isinstance(server, NativeServer):
        if tls is None:
            server.add_insecure_port(address)
        else:
            files = tls.checked_copy()
            server.add_secure_port(address, files.key_file, files.cert_file, files.client_ca_file, tls.interval_s)
        try:
            server.start()
        except RuntimeError as exc:
            server.stop(0).wait()
            raise RuntimeError(f"cannot bind gRPC port {address}") from exc
        return server.bound_ports()[0]
    try:
        # grpcio raises on a failed bind, or (older) returns 0
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, tls.grpc_credentials())
    except RuntimeError as exc:
        raise RuntimeError(f"cannot bind gRPC port {address}: {exc}") from exc
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC port {address}")
    server.start()
    return port


def start_server(settings: ServerSettings) -> ServerHandle:
    configure_logging(settings.log_level, settings.log_format, settings.log_requests)
    # PyTorch computes on one thread with settings.torch_threads intra-op threads; every other thread, single-threaded
    compute.acquire(settings.torch_threads)
    try:
        return _start_server(settings)
    except BaseException:
        compute.release()
        raise


def _start_server(settings: ServerSettings) -> ServerHandle:
    if settings.deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    device = resolve_device(settings.device)
    tls_files = load_tls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)  # before anything slow
    tls = None if tls_files is None else TlsReloader(tls_files, settings.tls_reload_interval_s)
    # build or load the C normalisation kernels now (~0.3 s once), not inside a first request
    kernels = "loaded" if native.kernels() is not None else "unavailable"
    server, frontend = _grpc_server(settings)  # first: a front end that cannot be built fails before any loading
    log.info("device %s (torch %s, cuda available: %s)", device, torch.__version__, torch.cuda.is_available())

    metrics = Metrics()
    snapshot_dir = settings.snapshot_dir or Path("snapshots")
    memory_mib = settings.max_session_memory_mib
    sessions = SessionTable(
        max_sessions=settings.max_sessions,
        idle_timeout_s=settings.session_idle_timeout_s,
        snapshot_dir=snapshot_dir,
        on_removed=metrics.session_removed,
        max_bytes=None if memory_mib is None else int(memory_mib * 2**20),
        spill=settings.spill_evicted_sessions,
    )
    health_board = HealthBoard(health.HealthServicer(), ("", INFERENCE_SERVICE, ADAPTATION_SERVICE))

    def model_changed(name: str) -> None:
        metrics.update_model(repository, name)
        health_board.model_changed(name, bool(repository.versions(name)))

    repository = ModelRepository(
        settings.model_repository,
        device,
        on_change=model_changed,
        on_retired=lambda name, reason: _drop_sessions(sessions, name, reason),
    )
    poller = None
    if settings.repository_poll_s is not None:  # its baseline first: a file changing during the loads is seen
        poller = RepositoryPoller(
            repository, settings.repository_poll_s, settings.models, lambda name: compute.run(repository.load, name)
        )
    compute.run(repository.load_all, settings.models)  # loading's tensor copies start no second OpenMP team

    pipeline = Pipeline(repository, sessions, metrics, SharedMemoryRegistry(settings.allow_shared_memory))
    inflight = InflightTracker()
    metrics.watch_sessions(sessions)
    metrics.watch_warmups(repository)
    metrics.watch_inflight(lambda: inflight.count)

    inference_servicer = InferenceServicer(repository, pipeline, inflight)
    adaptation_servicer = AdaptationServicer(repository, sessions, metrics)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference_servicer, server)
    adaptation_pb2_grpc.add_AdaptationServicer_to_server(adaptation_servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_board.servicer, server)
    reflection.enable_server_reflection(
        (INFERENCE_SERVICE, ADAPTATION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
        server,
        pool=reflection_pool(),
    )
    try:
        port = _bind_and_start(server, f"{settings.grpc_host}:{settings.grpc_port}", tls)
    except RuntimeError:
        if tls is not None:
            tls.stop()
        raise
    http = None
    if settings.http_port is not None:
        http = HttpFrontend(
            inference_servicer,
            adaptation_servicer,
            max_body_bytes=settings.max_message_mb * 1024 * 1024,
            max_connections=settings.http_max_connections,
            ssl_context=None if tls is None else tls.config.ssl_context,
        )
        try:
            http.start(settings.grpc_host, settings.http_port)
        except RuntimeError:
            server.stop(0).wait()
            if tls is not None:
                tls.stop()
            raise
    if tls is not None:
        if http is not None:
            tls.on_reload(lambda config: http.use_ssl_context(config.ssl_context))
        metrics.watch_tls(tls)  # after the front ends' listeners: a reload is counted once it is served
        tls.start()
    metrics.server_info.info(
        {
            "version": server_version(),
            "torch": torch.__version__,
            "device": str(device),
            "native_kernels": kernels,
            "frontend": frontend,
        }
    )
    metrics_port = (
        metrics.serve(
            settings.metrics_port,
            settings.grpc_host,
            probes={LIVE_PATH: lambda: True, READY_PATH: inference_servicer.ready},
        )
        if settings.metrics_port is not None
        else None
    )
    handle = ServerHandle(
        settings=settings,
        server=server,
        grpc_port=port,
        metrics_port=metrics_port,
        repository=repository,
        sessions=sessions,
        metrics=metrics,
        health=health_board,
        inflight=inflight,
        http=http,
        tls=tls,
    )
    _start_sweeper(handle)
    if poller is not None:
        poller.start(handle._stopped)
    log.info(
        "ttaserve listening on %s:%d (%s gRPC front end, %s, REST %s, metrics %s), models: %s",
        settings.grpc_host,
        port,
        frontend,
        "plaintext" if tls is None else ("mutual TLS" if tls.config.mutual else "TLS"),
        handle.http_port if handle.http_port is not None else "off",
        metrics_port if metrics_port is not None else "off",
        ", ".join(f"{m.name}/{m.version}" for m in repository.loaded()) or "none",
    )
    return handle


def _drop_sessions(sessions: SessionTable, model: str, reason: str) -> None:
    """End the sessions of a model that was unloaded or reloaded: their state was adapted on the old weights."""
    dropped = sessions.drop_model(model, reason)
    log.info("model %s %s: %d session(s) dropped", model, reason, dropped)


def _start_sweeper(handle: ServerHandle) -> None:
    """Expire idle sessions in the background (at least twice per idle timeout, so short timeouts hold)."""
    interval_s = min(_SWEEP_INTERVAL_S, handle.settings.session_idle_timeout_s / 2)

    def sweep() -> None:
        while not handle._stopped.wait(interval_s):
            handle.sessions.expire_idle()

    threading.Thread(target=sweep, name="ttaserve-session-sweeper", daemon=True).start()


def serve(settings: ServerSettings) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    handle = start_server(settings)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        threading.Thread(target=handle.drain, name="ttaserve-drain").start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Wake up regularly: the kernel may hand SIGTERM to any of the process's threads, and Python runs the handler only
    # when the main thread executes bytecode, which a wait without a timeout would not do until the server stopped.
    while not handle.wait(timeout_s=0.5):
        pass
