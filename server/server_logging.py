"""The server's log: plain text for a terminal, or one JSON object per line for a log pipeline (Loki, Elasticsearch,
Cloud Logging), and the optional request log.

The request log (``log_requests``) writes one INFO line per inference request on the ``ttaserve.requests`` logger:
model, version, strategy, caller, session, request id, images, gRPC status and time. It is off by default: at
thousands of requests a second a line each costs more than the request's own bookkeeping. In JSON each of those is
a field of its own, so a pipeline can filter one camera's session or one failed request without parsing text.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal

#: the request log's logger; its records carry their fields in ``record.fields``
REQUEST_LOGGER = "ttaserve.requests"

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, RFC 3339 with milliseconds), level, logger, message, the record's
    ``fields`` when it has them, and the exception's traceback as one string."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.gmtime(record.created)
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, log_format: LogFormat, log_requests: bool) -> None:
    """Set up the root logger once per process (as ``logging.basicConfig`` does: a process that already configured
    logging, such as a test runner, keeps its handlers) and turn the request log on or off."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
        root.addHandler(handler)
        root.setLevel(level)
    logging.getLogger(REQUEST_LOGGER).setLevel(logging.INFO if log_requests else logging.WARNING)
