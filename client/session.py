"""What a session is on the client side, shared by the sync and asyncio session objects.

A session is the server's adaptation state for one stream (Triton's sequence): the first request carries
``sequence_start`` (so a reused id starts fresh), every request carries the id as a string and the routing
metadata, and closing ends it. ``started`` flips only after a request succeeded, so a rejected first request is
retried with ``sequence_start`` again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ttaserve.protocol import adaptation_pb2 as apb

from .codec import SequenceFlags, call_metadata, session_key, session_route
from .errors import FailedPrecondition


@dataclass
class SessionCore:
    caller: str | None
    model: str
    sequence_id: str
    strategy: str
    settings: Mapping[str, bool | int | float | str] = field(default_factory=dict)
    version: str = ""
    started: bool = False
    ended: bool = False

    def next_flags(self, end: bool) -> SequenceFlags:
        if self.ended:
            raise FailedPrecondition(f"session {self.sequence_id!r} has ended; open a new one")
        return SequenceFlags(self.sequence_id, start=not self.started, end=end)

    def record(self, flags: SequenceFlags) -> None:
        self.started = True
        self.ended = self.ended or flags.end

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return call_metadata(self.caller, session_route(self.caller, self.model, self.sequence_id))

    @property
    def key(self) -> apb.SessionKey:
        return session_key(self.caller, self.model, self.strategy, self.sequence_id)

    @property
    def needs_end(self) -> bool:
        return self.started and not self.ended
