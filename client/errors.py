"""One exception family for everything the SDK reports, so callers catch ``TtaserveError`` and read ``code``.

gRPC failures keep their status code name (``INVALID_ARGUMENT``, ``DEADLINE_EXCEEDED``, ...) and the server's
message; problems the SDK finds before sending (an image it cannot encode, an ambiguous model) use the code the
server would have used for the same mistake.
"""

from __future__ import annotations

import grpc


class TtaserveError(Exception):
    """A failed call: ``code`` is the gRPC status code name, ``message`` the server's (or the SDK's) explanation."""

    code = "UNKNOWN"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgument(TtaserveError):
    code = "INVALID_ARGUMENT"


class NotFound(TtaserveError):
    code = "NOT_FOUND"


class ResourceExhausted(TtaserveError):
    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(TtaserveError):
    code = "FAILED_PRECONDITION"


class Unavailable(TtaserveError):
    code = "UNAVAILABLE"


class DeadlineExceeded(TtaserveError):
    code = "DEADLINE_EXCEEDED"


_BY_CODE: dict[str, type[TtaserveError]] = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, ResourceExhausted, FailedPrecondition, Unavailable, DeadlineExceeded)
}


def from_rpc_error(error: grpc.RpcError) -> TtaserveError:
    """Map a gRPC failure (sync ``RpcError`` or ``grpc.aio.AioRpcError``) onto the exception family."""
    status = error.code() if callable(getattr(error, "code", None)) else None
    name = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
    details = error.details() if callable(getattr(error, "details", None)) else None
    cls = _BY_CODE.get(name, TtaserveError)
    return cls(details or str(error), code=name)
