"""Connection settings and per-server caches shared by ``Client`` and ``AsyncClient``.

Both clients need the same things before a call: the channel target and options (explicit message limits: a batch
of images is easily above gRPC's 4 MiB default), the caller metadata, the effective deadline, and two lookups
worth caching per client: the server's only model (for ``model=None``) and each model's input name and layout.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from .codec import InputTarget, call_metadata, channel_options, channel_target, read_certificates

DEFAULT_URL = "localhost:8001"


class ClientCore:
    def __init__(
        self,
        url: str,
        *,
        timeout_s: float | None,
        tls: bool,
        root_certificates: bytes | str | Path | None,
        caller: str | None,
        max_message_mb: int,
    ) -> None:
        if max_message_mb <= 0:
            raise ValueError(f"max_message_mb must be positive, not {max_message_mb}")
        self.target = channel_target(url)
        self.options = channel_options(max_message_mb)
        self.credentials = grpc.ssl_channel_credentials(read_certificates(root_certificates)) if tls else None
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
