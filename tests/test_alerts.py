"""The alert rules and the example Prometheus config, checked and unit-tested by the real promtool."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from opskit.procs import require_binary

PROMETHEUS_DIR = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
ALERTS = (
    "TtaserveModelNotReady",
    "TtaserveHighErrorRate",
    "TtaserveLatencyP99High",
    "TtaserveSessionCollapses",
    "TtaserveSessionsThrashing",
    "TtaserveCertificateExpiresSoon",
    "TtaserveCertificateReloadRejected",
    "TtaserveClientCaExpiresSoon",
    "TtaserveInputDrift",
)


def promtool(*args: str) -> str:
    binary = require_binary("promtool", "prometheus")
    done = subprocess.run([binary, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_rules_pass_promtool_check() -> None:
    assert "SUCCESS: 12 rules found" in promtool("check", "rules", "alerts.yml")


def test_rules_unit_tests_pass() -> None:
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def test_every_alert_is_unit_tested_and_documented() -> None:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"][0]["rules"]
    names = {rule["alert"] for rule in rules}
    assert set(ALERTS) | {"TtaserveSessionEvictions"} <= names
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert tested == names, f"alerts never shown firing: {sorted(names - tested)}"
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
    operations = (PROMETHEUS_DIR.parents[1] / "docs" / "operations.md").read_text()
    missing = sorted(name for name in names if name not in operations)
    assert not missing, f"alerts not described in docs/operations.md: {missing}"


def test_example_prometheus_config_is_valid() -> None:
    out = promtool("check", "config", "prometheus.yml")
    assert "is valid prometheus config file syntax" in out


@pytest.mark.parametrize("broken", ["expr: ttaserve_model_ready ==", "for: 5 minutes"])
def test_promtool_rejects_a_broken_rule(tmp_path: Path, broken: str) -> None:
    """The check is real: the same file with one line broken fails."""
    text = (PROMETHEUS_DIR / "alerts.yml").read_text()
    key = broken.split(":")[0]
    original = next(line for line in text.splitlines() if line.strip().startswith(f"{key}:"))
    indent = original[: len(original) - len(original.lstrip())]
    (tmp_path / "alerts.yml").write_text(text.replace(original, indent + broken, 1))
    binary = require_binary("promtool", "prometheus")
    done = subprocess.run([binary, "check", "rules", str(tmp_path / "alerts.yml")], capture_output=True, timeout=60)
    assert done.returncode != 0
