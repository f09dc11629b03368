"""The request log: one line per inference request, when ``log_requests`` is on (server_logging.py)."""

from __future__ import annotations

import logging
import time

from ttaserve.protocol import kserve_v2_pb2 as pb

from .codec import parameter_value
from .server_logging import REQUEST_LOGGER

log = logging.getLogger(REQUEST_LOGGER)


def log_request(
    request: pb.ModelInferRequest,
    caller: str,
    strategy: str,
    status: str,
    start_ns: int,
    response: pb.ModelInferResponse | None = None,
    error: str = "",
) -> None:
    """Log how one request ended. ``strategy``: the label it is counted under; ``status``: the gRPC status name
    (``OK``); ``start_ns``: its ``time.perf_counter_ns()`` on arrival; ``response``: the answer, when there is one;
    ``error``: the message sent instead."""
    if not log.isEnabledFor(logging.INFO):
        return
    parameters = request.parameters
    answered = response.parameters if response is not None else {}
    fields: dict[str, object] = {
        "model": request.model_name,
        "version": response.model_version if response is not None else request.model_version,
        "strategy": strategy,
        "caller": caller,
        "session": str(parameter_value(parameters["sequence_id"])) if "sequence_id" in parameters else "",
        "request_id": request.id,
        "images": request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 0,
        "status": status,
        "ms": round((time.perf_counter_ns() - start_ns) / 1e6, 3),
    }
    if "tta_session_event" in answered:
        fields["session_event"] = answered["tta_session_event"].string_param
    if error:
        fields["error"] = error
    text = " ".join(f"{key}={value}" for key, value in fields.items() if value != "")
    log.info("%s", text, extra={"fields": fields})
