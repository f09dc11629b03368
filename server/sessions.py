"""Per-stream adaptation sessions.

A session is keyed by (caller, model, strategy, sequence id) and holds one stream's adaptation state. Its requests
run one at a time in the order they reached it (a FIFO ticket lock, not a plain mutex, which promises no order).
Sessions end explicitly (``sequence_end``), expire after an idle timeout, are evicted least-recently-used when the
table is full, or are dropped when their model is unloaded or reloaded. Snapshots are ``torch.save`` files of plain
tensors, restorable on this or another replica.

A session's last applied request that carried an id is kept with it (and in its snapshots, and for a while after
the session ended), so that a client retrying a step whose answer it lost is answered again instead of adapting on
the same batch twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ttaserve.adapters import AdapterState, StrategyConfig, get_strategy_class

from .errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionKey:
    caller: str
    model: str
    strategy: str
    sequence_id: str

    def digest(self) -> str:
        """A file-name-safe id for snapshots."""
        text = json.dumps([self.caller, self.model, self.strategy, self.sequence_id])
        return hashlib.sha256(text.encode()).hexdigest()[:32]


class FifoLock:
    """A lock granted in request order, that a waiter may stop waiting for.

    A waiter that gives up (its ``give_up`` returns an exception: the client left, or its deadline passed) leaves its
    place in the line and raises that exception at once, instead of waiting behind a long adaptation step for an
    answer nobody will read; the turn it held is skipped when it comes."""

    #: how often a waiter asks ``give_up`` (a cancel is noticed at most this late)
    POLL_S = 0.02

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self._left: set[int] = set()  # tickets whose waiter gave up

    @contextmanager
    def hold(self, give_up: Callable[[], BaseException | None] | None = None) -> Iterator[None]:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._cond.wait(None if give_up is None else self.POLL_S)
                reason = None if give_up is None or ticket == self._serving else give_up()
                if reason is not None:
                    self._left.add(ticket)
                    raise reason
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                while self._serving in self._left:
                    self._left.remove(self._serving)
                    self._serving += 1
                self._cond.notify_all()


@dataclass(frozen=True)
class AppliedRequest:
    """A session step that carried a request id, and what it answered."""

    id: str
    #: digest of the request's preprocessed inputs: a retry must carry the same batch
    digest: bytes
    logits: np.ndarray
    variant: str
    stats: dict[str, float]
    steps: int
    event: str

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "digest": self.digest,
            "logits": torch.from_numpy(self.logits),
            "variant": self.variant,
            "stats": dict(self.stats),
            "steps": self.steps,
            "event": self.event,
        }

    @classmethod
    def from_dict(cls, data: dict) -> AppliedRequest:
        return cls(
            id=str(data["id"]),
            digest=bytes(data["digest"]),
            logits=data["logits"].numpy(),
            variant=str(data["variant"]),
            stats={k: float(v) for k, v in data["stats"].items()},
            steps=int(data["steps"]),
            event=str(data["event"]),
        )


@dataclass
class Session:
    key: SessionKey
    model_version: int
    settings: StrategyConfig
    state: AdapterState
    #: ``LoadedModel.serial`` of the loaded model this state belongs to (0: not bound yet)
    model_serial: int = 0
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    resets: int = 0
    last_stats: dict[str, float] = field(default_factory=dict)
    #: running (EMA) mean of the predicted class probabilities, for the collapse guard
    marginal: torch.Tensor | None = None
    lock: FifoLock = field(default_factory=FifoLock, repr=False)
    ended: bool = False
    #: the last applied request that carried an id
    last_request: AppliedRequest | None = field(default=None, repr=False)

    @property
    def steps(self) -> int:
        return self.state.steps

    def state_bytes(self) -> int:
        extra = 0 if self.marginal is None else self.marginal.numel() * self.marginal.element_size()
        return self.state.nbytes() + extra


EvictionListener = Callable[[Session, str], None]


class SessionTable:
    """All live sessions, with LRU eviction, idle expiry and snapshot files."""

    def __init__(
        self,
        max_sessions: int,
        idle_timeout_s: float,
        snapshot_dir: Path,
        on_removed: EvictionListener | None = None,
    ) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.snapshot_dir = snapshot_dir
        self._on_removed = on_removed
        self._lock = threading.Lock()
        self._sessions: OrderedDict[SessionKey, Session] = OrderedDict()
        #: the last request of sessions that a request ended (as many as there may be live sessions), for a retry
        #: of that request; dropped when a new session takes the key
        self._ended: OrderedDict[SessionKey, AppliedRequest] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def get(self, key: SessionKey) -> Session | None:
        with self._lock:
            session = self._sessions.get(key)
            if session is not None:
                self._sessions.move_to_end(key)
            return session

    def require(self, key: SessionKey) -> Session:
        session = self.get(key)
        if session is None:
            raise NotFound(
                f"no session for caller '{key.caller}', model '{key.model}', strategy '{key.strategy}', "
                f"sequence id '{key.sequence_id}'"
            )
        return session

    def add(self, session: Session) -> None:
        evicted: list[Session] = []
        with self._lock:
            self._ended.pop(session.key, None)
            self._sessions[session.key] = session
            self._sessions.move_to_end(session.key)
            while len(self._sessions) > self.max_sessions:
                _, oldest = self._sessions.popitem(last=False)
                evicted.append(oldest)
        for old in evicted:
            old.ended = True
            log.info("session %s evicted (table full: %d)", old.key, self.max_sessions)
            self._notify(old, "evicted")

    def remove(self, key: SessionKey, reason: str) -> Session | None:
        with self._lock:
            session = self._sessions.pop(key, None)
            if session is not None and reason == "ended" and session.last_request is not None:
                self._ended[key] = session.last_request
                while len(self._ended) > self.max_sessions:
                    self._ended.popitem(last=False)
        if session is not None:
            session.ended = True
            self._notify(session, reason)
        return session

    def ended_request(self, key: SessionKey) -> AppliedRequest | None:
        """The last request of the session under ``key`` that a request ended, if no session took the key since."""
        with self._lock:
            return self._ended.get(key)

    def discard(self, session: Session, reason: str) -> None:
        """End ``session`` and remove it if it is still the live one under its key (a newer one there stays)."""
        with self._lock:
            if self._sessions.get(session.key) is not session:
                session.ended = True
                return
            del self._sessions[session.key]
        session.ended = True
        self._notify(session, reason)

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def drop_model(self, model: str, reason: str) -> int:
        """End every session of ``model`` (all versions) and delete its snapshot; returns how many went.

        For a model that was unloaded or reloaded: a session's state was adapted from weights that are no longer
        served, so neither the live state nor its snapshot may carry on. A request waiting in a dropped session's
        queue finds it ended and gets NOT_FOUND.
        """
        with self._lock:
            keys = [key for key in self._sessions if key.model == model]
        dropped = [key for key in keys if self.remove(key, reason) is not None]
        for key in dropped:
            self.delete_snapshot(key)
        return len(dropped)

    def expire_idle(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self._lock:
            stale = [k for k, s in self._sessions.items() if now - s.last_used > self.idle_timeout_s]
        return sum(1 for key in stale if self.remove(key, "expired") is not None)

    def total_state_bytes(self) -> int:
        return sum(s.state_bytes() for s in self.sessions())

    def _notify(self, session: Session, reason: str) -> None:
        if self._on_removed is not None:
            self._on_removed(session, reason)

    # --- snapshots -------------------------------------------------------------------------------------------

    def snapshot_path(self, key: SessionKey) -> Path:
        return self.snapshot_dir / f"{key.digest()}.pt"

    def snapshot(self, session: Session) -> Path:
        """Write the session atomically (temp file + rename) so a crash never leaves half a snapshot."""
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        path = self.snapshot_path(session.key)
        payload = snapshot_payload(session)
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        return path

    def read_snapshot(self, key: SessionKey) -> dict | None:
        path = self.snapshot_path(key)
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def delete_snapshot(self, key: SessionKey) -> None:
        self.snapshot_path(key).unlink(missing_ok=True)


def snapshot_payload(session: Session) -> dict:
    key = session.key
    return {
        "format": 1,
        "key": [key.caller, key.model, key.strategy, key.sequence_id],
        "model_version": session.model_version,
        "settings": session.settings.model_dump_json(),
        "state": session.state.to_dict(),
        "created": session.created,
        "resets": session.resets,
        "marginal": None if session.marginal is None else session.marginal.cpu(),
        "last_stats": dict(session.last_stats),
        "last_request": None if session.last_request is None else session.last_request.to_dict(),
    }


def session_from_payload(
    payload: dict, state_cls: type[AdapterState], device: torch.device, model_serial: int
) -> Session:
    """Rebuild a session from ``snapshot_payload`` for the loaded model ``model_serial``; refuses snapshots of
    another format or strategy."""
    if payload.get("format") != 1:
        raise InvalidArgument(f"snapshot format {payload.get('format')!r} is not supported (expected 1)")
    caller, model, strategy, sequence_id = payload["key"]
    key = SessionKey(caller, model, strategy, sequence_id)
    config_cls = get_strategy_class(strategy).config_cls
    try:
        state = state_cls.from_dict(payload["state"], device)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"snapshot of session {key} does not fit strategy '{strategy}': {exc}") from None
    marginal = payload.get("marginal")
    last_request = payload.get("last_request")
    return Session(
        key=key,
        model_version=int(payload["model_version"]),
        model_serial=model_serial,
        settings=config_cls.model_validate_json(payload["settings"]),
        state=state,
        created=float(payload["created"]),
        resets=int(payload["resets"]),
        marginal=None if marginal is None else marginal.to(device),
        last_stats={k: float(v) for k, v in payload.get("last_stats", {}).items()},
        last_request=None if last_request is None else AppliedRequest.from_dict(last_request),
    )


def marginal_entropy(marginal: torch.Tensor) -> float:
    p = marginal.clamp_min(1e-12)
    return float(-(p * p.log()).sum())
