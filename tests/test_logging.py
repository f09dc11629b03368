"""The server's log as a log pipeline reads it: ``ttaserve serve --log-format json --log-requests`` writes one JSON
object per line, and one line per inference request whatever its outcome."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from support import cifar_resnet20_config, seeded_resnet20, write_model

from opskit.procs import start_ttaserve, wait_serving, wait_until
from ttaserve.server.server_logging import JsonFormatter


def json_lines(log: Path) -> list[dict]:
    """Every line of the log, each of which must be a JSON object."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def request_lines(log: Path) -> list[dict]:
    return [entry for entry in json_lines(log) if entry["logger"] == "ttaserve.requests"]


def test_json_request_log_of_a_real_server(tmp_path: Path, real_images: np.ndarray) -> None:
    write_model(tmp_path / "repo", "cam", cifar_resnet20_config(), {1: seeded_resnet20(0).state_dict()})
    server = start_ttaserve(
        tmp_path / "run",
        tmp_path / "repo",
        tmp_path / "snapshots",
        extra_args=["--log-format", "json", "--log-requests"],
    )
    try:
        wait_serving(server)
        client = tc.InferenceServerClient(server.url)
        tensor = tc.InferInput("input", [2, 32, 32, 3], "UINT8")
        tensor.set_data_from_numpy(real_images[:2])
        client.infer(
            "cam",
            [tensor],
            request_id="r-1",
            sequence_id="north-gate",
            sequence_start=True,
            parameters={"tta_strategy": "tent"},
        )
        with pytest.raises(tc.InferenceServerException):
            client.infer("cam", [tensor], request_id="r-2", parameters={"tta_strategy": "magic"})
        with pytest.raises(tc.InferenceServerException):
            client.infer("nope", [tensor], request_id="r-3")
        requests = wait_until(
            lambda: request_lines(server.child.log)[2:] and request_lines(server.child.log), 10, "3 lines"
        )
    finally:
        server.child.stop()
    entries = json_lines(server.child.log)
    assert any("listening" in e["message"] and e["level"] == "INFO" for e in entries)
    ok, invalid, unknown = requests
    assert ok["status"] == "OK" and ok["model"] == "cam" and ok["version"] == "1" and ok["strategy"] == "tent"
    assert ok["session"] == "north-gate" and ok["session_event"] == "started" and ok["request_id"] == "r-1"
    assert ok["images"] == 2 and ok["caller"] == "anonymous" and ok["ms"] > 0
    assert invalid["status"] == "INVALID_ARGUMENT" and invalid["request_id"] == "r-2" and "magic" in invalid["error"]
    assert invalid["strategy"] == "unknown"
    assert unknown["status"] == "NOT_FOUND" and unknown["model"] == "nope" and "nope" in unknown["error"]
    assert all(e["time"].endswith("Z") for e in entries)


def test_the_json_formatter_keeps_fields_and_tracebacks() -> None:
    record = logging.LogRecord("ttaserve.x", logging.ERROR, __file__, 1, "failed %s", ("twice",), None)
    record.fields = {"model": "cam", "images": 3}
    try:
        raise ValueError("bad weights")
    except ValueError:
        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed twice" and entry["level"] == "ERROR" and entry["logger"] == "ttaserve.x"
    assert entry["model"] == "cam" and entry["images"] == 3
    assert "ValueError: bad weights" in entry["exception"] and "\n" not in JsonFormatter().format(record)
