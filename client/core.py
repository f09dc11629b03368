"""Connection settings and per-server caches shared by ``Client`` and ``AsyncClient``.

Both clients need the same things before a call: the channel target and options (explicit message limits: a batch
of images is easily above gRPC's 4 MiB default), the caller metadata, the effective deadline, and two lookups
worth caching per client: the server's only model (for ``model=None``) and each model's input name and layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

import grpc

from ttaserve.protocol import kserve_v2_pb2 as pb
from ttaserve.protocol.adaptation_pb2_grpc import AdaptationStub
from ttaserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub

from . import codec
from .codec import InputTarget, SequenceFlags, call_metadata, channel_options, channel_target
from .session import SessionCore
from .shared_memory import SharedMemoryPool, SharedMemorySlot
from .tls import PemSource, client_tls

DEFAULT_URL = "localhost:8001"


@dataclass(frozen=True)
class PreparedInfer:
    request: pb.ModelInferRequest
    #: the shared-memory slot holding the batch (None: the batch is in the request)
    slot: SharedMemorySlot | None
    #: the slot is new: register it with this request before the call
    register: pb.SystemSharedMemoryRegisterRequest | None


class ClientCore:
    def __init__(
        self,
        url: str,
        *,
        timeout_s: float | None,
        tls: bool,
        root_certificates: PemSource | None,
        certificate_chain: PemSource | None,
        private_key: PemSource | None,
        server_name: str | None,
        caller: str | None,
        max_message_mb: int,
        retries: int,
    ) -> None:
        if max_message_mb <= 0:
            raise ValueError(f"max_message_mb must be positive, not {max_message_mb}")
        self.target = channel_target(url)
        self.options = channel_options(max_message_mb, retries)
        settings = client_tls(
            url,
            tls=tls,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            server_name=server_name,
        )
        self.credentials = None if settings is None else settings.credentials()
        if settings is not None:
            self.options += settings.options()
        self.timeout_s = timeout_s
        self.caller = caller
        self.default_model: str | None = None
        self.inputs: dict[tuple[str, str], InputTarget] = {}

    def timeout(self, timeout_s: float | None) -> float | None:
        """A per-call deadline wins over the client's default; None means no deadline."""
        return self.timeout_s if timeout_s is None else timeout_s

    def metadata(self, session: tuple[tuple[str, str], ...] | None = None) -> tuple[tuple[str, str], ...]:
        """A session's metadata (caller plus routing key) or, outside sessions, just the caller."""
        return session if session is not None else call_metadata(self.caller)


class ClientBase:
    """What ``Client`` and ``AsyncClient`` share: settings, the channel and the two service stubs. ``_channels`` is
    the module whose ``secure_channel`` / ``insecure_channel`` make the channel (``grpc`` or ``grpc.aio``)."""

    _channels: ClassVar[ModuleType] = grpc

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout_s: float | None = None,
        tls: bool = False,
        root_certificates: PemSource | None = None,
        certificate_chain: PemSource | None = None,
        private_key: PemSource | None = None,
        server_name: str | None = None,
        caller: str | None = None,
        max_message_mb: int = 256,
        retries: int = 2,
        shared_memory: bool = False,
    ) -> None:
        """TLS is on with ``tls=True``, a ``grpcs://`` URL, or any certificate argument: ``root_certificates``
        verifies the server (default: the system's roots), ``certificate_chain`` and ``private_key`` identify this
        client to a server that requires mutual TLS, ``server_name`` is the name the server's certificate must
        carry when it is not the URL's host. ``shared_memory=True`` (a client on the server's host, a server run
        with ``--allow-shared-memory``) passes each batch through /dev/shm instead of the request message
        (client/shared_memory.py). A call that fails with UNAVAILABLE (the connection was lost, the server is
        draining) is tried again up to ``retries`` times (at most 4; 0: never) inside its deadline: reads, and
        ModelInfer, which a session makes safe to repeat with its request ids (``codec.RETRIED_METHODS``)."""
        self._shared_memory = SharedMemoryPool() if shared_memory else None
        core = self._core = ClientCore(
            url,
            timeout_s=timeout_s,
            tls=tls,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            server_name=server_name,
            caller=caller,
            max_message_mb=max_message_mb,
            retries=retries,
        )
        if core.credentials is not None:
            self._channel = self._channels.secure_channel(core.target, core.credentials, options=core.options)
        else:
            self._channel = self._channels.insecure_channel(core.target, options=core.options)
        self._inference = GRPCInferenceServiceStub(self._channel)
        self._adaptation = AdaptationStub(self._channel)

    @property
    def caller(self) -> str | None:
        return self._core.caller

    def _prepare_infer(
        self,
        images: codec.Images,
        target: InputTarget,
        model: str,
        version: str,
        strategy: str,
        top_k: int,
        settings: Mapping[str, bool | int | float | str] | None,
        session: SessionCore | None,
        flags: SequenceFlags | None,
    ) -> PreparedInfer:
        """The ModelInfer request (a session's with its request id); with shared memory on, the batch is written
        into a lent slot first."""
        encoded = codec.encode_images(images, target)
        slot, new = None, False
        if self._shared_memory is not None:
            slot, new = self._shared_memory.acquire(len(encoded.raw))
            slot.write(encoded.raw)
        request = codec.build_infer_request(
            model,
            target,
            encoded,
            version=version,
            strategy=strategy,
            top_k=top_k,
            settings=settings,
            sequence=flags,
            shared_memory_region=slot.region if slot is not None else None,
            request_id=session.request_id(encoded) if session is not None else "",
        )
        register = (
            pb.SystemSharedMemoryRegisterRequest(name=slot.region, key=slot.key, byte_size=slot.byte_size)
            if slot is not None and new
            else None
        )
        return PreparedInfer(request, slot, register)

    def _finish_infer(self, prepared: PreparedInfer, registered: bool) -> None:
        """Give the slot back for the next request, or drop it when the server refused to register it."""
        if prepared.slot is None or self._shared_memory is None:
            return
        if registered:
            self._shared_memory.release(prepared.slot)
        else:
            self._shared_memory.discard(prepared.slot)

    def _close_slots(self) -> list[SharedMemorySlot]:
        """Remove this client's objects; the caller unregisters the returned slots from the server."""
        return self._shared_memory.close() if self._shared_memory is not None else []

    @staticmethod
    def _unregister_request(slot: SharedMemorySlot) -> pb.SystemSharedMemoryUnregisterRequest:
        return pb.SystemSharedMemoryUnregisterRequest(name=slot.region)
