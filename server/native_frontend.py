"""The native gRPC front end: ``frontend.cc`` (gRPC's C++ core) runs the transport; the Python servicers run as is.

Why: on a 2-core machine the Python gRPC server spends ~0.4 ms of CPU on every call before any handler runs (a
canned response costs 0.37–0.41 ms of server CPU), which is most of the overhead a batch-1 request pays. The C++
server moves the same call for ~0.15 ms of CPU, and runs a unary handler on the thread that read its request.

``NativeServer`` takes the servicers through the same ``add_generic_rpc_handlers`` /
``add_registered_method_handlers`` calls that the generated ``add_*_to_server`` functions make on a
``grpc.Server``, so the inference, adaptation, health and reflection services are registered unchanged, and
their handlers see a context with the ``grpc.ServicerContext`` methods they use. Unary calls run on the C++
polling thread that read the request; streaming calls get a Python thread of their own, as under ``grpc.server``.

The shared library is compiled on first use from ``frontend.cc`` against the system's gRPC C++ library (Debian
``libgrpc++-dev``, found with ``pkg-config``) and cached like the normalisation kernels; an image can ship it
prebuilt in the cache folder and leave the toolchain out. ``build_library`` raises RuntimeError where it can be
neither built nor found prebuilt; the server then uses ``grpc.server`` (``frontend: auto``).
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import queue
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc

from ttaserve.adapters.native_build import shared_library

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("frontend.cc")
CXXFLAGS = ("-O2", "-fPIC", "-shared", "-std=c++17")

# events reported by frontend.cc, and what a start event answers (see the enums there)
_START, _MESSAGE, _HALF_CLOSE, _DONE, _UNARY = 0, 1, 2, 3, 4
_READ_ONE, _READ_ALL, _READ_NONE = 0, 1, -1

#: what frontend.cc's polling threads call to hold a Python thread state for their whole life
_THREAD_STATE_FUNCTIONS = ("PyGILState_Ensure", "PyEval_SaveThread", "PyEval_RestoreThread", "PyGILState_Release")
_EVENT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
_U64, _PTR, _SIZE = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t


def build_library() -> Path:
    """Compile ``frontend.cc`` against the system gRPC C++ library, into the cache folder unless built before.

    Without the toolchain (a runtime image holds the gRPC C++ runtime libraries but not ``pkg-config``, the headers
    or a compiler) a library prebuilt from this same source into the cache folder is used as it is."""
    return shared_library(SOURCE, "frontend", _compile_and_link_flags)


def _compile_and_link_flags() -> tuple[list[str], list[str]]:
    """(compiler and compile flags, link flags) for ``frontend.cc``, from ``pkg-config grpc++``."""
    if shutil.which("pkg-config") is None:
        raise RuntimeError("pkg-config not found (install pkg-config and libgrpc++-dev)")
    found = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++"], capture_output=True, text=True)
    if found.returncode != 0:
        raise RuntimeError(f"gRPC C++ library not found by pkg-config (install libgrpc++-dev): {found.stderr.strip()}")
    flags = found.stdout.split()
    compile_flags = [f for f in flags if not f.startswith(("-l", "-L", "-Wl"))]
    link_flags = [f for f in flags if f.startswith(("-l", "-L", "-Wl"))]
    return [os.environ.get("CXX", "c++"), *CXXFLAGS, *compile_flags], link_flags


_library_lock = threading.Lock()
_library: list[ctypes.CDLL] = []


def load_library() -> ctypes.CDLL:
    """The compiled front end (built on the first call); RuntimeError or OSError when it cannot be built or loaded."""
    with _library_lock:
        if not _library:
            library = ctypes.CDLL(str(build_library()))
            library.ttaserve_frontend_create.argtypes = [_EVENT, _PTR, _PTR, _PTR, _PTR, ctypes.c_int, ctypes.c_int]
            library.ttaserve_frontend_create.restype = _PTR
            library.ttaserve_frontend_add_unary_method.argtypes = [_PTR, ctypes.c_char_p]
            library.ttaserve_frontend_add_unary_method.restype = None
            library.ttaserve_frontend_add_port.argtypes = [_PTR, ctypes.c_char_p]
            library.ttaserve_frontend_add_secure_port.argtypes = [_PTR, *[ctypes.c_char_p] * 4, ctypes.c_uint]
            library.ttaserve_frontend_port.argtypes = [_PTR, ctypes.c_int]
            library.ttaserve_frontend_start.argtypes = [_PTR, ctypes.c_int]
            library.ttaserve_frontend_active.argtypes = [_PTR, _U64]
            library.ttaserve_frontend_write.argtypes = [_PTR, _U64, _PTR, _SIZE]
            library.ttaserve_frontend_finish.argtypes = [_PTR, _U64, ctypes.c_int, ctypes.c_char_p, _PTR, _SIZE]
            library.ttaserve_frontend_finish.argtypes += [ctypes.c_int]
            library.ttaserve_frontend_shutdown.argtypes = [_PTR, ctypes.c_double]
            library.ttaserve_frontend_shutdown.restype = None
            library.ttaserve_frontend_destroy.argtypes = [_PTR]
            library.ttaserve_frontend_destroy.restype = None
            _library.append(library)
    return _library[0]


def _borrowed(data: int | None, length: int) -> memoryview:
    """The bytes frontend.cc passed to a callback, without a copy: valid only until the callback returns."""
    if not length:
        return memoryview(b"")
    return memoryview((ctypes.c_char * length).from_address(data)).cast("B")


_Metadata = tuple[tuple[str, str | bytes], ...]
_AuthContext = dict[str, list[bytes]]
_Start = tuple[float | None, str, str, _AuthContext, _Metadata]


class _Aborted(Exception):
    """Raised by ``_Context.abort`` to leave the handler, as ``grpc`` does."""


class _HandlerCallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str, invocation_metadata: _Metadata) -> None:
        self.method = method
        self.invocation_metadata = invocation_metadata


def _fields(record: bytes, offset: int = 0) -> list[bytes]:
    """The length-prefixed fields of a record from frontend.cc, from ``offset`` on."""
    fields = []
    while offset < len(record):
        (length,) = struct.unpack_from("=I", record, offset)
        fields.append(record[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return fields


def _parse_start(record: bytes) -> _Start:
    """(seconds to the deadline or None, method, peer, auth context, metadata) from frontend.cc's start record; the
    auth context holds the client certificate's properties under mutual TLS, and is empty otherwise."""
    (remaining,) = struct.unpack_from("=d", record)
    fields = _fields(record, 8)
    auth: _AuthContext = {}
    if fields[2]:
        properties = _fields(fields[2])
        for name, value in zip(properties[::2], properties[1::2], strict=True):
            auth.setdefault(name.decode(), []).append(value)
    metadata = tuple(
        (key.decode(), value if key.endswith(b"-bin") else value.decode("latin-1"))
        for key, value in zip(fields[3::2], fields[4::2], strict=True)
    )
    return (None if remaining < 0 else remaining), fields[0].decode(), fields[1].decode(), auth, metadata


