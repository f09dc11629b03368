"""A TCP link on loopback that loses answers, for testing what clients do when a request's answer never comes."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType


class LossyLink:
    """A proxy between a client and a server on ``upstream_port``. After ``hold()`` it still passes the client's
    bytes to the server but keeps the server's bytes back; ``cut()`` then closes every connection. The server has
    done the work, and the client's call fails (UNAVAILABLE) without an answer: what a flaky uplink or a restarting
    proxy does to a request in flight."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._holding = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="lossy-link", daemon=True).start()

    def hold(self) -> None:
        self._holding.set()

    def cut(self) -> None:
        """Close every open connection and pass everything again from the next one on."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
            self._holding.clear()
        for sock in sockets:
            _close(sock)

    def close(self) -> None:
        _close(self._listener)
        self.cut()

    def __enter__(self) -> LossyLink:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets += [downstream, upstream]
            threading.Thread(target=self._pump, args=(downstream, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            while data := source.recv(65536):
                if answers and self._holding.is_set():
                    continue  # lost: the client never sees it
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
