"""Per-stream adaptation sessions.

A session is keyed by (caller, model, strategy, sequence id) and holds one stream's adaptation state. Its requests
run one at a time in the order they reached it (a FIFO ticket lock, not a plain mutex, which promises no order).
Sessions end explicitly (``sequence_end``), expire after an idle timeout, are evicted least-recently-used when the
table is full (in sessions or in bytes of state) or, with spilling on, written to disk then and restored by their
next request, or are dropped when their model is unloaded or reloaded. Snapshots are ``torch.save`` files of plain
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
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ttaserve.adapters import AdapterState, StrategyConfig, get_strategy_class

from .errors import InvalidArgument, NotFound
from .tensor_pack import pack, unpack
from .write_behind import WriteBehind

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

    @property
    def busy(self) -> bool:
        """Whether a request holds the lock or waits for it."""
        with self._cond:
            return self._next_ticket != self._serving + len(self._left)

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
    #: taken out of the table to be written to disk (spilled): a request holding it must open its key again
    evicted: bool = False
    #: bytes of state when it entered the table (what counts against ``SessionTable.max_bytes``)
    size: int = 0
    #: the last applied request that carried an id
    last_request: AppliedRequest | None = field(default=None, repr=False)

    @property
    def steps(self) -> int:
        return self.state.steps

    def state_bytes(self) -> int:
        extra = 0 if self.marginal is None else self.marginal.numel() * self.marginal.element_size()
        return self.state.nbytes() + extra

    def summary(self, spilled: bool = False) -> SessionSummary:
        return SessionSummary(
            key=self.key,
            model_version=self.model_version,
            steps=self.steps,
            resets=self.resets,
            state_bytes=self.state_bytes(),
            settings_json=self.settings.model_dump_json(),
            last_stats=dict(self.last_stats),
            created=self.created,
            last_used=self.last_used,
            spilled=spilled,
        )


@dataclass(frozen=True)
class SessionSummary:
    """What ListSessions and GetSession tell of a session. The table keeps one for each session it spilled to
    disk, so that listing or inspecting those reads no file and brings none back into memory."""

    key: SessionKey
    model_version: int
    steps: int
    resets: int
    state_bytes: int
    settings_json: str
    last_stats: dict[str, float]
    created: float
    last_used: float
    #: not in memory: written to its snapshot file (or on its way there) because the table was full
    spilled: bool


def no_session(key: SessionKey) -> NotFound:
    return NotFound(
        f"no session for caller '{key.caller}', model '{key.model}', strategy '{key.strategy}', "
        f"sequence id '{key.sequence_id}'"
    )


#: told the key and the reason whenever a session leaves the table: ended, evicted, spilled, expired, ...
EvictionListener = Callable[[SessionKey, str], None]


class SessionTable:
    """All live sessions, with LRU eviction, idle expiry and snapshot files.

    The table holds at most ``max_sessions`` sessions and, with ``max_bytes``, at most that many bytes of state;
    beyond either the least recently used idle session goes (one in the middle of a step stays until a later add).
    With ``spill`` an evicted session is not lost but written to its snapshot file, once any step on it has
    finished, and its next request restores it from there: the table is then a cache of the streams' states, and
    a fleet of streams larger than it keeps adapting, at the cost of a disk write and read per eviction. The
    writes run on a background thread (the request that overflowed the table does not wait for them) with at most
    ``SPILL_QUEUE`` waiting and, under a memory limit, at most ``SPILL_QUEUE_SHARE`` of it: so evicted sessions in
    memory exceed the limits by that much at most; ``flush`` waits for them, ``close`` too and stops the thread.
    """

    #: evicted sessions that may wait in memory for the background writer; past that the evicting request writes
    SPILL_QUEUE = 4
    #: under ``max_bytes``, the share of it that their state may take
    SPILL_QUEUE_SHARE = 0.125

    def __init__(
        self,
        max_sessions: int,
        idle_timeout_s: float,
        snapshot_dir: Path,
        on_removed: EvictionListener | None = None,
        max_bytes: int | None = None,
        spill: bool = False,
    ) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.snapshot_dir = snapshot_dir
        self.max_bytes = max_bytes
        self.spill = spill
        self._on_removed = on_removed
        self._lock = threading.Lock()
        self._sessions: OrderedDict[SessionKey, Session] = OrderedDict()
        self._bytes = 0  # the live sessions' ``size``, summed
        #: evicted sessions on their way to disk: a request for one takes it back as it is
        self._spilling: dict[SessionKey, Session] = {}
        #: each session this table spilled to disk, as it was then: for listing, and for its idle expiry there
        self._spilled: dict[SessionKey, SessionSummary] = {}
        queue_bytes = None if max_bytes is None else int(max_bytes * self.SPILL_QUEUE_SHARE)
        #: writes evicted sessions to disk in the background (``limit`` 0: in the evicting request)
        self.spill_writer = WriteBehind(self.SPILL_QUEUE, "session-spill", max_size=queue_bytes)
        #: the last request of sessions that a request ended (as many as there may be live sessions), for a retry
        #: of that request; dropped when a new session takes the key
        self._ended: OrderedDict[SessionKey, AppliedRequest] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def get(self, key: SessionKey) -> Session | None:
        """The live session under ``key`` (taken back if it is on its way to disk), or None."""
        with self._lock:
            session = self._sessions.get(key)
            if session is not None:
                self._sessions.move_to_end(key)
                return session
            session = self._spilling.pop(key, None)
            if session is None:
                return None
            session.evicted = False
            self._insert_locked(session)
            evicted = self._evict_locked(session)
        self._let_go(evicted)
        return session

    def require(self, key: SessionKey) -> Session:
        session = self.get(key)
        if session is None:
            raise no_session(key)
        return session

    def add(self, session: Session) -> None:
        """Make ``session`` the live one under its key; an older state there (live, spilled or on its way to
        disk) is superseded, and a spill file of it deleted."""
        with self._lock:
            self._ended.pop(session.key, None)
            self._spilling.pop(session.key, None)
            was_on_disk = self._spilled.pop(session.key, None) is not None
            self._insert_locked(session)
            evicted = self._evict_locked(session)
        if was_on_disk:
            self.delete_snapshot(session.key)
        self._let_go(evicted)

    def trim(self) -> None:
        """Evict down to the limits: an add finds every other session busy when all streams send at once, so the
        table can overshoot until their steps finish."""
        with self._lock:
            evicted = self._evict_locked(None)
        self._let_go(evicted)

    def _insert_locked(self, session: Session) -> None:
        replaced = self._sessions.pop(session.key, None)
        if replaced is not None:
            self._bytes -= replaced.size
        session.size = session.state_bytes()
        self._sessions[session.key] = session
        self._bytes += session.size

    def _pop_locked(self, key: SessionKey) -> Session | None:
        session = self._sessions.pop(key, None)
        if session is not None:
            self._bytes -= session.size
        return session

    def _full_locked(self) -> bool:
        return len(self._sessions) > self.max_sessions or (self.max_bytes is not None and self._bytes > self.max_bytes)

    def _evict_locked(self, keep: Session | None) -> list[Session]:
        """Take least recently used idle sessions out until the table fits its limits; ``keep`` stays."""
        evicted: list[Session] = []
        if not self._full_locked():  # the common case, after every session step: no copy of the table's order
            return evicted
        candidates = iter(list(self._sessions.values()))
        while self._full_locked():
            victim = next((s for s in candidates if s is not keep and not s.lock.busy), None)
            if victim is None:
                break
            self._pop_locked(victim.key)
            if self.spill:
                victim.evicted = True
                self._spilling[victim.key] = victim
            else:
                victim.ended = True
            evicted.append(victim)
        return evicted

    def _let_go(self, evicted: list[Session]) -> None:
        for session in evicted:
            if self.spill:
                self.spill_writer.submit(partial(self._write_spilled, session), session.size)
            else:
                log.info("session %s evicted (table full: %s)", session.key, self._limits())
                self._notify(session.key, "evicted")

    def _write_spilled(self, session: Session) -> None:
        """Write an evicted session to its snapshot file once any step on it has finished. A request that took it
        back meanwhile, or a model unload that dropped it, keeps the file from staying behind."""
        with self._lock:
            if self._spilling.get(session.key) is not session:
                return  # taken back: no need to wait for a step on it
        with session.lock.hold():
            with self._lock:
                if self._spilling.get(session.key) is not session:
                    return
            try:
                path = self.snapshot(session)
            except OSError as exc:
                with self._lock:
                    lost = self._spilling.get(session.key) is session
                    if lost:
                        del self._spilling[session.key]
                        session.ended = True
                if lost:
                    log.error("session %s evicted and lost: cannot write its snapshot: %s", session.key, exc)
                    self._notify(session.key, "evicted")
                return
            summary = session.summary(spilled=True)
            with self._lock:
                written = self._spilling.get(session.key) is session
                if written:
                    del self._spilling[session.key]
                    self._spilled[session.key] = summary
            if not written:
                path.unlink(missing_ok=True)
                return
        log.debug("session %s spilled to %s (table full: %s)", session.key, path, self._limits())
        self._notify(session.key, "spilled")

    def _limits(self) -> str:
        bytes_limit = "" if self.max_bytes is None else f", {self.max_bytes / 2**20:.0f} MiB"
        return f"{self.max_sessions} sessions{bytes_limit}"

    def remove(self, key: SessionKey, reason: str) -> bool:
        """End the session under ``key``, live or spilled (a spilled one's file goes with it); False if none."""
        with self._lock:
            session = self._pop_locked(key) or self._spilling.pop(key, None)
            on_disk = self._spilled.pop(key, None) is not None
            if session is not None and reason == "ended" and session.last_request is not None:
                self._ended[key] = session.last_request
                while len(self._ended) > self.max_sessions:
                    self._ended.popitem(last=False)
        if session is not None:
            session.ended = True
        elif on_disk:
            self.delete_snapshot(key)
        else:
            return False
        self._notify(key, reason)
        return True

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
            self._pop_locked(session.key)
        session.ended = True
        self._notify(session.key, reason)

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
            keys = [key for key in [*self._sessions, *self._spilling, *self._spilled] if key.model == model]
        dropped = [key for key in keys if self.remove(key, reason)]
        for key in dropped:
            self.delete_snapshot(key)
        return len(dropped)

    def expire_idle(self, now: float | None = None) -> int:
        """End the sessions idle longer than ``idle_timeout_s``, live or spilled; returns how many."""
        now = time.time() if now is None else now
        with self._lock:
            stale = [k for k, s in self._sessions.items() if now - s.last_used > self.idle_timeout_s]
            stale += [k for k, spilled in self._spilled.items() if now - spilled.last_used > self.idle_timeout_s]
        return sum(1 for key in stale if self.remove(key, "expired"))

    def spilled(self, key: SessionKey) -> bool:
        """Whether the session under ``key`` lives in its snapshot file, spilled there by this table."""
        with self._lock:
            return key in self._spilled

    def spilled_keys(self) -> list[SessionKey]:
        """The sessions out of memory: spilled to disk, or on their way there."""
        with self._lock:
            return [*self._spilling, *self._spilled]

    def summary(self, key: SessionKey) -> SessionSummary | None:
        """The session under ``key`` as ListSessions shows it, live or spilled (without bringing it back)."""
        with self._lock:
            session = self._sessions.get(key)
            spilling = self._spilling.get(key)
            spilled = self._spilled.get(key)
        if session is not None:
            return session.summary()
        if spilling is not None:
            return spilling.summary(spilled=True)
        return spilled

    def summaries(self) -> list[SessionSummary]:
        """Every session of the table, live ones first (least recently used first), then those out of memory."""
        with self._lock:
            live = list(self._sessions.values())
            spilling = list(self._spilling.values())
            spilled = list(self._spilled.values())
        return [
            *(session.summary() for session in live),
            *(session.summary(spilled=True) for session in spilling),
            *spilled,
        ]

    def flush(self) -> None:
        """Wait until every evicted session so far is written to disk (or back in the table)."""
        self.spill_writer.flush()

    def close(self) -> None:
        """Write the evicted sessions still in memory, and stop the background writer."""
        self.spill_writer.close()

    def total_state_bytes(self) -> int:
        return sum(s.state_bytes() for s in self.sessions())

    def _notify(self, key: SessionKey, reason: str) -> None:
        if self._on_removed is not None:
            self._on_removed(key, reason)

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

    def restore(
        self, key: SessionKey, state_cls: type[AdapterState], device: torch.device, model_serial: int
    ) -> Session | None:
        """The session under ``key`` back from its snapshot file (its own spill, a drain, another replica's
        snapshot) and live again in the table; None without a file. A spill's file is deleted once read: from then
        on the live session is the state, and a file left behind would bring back an old one after it expired."""
        payload = self.read_snapshot(key)
        if payload is None:
            return None
        session = session_from_payload(payload, state_cls, device, model_serial)
        spilled = self.spilled(key)
        self.add(session)  # deletes a spill's file
        # a spill coming back is routine (a table smaller than the fleet); a snapshot restored is a restart or failover
        log.log(logging.DEBUG if spilled else logging.INFO, "session %s restored at step %d", key, session.steps)
        return session

    def delete_snapshot(self, key: SessionKey) -> None:
        self.snapshot_path(key).unlink(missing_ok=True)


#: snapshot files this server reads: 1 (each state tensor its own record), 2 (the state packed, ``tensor_pack``)
SNAPSHOT_FORMATS = (1, 2)


def snapshot_payload(session: Session) -> dict:
    key = session.key
    return {
        "format": 2,
        "key": [key.caller, key.model, key.strategy, key.sequence_id],
        "model_version": session.model_version,
        "settings": session.settings.model_dump_json(),
        "state": pack(session.state.to_dict()),
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
    if payload.get("format") not in SNAPSHOT_FORMATS:
        raise InvalidArgument(f"snapshot format {payload.get('format')!r} is not supported (expected 1 or 2)")
    caller, model, strategy, sequence_id = payload["key"]
    key = SessionKey(caller, model, strategy, sequence_id)
    config_cls = get_strategy_class(strategy).config_cls
    try:
        fields = payload["state"] if payload["format"] == 1 else unpack(payload["state"])
        state = state_cls.from_dict(fields, device)
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
