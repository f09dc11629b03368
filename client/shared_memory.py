"""Shared memory for an SDK client on the server's host: ``Client(url, shared_memory=True)``.

Each request's input is written into a POSIX shared-memory object the client created and registered with the server
(Triton's system shared-memory extension; the server runs with ``--allow-shared-memory``), and the request carries
only the tensor's description. Outputs still come back in the response: they are a few bytes per image.

A client may be used by many threads at once, so it keeps a pool of objects, each lent to one request at a time and
grown by adding a larger one. Objects are created with mode 0600: the server must run as the same user. Closing the
client unregisters and removes them.
"""

from __future__ import annotations

import os
import threading
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

SHM_ROOT = Path("/dev/shm")
#: objects are at least this large, so a stream of similar batches reuses one
MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class SharedMemorySlot:
    """One object: registered under ``region``, opened as ``fd``."""

    region: str
    key: str
    byte_size: int
    fd: int

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        position = 0
        while position < len(view):
            position += os.pwrite(self.fd, view[position:], position)


class SharedMemoryPool:
    def __init__(self, root: Path = SHM_ROOT) -> None:
        self._root = root
        self._free: list[SharedMemorySlot] = []
        self._slots: list[SharedMemorySlot] = []
        self._lock = threading.Lock()
        # a client dropped without close() still removes its objects, at garbage collection or at exit
        weakref.finalize(self, _remove_all, root, self._slots)

    def acquire(self, byte_size: int) -> tuple[SharedMemorySlot, bool]:
        """A slot of at least ``byte_size`` bytes for one request, and whether it is new (to be registered)."""
        with self._lock:
            fitting = [slot for slot in self._free if slot.byte_size >= byte_size]
            if fitting:
                slot = min(fitting, key=lambda s: s.byte_size)
                self._free.remove(slot)
                return slot, False
        size = max(MIN_BYTES, -(-byte_size // MIN_BYTES) * MIN_BYTES)
        name = f"ttaserve-{os.getpid()}-{uuid.uuid4().hex[:16]}"
        fd = os.open(self._root / name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            (self._root / name).unlink()
            raise
        slot = SharedMemorySlot(region=name, key=f"/{name}", byte_size=size, fd=fd)
        with self._lock:
            self._slots.append(slot)
        return slot, True

    def release(self, slot: SharedMemorySlot) -> None:
        with self._lock:
            if slot in self._slots:
                self._free.append(slot)

    def discard(self, slot: SharedMemorySlot) -> None:
        """Close and remove one slot (the server refused it)."""
        with self._lock:
            self._slots.remove(slot)
        _remove(self._root, slot)

    def close(self) -> list[SharedMemorySlot]:
        """Close and remove every slot; returns them, for the caller to unregister."""
        with self._lock:
            slots = list(self._slots)
            self._slots.clear()
            self._free.clear()
        _remove_all(self._root, slots)
        return slots


def _remove_all(root: Path, slots: list[SharedMemorySlot]) -> None:
    for slot in slots:
        _remove(root, slot)


def _remove(root: Path, slot: SharedMemorySlot) -> None:
    os.close(slot.fd)
    (root / slot.region).unlink(missing_ok=True)
