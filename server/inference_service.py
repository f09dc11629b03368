"""``inference.GRPCInferenceService``: the KServe v2 / Triton RPCs, mapped onto the repository and the pipeline."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn, TypeVar

import grpc

from ttaserve.protocol import grpc_service_pb2_grpc
from ttaserve.protocol import kserve_v2_pb2 as pb

from .errors import InvalidArgument, ServingError, Unavailable, Unimplemented
from .loaded_model import LoadedModel
from .model_config import ConfigError, Platform
from .pipeline import Pipeline
from .repository import ModelRepository
from .request import OUTPUT_NAMES
from .shared_memory import SharedMemoryRegistry
from .tls import identity_of

log = logging.getLogger(__name__)

CALLER_METADATA = "ttaserve-caller"
ANONYMOUS = "anonymous"
MAX_CALLER_CHARS = 128
EXTENSIONS = (
    "classification",
    "sequence",
    "model_repository",
    "model_configuration",
    "statistics",
    "health",
    "reflection",
    "ttaserve_adaptation",
)
SHARED_MEMORY_EXTENSION = "system_shared_memory"
_NO_CUDA_SHARED_MEMORY = "CUDA shared memory is not supported by ttaserve; register system shared memory instead"
#: the platform names Triton clients know
PLATFORM_NAMES = {
    Platform.PYTORCH: "pytorch",
    Platform.TORCHSCRIPT: "pytorch_libtorch",
    Platform.ONNX: "onnxruntime_onnx",
}
_DATATYPE_ENUM = {"FP32": pb.TYPE_FP32, "UINT8": pb.TYPE_UINT8, "BYTES": pb.TYPE_STRING, "INT64": pb.TYPE_INT64}

T = TypeVar("T")


def server_version() -> str:
    try:
        return version("ttaserve")
    except PackageNotFoundError:
        return "0+unknown"


def caller_of(context: grpc.ServicerContext, named: str = "") -> str:
    """Who is calling, for keeping sessions apart: ``named`` (a caller an Adaptation request names in its session
    key), else the ``ttaserve-caller`` header, else "anonymous". Under mutual TLS the name lives inside the client
    certificate's namespace: the certificate's name, then ``/`` and the header or named caller when there is one.
    A certificate can subdivide its own sessions but never reach another certificate's."""
    if not named:
        named = next((str(v) for k, v in context.invocation_metadata() if k == CALLER_METADATA and v), "")
    identity = identity_of(context.auth_context())
    if identity is None:
        return named[:MAX_CALLER_CHARS] or ANONYMOUS
    if not named or _within(identity, named):
        return (named or identity)[:MAX_CALLER_CHARS]
    return f"{identity}/{named}"[:MAX_CALLER_CHARS]


def visible_to(context: grpc.ServicerContext, caller: str) -> bool:
    """Whether a session of ``caller`` may be listed to every caller of this RPC: always in plaintext or one-way
    TLS (callers are not authenticated there), only the certificate's own namespace under mutual TLS."""
    identity = identity_of(context.auth_context())
    return identity is None or _within(identity, caller)


def _within(identity: str, caller: str) -> bool:
    """Whether ``caller`` lies in the namespace of the client certificate named ``identity``."""
    return caller == identity or caller.startswith(f"{identity}/")


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The RPC's deadline on the ``time.monotonic()`` clock; None when the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def abandoned_of(context: grpc.ServicerContext) -> Callable[[], bool]:
    """True once the client has cancelled the call, its deadline passed, or its connection closed."""
    return lambda: not context.is_active()