class _Context:
    """The ``grpc.ServicerContext`` methods that servicers call, for one call of the native front end."""

    def __init__(self, call: _Call, deadline: float | None, peer: str, auth: _AuthContext, metadata: tuple) -> None:
        self._call = call
        self._deadline = deadline
        self._peer = peer
        self._auth = auth
        self._metadata = metadata
        self._callbacks: list[Callable[[], None]] = []
        self.code_: grpc.StatusCode = grpc.StatusCode.OK
        self.details_: str = ""

    def invocation_metadata(self) -> tuple:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> _AuthContext:
        return self._auth

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def is_active(self) -> bool:
        """False once the call ended; a unary call gets no done event, so frontend.cc is asked."""
        call = self._call
        return not call.done and call.server.library.ttaserve_frontend_active(call.server.frontend, call.id) == 1

    def add_callback(self, callback: Callable[[], None]) -> bool:
        if self._call.done:
            return False
        self._callbacks.append(callback)
        return True

    def run_callbacks(self) -> None:
        for callback in self._callbacks:
            try:
                callback()
            except Exception:
                log.exception("a call's termination callback failed")

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code_ = code

    def set_details(self, details: str) -> None:
        self.details_ = details

    def code(self) -> grpc.StatusCode:
        return self.code_

    def details(self) -> str:
        return self.details_

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        if code == grpc.StatusCode.OK:
            log.error("abort() called with StatusCode.OK; returning UNKNOWN")
            code = grpc.StatusCode.UNKNOWN
        self.code_, self.details_ = code, details
        raise _Aborted(details)

    def cancel(self) -> None:
        self._call.finish(grpc.StatusCode.CANCELLED, "cancelled by the server")

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, str | bytes]]) -> None:
        log.debug("trailing metadata is not sent by the native front end: %s", trailing_metadata)

    def send_initial_metadata(self, initial_metadata: Sequence[tuple[str, str | bytes]]) -> None:
        log.debug("initial metadata is not sent by the native front end: %s", initial_metadata)


