"""Small JSON Schemas for the custom resources the deploy files use. kubernetes-validate knows only the built-in
kinds, so ServiceMonitor, PrometheusRule, DestinationRule, ServingRuntime and InferenceService are checked here
against the fields they use (names and types from the Prometheus Operator, Istio and KServe API references)."""

from __future__ import annotations

from typing import Any

import jsonschema


def _object(required: list[str], properties: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties, "additionalProperties": not strict}


_STRING = {"type": "string", "minLength": 1}
_STRINGS = {"type": "array", "items": _STRING}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = _object(["name"], {"name": _STRING, "labels": _LABELS, "annotations": _LABELS}, strict=False)
_DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _object(
        ["apiVersion", "kind", "metadata", "spec"],
        {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _METADATA, "spec": spec},
    )


_RULE = {
    "type": "object",
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": _STRING,
        "record": _STRING,
        "expr": _STRING,
        "for": _DURATION,
        "labels": _LABELS,
        "annotations": _LABELS,
    },
    "additionalProperties": False,
}
_CONTAINER = _object(["name", "image"], {"name": _STRING, "image": _STRING, "args": _STRINGS}, strict=False)

SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _resource(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        _object(
            ["selector", "endpoints"],
            {
                "selector": _object(["matchLabels"], {"matchLabels": _LABELS}),
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _object(["port"], {"port": _STRING, "path": _STRING, "interval": _DURATION}),
                },
            },
        ),
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _resource(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        _object(
            ["groups"],
            {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": _object(
                        ["name", "rules"],
                        {"name": _STRING, "interval": _DURATION, "rules": {"type": "array", "items": _RULE}},
                    ),
                }
            },
        ),
    ),
    ("networking.istio.io/v1", "DestinationRule"): _resource(
        "networking.istio.io/v1",
        "DestinationRule",
        _object(
            ["host", "trafficPolicy"],
            {
                "host": _STRING,
                "trafficPolicy": _object(
                    ["loadBalancer"],
                    {
                        "loadBalancer": _object(
                            ["consistentHash"],
                            {
                                "consistentHash": _object(
                                    ["httpHeaderName"],
                                    {
                                        "httpHeaderName": _STRING,
                                        "ringHash": _object([], {"minimumRingSize": {"type": "integer"}}),
                                    },
                                )
                            },
                        )
                    },
                ),
            },
        ),
    ),
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): _resource(
        "serving.kserve.io/v1alpha1",
        "ServingRuntime",
        _object(
            ["supportedModelFormats", "containers"],
            {
                "annotations": _LABELS,
                "supportedModelFormats": {
                    "type": "array",
                    "minItems": 1,
                    "items": _object(
                        ["name"], {"name": _STRING, "version": _STRING, "autoSelect": {"type": "boolean"}}
                    ),
                },
                "protocolVersions": {"type": "array", "items": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}},
                "multiModel": {"type": "boolean"},
                "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
            },
        ),
    ),
    ("serving.kserve.io/v1beta1", "InferenceService"): _resource(
        "serving.kserve.io/v1beta1",
        "InferenceService",
        _object(
            ["predictor"],
            {
                "predictor": _object(
                    ["model"],
                    {
                        "minReplicas": {"type": "integer", "minimum": 0},
                        "maxReplicas": {"type": "integer", "minimum": 0},
                        "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
                        "model": _object(
                            ["modelFormat", "storageUri"],
                            {
                                "modelFormat": _object(["name"], {"name": _STRING, "version": _STRING}),
                                "runtime": _STRING,
                                "protocolVersion": {"enum": ["v1", "v2", "grpc-v2"]},
                                "storageUri": {"type": "string", "pattern": r"^(pvc|s3|gs|https?|hdfs|oci)://.+"},
                                "resources": {"type": "object"},
                            },
                        ),
                    },
                    strict=False,
                )
            },
        ),
    ),
}


def is_custom(document: dict[str, Any]) -> bool:
    return (document.get("apiVersion"), document.get("kind")) in SCHEMAS


def validate_custom(document: dict[str, Any]) -> None:
    """Raises ``jsonschema.ValidationError`` when the resource does not fit its schema."""
    schema = SCHEMAS[(document["apiVersion"], document["kind"])]
    jsonschema.Draft202012Validator(schema).validate(document)