class InflightTracker:
    """Counts requests in flight so a drain can wait for them; refuses new ones once draining."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0
        self.draining = False

    def enter(self) -> None:
        with self._cond:
            if self.draining:
                raise Unavailable("server is draining (shutting down); retry on another replica")
            self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def leave(self) -> None:
        with self._cond:
            self._count -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._count == 0, timeout=timeout_s)


def _output_metadata(model: LoadedModel) -> list[tuple[str, str, list[int]]]:
    classes = model.num_classes
    shapes = {
        "logits": ("FP32", [-1, classes]),
        "probabilities": ("FP32", [-1, classes]),
        "topk_indices": ("INT64", [-1, -1]),
        "topk_scores": ("FP32", [-1, -1]),
        "topk_labels": ("BYTES", [-1, -1]),
    }
    return [(name, *shapes[name]) for name in OUTPUT_NAMES]


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, pipeline: Pipeline, inflight: InflightTracker) -> None:
        self.repository = repository
        self.pipeline = pipeline
        self.inflight = inflight
        self.shared_memory: SharedMemoryRegistry = pipeline.shared_memory
        self.extensions = EXTENSIONS + ((SHARED_MEMORY_EXTENSION,) if self.shared_memory.enabled else ())

    def _call(self, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ServingError as exc:
            context.abort(exc.code, exc.message)
        except Exception as exc:
            log.exception("internal error")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        raise AssertionError("unreachable")

    @contextmanager
    def _admitted(self, request: pb.ModelInferRequest, caller: str) -> Iterator[None]:
        """Count the request in flight; while draining, refuse it (and count the refusal in the metrics)."""
        try:
            self.inflight.enter()
        except Unavailable as exc:
            self.pipeline.record_rejected(request, caller, exc)
            raise
        try:
            yield
        finally:
            self.inflight.leave()

    # --- health and metadata -------------------------------------------------------------------------------------

    def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ready(self) -> bool:
        """Serving: not draining, and at least one model loaded."""
        return not self.inflight.draining and bool(self.repository.loaded())

    def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready())

    def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        try:
            self.repository.get(request.name, request.version)
        except ServingError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self.inflight.draining)

    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="ttaserve", version=server_version(), extensions=self.extensions)

    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        def build() -> pb.ModelMetadataResponse:
            model = self.repository.get(request.name, request.version)
            spec = model.config.input
            raw_types = [d for d in spec.datatypes if d != "BYTES"] or ["BYTES"]
            response = pb.ModelMetadataResponse(
                name=model.name,
                versions=[str(v) for v in self.repository.versions(model.name)],
                platform=PLATFORM_NAMES[model.config.platform],
            )
            response.inputs.add(name=spec.name, datatype=raw_types[0], shape=spec.shape())
            for name, datatype, shape in _output_metadata(model):
                response.outputs.add(name=name, datatype=datatype, shape=shape)
            return response

        return self._call(context, build)

    def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.ServicerContext) -> pb.ModelConfigResponse:
        def build() -> pb.ModelConfigResponse:
            model = self.repository.get(request.name, request.version)
            config = model.config
            spec = config.input
            message = pb.ModelConfig(
                name=config.name,
                platform=PLATFORM_NAMES[config.platform],
                backend=model.engine.kind,
                max_batch_size=config.max_batch_size,
                default_model_filename=config.weights_filename,
            )
            raw_types = [d for d in spec.datatypes if d != "BYTES"] or ["BYTES"]
            message.input.add(
                name=spec.name,
                data_type=_DATATYPE_ENUM[raw_types[0]],
                format=pb.ModelInput.FORMAT_NHWC if spec.layout == "NHWC" else pb.ModelInput.FORMAT_NCHW,
                dims=spec.shape()[1:],
            )
            for name, datatype, shape in _output_metadata(model):
                message.output.add(name=name, data_type=_DATATYPE_ENUM[datatype], dims=shape[1:])
            if config.dynamic_batching.enabled:
                message.dynamic_batching.max_queue_delay_microseconds = config.dynamic_batching.max_queue_delay_us
                message.dynamic_batching.preferred_batch_size.append(config.dynamic_batching.max_batch_size)
            if config.versions:
                message.version_policy.specific.versions.extend(config.versions)
            else:
                message.version_policy.all.SetInParent()
            kind = pb.ModelInstanceGroup.KIND_GPU if model.device.type == "cuda" else pb.ModelInstanceGroup.KIND_CPU
            message.instance_group.add(name=f"{config.name}_0", count=config.instances, kind=kind)
            extras = {
                **model.engine.describe(),
                "labels": ",".join(model.labels),
                "preprocessing": config.preprocessing.model_dump_json(),
                "accepted_datatypes": ",".join(spec.datatypes),
                "merge_partner": config.merge_partner or "",
            }
            for key, value in extras.items():
                message.parameters[key].string_value = value
            return pb.ModelConfigResponse(config=message)

        return self._call(context, build)

    def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        def build() -> pb.ModelStatisticsResponse:
            if request.name:
                models = (
                    [self.repository.get(request.name, request.version)]
                    if request.version
                    else [self.repository.get(request.name, str(v)) for v in self.repository.versions(request.name)]
                )
                if not models:
                    self.repository.get(request.name)  # raises the right error
            else:
                models = self.repository.loaded()
            response = pb.ModelStatisticsResponse()
            for model in models:
                response.model_stats.append(model.statistics.to_proto(model.name, str(model.version)))
            return response

        return self._call(context, build)

    # --- inference --------------------------------------------------------------------------------------------

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        caller = caller_of(context)

        def run() -> pb.ModelInferResponse:
            with self._admitted(request, caller):
                return self.pipeline.infer(request, caller, deadline_of(context), abandoned_of(context))

        return self._call(context, run)

    def ModelStreamInfer(
        self, request_iterator: Iterator[pb.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ModelStreamInferResponse]:
        """Triton's stream: responses in request order; an error travels in-band and the stream stays open."""
        caller = caller_of(context)
        for request in request_iterator:
            try:
                with self._admitted(request, caller):
                    response = self.pipeline.infer(request, caller, deadline_of(context), abandoned_of(context))
            except ServingError as exc:
                yield pb.ModelStreamInferResponse(error_message=f"{exc.code.name}: {exc.message}")
                continue
            except Exception as exc:
                log.exception("internal error in stream")
                yield pb.ModelStreamInferResponse(error_message=f"INTERNAL: {type(exc).__name__}: {exc}")
                continue
            yield pb.ModelStreamInferResponse(infer_response=response)

    # --- repository -------------------------------------------------------------------------------------------

    def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for entry in self.repository.index(ready_only=request.ready):
            response.models.add(name=entry.name, version=entry.version, state=entry.state, reason=entry.reason)
        return response

    def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        def load() -> pb.RepositoryModelLoadResponse:
            try:
                self.repository.load(request.model_name)
            except ServingError:
                raise
            except ConfigError as exc:
                raise InvalidArgument(f"model '{request.model_name}' failed to load: {exc}") from None
            except Exception as exc:
                raise Unavailable(f"model '{request.model_name}' failed to load: {exc}") from None
            return pb.RepositoryModelLoadResponse()

        return self._call(context, load)

    def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        def unload() -> pb.RepositoryModelUnloadResponse:
            self.repository.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return self._call(context, unload)

    # --- shared memory ----------------------------------------------------------------------------------------

    def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        def status() -> pb.SystemSharedMemoryStatusResponse:
            response = pb.SystemSharedMemoryStatusResponse()
            for region in self.shared_memory.status(request.name):
                entry = response.regions[region.name]
                entry.name, entry.key, entry.offset, entry.byte_size = (
                    region.name,
                    region.key,
                    region.offset,
                    region.byte_size,
                )
            return response

        return self._call(context, status)

    def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        def register() -> pb.SystemSharedMemoryRegisterResponse:
            region = self.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
            log.info(
                "shared-memory region '%s' registered: %d bytes at offset %d of %s%s",
                region.name,
                region.byte_size,
                region.offset,
                region.key,
                "" if region.writable else " (read-only)",
            )
            return pb.SystemSharedMemoryRegisterResponse()

        return self._call(context, register)

    def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        def unregister() -> pb.SystemSharedMemoryUnregisterResponse:
            self.shared_memory.unregister(request.name)
            return pb.SystemSharedMemoryUnregisterResponse()

        return self._call(context, unregister)

    def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: grpc.ServicerContext
    ) -> pb.CudaSharedMemoryStatusResponse:
        return self._call(context, _no_cuda_shared_memory)

    def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: grpc.ServicerContext
    ) -> pb.CudaSharedMemoryRegisterResponse:
        return self._call(context, _no_cuda_shared_memory)

    def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: grpc.ServicerContext
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        return self._call(context, _no_cuda_shared_memory)


def _no_cuda_shared_memory() -> NoReturn:
    raise Unimplemented(_NO_CUDA_SHARED_MEMORY)
