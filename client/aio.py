"""The asyncio SDK: ``Client``'s methods as coroutines on a ``grpc.aio`` channel.

Request building, response parsing, caches and session bookkeeping are the sync client's (``codec``, ``core``,
``session``); only the awaiting differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import grpc

from ttaserve.protocol import adaptation_pb2 as apb
from ttaserve.protocol import kserve_v2_pb2 as pb

from . import codec
from .core import ClientBase
from .errors import NotFound, TtaserveError, from_rpc_error
from .results import BatchResult, ModelEntry, ModelMetadata, SessionInfo, Snapshot, Strategy
from .session import SessionCore

Settings = Mapping[str, bool | int | float | str]


class AsyncClient(ClientBase):
    """``async with AsyncClient("localhost:8001") as c: await c.classify(images)``."""

    _channels = grpc.aio

    async def _call(
        self,
        method: Callable[..., Any],
        request: Any,
        timeout_s: float | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> Any:
        try:
            return await method(request, timeout=self._core.timeout(timeout_s), metadata=self._core.metadata(metadata))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def live(self) -> bool:
        return (await self._call(self._inference.ServerLive, pb.ServerLiveRequest())).live

    async def ready(self) -> bool:
        return (await self._call(self._inference.ServerReady, pb.ServerReadyRequest())).ready

    async def models(self) -> list[ModelEntry]:
        return codec.parse_index(await self._call(self._inference.RepositoryIndex, pb.RepositoryIndexRequest()))

    async def metadata(self, model: str | None = None, version: str | None = None) -> ModelMetadata:
        request = pb.ModelMetadataRequest(name=await self._resolve_model(model), version=version or "")
        return codec.parse_metadata(await self._call(self._inference.ModelMetadata, request))

    async def list_strategies(self, model: str | None = None) -> list[Strategy]:
        request = apb.ListStrategiesRequest(model_name=model or "")
        return codec.parse_strategies(await self._call(self._adaptation.ListStrategies, request))

    async def _resolve_model(self, model: str | None) -> str:
        if model:
            return model
        if self._core.default_model is None:
            self._core.default_model = codec.choose_model(await self.models())
        return self._core.default_model

    async def _input(self, model: str, version: str) -> codec.InputTarget:
        key = (model, version)
        if key not in self._core.inputs:
            self._core.inputs[key] = codec.input_target(await self.metadata(model, version))
        return self._core.inputs[key]

    async def classify(
        self,
        images: codec.Images,
        model: str | None = None,
        strategy: str = "none",
        top_k: int = 5,
        settings: Settings | None = None,
        version: str | None = None,
        timeout_s: float | None = None,
    ) -> BatchResult:
        model = await self._resolve_model(model)
        return await self._infer(images, model, strategy, top_k, settings, version or "", timeout_s)

    async def _infer(
        self,
        images: codec.Images,
        model: str,
        strategy: str,
        top_k: int,
        settings: Settings | None,
        version: str,
        timeout_s: float | None,
        session: SessionCore | None = None,
        end: bool = False,
    ) -> BatchResult:
        target = await self._input(model, version)
        flags = session.next_flags(end) if session is not None else None
        prepared = self._prepare_infer(images, target, model, version, strategy, top_k, settings, session, flags)
        metadata = session.metadata if session is not None else None
        registered = prepared.register is None
        try:
            if prepared.register is not None:
                await self._call(self._inference.SystemSharedMemoryRegister, prepared.register)
                registered = True
            response = await self._call(self._inference.ModelInfer, prepared.request, timeout_s, metadata)
        finally:
            self._finish_infer(prepared, registered)
        result = codec.parse_infer_response(response, top_k)
        if session is not None and flags is not None:
            session.record(flags)
        return result

    def session(
        self,
        sequence_id: str,
        model: str | None = None,
        strategy: str = "none",
        settings: Settings | None = None,
        version: str | None = None,
        *,
        resume: bool = False,
    ) -> AsyncSession:
        """``async with client.session("cam-1") as s: await s.classify(batch)``; ``model=None`` is resolved on
        first use, since a constructor cannot await. ``resume`` as for ``Client.session``."""
        core = SessionCore(
            self.caller, model or "", str(sequence_id), strategy, dict(settings or {}), version or "", started=resume
        )
        return AsyncSession(self, core)

    async def sessions(self, model: str | None = None, all_callers: bool = False) -> list[SessionInfo]:
        request = apb.ListSessionsRequest(model_name=model or "", all_callers=all_callers)
        return [codec.parse_session(s) for s in (await self._call(self._adaptation.ListSessions, request)).sessions]

    async def close(self) -> None:
        for slot in self._close_slots():
            with contextlib.suppress(TtaserveError):
                await self._call(self._inference.SystemSharedMemoryUnregister, self._unregister_request(slot))
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSession:
    def __init__(self, client: AsyncClient, core: SessionCore) -> None:
        self._client = client
        self._core = core

    @property
    def sequence_id(self) -> str:
        return self._core.sequence_id

    async def _ready(self) -> SessionCore:
        if not self._core.model:
            self._core.model = await self._client._resolve_model(None)
        return self._core

    async def classify(
        self, images: codec.Images, *, top_k: int = 5, timeout_s: float | None = None, end: bool = False
    ) -> BatchResult:
        core = await self._ready()
        return await self._client._infer(
            images, core.model, core.strategy, top_k, core.settings, core.version, timeout_s, core, end
        )

    async def _adapt(self, rpc: str, request_type: Callable[..., Any], **fields: Any) -> Any:
        core = await self._ready()
        method = getattr(self._client._adaptation, rpc)
        return await self._client._call(method, request_type(key=core.key, **fields), metadata=core.metadata)

    async def info(self) -> SessionInfo:
        return codec.parse_session((await self._adapt("GetSession", apb.GetSessionRequest)).session)

    async def reset(self) -> SessionInfo:
        return codec.parse_session((await self._adapt("ResetSession", apb.ResetSessionRequest)).session)

    async def snapshot(self, return_data: bool = False) -> Snapshot:
        response = await self._adapt("SnapshotSession", apb.SnapshotSessionRequest, return_data=return_data)
        return Snapshot(response.path, response.byte_size, response.data)

    async def restore(self, data: bytes = b"") -> SessionInfo:
        info = codec.parse_session((await self._adapt("RestoreSession", apb.RestoreSessionRequest, data=data)).session)
        self._core.started = True
        return info

    async def end(self) -> None:
        if self._core.needs_end:
            await self._adapt("EndSession", apb.EndSessionRequest)
        self._core.ended = True

    async def __aenter__(self) -> AsyncSession:
        await self._ready()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # NOT_FOUND: already evicted (idle timeout) or ended by the server, nothing left to free
        with contextlib.suppress(NotFound):
            await self.end()