class _Call:
    """One call: its handler, its context, and the way back to frontend.cc."""

    def __init__(self, server: NativeServer, call_id: int, handler: grpc.RpcMethodHandler, start: _Start) -> None:
        remaining, method, peer, auth, metadata = start
        self.server, self.id, self.handler, self.method = server, call_id, handler, method
        # Read by other threads (``is_active``) but only ever set once, so a plain attribute is enough; a unary call
        # (most calls) never needs the request queue. An Event and a queue cost ~3.5 µs per call, of ~11 µs
        # of front-end Python.
        self.done = False
        deadline = None if remaining is None else time.monotonic() + remaining
        self.context = _Context(self, deadline, peer, auth, metadata)
        self.requests: queue.SimpleQueue[bytes | None] | None = (
            queue.SimpleQueue() if handler.request_streaming else None
        )

    # --- the way back -----------------------------------------------------------------------------------------
    def write(self, message: Any) -> bool:
        data = self.handler.response_serializer(message) if self.handler.response_serializer else message
        return self.server.library.ttaserve_frontend_write(self.server.frontend, self.id, data, len(data)) == 0

    def finish(self, code: grpc.StatusCode, details: str, message: Any = None) -> None:
        """End the call with a status; an OK status carries ``message`` (a unary response) when one is given."""
        data = b""
        with_message = message is not None and code == grpc.StatusCode.OK
        if with_message:
            data = self.handler.response_serializer(message) if self.handler.response_serializer else message
        self.server.library.ttaserve_frontend_finish(
            self.server.frontend, self.id, code.value[0], details.encode(), data, len(data), int(with_message)
        )

    def finish_with_error(self, exc: BaseException) -> None:
        if isinstance(exc, _Aborted):
            self.finish(self.context.code_, self.context.details_)
            return
        log.exception("exception calling %s", self.method, exc_info=exc)
        self.finish(grpc.StatusCode.UNKNOWN, f"Exception calling application: {exc}")

    def finish_returned(self, response: Any) -> None:
        """Finish with a handler's response, or with the status it set on its context."""
        if self.context.code_ != grpc.StatusCode.OK:
            self.finish(self.context.code_, self.context.details_)
        else:
            self.finish(grpc.StatusCode.OK, self.context.details_, response)

    # --- requests ---------------------------------------------------------------------------------------------
    def parse(self, data: bytes | memoryview) -> Any | None:
        """The request object, or None after finishing the call with INTERNAL when it does not parse."""
        try:
            return self.handler.request_deserializer(data) if self.handler.request_deserializer else bytes(data)
        except Exception as exc:
            log.warning("%s: cannot parse the request: %s", self.method, exc)
            self.finish(grpc.StatusCode.INTERNAL, "Exception deserializing request!")
            return None

    def request_stream(self) -> Iterator[Any]:
        assert self.requests is not None
        while (data := self.requests.get()) is not None:
            request = self.parse(data)
            if request is None:
                return
            yield request

    # --- running the handler ----------------------------------------------------------------------------------
    def run_unary(self, data: memoryview) -> None:
        """A unary-unary call, on the polling thread that read the request (``data`` lives only until we return)."""
        request = self.parse(data)
        if request is None:
            return
        try:
            response = self.handler.unary_unary(request, self.context)
        except BaseException as exc:
            self.finish_with_error(exc)
            return
        self.finish_returned(response)

    def run_streaming(self, first: bytes | None) -> None:
        """Any call that streams, on a thread of its own; ``first`` is the request of a unary-stream call."""
        self.server.run_initializer()
        handler = self.handler
        try:
            if handler.request_streaming:
                argument: Any = self.request_stream()
            else:
                argument = self.parse(first or b"")
                if argument is None:
                    return
            behaviour = handler.stream_stream if handler.request_streaming else handler.unary_stream
            if not handler.response_streaming:
                self.finish_returned(handler.stream_unary(argument, self.context))
                return
            responses = behaviour(argument, self.context)
            for response in responses or ():
                if not self.write(response):
                    if hasattr(responses, "close"):
                        responses.close()
                    return
            self.finish(self.context.code_, self.context.details_)
        except BaseException as exc:
            self.finish_with_error(exc)

    def ended(self) -> None:
        self.done = True
        self.end_requests()
        self.context.run_callbacks()

    def end_requests(self) -> None:
        """Wake a handler reading the request stream: no more requests will come."""
        if self.requests is not None:
            self.requests.put(None)


