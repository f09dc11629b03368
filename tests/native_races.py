"""Races the native gRPC front end must survive, on a bare ``NativeServer``: run in-process by the tests, and as a
script (``python tests/native_races.py``) in a process where frontend.cc was built with AddressSanitizer, which
turns a use of a freed call into a report and a non-zero exit instead of silent memory corruption."""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from ttaserve.server import native_frontend

SERVICE = "probe.Probe"


@contextmanager
def probe_server(handlers: dict[str, grpc.RpcMethodHandler], threads: int) -> Iterator[grpc.Channel]:
    """A bare native server with ``handlers`` as the service ``probe.Probe``, and a channel to it."""
    server = native_frontend.NativeServer(threads=threads, max_message_bytes=1 << 20)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.bound_ports()[0]}") as opened:
            yield opened
    finally:
        server.stop(None).wait(30)


def cancel_streams_while_the_server_writes(streams: int, seed: int = 0) -> None:
    """Streams whose client cancels after the first message while the handler still writes (or has just finished:
    each stream is 1–64 messages long), so the handler's writes and final status race the call being freed. Every
    handler must end, and the server must still answer afterwards."""
    ended = threading.Semaphore(0)

    def flood(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            for _ in range(request[0]):
                yield request
        finally:
            ended.release()

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"echo " + request

    handlers = {
        "Flood": grpc.unary_stream_rpc_method_handler(flood),
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
    }
    lengths = random.Random(seed)
    with probe_server(handlers, threads=4) as opened:
        flood_call = opened.unary_stream(f"/{SERVICE}/Flood")
        for i in range(streams):
            message = bytes([lengths.randint(1, 64)]) + i.to_bytes(4, "big") * 32
            stream = flood_call(message, timeout=30)
            assert next(stream) == message
            stream.cancel()
        for i in range(streams):
            assert ended.acquire(timeout=30), f"{streams - i} of {streams} stream handlers never ended"
        assert opened.unary_unary(f"/{SERVICE}/Echo")(b"z", timeout=10) == b"echo z"


if __name__ == "__main__":
    cancel_streams_while_the_server_writes(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
    print("no race found")
