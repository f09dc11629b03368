"""Parsing a ModelInferRequest into what the pipeline needs: the images, the strategy and its settings, the
session key, the outputs to return. Everything a client can get wrong is checked here, with a message naming it."""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from ttaserve.adapters import StrategyConfig, get_strategy_class, strategy_names
from ttaserve.protocol import kserve_v2_pb2 as pb

from .codec import decode_tensor, parameter_value
from .errors import InvalidArgument, ResourceExhausted
from .loaded_model import LoadedModel
from .shared_memory import SharedMemoryRegistry, SharedMemorySlice

OUTPUT_NAMES = ("logits", "probabilities", "topk_indices", "topk_scores", "topk_labels")
DEFAULT_TOP_K = 5
STRATEGY_PARAMETER = "tta_strategy"
SETTING_PREFIX = "tta_"
#: Triton's request timeout in microseconds (``tritonclient``'s ``timeout=``, over gRPC and HTTP alike)
TIMEOUT_PARAMETER = "timeout"


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    #: Triton's classification extension: return "score:index:label" for the top ``classification`` classes
    classification: int = 0
    #: where the client asked for the output to be written instead of returned (the shared-memory extension)
    shared_memory: SharedMemorySlice | None = None


@dataclass(frozen=True)
class SessionRequest:
    sequence_id: str
    start: bool
    end: bool


@dataclass(frozen=True)
class ParsedRequest:
    images: np.ndarray  # normalised (N, C, H, W) float32
    strategy: str
    settings: StrategyConfig
    #: True when the request overrode settings (``tta_*``) rather than taking the defaults
    settings_explicit: bool
    top_k: int
    outputs: tuple[RequestedOutput, ...]
    session: SessionRequest | None


def parse_request(
    request: pb.ModelInferRequest, model: LoadedModel, shared_memory: SharedMemoryRegistry
) -> ParsedRequest:
    """Unknown parameters without the ``tta_`` prefix are ignored, as Triton ignores them (clients add their own)."""
    params = {key: parameter_value(value) for key, value in request.parameters.items()}
    strategy, settings = parse_strategy(params)
    return ParsedRequest(
        images=_parse_images(request, model, shared_memory),
        strategy=strategy,
        settings=settings,
        settings_explicit=any(k.startswith(SETTING_PREFIX) and k != STRATEGY_PARAMETER for k in params),
        top_k=_parse_top_k(params, model.num_classes),
        outputs=_parse_outputs(request, model.num_classes, shared_memory),
        session=_parse_session(params),
    )


def request_deadline(request: pb.ModelInferRequest, deadline: float | None) -> float | None:
    """The earlier of the transport's ``deadline`` and the request's ``timeout`` parameter, counted from now, on the
    ``time.monotonic()`` clock (None: neither). A timeout of 0 means none, as in Triton. It is the only deadline an
    HTTP request can carry."""
    if TIMEOUT_PARAMETER not in request.parameters:
        return deadline
    micros = parameter_value(request.parameters[TIMEOUT_PARAMETER])
    if isinstance(micros, bool) or not isinstance(micros, int) or micros < 0:
        raise InvalidArgument(f"parameter '{TIMEOUT_PARAMETER}' must be whole microseconds >= 0, not {micros!r}")
    if micros == 0:
        return deadline
    own = time.monotonic() + micros / 1e6
    return own if deadline is None else min(deadline, own)


