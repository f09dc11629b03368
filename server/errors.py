"""Errors the server turns into gRPC statuses. Every message names the problem (field, value, what is allowed)."""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """A request the server refuses; ``code`` is the gRPC status the client sees."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServingError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ServingError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServingError):
    """The client went away (cancelled the call, or its connection closed) before its request was run."""

    code = grpc.StatusCode.CANCELLED


class Unimplemented(ServingError):
    """Not supported, or not enabled in this server's settings."""

    code = grpc.StatusCode.UNIMPLEMENTED
