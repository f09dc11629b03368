"""The KServe v2 REST protocol over HTTP/1.1, beside gRPC: what ``tritonclient.http``, KServe's REST tooling and
``curl`` speak.

Each route turns its URL and JSON body into the gRPC request message and calls the same servicer method the gRPC
front ends call, so both protocols share one implementation of every RPC, its checks and its metrics; this module
only translates. A servicer's ``context.abort`` becomes an HTTP status and a JSON ``{"error": message}`` body.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import re
import select
import socket
import ssl
import sys
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.client import HTTPMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NoReturn, TypeVar
from urllib.parse import unquote, urlsplit

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.message import Message

from ttaserve.protocol import adaptation_pb2 as apb
from ttaserve.protocol import kserve_v2_pb2 as pb

from . import compute
from .adaptation_service import AdaptationServicer
from .errors import InvalidArgument, ServingError
from .inference_service import CALLER_METADATA, InferenceServicer, caller_of, server_version
from .rest_codec import encode_infer_response, load_json_object, message_to_json, parse_infer_body
from .tls import auth_context_of_certificate

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

JSON_CONTENT = "application/json"
BINARY_CONTENT = "application/octet-stream"
HEADER_LENGTH = "Inference-Header-Content-Length"
#: an idle keep-alive connection is closed after this long (each one holds a thread)
IDLE_TIMEOUT_S = 60.0
#: Linux only; elsewhere the delayed ACK stays
QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
ADAPTATION_SERVICE = apb.DESCRIPTOR.services_by_name["Adaptation"]

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,  # nginx's "client closed request": nobody reads it, but the access log does
}


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = tuple(headers)


class HttpContext:
    """What the servicers use of ``grpc.ServicerContext``: the caller's identity (the ``ttaserve-caller`` header
    plays gRPC's metadata; under mutual TLS, the client certificate), ``abort``, and whether the client still
    waits. HTTP requests carry no transport deadline (Triton's ``timeout`` parameter is one)."""

    def __init__(
        self, caller: str | None, auth: dict[str, list[bytes]] | None = None, connection: socket.socket | None = None
    ) -> None:
        self._metadata = ((CALLER_METADATA, caller),) if caller else ()
        self._auth = auth or {}
        self._connection = connection

    def is_active(self) -> bool:
        """False once the client closed or reset its connection. Asked of the socket without reading from it (the
        next pipelined request, or TLS records, stay where they are): HTTP/1.1 clients do not half-close while they
        wait for an answer, so a hang-up is the client leaving."""
        if self._connection is None:
            return True
        poller = select.poll()
        poller.register(self._connection.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        return not poller.poll(0)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def time_remaining(self) -> float | None:
        return None

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise HttpError(HTTP_STATUS.get(code, 500), details)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = JSON_CONTENT
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Call:
    """One HTTP request as a route sees it."""

    params: dict[str, str]
    body: bytes
    headers: HTTPMessage
    context: HttpContext

    def model(self) -> tuple[str, str]:
        return self.params["model"], self.params.get("version") or ""

    def json(self, what: str) -> dict[str, Any]:
        return load_json_object(self.body, what)

    def message(self, message: M, what: str) -> M:
        """The body parsed into ``message`` with protobuf's JSON mapping (no body: the message's defaults)."""
        try:
            json_format.Parse(self.body or b"{}", message)
        except json_format.ParseError as exc:
            raise InvalidArgument(f"{what}: {exc}") from None
        return message


Handler = Callable[[Call], Reply]


def json_reply(value: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(value, separators=(",", ":")).encode())


class RestApi:
    """The routes, each a regular expression over the path (percent-decoded per segment) and a method."""

    _MODEL = r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
    _REGION = r"(?:/region/(?P<region>[^/]+))?"

    def __init__(self, inference: InferenceServicer, adaptation: AdaptationServicer) -> None:
        self.inference = inference
        self.adaptation = adaptation
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []
        add = self._add
        add("GET", r"/v2/health/live", self.server_live)
        add("GET", r"/v2/health/ready", self.server_ready)
        add("GET", r"/v2", self.server_metadata)
        add("GET", r"/v2/models/stats", self.model_statistics)
        add("GET", self._MODEL + r"/stats", self.model_statistics)
        add("GET", self._MODEL + r"/ready", self.model_ready)
        add("GET", self._MODEL + r"/config", self.model_config)
        add("POST", self._MODEL + r"/infer", self.model_infer)
        add("GET", self._MODEL, self.model_metadata)
        add("POST", r"/v2/repository/index", self.repository_index)
        add("POST", r"/v2/repository/models/(?P<model>[^/]+)/load", self.repository_load)
        add("POST", r"/v2/repository/models/(?P<model>[^/]+)/unload", self.repository_unload)
        add("GET", r"/v2/systemsharedmemory" + self._REGION + "/status", self.shared_memory_status)
        add("POST", r"/v2/systemsharedmemory/region/(?P<region>[^/]+)/register", self.shared_memory_register)
        add("POST", r"/v2/systemsharedmemory" + self._REGION + "/unregister", self.shared_memory_unregister)
        add("GET", r"/v2/cudasharedmemory" + self._REGION + "/status", self.cuda_shared_memory)
        add("POST", r"/v2/cudasharedmemory/region/(?P<region>[^/]+)/register", self.cuda_shared_memory)
        add("POST", r"/v2/cudasharedmemory" + self._REGION + "/unregister", self.cuda_shared_memory)
        for method in ("GET", "POST"):
            add(method, r"/ttaserve\.v1\.Adaptation/(?P<rpc>[A-Za-z]+)", self.adaptation_rpc)

    def _add(self, method: str, pattern: str, handler: Handler) -> None:
        self.routes.append((method, re.compile(pattern + r"/?"), handler))

    def find(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        allowed = []
        for route_method, pattern, handler in self.routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if route_method == method:
                return handler, {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            allowed.append(route_method)
        if allowed:
            raise HttpError(405, f"{method} {path}: use {' or '.join(allowed)}", [("Allow", ", ".join(allowed))])
        raise HttpError(404, f"no such endpoint: {method} {path} (the v2 REST API is under /v2)")

    # --- health and metadata -------------------------------------------------------------------------------------

    def server_live(self, call: Call) -> Reply:
        live = self.inference.ServerLive(pb.ServerLiveRequest(), call.context).live
        return Reply(200 if live else 503)

    def server_ready(self, call: Call) -> Reply:
        ready = self.inference.ServerReady(pb.ServerReadyRequest(), call.context).ready
        return Reply(200 if ready else 503)

    def model_ready(self, call: Call) -> Reply:
        name, version = call.model()
        ready = self.inference.ModelReady(pb.ModelReadyRequest(name=name, version=version), call.context).ready
        return Reply(200 if ready else 503)

    def server_metadata(self, call: Call) -> Reply:
        return json_reply(message_to_json(self.inference.ServerMetadata(pb.ServerMetadataRequest(), call.context)))

    def model_metadata(self, call: Call) -> Reply:
        name, version = call.model()
        request = pb.ModelMetadataRequest(name=name, version=version)
        return json_reply(message_to_json(self.inference.ModelMetadata(request, call.context)))

    def model_config(self, call: Call) -> Reply:
        name, version = call.model()
        response = self.inference.ModelConfig(pb.ModelConfigRequest(name=name, version=version), call.context)
        return json_reply(message_to_json(response.config))

    def model_statistics(self, call: Call) -> Reply:
        request = pb.ModelStatisticsRequest(name=call.params.get("model", ""), version=call.params.get("version", ""))
        response = self.inference.ModelStatistics(request, call.context)
        return json_reply({"model_stats": [message_to_json(stats) for stats in response.model_stats]})

    # --- inference --------------------------------------------------------------------------------------------

    def model_infer(self, call: Call) -> Reply:
        name, version = call.model()
        try:
            parsed = parse_infer_body(name, version, call.body, _header_length(call.headers))
        except ServingError as exc:
            unparsed = pb.ModelInferRequest(model_name=name, model_version=version)
            self.inference.pipeline.record_rejected(unparsed, caller_of(call.context), exc)
            raise
        encoded = encode_infer_response(self.inference.ModelInfer(parsed.request, call.context), parsed)
        if encoded.json_length is None:
            return Reply(body=encoded.body)
        return Reply(
            body=encoded.body, content_type=BINARY_CONTENT, headers=[(HEADER_LENGTH, str(encoded.json_length))]
        )

    # --- repository -------------------------------------------------------------------------------------------

    def repository_index(self, call: Call) -> Reply:
        ready = call.json("repository index request").get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgument(f"'ready' must be true or false, got {ready!r}")
        response = self.inference.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready), call.context)
        return json_reply([message_to_json(model) for model in response.models])

    def repository_load(self, call: Call) -> Reply:
        parameters = call.json("load request").get("parameters") or {}
        if parameters:
            raise InvalidArgument(
                f"load parameters are not supported ({', '.join(sorted(parameters))}): a model loads from its "
                "folder in the repository"
            )
        self.inference.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=call.params["model"]), call.context)
        return Reply()

    def repository_unload(self, call: Call) -> Reply:
        call.json("unload request")  # a malformed body is refused; 'unload_dependents' has nothing to act on here
        request = pb.RepositoryModelUnloadRequest(model_name=call.params["model"])
        self.inference.RepositoryModelUnload(request, call.context)
        return Reply()

    # --- shared memory ----------------------------------------------------------------------------------------

    def shared_memory_status(self, call: Call) -> Reply:
        request = pb.SystemSharedMemoryStatusRequest(name=call.params.get("region", ""))
        response = self.inference.SystemSharedMemoryStatus(request, call.context)
        return json_reply([message_to_json(region) for region in response.regions.values()])

    def shared_memory_register(self, call: Call) -> Reply:
        """The body (``key``, ``offset``, ``byte_size``) is the gRPC request's own fields in protobuf's JSON mapping,
        so protobuf checks their types and ranges and the registry checks the rest."""
        request = call.message(pb.SystemSharedMemoryRegisterRequest(), "register request")
        request.name = call.params["region"]
        self.inference.SystemSharedMemoryRegister(request, call.context)
        return Reply()

    def shared_memory_unregister(self, call: Call) -> Reply:
        request = pb.SystemSharedMemoryUnregisterRequest(name=call.params.get("region", ""))
        self.inference.SystemSharedMemoryUnregister(request, call.context)
        return Reply()

    def cuda_shared_memory(self, call: Call) -> Reply:
        self.inference.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(), call.context)
        raise AssertionError("unreachable: CUDA shared memory always refuses")

    # --- ttaserve.v1.Adaptation, transcoded ---------------------------------------------------------------------

    def adaptation_rpc(self, call: Call) -> Reply:
        """Any Adaptation RPC, its request and response in protobuf's JSON mapping (``{}`` or no body: defaults)."""
        method = ADAPTATION_SERVICE.methods_by_name.get(call.params["rpc"])
        if method is None:
            names = ", ".join(sorted(ADAPTATION_SERVICE.methods_by_name))
            raise HttpError(404, f"ttaserve.v1.Adaptation has no RPC '{call.params['rpc']}'; RPCs: {names}")
        request = call.message(message_factory.GetMessageClass(method.input_type)(), f"{method.name} request")
        response = getattr(self.adaptation, method.name)(request, call.context)
        return json_reply(message_to_json(response))


