"""Triton's system shared-memory extension: tensors that travel through POSIX shared memory instead of the messages.

A client on the same host (or in the same pod, through a shared ``/dev/shm``) creates a shared-memory object, registers
a named region of it, and then names that region in an input's or a requested output's parameters
(``shared_memory_region``, ``shared_memory_byte_size``, optional ``shared_memory_offset``). The server then reads the
input from, and writes the output into, memory both processes map: a batch's pixels are neither serialised into
protobuf nor carried through gRPC.

Off unless the server runs with ``allow_shared_memory``: a registered key lets a caller read and write any
shared-memory object the server's user may open, so enable it only for trusted clients that share the host.

Tensors are copied in and out with pread/pwrite on the object, not through a mapping: a client that truncates its
object while it is registered then gets an error, where a mapping would kill the server with SIGBUS. The copy costs
what reading a mapping would (the input is copied once more anyway, into the normalised batch), and it leaves the
request a private input that the client cannot change while the model runs.

A region holds its own open descriptor. Unregistering a region only forgets its name: a request that resolved the
region before keeps a valid descriptor until it is done, and the descriptor is closed when the last reference goes.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ttaserve.protocol import kserve_v2_pb2 as pb

from .errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted, Unimplemented

#: where Linux keeps POSIX shared-memory objects (shm_open's namespace)
SHM_ROOT = Path("/dev/shm")
REGION_PARAMETER = "shared_memory_region"
BYTE_SIZE_PARAMETER = "shared_memory_byte_size"
OFFSET_PARAMETER = "shared_memory_offset"
PARAMETERS = (REGION_PARAMETER, BYTE_SIZE_PARAMETER, OFFSET_PARAMETER)
MAX_REGIONS = 1024
#: an shm_open name, leading slashes aside: one path component
_OBJECT_NAME = re.compile(r"[A-Za-z0-9._+-]{1,255}")
_DISABLED = "system shared memory is disabled on this server; start it with --allow-shared-memory"


@dataclass(frozen=True, eq=False)
class SharedMemoryRegion:
    """A registered region: ``byte_size`` bytes at ``offset`` of the shared-memory object ``key``."""

    name: str
    key: str
    offset: int
    byte_size: int
    writable: bool
    file: io.FileIO

    def read(self, offset: int, byte_size: int, what: str) -> memoryview:
        """A private copy of the bytes a tensor occupies."""
        self.check_bounds(offset, byte_size, what)
        buffer = bytearray(byte_size)
        done = 0
        while done < byte_size:
            with self._io_errors(what):
                count = os.preadv(self.file.fileno(), [memoryview(buffer)[done:]], self.offset + offset + done)
            if count == 0:
                raise InvalidArgument(
                    f"{what}: shared-memory object {self.key!r} ends before byte {self.offset + offset + done} "
                    f"(truncated after region '{self.name}' was registered?)"
                )
            done += count
        return memoryview(buffer)

    def write(self, offset: int, data: bytes, what: str) -> None:
        if not self.writable:
            raise InvalidArgument(
                f"{what}: shared-memory region '{self.name}' is read-only (the server may not write key {self.key!r})"
            )
        self.check_bounds(offset, len(data), what)
        view, position = memoryview(data), self.offset + offset
        while view:
            with self._io_errors(what):
                count = os.pwrite(self.file.fileno(), view, position)
            view, position = view[count:], position + count

    @contextmanager
    def _io_errors(self, what: str) -> Iterator[None]:
        """An I/O error on the object (a full /dev/shm, say) as a status that names it."""
        try:
            yield
        except OSError as exc:
            error = ResourceExhausted if exc.errno == errno.ENOSPC else InvalidArgument
            raise error(f"{what}: shared-memory object {self.key!r}: {exc.strerror}") from None

    def check_bounds(self, offset: int, byte_size: int, what: str) -> None:
        if offset < 0 or byte_size < 0 or offset + byte_size > self.byte_size:
            raise InvalidArgument(
                f"{what}: bytes [{offset}, {offset + byte_size}) lie outside shared-memory region '{self.name}' "
                f"of {self.byte_size} bytes"
            )


@dataclass(frozen=True)
class SharedMemorySlice:
    """Where one tensor lies: ``byte_size`` bytes at ``offset`` of a region (resolved when the request is parsed)."""

    region: SharedMemoryRegion
    offset: int
    byte_size: int

    def read(self, what: str) -> memoryview:
        return self.region.read(self.offset, self.byte_size, what)

    def write(self, data: bytes, what: str) -> None:
        if len(data) > self.byte_size:
            raise InvalidArgument(f"{what}: needs {len(data)} bytes, shared_memory_byte_size gives {self.byte_size}")
        self.region.write(self.offset, data, what)


class SharedMemoryRegistry:
    """The regions clients registered, by name (one namespace for every caller, as in Triton)."""

    def __init__(self, enabled: bool, root: Path = SHM_ROOT, max_regions: int = MAX_REGIONS) -> None:
        self.enabled = enabled
        self._root = root
        self._max_regions = max_regions
        self._regions: dict[str, SharedMemoryRegion] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: int, byte_size: int) -> SharedMemoryRegion:
        self._check_enabled()
        if not name:
            raise InvalidArgument("shared-memory region: 'name' is empty")
        if byte_size <= 0:
            raise InvalidArgument(f"shared-memory region '{name}': byte_size must be positive, got {byte_size}")
        with self._lock:
            if name in self._regions:
                raise AlreadyExists(f"shared-memory region '{name}' is already registered; unregister it first")
            if len(self._regions) >= self._max_regions:
                raise ResourceExhausted(
                    f"shared-memory region '{name}': {self._max_regions} regions are registered already"
                )
            region = self._map(name, key, offset, byte_size)
            self._regions[name] = region
        return region

    def unregister(self, name: str) -> None:
        """Forget one region, or every region when ``name`` is empty; an unknown name is no error (as in Triton)."""
        self._check_enabled()
        with self._lock:
            if name:
                self._regions.pop(name, None)
            else:
                self._regions.clear()

    def status(self, name: str) -> list[SharedMemoryRegion]:
        """One region, or every region when ``name`` is empty."""
        self._check_enabled()
        with self._lock:
            if not name:
                return list(self._regions.values())
            return [self._get(name)]

    def locate(self, parameters: Mapping[str, pb.InferParameter], what: str) -> SharedMemorySlice | None:
        """The slice a tensor's parameters name, or None when they name none."""
        if not any(p in parameters for p in PARAMETERS):
            return None
        self._check_enabled()
        if REGION_PARAMETER not in parameters or BYTE_SIZE_PARAMETER not in parameters:
            raise InvalidArgument(
                f"{what}: shared memory needs both '{REGION_PARAMETER}' and '{BYTE_SIZE_PARAMETER}' "
                f"('{OFFSET_PARAMETER}' is optional)"
            )
        region_name = _typed(parameters, REGION_PARAMETER, "string_param", what)
        byte_size = _typed(parameters, BYTE_SIZE_PARAMETER, "int64_param", what)
        offset = _typed(parameters, OFFSET_PARAMETER, "int64_param", what) if OFFSET_PARAMETER in parameters else 0
        with self._lock:
            region = self._get(region_name)
        region.check_bounds(offset, byte_size, what)  # now, before anything runs
        return SharedMemorySlice(region, offset, byte_size)

    def _get(self, name: str) -> SharedMemoryRegion:
        region = self._regions.get(name)
        if region is None:
            known = ", ".join(sorted(self._regions)) or "none"
            raise NotFound(f"shared-memory region '{name}' is not registered; registered: {known}")
        return region

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise Unimplemented(_DISABLED)

    def _map(self, name: str, key: str, offset: int, byte_size: int) -> SharedMemoryRegion:
        object_name = key.lstrip("/")
        if not _OBJECT_NAME.fullmatch(object_name) or object_name in (".", ".."):
            raise InvalidArgument(
                f"shared-memory region '{name}': key {key!r} is not a shared-memory object name "
                "('/' followed by letters, digits, '.', '_', '+' or '-')"
            )
        path = self._root / object_name
        try:
            file = _open(path)
        except FileNotFoundError:
            raise NotFound(f"shared-memory region '{name}': no shared-memory object {key!r} ({path})") from None
        except OSError as exc:
            raise InvalidArgument(f"shared-memory region '{name}': cannot open key {key!r}: {exc.strerror}") from None
        info = os.fstat(file.fileno())
        problem = ""
        if not stat.S_ISREG(info.st_mode):
            problem = f"key {key!r} is not a shared-memory object"
        elif offset + byte_size > info.st_size:
            problem = f"offset {offset} + byte_size {byte_size} is beyond the {info.st_size} bytes of key {key!r}"
        if problem:
            file.close()
            raise InvalidArgument(f"shared-memory region '{name}': {problem}")
        return SharedMemoryRegion(name, key, offset, byte_size, file.writable(), file)


def _open(path: Path) -> io.FileIO:
    """Open read-write where the server may, else read-only (such a region can carry inputs only); never through a
    symbolic link."""
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return io.FileIO(os.open(path, os.O_RDWR | flags), "r+")
    except PermissionError:
        return io.FileIO(os.open(path, os.O_RDONLY | flags), "r")


def _typed(parameters: Mapping[str, pb.InferParameter], key: str, kind: str, what: str) -> str | int:
    param = parameters[key]
    if param.WhichOneof("parameter_choice") != kind:
        expected = "a string" if kind == "string_param" else "an integer"
        raise InvalidArgument(f"{what}: parameter '{key}' must be {expected}")
    return getattr(param, kind)
