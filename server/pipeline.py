"""The request path: parse -> (session lookup) -> engine or adapter step -> outputs -> statistics and metrics.

Transport-agnostic: the gRPC servicer calls ``Pipeline.infer`` for unary and streaming requests alike.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ttaserve.adapters import strategy_names
from ttaserve.protocol import kserve_v2_pb2 as pb

from . import compute
from .batching import no_longer_awaited
from .codec import encode_bytes_elements, set_parameter
from .errors import FailedPrecondition, InvalidArgument, NotFound, ServingError, Unavailable
from .loaded_model import LoadedModel
from .metrics import UNKNOWN, Metrics, observe_all
from .model_config import SessionSettings
from .repository import RELOADED, ModelRepository
from .request import (
    STRATEGY_PARAMETER,
    ParsedRequest,
    RequestedOutput,
    SessionRequest,
    parse_request,
    request_deadline,
    settings_json,
)
from .request_log import log_request
from .sessions import AppliedRequest, Session, SessionKey, SessionTable, marginal_entropy
from .shared_memory import BYTE_SIZE_PARAMETER, OFFSET_PARAMETER, REGION_PARAMETER, SharedMemoryRegistry
from .warmup import initial_state

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    logits: np.ndarray
    variant: str = ""
    stats: dict[str, float] = field(default_factory=dict)
    queue_ns: int = 0
    infer_ns: int = 0
    session_steps: int | None = None
    session_event: str = ""
    #: rows of the engine execution that served the request (more than its own under dynamic batching)
    batch_size: int = 0


class Pipeline:
    def __init__(
        self,
        repository: ModelRepository,
        sessions: SessionTable,
        metrics: Metrics,
        shared_memory: SharedMemoryRegistry,
    ) -> None:
        self.repository = repository
        self.sessions = sessions
        self.metrics = metrics
        self.shared_memory = shared_memory

    # --- entry point ------------------------------------------------------------------------------------------

    def infer(
        self,
        request: pb.ModelInferRequest,
        caller: str,
        deadline: float | None = None,
        abandoned: Callable[[], bool] | None = None,
    ) -> pb.ModelInferResponse:
        """Serve one request; ``deadline`` (``time.monotonic()``, None: none), or the request's own ``timeout`` when
        that comes first, bounds waiting: in the batcher's queue, for a session, for a source warm-up. A request
        whose client has left by the time it leaves the batcher's queue or gets its session (``abandoned()``, when
        the transport can tell) is not run."""
        start = time.perf_counter_ns()
        try:
            model = self.repository.get(request.model_name, request.model_version)
        except ServingError as exc:
            self.record_rejected(request, caller, exc, start)
            raise
        strategy = requested_strategy(request)
        try:
            deadline = request_deadline(request, deadline)
            parsed = parse_request(request, model, self.shared_memory)
            strategy = parsed.strategy
            check_output_space(parsed, model)
            parsed_ns = time.perf_counter_ns()
            result = self._run(model, parsed, caller, request.id, deadline, abandoned)
            run_ns = time.perf_counter_ns()
            probabilities = softmax(result.logits)
            response = build_response(request, model, parsed, result, probabilities)
        except ServingError as exc:
            self._record_failure(model, request, caller, strategy, start, exc.code.name, exc.message)
            raise
        except Exception as exc:
            self._record_failure(model, request, caller, strategy, start, "INTERNAL", f"{type(exc).__name__}: {exc}")
            raise
        end = time.perf_counter_ns()
        rows = len(parsed.images)
        model.statistics.record_request(
            ok=True,
            total_ns=end - start,
            queue_ns=result.queue_ns,
            input_ns=parsed_ns - start,
            infer_ns=run_ns - parsed_ns - result.queue_ns,
            output_ns=end - run_ns,
            rows=rows,
        )
        compute_s = (run_ns - parsed_ns - result.queue_ns) / 1e9
        self._record_success(model, parsed, result, probabilities, (end - start) / 1e9, compute_s)
        log_request(request, caller, strategy, "OK", start, response)
        return response

    # --- running a batch --------------------------------------------------------------------------------------

    def _run(
        self,
        model: LoadedModel,
        parsed: ParsedRequest,
        caller: str,
        request_id: str,
        deadline: float | None,
        abandoned: Callable[[], bool] | None,
    ) -> RunResult:
        if parsed.session is not None:
            return self._run_session(model, parsed, parsed.session, caller, request_id, deadline, abandoned)
        if parsed.strategy == "none":
            return self._run_source(model, parsed.images, deadline, abandoned)
        return self._run_stateless(model, parsed, deadline)

    def _run_source(
        self, model: LoadedModel, images: np.ndarray, deadline: float | None, abandoned: Callable[[], bool] | None
    ) -> RunResult:
        batched = model.batcher.submit(images, deadline, abandoned)
        return RunResult(
            batched.output, queue_ns=batched.queue_ns, infer_ns=batched.infer_ns, batch_size=batched.batch_size
        )

    def _run_stateless(self, model: LoadedModel, parsed: ParsedRequest, deadline: float | None) -> RunResult:
        """One episode: a fresh source state, one step, state discarded."""
        strategy = model.strategy(parsed.strategy)
        start = time.perf_counter_ns()
        state = initial_state(model, strategy, parsed.settings, deadline)
        step = compute.run(strategy.step, state, torch.from_numpy(parsed.images).to(model.device), parsed.settings)
        logits = step.logits.detach().float().cpu().numpy()
        infer_ns = time.perf_counter_ns() - start
        model.statistics.record_execution(len(logits), infer_ns)
        return RunResult(logits, stats=step.stats, infer_ns=infer_ns, variant=strategy.variant(parsed.settings))

    def _run_session(
        self,
        model: LoadedModel,
        parsed: ParsedRequest,
        request: SessionRequest,
        caller: str,
        request_id: str,
        deadline: float | None,
        abandoned: Callable[[], bool] | None,
    ) -> RunResult:
        """One step of a session, applied exactly once: a request whose deadline passed, or whose client left, while
        it waited for the session is refused unapplied (its client has given up and may retry), and a retried
        request (the same ``id`` and inputs as the session's last applied one, even one that ended the session) gets
        that request's answer again."""
        key = SessionKey(caller, model.name, parsed.strategy, request.sequence_id)
        strategy = model.strategy(parsed.strategy)
        digest = hashlib.blake2b(parsed.images.tobytes(), digest_size=16).digest() if request_id else b""
        if not request.start:  # a retry of the request that ended the session (none has taken the key since)
            replayed = self._replay(model, parsed, request, self.sessions.ended_request(key), request_id, digest)
            if replayed is not None:
                return replayed
        enqueued = time.perf_counter_ns()

        def unapplied() -> ServingError | None:
            """The error to answer once the client stops waiting for its turn in the session, else None."""
            reason = no_longer_awaited(deadline, abandoned, time.monotonic())
            if reason is None:
                return None
            error, what = reason
            waited = (time.perf_counter_ns() - enqueued) / 1e9
            return error(
                f"{what} while the request waited {waited:.3f} s for session {request.sequence_id!r}; "
                "its batch was not applied"
            )

        with self._turn_in_session(model, key, parsed, request.start, deadline, unapplied) as (session, event):
            if session.ended:
                raise NotFound(f"session {request.sequence_id!r} ended while this request waited for it")
            replayed = self._replay(model, parsed, request, session.last_request, request_id, digest)
            if replayed is not None:
                return replayed
            if (error := unapplied()) is not None:
                raise error
            self._check_same_weights(model, session)
            start = time.perf_counter_ns()
            x = torch.from_numpy(parsed.images).to(model.device)
            step = compute.run(strategy.step, session.state, x, session.settings)
            logits = step.logits.detach().float()
            reason = self._collapse_reason(session, logits, step.stats, model.config.sessions)
            if reason:
                log.warning("session %s collapsed (%s): reset to the source state", key, reason)
                session.state = initial_state(model, strategy, session.settings, deadline)
                session.marginal = None
                session.resets += 1
                self.metrics.session_resets.labels(model.name, parsed.strategy, "collapse").inc()
                step = compute.run(strategy.step, session.state, x, session.settings)
                logits = step.logits.detach().float()
                event = f"collapse: {reason}"
            session.state = step.state
            self._update_marginal(session, logits, model.config.sessions)
            session.last_stats = dict(step.stats)
            session.last_used = time.time()
            infer_ns = time.perf_counter_ns() - start
            result = RunResult(
                logits.cpu().numpy(),
                stats=step.stats,
                queue_ns=start - enqueued,
                infer_ns=infer_ns,
                session_steps=session.steps,
                session_event=event,
                variant=strategy.variant(session.settings),
            )
            if request_id:
                session.last_request = AppliedRequest(
                    request_id, digest, result.logits, result.variant, dict(result.stats), session.steps, event
                )
            every = model.config.sessions.snapshot_every_steps
            if every and session.steps % every == 0 and not request.end:
                self.sessions.snapshot(session)
        model.statistics.record_execution(len(logits), infer_ns)
        if request.end:
            self.sessions.remove(key, "ended")
            self.sessions.delete_snapshot(key)
        else:
            self.sessions.trim()
        return result

    @contextmanager
    def _turn_in_session(
        self,
        model: LoadedModel,
        key: SessionKey,
        parsed: ParsedRequest,
        start: bool,
        deadline: float | None,
        give_up: Callable[[], ServingError | None],
    ) -> Iterator[tuple[Session, str]]:
        """The session for ``key`` and how it was opened, held for this request. A session that the table
        spilled to disk between its opening and this request's place in its line is opened again (taken back, or
        restored from the file), so that no step runs on a state the table no longer holds."""
        while True:
            session, event = self._open_session(model, key, parsed, start, deadline)
            if event:
                self.metrics.sessions_opened.labels(model.name, parsed.strategy, event).inc()
            with session.lock.hold(give_up):
                if not session.evicted:
                    yield session, event
                    return

    def _replay(
        self,
        model: LoadedModel,
        parsed: ParsedRequest,
        request: SessionRequest,
        applied: AppliedRequest | None,
        request_id: str,
        digest: bytes,
    ) -> RunResult | None:
        """The answer of ``applied`` (a session's last applied request), counted, when this request retries it;
        None for a new request."""
        if not request_id or applied is None or applied.id != request_id:
            return None
        if applied.digest != digest:
            raise InvalidArgument(
                f"request id {request_id!r} was already applied to session {request.sequence_id!r} with other "
                "inputs; give each batch its own id"
            )
        self.metrics.session_replays.labels(model.name, parsed.strategy).inc()
        return RunResult(
            applied.logits,
            variant=applied.variant,
            stats=applied.stats,
            session_steps=applied.steps,
            session_event="replayed",
        )

    def _open_session(
        self, model: LoadedModel, key: SessionKey, parsed: ParsedRequest, start: bool, deadline: float | None
    ) -> tuple[Session, str]:
        """The session for ``key``: fresh on ``sequence_start``; else the live one, or its snapshot (another
        replica's, after a failover), or a fresh one."""
        strategy = model.strategy(key.strategy)
        if not start:
            session = self.sessions.get(key)
            if session is not None:
                if parsed.settings_explicit and parsed.settings != session.settings:
                    raise InvalidArgument(
                        f"session {key.sequence_id!r} runs {key.strategy} with {session.settings.model_dump_json()}; "
                        "settings are fixed at sequence_start (start a new sequence to change them)"
                    )
                return session, ""
            session = self.sessions.restore(key, strategy.state_cls, model.device, model.serial)
            if session is not None:
                return session, "restored"
        else:
            self.sessions.delete_snapshot(key)
        session = Session(
            key=key,
            model_version=model.version,
            model_serial=model.serial,
            settings=parsed.settings,
            state=initial_state(model, strategy, parsed.settings, deadline),
        )
        self.sessions.add(session)
        return session, "started" if start else "created"

    def _check_same_weights(self, model: LoadedModel, session: Session) -> None:
        """Refuse to step a session whose state and this request's model are not of the same loaded weights.

        A reload or unload ends the model's sessions, but a request that resolved the model just before it can
        still open a session on the retired weights after that sweep, and a later request (on the new weights)
        would then find it. Whichever of the two requests gets here first ends such a session; both are told to
        retry, and the retry starts a fresh session on the weights now served.
        """
        if session.model_version != model.version:
            raise FailedPrecondition(
                f"session {session.key.sequence_id!r} runs on version {session.model_version} of model "
                f"'{model.name}', not version {model.version}; end it or use another sequence id"
            )
        if model.closed or session.model_serial != model.serial:
            if session.model_serial == model.serial or not model.closed:
                self.sessions.discard(session, RELOADED)
            raise Unavailable(
                f"model '{model.name}' was reloaded or unloaded while this request was in flight; "
                f"session {session.key.sequence_id!r} was ended: retry to start a fresh one"
            )

    @staticmethod
    def _collapse_reason(
        session: Session, logits: torch.Tensor, stats: dict[str, float], settings: SessionSettings
    ) -> str:
        if not bool(torch.isfinite(logits).all()):
            return "non-finite logits"
        if not all(math.isfinite(v) for v in stats.values()):
            bad = sorted(k for k, v in stats.items() if not math.isfinite(v))
            return f"non-finite {', '.join(bad)}"
        if session.marginal is None or session.steps < settings.collapse_min_steps:
            return ""
        entropy = marginal_entropy(session.marginal)
        if entropy < settings.collapse_min_marginal_entropy:
            return f"class-marginal entropy {entropy:.3f} < {settings.collapse_min_marginal_entropy}"
        return ""

    @staticmethod
    def _update_marginal(session: Session, logits: torch.Tensor, settings: SessionSettings) -> None:
        batch_marginal = torch.softmax(logits, dim=1).mean(0)
        if session.marginal is None:
            session.marginal = batch_marginal
        else:
            m = settings.collapse_marginal_momentum
            session.marginal = m * session.marginal + (1 - m) * batch_marginal

    # --- metrics --------------------------------------------------------------------------------------------

    def record_rejected(
        self, request: pb.ModelInferRequest, caller: str, exc: ServingError, start: int | None = None
    ) -> None:
        """Count (and log) a request refused before it reached a model: unknown or unready model or version, server
        draining, a REST body that does not parse. A model name that is not loaded is counted as ``unknown`` (clients
        choose it: no unbounded labels)."""
        try:
            model = self.repository.get(request.model_name, request.model_version)
            name, version = model.name, str(model.version)
        except ServingError:
            name, version = UNKNOWN, ""
        now = time.perf_counter_ns()
        start = now if start is None else start
        strategy = requested_strategy(request)
        self.metrics.record_failure(name, version, strategy, exc.code.name, (now - start) / 1e9)
        log_request(request, caller, strategy, exc.code.name, start, error=exc.message)

    def _record_failure(
        self,
        model: LoadedModel,
        request: pb.ModelInferRequest,
        caller: str,
        strategy: str,
        start: int,
        status_name: str,
        error: str,
    ) -> None:
        """Count (and log) a request that reached ``model`` and failed with ``status_name`` and ``error``."""
        elapsed = time.perf_counter_ns() - start
        model.statistics.record_request(ok=False, total_ns=elapsed)
        self.metrics.record_failure(model.name, str(model.version), strategy, status_name, elapsed / 1e9)
        log_request(request, caller, strategy, status_name, start, error=error)

    def _record_success(
        self,
        model: LoadedModel,
        parsed: ParsedRequest,
        result: RunResult,
        probabilities: np.ndarray,
        seconds: float,
        compute_s: float,
    ) -> None:
        series_key = (model.name, str(model.version), parsed.strategy)
        series = self.metrics.request_series(*series_key)
        series.requests_ok.inc()
        series.latency_ok.observe(seconds)
        series.queue.observe(result.queue_ns / 1e9)
        series.compute.observe(compute_s)
        series.images.inc(len(probabilities))
        series.request_batch_size.observe(len(probabilities))
        series.batch_size.observe(result.batch_size or len(probabilities))
        if series.adaptation_step is not None:
            series.adaptation_step.observe(compute_s)
        classes = probabilities.shape[1]
        normaliser = math.log(classes) if classes > 1 else 1.0
        entropies = -(probabilities * np.log(np.maximum(probabilities, 1e-12))).sum(axis=1) / normaliser
        observe_all(series.entropy, entropies)
        observe_all(series.max_probability, probabilities.max(axis=1))
        if "lambda" in result.stats:
            self.metrics.t3_lambda.labels(*series_key).observe(result.stats["lambda"])


def requested_strategy(request: pb.ModelInferRequest) -> str:
    """The strategy label of a request: the one it names when that exists, ``unknown`` for a made-up name."""
    if STRATEGY_PARAMETER not in request.parameters:
        return "none"
    name = request.parameters[STRATEGY_PARAMETER].string_param
    return name if name in strategy_names() else UNKNOWN


# --- responses -------------------------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32 (a new array; the logits are left as they are)."""
    shifted = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def build_response(
    request: pb.ModelInferRequest,
    model: LoadedModel,
    parsed: ParsedRequest,
    result: RunResult,
    probabilities: np.ndarray,
) -> pb.ModelInferResponse:
    logits = np.ascontiguousarray(result.logits, dtype=np.float32)
    response = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id)
    need_topk = max([parsed.top_k] + [o.classification for o in parsed.outputs])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :need_topk]
    for output in parsed.outputs:
        datatype, shape, raw = _encode_output(output, logits, probabilities, order, parsed.top_k, model.labels)
        tensor = response.outputs.add(name=output.name, datatype=datatype, shape=shape)
        located = output.shared_memory
        if located is None:
            response.raw_output_contents.append(raw)
            continue
        located.write(raw, f"output '{output.name}'")
        # An empty entry keeps raw_output_contents aligned with outputs, as Triton's clients index it.
        response.raw_output_contents.append(b"")
        set_parameter(tensor.parameters[REGION_PARAMETER], located.region.name)
        set_parameter(tensor.parameters[BYTE_SIZE_PARAMETER], len(raw))
        if located.offset:
            set_parameter(tensor.parameters[OFFSET_PARAMETER], located.offset)
    params = response.parameters
    set_parameter(params["tta_strategy"], parsed.strategy)
    set_parameter(params["tta_settings"], settings_json(parsed.settings))
    if result.variant:
        set_parameter(params["tta_variant"], result.variant)
    for name, value in result.stats.items():
        set_parameter(params[f"tta_{name}"], float(value))
    if result.session_steps is not None:
        set_parameter(params["tta_session_steps"], int(result.session_steps))
    if result.session_event:
        set_parameter(params["tta_session_event"], result.session_event)
    if result.session_event.startswith("collapse"):
        set_parameter(params["tta_session_reset"], result.session_event)
    set_parameter(params["engine"], model.engine.kind if parsed.strategy == "none" else "pytorch")
    set_parameter(params["device"], model.engine.device)
    return response