def _header_length(headers: HTTPMessage) -> int | None:
    value = headers.get(HEADER_LENGTH)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(f"header {HEADER_LENGTH}: {value!r} is not a byte count") from None


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """A compressed request body, inflated to at most ``limit`` bytes (a small body must not inflate to gigabytes)."""
    if encoding == "gzip":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        inflater = zlib.decompressobj()
    else:
        raise HttpError(415, f"Content-Encoding {encoding!r} is not supported; use gzip or deflate")
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise HttpError(400, f"the body is not valid {encoding} data: {exc}") from None
    if len(data) > limit:
        raise HttpError(413, f"the {encoding} body inflates to more than the {limit}-byte limit")
    return data


def _response_encoding(accept: str | None) -> str | None:
    """gzip or deflate when the client accepts it (``Accept-Encoding``, q-values honoured), else None."""
    if not accept:
        return None
    accepted = {}
    for item in accept.split(","):
        token, _, params = item.strip().partition(";")
        quality = 1.0
        if params.strip().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                quality = 0.0
        accepted[token.strip().lower()] = quality
    for encoding in ("gzip", "deflate"):
        if accepted.get(encoding, 0.0) > 0:
            return encoding
    return None


def _compress(body: bytes, encoding: str) -> bytes:
    return gzip.compress(body, compresslevel=1) if encoding == "gzip" else zlib.compress(body, 1)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"ttaserve/{server_version()}"
    sys_version = ""
    #: a response leaves in two writes (head, body); with Nagle's algorithm the second waits for the client's
    #: delayed ACK, 40 ms on Linux, on every request
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT_S
    api: RestApi
    max_body_bytes: int

    def setup(self) -> None:
        super().setup()
        compute.single_threaded()
        self.auth: dict[str, list[bytes]] = {}

    def handle(self) -> None:
        """Under TLS, the handshake happens here, on the connection's own thread and under its idle timeout, so a
        client that never completes one holds up no one else."""
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; a timeout too
                log.info("TLS handshake with %s failed: %s", self.address_string(), exc)
                self.close_connection = True
                return
            self.auth = auth_context_of_certificate(self.connection.getpeercert())
        super().handle()

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        """A GET without the body (load balancers and uptime checkers probe health with HEAD)."""
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """What the base class refuses itself (a malformed request line, oversized headers, an unknown method) gets
        the same JSON error body as everything else."""
        self.close_connection = True
        self._send(json_reply({"error": message or explain or HTTPStatus(code).phrase}, code))

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _handle(self, method: str) -> None:
        try:
            path = urlsplit(self.path).path
            handler, params = self.api.find(method, path)
            body = self._read_body()
            context = HttpContext(self.headers.get(CALLER_METADATA), self.auth, self.connection)
            reply = handler(Call(params, body, self.headers, context))
        except HttpError as exc:
            reply = json_reply({"error": exc.message}, exc.status)
            reply.headers.extend(exc.headers)
        except ServingError as exc:
            reply = json_reply({"error": exc.message}, HTTP_STATUS.get(exc.code, 500))
        except Exception as exc:
            log.exception("internal error in %s %s", method, self.path)
            reply = json_reply({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)
        self._send(reply)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HttpError(411, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise HttpError(400, f"Content-Length {self.headers.get('Content-Length')!r} is not a number") from None
        if length > self.max_body_bytes:
            self.close_connection = True
            raise HttpError(
                413, f"the request body is {length} bytes, above the server's {self.max_body_bytes}-byte limit"
            )
        if length:
            self._acknowledge_promptly()
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            self.close_connection = True
            raise HttpError(400, f"the body ended after {len(body)} of {length} bytes")
        encoding = self.headers.get("Content-Encoding")
        if encoding and encoding.lower() != "identity":
            body = _decompress(body, encoding.lower(), self.max_body_bytes)
        return body

    def _acknowledge_promptly(self) -> None:
        """ACK the body's segments as they arrive instead of up to 40 ms later. A client that writes a large body
        without ``TCP_NODELAY`` holds its last, short segment back until the previous one is acknowledged; over TLS
        (records written one by one) ``tritonclient.http`` waited out the delayed ACK on every batch-64 request: 70 ms
        against 28 ms. Linux leaves quick-ACK mode on its own, so it is asked for again on each request."""
        if QUICKACK is not None:
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)

    def _send(self, reply: Reply) -> None:
        body = reply.body
        headers = getattr(self, "headers", None)  # absent when the request line itself was malformed
        encoding = _response_encoding(headers.get("Accept-Encoding")) if body and headers is not None else None
        if encoding:
            body = _compress(body, encoding)
        self.send_response(reply.status)
        if reply.body:
            self.send_header("Content-Type", reply.content_type)
        if encoding:
            self.send_header("Content-Encoding", encoding)
        for name, value in reply.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` of them: a client that opens more gets a 503 and a
    closed socket instead of a thread each (thousands of idle connections would otherwise exhaust the process).
    Under TLS the refused connection is closed without the 503: answering would need a handshake on the accepting
    thread, where one slow client could stall every other."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        max_connections: int,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(max_connections)
        self._busy = _busy_response(max_connections)
        #: replaced when a rotated certificate is loaded; each connection takes the one current at its accept
        self.ssl_context = ssl_context
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, client_address = super().get_request()
        context = self.ssl_context
        if context is not None:  # no I/O yet: the handler's thread does the handshake
            connection = context.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        return connection, client_address

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            if self.ssl_context is None:
                with contextlib.suppress(OSError):  # a client that is gone already needs no answer
                    request.sendall(self._busy)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up before its answer is sent is routine (a cancelled call, a closed browser tab):
        a debug line, not the traceback ``socketserver`` prints on stderr; anything else is logged as an error."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | ssl.SSLError | TimeoutError):
            log.debug("HTTP client %s went away: %s", client_address, error)
            return
        log.exception("HTTP connection from %s failed", client_address)


def _busy_response(max_connections: int) -> bytes:
    body = json.dumps({"error": f"the server has its maximum of {max_connections} open HTTP connections; retry"})
    head = f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {JSON_CONTENT}\r\nContent-Length: {len(body)}\r\n"
    return (head + "Connection: close\r\nRetry-After: 1\r\n\r\n" + body).encode()


class HttpFrontend:
    """The REST server: one thread accepting, one thread per open connection (up to ``max_connections``)."""

    def __init__(
        self,
        inference: InferenceServicer,
        adaptation: AdaptationServicer,
        max_body_bytes: int,
        max_connections: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._max_connections = max_connections
        self._ssl_context = ssl_context
        self._handler = type(
            "RequestHandler",
            (_RequestHandler,),
            {"api": RestApi(inference, adaptation), "max_body_bytes": max_body_bytes},
        )
        self._server: _Server | None = None
        #: the bound port, once started (kept after stop, so a caller can still say which port it was)
        self.port: int | None = None

    def start(self, host: str, port: int) -> int:
        """Bind and serve in the background; returns the bound port (``port`` 0 picks one)."""
        try:
            self._server = _Server((host.strip("[]"), port), self._handler, self._max_connections, self._ssl_context)
        except OSError as exc:
            raise RuntimeError(f"cannot bind HTTP port {host}:{port}: {exc}") from exc
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="ttaserve-http", daemon=True).start()
        return self.port

    def use_ssl_context(self, context: ssl.SSLContext) -> None:
        """Serve new connections with ``context`` (a rotated certificate); open ones keep theirs."""
        self._ssl_context = context
        if self._server is not None:
            self._server.ssl_context = context

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
