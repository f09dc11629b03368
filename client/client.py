"""The synchronous SDK: one gRPC channel to a ttaserve (or any KServe v2) server, typed results, typed errors."""

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


class Client(ClientBase):
    """``Client("localhost:8001").classify(images)``; thread-safe (one channel, many concurrent calls)."""

    _channels = grpc

    def _call(
        self,
        method: Callable[..., Any],
        request: Any,
        timeout_s: float | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> Any:
        try:
            return method(request, timeout=self._core.timeout(timeout_s), metadata=self._core.metadata(metadata))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    # --- server and models ---

    def live(self) -> bool:
        return self._call(self._inference.ServerLive, pb.ServerLiveRequest()).live

    def ready(self) -> bool:
        return self._call(self._inference.ServerReady, pb.ServerReadyRequest()).ready

    def models(self) -> list[ModelEntry]:
        return codec.parse_index(self._call(self._inference.RepositoryIndex, pb.RepositoryIndexRequest()))

    def metadata(self, model: str | None = None, version: str | None = None) -> ModelMetadata:
        request = pb.ModelMetadataRequest(name=self._resolve_model(model), version=version or "")
        return codec.parse_metadata(self._call(self._inference.ModelMetadata, request))

    def list_strategies(self, model: str | None = None) -> list[Strategy]:
        request = apb.ListStrategiesRequest(model_name=model or "")
        return codec.parse_strategies(self._call(self._adaptation.ListStrategies, request))

    def _resolve_model(self, model: str | None) -> str:
        if model:
            return model
        if self._core.default_model is None:
            self._core.default_model = codec.choose_model(self.models())
        return self._core.default_model

    def _input(self, model: str, version: str) -> codec.InputTarget:
        key = (model, version)
        if key not in self._core.inputs:
            self._core.inputs[key] = codec.input_target(self.metadata(model, version))
        return self._core.inputs[key]

    # --- inference ---

    def classify(
        self,
        images: codec.Images,
        model: str | None = None,
        strategy: str = "none",
        top_k: int = 5,
        settings: Settings | None = None,
        version: str | None = None,
        timeout_s: float | None = None,
    ) -> BatchResult:
        """Classify one image or a batch (see ``codec.Images``); a fresh adaptation state per call."""
        return self._infer(images, self._resolve_model(model), strategy, top_k, settings, version or "", timeout_s)

    def _infer(
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
        target = self._input(model, version)
        flags = session.next_flags(end) if session is not None else None
        prepared = self._prepare_infer(images, target, model, version, strategy, top_k, settings, session, flags)
        metadata = session.metadata if session is not None else None
        registered = prepared.register is None
        try:
            if prepared.register is not None:
                self._call(self._inference.SystemSharedMemoryRegister, prepared.register)
                registered = True
            response = self._call(self._inference.ModelInfer, prepared.request, timeout_s, metadata)
        finally:
            self._finish_infer(prepared, registered)
        result = codec.parse_infer_response(response, top_k)
        if session is not None and flags is not None:
            session.record(flags)
        return result

    # --- sessions ---

    def session(
        self,
        sequence_id: str,
        model: str | None = None,
        strategy: str = "none",
        settings: Settings | None = None,
        version: str | None = None,
        *,
        resume: bool = False,
    ) -> Session:
        """A stream whose adaptation state the server keeps across requests; use it as a context manager.

        The first batch starts the session afresh (``sequence_start``), unless ``resume``: then it continues the
        state the server holds under this id (a program that restarted picks up where it left off), or starts one
        if there is none."""
        model = self._resolve_model(model)
        core = SessionCore(
            self.caller, model, str(sequence_id), strategy, dict(settings or {}), version or "", started=resume
        )
        return Session(self, core)

    def sessions(self, model: str | None = None, all_callers: bool = False) -> list[SessionInfo]:
        request = apb.ListSessionsRequest(model_name=model or "", all_callers=all_callers)
        return [codec.parse_session(s) for s in self._call(self._adaptation.ListSessions, request).sessions]

    # --- lifetime ---

    def close(self) -> None:
        for slot in self._close_slots():
            with contextlib.suppress(TtaserveError):
                self._call(self._inference.SystemSharedMemoryUnregister, self._unregister_request(slot))
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Session:
    """One adaptation session; ``with client.session("cam-1") as s: s.classify(batch)`` ends it on exit."""

    def __init__(self, client: Client, core: SessionCore) -> None:
        self._client = client
        self._core = core

    @property
    def sequence_id(self) -> str:
        return self._core.sequence_id

    @property
    def model(self) -> str:
        return self._core.model

    def classify(
        self, images: codec.Images, *, top_k: int = 5, timeout_s: float | None = None, end: bool = False
    ) -> BatchResult:
        """Classify and adapt; ``end=True`` sends ``sequence_end`` with this batch."""
        core = self._core
        return self._client._infer(
            images, core.model, core.strategy, top_k, core.settings, core.version, timeout_s, core, end
        )

    def _adapt(self, rpc: str, request_type: Callable[..., Any], **fields: Any) -> Any:
        method = getattr(self._client._adaptation, rpc)
        return self._client._call(method, request_type(key=self._core.key, **fields), metadata=self._core.metadata)

    def info(self) -> SessionInfo:
        return codec.parse_session(self._adapt("GetSession", apb.GetSessionRequest).session)

    def reset(self) -> SessionInfo:
        """Drop the adapted state; the next batch starts again from the source model."""
        return codec.parse_session(self._adapt("ResetSession", apb.ResetSessionRequest).session)

    def snapshot(self, return_data: bool = False) -> Snapshot:
        response = self._adapt("SnapshotSession", apb.SnapshotSessionRequest, return_data=return_data)
        return Snapshot(response.path, response.byte_size, response.data)

    def restore(self, data: bytes = b"") -> SessionInfo:
        """Load a snapshot (bytes from ``snapshot(return_data=True)``, else the server's latest one)."""
        info = codec.parse_session(self._adapt("RestoreSession", apb.RestoreSessionRequest, data=data).session)
        self._core.started = True
        return info

    def end(self) -> None:
        """Free the server's state now; a session that never sent a request has nothing to free."""
        if self._core.needs_end:
            self._adapt("EndSession", apb.EndSessionRequest)
        self._core.ended = True

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # NOT_FOUND: already evicted (idle timeout) or ended by the server, nothing left to free
        with contextlib.suppress(NotFound):
            self.end()
