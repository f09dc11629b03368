"""ttaserve's Python SDK: ``Client`` / ``AsyncClient`` for a ttaserve (or any KServe v2) gRPC server.

Needs only numpy, grpcio, protobuf and pillow; never torch.
"""

from .aio import AsyncClient, AsyncSession
from .client import Client, Session
from .errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TtaserveError,
    Unavailable,
)
from .results import BatchResult, Classification, ModelEntry, ModelMetadata, Prediction, SessionInfo, Strategy

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "BatchResult",
    "Classification",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "ModelEntry",
    "ModelMetadata",
    "NotFound",
    "Prediction",
    "ResourceExhausted",
    "Session",
    "SessionInfo",
    "Strategy",
    "TtaserveError",
    "Unavailable",
]
