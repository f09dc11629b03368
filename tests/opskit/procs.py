"""Real child processes on loopback, each in its own folder and always stopped by the context manager that started
it: a ttaserve server (``python -m ttaserve.client.cli serve``), Prometheus and an nginx gRPC proxy."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

T = TypeVar("T")
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def require_binary(name: str, package: str) -> str:
    """The binary's path (nginx lives in /usr/sbin, which a non-root PATH may lack), or skip the test."""
    candidates = (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}")
    path = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if path is None:
        pytest.skip(f"needs the '{name}' binary (Debian package {package}; scripts/setup.sh installs it)")
    return path


def wait_until(check: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """Poll ``check`` until it returns something other than None or False; its exceptions count as not yet."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        try:
            value = check()
            if value is not None and value is not False:
                return value
            last = value
        except Exception as exc:  # not ready yet: connection refused, empty result, ...
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f}s (last: {last!r})")
        time.sleep(interval_s)


@dataclass
class Child:
    """A child process whose output goes to a log file (never a pipe nobody reads)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""

    def ensure_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout_s)

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
        self.popen.wait(10)


def spawn(name: str, args: Sequence[str], workdir: Path, env: dict[str, str] | None = None) -> Child:
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            list(args), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir, env=env
        )
    return Child(name, popen, log)


# --- ttaserve ----------------------------------------------------------------------------------------------------


@dataclass
class ServerProcess:
    child: Child
    grpc_port: int
    metrics_port: int

    @property
    def url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def health(self, service: str = "") -> str:
        with grpc.insecure_channel(self.url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    def probe(self, path: str) -> int:
        """The HTTP status of a health probe on the metrics port (``/v2/health/live`` or ``/v2/health/ready``)."""
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.metrics_port}{path}", timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples that carry ``labels``, read from the server's own endpoint."""
        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name) or line[len(name)] not in "{ ":
                continue
            series, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
        return total


def start_ttaserve(
    workdir: Path, repo: Path, snapshot_dir: Path, name: str = "ttaserve", extra_args: Sequence[str] = ()
) -> ServerProcess:
    """Start ``ttaserve serve`` as a child process (``extra_args``: more of its flags); call ``wait_serving``
    before using it."""
    grpc_port, metrics_port = free_port(), free_port()
    args = [
        sys.executable,
        "-m",
        "ttaserve.client.cli",
        "serve",
        "--model-repository",
        str(repo),
        "--grpc-port",
        str(grpc_port),
        "--no-http",
        "--metrics-port",
        str(metrics_port),
        "--host",
        LOOPBACK,
        "--snapshot-dir",
        str(snapshot_dir),
        "--device",
        "cpu",
        *extra_args,
    ]
    env = {**os.environ, "TTASERVE_TORCH_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return ServerProcess(spawn(name, args, workdir, env), grpc_port, metrics_port)


def wait_serving(server: ServerProcess, timeout_s: float = 60.0) -> None:
    def serving() -> bool:
        server.child.ensure_alive()
        return server.health() == "SERVING"

    try:
        wait_until(serving, timeout_s, f"{server.child.name} serving", interval_s=0.2)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}\n{server.child.log_tail()}") from None


@contextmanager
def ttaserve_replicas(workdir: Path, repo: Path, snapshot_dir: Path, count: int) -> Iterator[list[ServerProcess]]:
    """``count`` servers started side by side (their imports overlap), all stopped (or killed) on exit."""
    servers: list[ServerProcess] = []
    try:
        for i in range(count):
            servers.append(start_ttaserve(workdir / f"replica{i}", repo, snapshot_dir, name=f"replica{i}"))
        for server in servers:
            wait_serving(server)
        yield servers
    finally:
        for server in servers:
            server.child.stop()


# --- Prometheus --------------------------------------------------------------------------------------------------


class PromQLError(RuntimeError):
    pass


