"""What a session is on the client side, shared by the sync and asyncio session objects.

A session is the server's adaptation state for one stream (Triton's sequence): the first request carries
``sequence_start`` (so a reused id starts fresh), every request carries the id as a string and the routing
metadata, and closing ends it. ``started`` flips only after a request succeeded, so a rejected first request is
retried with ``sequence_start`` again.

Each batch goes with a request id of its own. A batch whose call failed keeps its id: sent again (the same
encoded images), it reuses it, so a step the server applied before the answer was lost is answered again instead
of adapting the session on the same batch twice.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from ttaserve.protocol import adaptation_pb2 as apb

from .codec import EncodedInput, SequenceFlags, call_metadata, session_key, session_route
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
    #: request ids are ``<nonce>-<batch number>``: unique across clients and runs reusing the sequence id
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    batches: int = 0
    #: (request id, digest of the batch) of the last batch sent whose call has not succeeded
    unanswered: tuple[str, bytes] | None = None

    def next_flags(self, end: bool) -> SequenceFlags:
        if self.ended:
            raise FailedPrecondition(f"session {self.sequence_id!r} has ended; open a new one")
        return SequenceFlags(self.sequence_id, start=not self.started, end=end)

    def request_id(self, images: EncodedInput) -> str:
        """The id for sending ``images``: the unanswered batch's id when these are the same images, else a new one."""
        digest = hashlib.blake2b(repr((images.datatype, images.shape)).encode() + images.raw, digest_size=16).digest()
        if self.unanswered is None or self.unanswered[1] != digest:
            self.batches += 1
            self.unanswered = (f"{self.nonce}-{self.batches}", digest)
        return self.unanswered[0]

    def record(self, flags: SequenceFlags) -> None:
        """The call with ``flags`` succeeded."""
        self.started = True
        self.ended = self.ended or flags.end
        self.unanswered = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return call_metadata(self.caller, session_route(self.caller, self.model, self.sequence_id))

    @property
    def key(self) -> apb.SessionKey:
        return session_key(self.caller, self.model, self.strategy, self.sequence_id)

    @property
    def needs_end(self) -> bool:
        return self.started and not self.ended
