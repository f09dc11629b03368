"""Server settings: file < environment < flags, and invalid values fail at start with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ttaserve.server.settings import ServerSettings


def test_precedence_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text("grpc_port: 9000\nmetrics_port: 9001\nworkers: 4\n")
    assert ServerSettings.from_sources(config).grpc_port == 9000
    monkeypatch.setenv("TTASERVE_GRPC_PORT", "9100")
    settings = ServerSettings.from_sources(config)
    assert (settings.grpc_port, settings.metrics_port, settings.workers) == (9100, 9001, 4)
    assert ServerSettings.from_sources(config, grpc_port=9200, workers=None).grpc_port == 9200


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"device": "tpu"}, "device"), ({"grpc_port": 70000}, "grpc_port"), ({"max_sessions": 0}, "max_sessions")],
)
def test_invalid_values_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        ServerSettings.from_sources(None, **overrides)
    assert field in str(excinfo.value)


def test_unknown_setting_in_file(tmp_path: Path) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text("grpc_prot: 9000\n")
    with pytest.raises(ValidationError, match="grpc_prot"):
        ServerSettings.from_sources(config)


@pytest.mark.parametrize(
    ("flags", "file_value", "expected"), [([], True, True), (["--allow-shared-memory"], None, True), ([], None, False)]
)
def test_serve_flags_reach_the_settings(
    flags: list[str], file_value: bool | None, expected: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ttaserve serve`` turns its flags into ServerSettings; a flag left out keeps the file's value."""
    from ttaserve.client import cli
    from ttaserve.server import app

    config = tmp_path / "settings.yaml"
    config.write_text(
        "grpc_port: 9300\n" + ("" if file_value is None else f"allow_shared_memory: {str(file_value).lower()}\n")
    )
    served: list[ServerSettings] = []
    monkeypatch.setattr(app, "serve", served.append)
    assert cli.main(["serve", "--config", str(config), "--snapshot-dir", str(tmp_path), *flags]) == 0
    (settings,) = served
    assert (settings.allow_shared_memory, settings.grpc_port, settings.snapshot_dir) == (expected, 9300, tmp_path)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [([], 8000), (["--http-port", "9400"], 9400), (["--no-http"], None), (["--http-port", "0"], 0)],
)
def test_the_rest_port_flags(flags: list[str], expected: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """REST is on by default at Triton's port 8000, beside gRPC's 8001; ``--no-http`` turns it off."""
    from ttaserve.client import cli
    from ttaserve.server import app

    served: list[ServerSettings] = []
    monkeypatch.setattr(app, "serve", served.append)
    assert cli.main(["serve", *flags]) == 0
    (settings,) = served
    assert settings.http_port == expected and settings.grpc_port == 8001