def parse_strategy(params: dict[str, Any]) -> tuple[str, StrategyConfig]:
    name = params.get(STRATEGY_PARAMETER, "none")
    if not isinstance(name, str) or name not in strategy_names():
        raise InvalidArgument(
            f"parameter '{STRATEGY_PARAMETER}': unknown strategy {name!r}; allowed: {', '.join(strategy_names())}"
        )
    config_cls = get_strategy_class(name).config_cls
    overrides = {
        key[len(SETTING_PREFIX) :]: value
        for key, value in params.items()
        if key.startswith(SETTING_PREFIX) and key != STRATEGY_PARAMETER
    }
    if not overrides:
        return name, default_settings(config_cls)
    unknown = sorted(set(overrides) - set(config_cls.model_fields))
    if unknown:
        raise InvalidArgument(
            f"strategy '{name}' has no setting {', '.join(SETTING_PREFIX + u for u in unknown)}; "
            f"allowed: {describe_settings(config_cls) or 'none'}"
        )
    try:
        return name, config_cls(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{SETTING_PREFIX}{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidArgument(f"strategy '{name}': {problems}; allowed: {describe_settings(config_cls)}") from None


@functools.cache
def default_settings(config_cls: type[StrategyConfig]) -> StrategyConfig:
    """The defaults, built once per strategy (configs are frozen, so one instance serves every request)."""
    return config_cls()


@functools.lru_cache(maxsize=4096)
def settings_json(settings: StrategyConfig) -> str:
    """The effective settings as the response's ``tta_settings`` JSON, cached per (frozen, hashable) config."""
    return json.dumps(settings.model_dump(mode="json"), sort_keys=True)


@functools.cache
def describe_settings(config_cls: type[StrategyConfig]) -> str:
    """``tta_alpha (number, 0 ≤ x ≤ 1, default 0.1), ...`` from the pydantic JSON schema."""
    schema = config_cls.model_json_schema()
    parts = []
    for field_name, prop in schema.get("properties", {}).items():
        bounds = []
        for key, symbol in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<")):
            if key in prop:
                bounds.append(f"{symbol} {prop[key]}")
        if "enum" in prop:
            bounds.append("one of " + "/".join(map(str, prop["enum"])))
        kind = (
            prop.get("type") or " or ".join(option.get("type", "value") for option in prop.get("anyOf", [])) or "value"
        )
        default = json.dumps(prop.get("default"))
        parts.append(
            f"{SETTING_PREFIX}{field_name} ({kind}{', ' if bounds else ''}{' '.join(bounds)}, default {default})"
        )
    return ", ".join(parts)


def _parse_images(request: pb.ModelInferRequest, model: LoadedModel, shared_memory: SharedMemoryRegistry) -> np.ndarray:
    spec = model.config.input
    if len(request.inputs) != 1:
        names = [t.name for t in request.inputs]
        raise InvalidArgument(f"model '{model.name}' takes exactly one input '{spec.name}', got {len(names)}: {names}")
    tensor = request.inputs[0]
    if tensor.name != spec.name:
        raise InvalidArgument(f"model '{model.name}' has no input '{tensor.name}'; its input is '{spec.name}'")
    if tensor.datatype not in spec.datatypes:
        raise InvalidArgument(
            f"input '{spec.name}': datatype {tensor.datatype!r} not accepted; allowed: {', '.join(spec.datatypes)}"
        )
    raw_count = len(request.raw_input_contents)
    if raw_count not in (0, 1):
        raise InvalidArgument(f"raw_input_contents has {raw_count} buffers for 1 input")
    if not tensor.shape:
        raise InvalidArgument(f"input '{spec.name}': shape is missing")
    batch = tensor.shape[0]
    if batch <= 0:
        raise InvalidArgument(f"input '{spec.name}': empty batch (shape {list(tensor.shape)})")
    if batch > model.config.max_batch_size:
        raise ResourceExhausted(
            f"input '{spec.name}': batch of {batch} is above model '{model.name}' max_batch_size "
            f"{model.config.max_batch_size}"
        )
    raw: bytes | memoryview | None = request.raw_input_contents[0] if raw_count else None
    located = shared_memory.locate(tensor.parameters, f"input '{spec.name}'")
    if located is not None:
        if raw is not None or tensor.HasField("contents"):
            raise InvalidArgument(f"input '{spec.name}': data given both in shared memory and in the request")
        raw = located.read(f"input '{spec.name}'")
    values = decode_tensor(tensor, raw)
    if isinstance(values, list):
        if len(tensor.shape) != 1:
            raise InvalidArgument(f"input '{spec.name}': BYTES images need shape [N], got {list(tensor.shape)}")
        return model.preprocessor.from_encoded(values, spec.name)
    return model.preprocessor.from_array(values, spec.name)


def _parse_top_k(params: dict[str, Any], num_classes: int) -> int:
    top_k = params.get("top_k", DEFAULT_TOP_K)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InvalidArgument(f"parameter 'top_k': must be a positive integer, got {top_k!r}")
    return min(top_k, num_classes)


def _parse_outputs(
    request: pb.ModelInferRequest, num_classes: int, shared_memory: SharedMemoryRegistry
) -> tuple[RequestedOutput, ...]:
    if not request.outputs:
        return tuple(RequestedOutput(name) for name in OUTPUT_NAMES)
    outputs = []
    for output in request.outputs:
        if output.name not in OUTPUT_NAMES:
            raise InvalidArgument(f"unknown output '{output.name}'; outputs: {', '.join(OUTPUT_NAMES)}")
        classification = 0
        if "classification" in output.parameters:
            classification = parameter_value(output.parameters["classification"])
            if isinstance(classification, bool) or not isinstance(classification, int) or classification < 1:
                raise InvalidArgument(f"output '{output.name}': 'classification' must be a positive integer")
            classification = min(classification, num_classes)
        located = shared_memory.locate(output.parameters, f"output '{output.name}'")
        if located is not None and classification:
            raise InvalidArgument(f"output '{output.name}': a classification output cannot go to shared memory")
        outputs.append(RequestedOutput(output.name, classification, located))
    return tuple(outputs)


def _parse_session(params: dict[str, Any]) -> SessionRequest | None:
    if "sequence_id" not in params:
        if params.get("sequence_start") or params.get("sequence_end"):
            raise InvalidArgument("sequence_start/sequence_end given without a sequence_id")
        return None
    sequence_id = params["sequence_id"]
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, int | str):
        raise InvalidArgument(f"parameter 'sequence_id': must be an unsigned integer or a string, got {sequence_id!r}")
    sequence_id = str(sequence_id)
    if sequence_id in ("", "0"):
        # Triton's clients send sequence_id 0 for "no sequence"
        return None
    if len(sequence_id) > 256:
        raise InvalidArgument("parameter 'sequence_id': longer than 256 characters")
    return SessionRequest(
        sequence_id=sequence_id,
        start=bool(params.get("sequence_start", False)),
        end=bool(params.get("sequence_end", False)),
    )