class _HandlerTable:
    """The method handlers registered through the ``grpc.Server`` registration calls."""

    def __init__(self) -> None:
        self._methods: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for name, handler in handlers.items():
            self._methods[f"/{service}/{name}"] = handler

    def unary_methods(self) -> list[str]:
        """The registered unary-unary methods (by full name)."""
        return [m for m, h in self._methods.items() if not (h.request_streaming or h.response_streaming)]

    def find(self, method: str) -> grpc.RpcMethodHandler | None:
        handler = self._methods.get(method)
        if handler is not None:
            return handler
        details = _HandlerCallDetails(method, ())
        for generic in self._generic:
            handler = generic.service(details)
            if handler is not None:
                return handler
        return None


#: started servers, held until they stop: their C++ threads call back into them, so they must not be collected
_live_servers: set[NativeServer] = set()


@atexit.register
def _stop_live_servers() -> None:
    """Stop servers left running at exit: their threads must not call into a finalising interpreter."""
    for server in list(_live_servers):
        server.stop_now()


class NativeServer(_HandlerTable):
    """A gRPC server on ``frontend.cc`` with the subset of ``grpc.Server``'s interface that ttaserve uses."""

    def __init__(
        self, *, threads: int, max_message_bytes: int, thread_initializer: Callable[[], None] | None = None
    ) -> None:
        super().__init__()
        self.library = load_library()
        self._threads = threads
        self._initializer = thread_initializer
        self._initialized_threads: set[int] = set()
        self._calls: dict[int, _Call] = {}
        self._calls_lock = threading.Lock()
        self._callback = _EVENT(self._on_event)  # kept alive as long as the C++ side may call it
        python = [ctypes.cast(getattr(ctypes.pythonapi, name), _PTR) for name in _THREAD_STATE_FUNCTIONS]
        self.frontend = self.library.ttaserve_frontend_create(
            self._callback, *python, max_message_bytes, max_message_bytes
        )
        self._ports: list[int] = []
        self._stopped: threading.Event | None = None
        self._stop_lock = threading.Lock()

    def add_insecure_port(self, address: str) -> int:
        """Register a listening address; the port is bound by ``start`` (``bound_ports`` gives it then)."""
        index = self.library.ttaserve_frontend_add_port(self.frontend, address.encode())
        self._ports.append(index)
        return index

    def add_secure_port(
        self, address: str, key_file: Path, cert_file: Path, client_ca_file: Path | None, refresh_s: float
    ) -> int:
        """A TLS listening address serving the PEM key and certificate chain in these files, re-read every
        ``refresh_s`` seconds (at least 1; gRPC counts whole seconds); with ``client_ca_file``, clients must
        present a certificate that bundle signed."""
        client_ca = None if client_ca_file is None else str(client_ca_file).encode()
        index = self.library.ttaserve_frontend_add_secure_port(
            self.frontend,
            address.encode(),
            str(key_file).encode(),
            str(cert_file).encode(),
            client_ca,
            max(1, round(refresh_s)),
        )
        self._ports.append(index)
        return index

    def start(self) -> None:
        for method in self.unary_methods():
            self.library.ttaserve_frontend_add_unary_method(self.frontend, method.encode())
        if self.library.ttaserve_frontend_start(self.frontend, self._threads) != 0:
            raise RuntimeError("the native gRPC front end could not start (is the address free?)")
        _live_servers.add(self)

    def bound_ports(self) -> list[int]:
        """The ports bound by ``start``, in ``add_insecure_port`` order (0 where binding failed)."""
        return [self.library.ttaserve_frontend_port(self.frontend, index) for index in self._ports]

    def stop(self, grace: float | None) -> threading.Event:
        """Stop accepting calls, cancel those still running after ``grace`` seconds; the event is set once every
        polling thread has ended."""
        if self._claim_stop():
            threading.Thread(target=self._shutdown, args=(grace or 0.0,), name="ttaserve-frontend-stop").start()
        assert self._stopped is not None
        return self._stopped

    def stop_now(self) -> None:
        """Stop on the calling thread, cancelling running calls (at exit, when no new thread may start)."""
        if self._claim_stop():
            self._shutdown(0.0)
        assert self._stopped is not None
        self._stopped.wait()

    def _claim_stop(self) -> bool:
        """True for the one caller that is to shut the server down."""
        with self._stop_lock:
            if self._stopped is not None:
                return False
            self._stopped = threading.Event()
            return True

    def _shutdown(self, grace: float) -> None:
        assert self._stopped is not None
        self.library.ttaserve_frontend_shutdown(self.frontend, grace)
        self.library.ttaserve_frontend_destroy(self.frontend)
        _live_servers.discard(self)
        self._stopped.set()

    def initialize_thread(self) -> None:
        """Name a polling thread and apply the thread initializer to it, once (the polling threads are C++ threads
        that enter Python through ctypes callbacks, and live as long as the server)."""
        ident = threading.get_ident()
        if ident in self._initialized_threads:
            return
        self._initialized_threads.add(ident)
        thread = threading.current_thread()
        if not thread.name.startswith("ttaserve-rpc"):
            thread.name = f"ttaserve-rpc_native-{len(self._initialized_threads)}"
        self.run_initializer()

    def run_initializer(self) -> None:
        if self._initializer is not None:
            self._initializer()

    # --- events from frontend.cc, on its polling threads ------------------------------------------------------
    def _on_event(self, call_id: int, event: int, data: int | None, length: int) -> int:
        try:
            if event == _UNARY:
                self._on_unary(call_id, data, length)
                return 0
            if event == _START:
                return self._on_start(call_id, ctypes.string_at(data, length))
            with self._calls_lock:
                call = self._calls.get(call_id)
                if event == _DONE:
                    self._calls.pop(call_id, None)
            if call is None:
                return 0
            if event == _MESSAGE:
                self._on_message(call, _borrowed(data, length))
            elif event == _HALF_CLOSE:
                call.end_requests()
                if not call.handler.request_streaming:  # a unary request is read once: no message came
                    call.finish(grpc.StatusCode.INTERNAL, "the client sent no request")
            else:
                call.ended()
        except BaseException:
            log.exception("native front end: event %d of call %d failed", event, call_id)
        return 0

    def _on_unary(self, call_id: int, data: int | None, length: int) -> None:
        """A declared unary method's call: start record and request in one event, run here, on the polling
        thread; frontend.cc reports no done event for it, so it ends when the handler returns."""
        view = _borrowed(data, length)
        (record_length,) = struct.unpack_from("=I", view)
        start = _parse_start(view[4 : 4 + record_length].tobytes())
        call = _Call(self, call_id, self._methods[start[1]], start)
        self.initialize_thread()
        call.run_unary(view[4 + record_length :])
        call.ended()

    def _on_start(self, call_id: int, record: bytes) -> int:
        start = _parse_start(record)
        handler = self.find(start[1])
        if handler is None:
            self.library.ttaserve_frontend_finish(
                self.frontend, call_id, grpc.StatusCode.UNIMPLEMENTED.value[0], b"Method not found!", None, 0, 0
            )
            return _READ_NONE
        call = _Call(self, call_id, handler, start)
        with self._calls_lock:
            self._calls[call_id] = call
        if handler.request_streaming:
            _run_on_own_thread(call, None)
            return _READ_ALL
        return _READ_ONE

    def _on_message(self, call: _Call, data: memoryview) -> None:
        handler = call.handler
        if call.requests is not None:
            call.requests.put(bytes(data))
        elif handler.response_streaming:
            _run_on_own_thread(call, bytes(data))
        else:
            self.initialize_thread()
            call.run_unary(data)


def _run_on_own_thread(call: _Call, first: bytes | None) -> None:
    threading.Thread(target=call.run_streaming, args=(first,), name="ttaserve-rpc_stream", daemon=True).start()