@dataclass
class Prometheus:
    child: Child
    url: str

    def _get(self, path: str, **params: str) -> Any:
        address = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(address, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        if body.get("status") != "success":
            raise PromQLError(f"{params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; the result's samples (vector) or one pseudo-sample (scalar)."""
        data = self._get("/api/v1/query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, expr: str) -> float:
        """The value of a query that must return exactly one sample."""
        result = self.query(expr)
        if len(result) != 1:
            raise PromQLError(f"{expr}: expected one sample, got {len(result)}: {result}")
        return float(result[0]["value"][1])

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
        data = self._get("/api/v1/query_range", query=expr, start=str(start), end=str(end), step=str(step_s))
        return data["result"]

    def wait_scraped_after(self, moment: float, timeout_s: float = 20.0) -> None:
        """Block until every target was scraped after ``moment`` (a ``time.time()``)."""

        def scraped() -> bool:
            samples = self.query("timestamp(up)")
            return bool(samples) and all(float(s["value"][1]) > moment for s in samples)

        wait_until(scraped, timeout_s, "a Prometheus scrape after the traffic", interval_s=0.25)


@contextmanager
def prometheus(workdir: Path, targets: Sequence[str], rule_files: Sequence[Path] = ()) -> Iterator[Prometheus]:
    """A real Prometheus scraping ``targets`` (host:port) every second, with its own data folder."""
    binary = require_binary("prometheus", "prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [{"job_name": "ttaserve", "static_configs": [{"targets": list(targets)}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    args = [
        binary,
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address={LOOPBACK}:{port}",
        "--log.level=warn",
    ]
    server = Prometheus(spawn("prometheus", args, workdir), f"http://{LOOPBACK}:{port}")
    try:

        def ready() -> bool:
            server.child.ensure_alive()
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                return response.status == 200

        wait_until(ready, 30, "Prometheus ready")
        yield server
    finally:
        server.child.stop()


# --- nginx -------------------------------------------------------------------------------------------------------

_NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    log_format routed '$http_ttaserve_session $upstream_addr $status';
    access_log {prefix}/access.log routed;
    upstream ttaserve {{
        hash $http_ttaserve_session consistent;
{servers}
    }}
    server {{
        listen {host}:{port} http2;
        client_max_body_size 0;
        location / {{
            grpc_pass grpc://ttaserve;
            grpc_next_upstream error timeout;
            grpc_read_timeout 60s;
        }}
    }}
}}
"""


@dataclass
class Nginx:
    child: Child
    port: int
    prefix: Path

    @property
    def url(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def routes(self) -> list[tuple[str, str]]:
        """(session header, upstream address) of every proxied request so far, from the access log."""
        path = self.prefix / "access.log"
        rows = [line.split() for line in path.read_text().splitlines()] if path.is_file() else []
        return [(row[0], row[1]) for row in rows if len(row) >= 3]


@contextmanager
def nginx_grpc_proxy(workdir: Path, upstream_ports: Sequence[int]) -> Iterator[Nginx]:
    """A real nginx in front of ``upstream_ports``: gRPC over h2c, a session sticks to one upstream by consistent
    hashing of the ``ttaserve-session`` header. Runs in the foreground as the current user."""
    binary = require_binary("nginx", "nginx-light")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    servers = "\n".join(f"        server {LOOPBACK}:{p} max_fails=1 fail_timeout=30s;" for p in upstream_ports)
    conf = _NGINX_CONF.format(user=user, prefix=workdir, servers=servers, host=LOOPBACK, port=port)
    (workdir / "nginx.conf").write_text(conf)
    args = [binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", str(workdir / "error.log")]
    proxy = Nginx(spawn("nginx", args, workdir), port, workdir)
    try:

        def listening() -> bool:
            proxy.child.ensure_alive()
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return True

        wait_until(listening, 15, "nginx listening")
        yield proxy
    finally:
        proxy.child.stop()
