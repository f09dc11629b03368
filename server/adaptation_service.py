"""``ttaserve.v1.Adaptation``: strategies and their schemas, and the sessions' lifecycle (inspect, reset, end,
snapshot, restore)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import TypeVar

import grpc
import torch

from ttaserve.adapters import get_strategy_class, strategy_names
from ttaserve.protocol import adaptation_pb2 as apb
from ttaserve.protocol import adaptation_pb2_grpc

from .errors import InvalidArgument, NotFound, ServingError
from .inference_service import caller_of, deadline_of, visible_to
from .loaded_model import LoadedModel
from .metrics import Metrics
from .repository import ModelRepository
from .sessions import Session, SessionKey, SessionSummary, SessionTable, no_session, snapshot_payload
from .sessions import session_from_payload as restore_payload
from .warmup import initial_state

T = TypeVar("T")


def session_info(summary: SessionSummary) -> apb.SessionInfo:
    key = summary.key
    return apb.SessionInfo(
        key=apb.SessionKey(caller=key.caller, model_name=key.model, strategy=key.strategy, sequence_id=key.sequence_id),
        steps=summary.steps,
        state_bytes=summary.state_bytes,
        last_stats=summary.last_stats,
        settings_json=summary.settings_json,
        created_unix=summary.created,
        last_used_unix=summary.last_used,
        resets=summary.resets,
        model_version=str(summary.model_version),
        spilled=summary.spilled,
    )


class AdaptationServicer(adaptation_pb2_grpc.AdaptationServicer):
    def __init__(self, repository: ModelRepository, sessions: SessionTable, metrics: Metrics) -> None:
        self.repository = repository
        self.sessions = sessions
        self.metrics = metrics

    def _call(self, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ServingError as exc:
            context.abort(exc.code, exc.message)
        raise AssertionError("unreachable")

    def _key(self, key: apb.SessionKey, context: grpc.ServicerContext) -> SessionKey:
        if not key.model_name or not key.sequence_id:
            raise InvalidArgument("session key needs model_name and sequence_id")
        strategy = key.strategy or "none"
        if strategy not in strategy_names():
            raise InvalidArgument(f"unknown strategy {strategy!r}; allowed: {', '.join(strategy_names())}")
        return SessionKey(caller_of(context, key.caller), key.model_name, strategy, key.sequence_id)

    def _session(self, key: SessionKey) -> Session:
        """The live session under ``key``, or the one the table spilled to disk, brought back."""
        session = self.sessions.get(key)
        if session is None and self.sessions.spilled(key):
            model = self.repository.get(key.model)
            session = self.sessions.restore(key, model.strategy(key.strategy).state_cls, model.device, model.serial)
        if session is None:
            return self.sessions.require(key)
        return session

    def ListStrategies(
        self, request: apb.ListStrategiesRequest, context: grpc.ServicerContext
    ) -> apb.ListStrategiesResponse:
        def build() -> apb.ListStrategiesResponse:
            model = self.repository.get(request.model_name) if request.model_name else None
            response = apb.ListStrategiesResponse()
            for name in strategy_names():
                cls = get_strategy_class(name)
                if model is not None and not _runs_on(cls.requires, name, model):
                    continue
                response.strategies.add(
                    name=name,
                    description=cls.description(),
                    config_schema_json=json.dumps(cls.config_cls.model_json_schema()),
                    defaults_json=cls.config_cls().model_dump_json(),
                    stateful=cls.stateful,
                    uses_gradients=cls.uses_gradients,
                    requires=list(cls.requires),
                )
            return response

        return self._call(context, build)

    def ListSessions(self, request: apb.ListSessionsRequest, context: grpc.ServicerContext) -> apb.ListSessionsResponse:
        caller = caller_of(context)
        response = apb.ListSessionsResponse()
        for summary in self.sessions.summaries():
            key = summary.key
            if request.model_name and key.model != request.model_name:
                continue
            if key.caller != caller and not (request.all_callers and visible_to(context, key.caller)):
                continue
            response.sessions.append(session_info(summary))
        return response

    def GetSession(self, request: apb.GetSessionRequest, context: grpc.ServicerContext) -> apb.GetSessionResponse:
        """A spilled session is described as it was when it left memory, and stays on disk."""

        def get() -> apb.GetSessionResponse:
            key = self._key(request.key, context)
            summary = self.sessions.summary(key)
            if summary is None:
                raise no_session(key)
            return apb.GetSessionResponse(session=session_info(summary))

        return self._call(context, get)

    def ResetSession(self, request: apb.ResetSessionRequest, context: grpc.ServicerContext) -> apb.ResetSessionResponse:
        def reset() -> apb.ResetSessionResponse:
            key = self._key(request.key, context)
            session = self._session(key)
            model = self.repository.get(key.model)
            strategy = model.strategy(key.strategy)
            with session.lock.hold():
                session.state = initial_state(model, strategy, session.settings, deadline_of(context))
                session.model_version, session.model_serial = model.version, model.serial
                session.marginal = None
                session.resets += 1
                session.last_stats = {}
                session.last_request = None
            self.metrics.session_resets.labels(key.model, key.strategy, "manual").inc()
            return apb.ResetSessionResponse(session=session_info(session.summary()))

        return self._call(context, reset)

    def EndSession(self, request: apb.EndSessionRequest, context: grpc.ServicerContext) -> apb.EndSessionResponse:
        def end() -> apb.EndSessionResponse:
            key = self._key(request.key, context)
            if not self.sessions.remove(key, "ended"):
                raise NotFound(f"no session {key.sequence_id!r} of model '{key.model}' and strategy '{key.strategy}'")
            self.sessions.delete_snapshot(key)
            return apb.EndSessionResponse()

        return self._call(context, end)

    def SnapshotSession(
        self, request: apb.SnapshotSessionRequest, context: grpc.ServicerContext
    ) -> apb.SnapshotSessionResponse:
        def snapshot() -> apb.SnapshotSessionResponse:
            session = self._session(self._key(request.key, context))
            with session.lock.hold():
                path = self.sessions.snapshot(session)
                data = b""
                if request.return_data:
                    buffer = io.BytesIO()
                    torch.save(snapshot_payload(session), buffer)
                    data = buffer.getvalue()
            return apb.SnapshotSessionResponse(path=str(path), byte_size=path.stat().st_size, data=data)

        return self._call(context, snapshot)

    def RestoreSession(
        self, request: apb.RestoreSessionRequest, context: grpc.ServicerContext
    ) -> apb.RestoreSessionResponse:
        def restore() -> apb.RestoreSessionResponse:
            key = self._key(request.key, context)
            model = self.repository.get(key.model)
            strategy = model.strategy(key.strategy)
            if request.data:
                try:
                    payload = torch.load(io.BytesIO(request.data), map_location="cpu", weights_only=True)
                except Exception as exc:
                    raise InvalidArgument(f"snapshot data cannot be read: {exc}") from None
            else:
                payload = self.sessions.read_snapshot(key)
                if payload is None:
                    raise NotFound(f"no snapshot of session {key.sequence_id!r} in {self.sessions.snapshot_dir}")
            session = restore_payload(payload, strategy.state_cls, model.device, model.serial)
            if (session.key.model, session.key.strategy) != (key.model, key.strategy):
                raise InvalidArgument(
                    f"snapshot is of model '{session.key.model}' strategy '{session.key.strategy}', "
                    f"not '{key.model}' / '{key.strategy}'"
                )
            session.key = key
            self.sessions.add(session)
            return apb.RestoreSessionResponse(session=session_info(session.summary()))

        return self._call(context, restore)


def _runs_on(requires: tuple[str, ...], name: str, model: LoadedModel) -> bool:
    if name != "none" and model.module is None:
        return False
    if "batchnorm" in requires and not model.has_batchnorm():
        return False
    return not ("merge_partner" in requires and not model.config.merge_partner)