def _encode_output(
    output: RequestedOutput,
    logits: np.ndarray,
    probabilities: np.ndarray,
    order: np.ndarray,
    top_k: int,
    labels: tuple[str, ...],
) -> tuple[str, list[int], bytes]:
    """An output's datatype, shape and raw bytes (``output_byte_bound`` bounds their length)."""
    rows = len(logits)
    if output.classification:
        k = output.classification
        scores = np.take_along_axis(probabilities, order[:, :k], axis=1)
        values = [
            f"{scores[r, j]:f}:{order[r, j]}:{labels[order[r, j]]}".encode() for r in range(rows) for j in range(k)
        ]
        return "BYTES", [rows, k], encode_bytes_elements(values)
    if output.name == "logits":
        return "FP32", list(logits.shape), logits.tobytes()
    if output.name == "probabilities":
        return "FP32", list(probabilities.shape), probabilities.tobytes()
    if output.name == "topk_indices":
        return "INT64", [rows, top_k], order[:, :top_k].astype("<i8").tobytes()
    if output.name == "topk_scores":
        scores = np.ascontiguousarray(np.take_along_axis(probabilities, order[:, :top_k], axis=1), dtype="<f4")
        return "FP32", [rows, top_k], scores.tobytes()
    values = [labels[i].encode() for i in order[:, :top_k].ravel()]  # topk_labels
    return "BYTES", [rows, top_k], encode_bytes_elements(values)


def output_byte_bound(output: RequestedOutput, rows: int, top_k: int, labels: tuple[str, ...]) -> int:
    """The most bytes ``_encode_output`` can give this output: exact for numbers, an upper bound for labels
    (classification outputs never go to shared memory, as in Triton)."""
    classes = len(labels)
    longest_label = max((len(label.encode()) for label in labels), default=0)
    per_row = {
        "logits": classes * 4,
        "probabilities": classes * 4,
        "topk_indices": top_k * 8,
        "topk_scores": top_k * 4,
        "topk_labels": top_k * (4 + longest_label),
    }
    return rows * per_row[output.name]


def check_output_space(parsed: ParsedRequest, model: LoadedModel) -> None:
    """Refuse, before anything runs, an output whose shared memory may be too small: a session must not step for a
    request whose answer cannot be delivered."""
    rows = len(parsed.images)
    for output in parsed.outputs:
        if output.shared_memory is None:
            continue
        needed = output_byte_bound(output, rows, parsed.top_k, model.labels)
        if needed > output.shared_memory.byte_size:
            raise InvalidArgument(
                f"output '{output.name}': needs up to {needed} bytes of shared memory for {rows} rows, "
                f"shared_memory_byte_size gives {output.shared_memory.byte_size}"
            )
