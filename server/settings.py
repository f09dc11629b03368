"""The server's settings: one pydantic object from CLI flags, ``TTASERVE_*`` environment variables and an optional
YAML file, validated at start with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TTASERVE_", extra="forbid", frozen=True)

    #: model repository folder; None serves the embedded default model
    model_repository: Path | None = None
    #: models to load at start (default: every model in the repository)
    models: tuple[str, ...] | None = None
    #: follow the repository on disk (Triton's poll mode): every this many seconds, models whose files changed are
    #: reloaded, new folders loaded, removed ones unloaded (only ``models``, when given); None: only at start and
    #: through the repository RPCs
    repository_poll_s: float | None = Field(default=None, gt=0)
    grpc_host: str = "0.0.0.0"
    #: 0 picks a free port (tests)
    grpc_port: int = Field(default=8001, ge=0, le=65535)
    #: the v2 REST protocol over HTTP (tritonclient.http, curl) on grpc_host; None turns it off, 0 picks a free port
    http_port: int | None = Field(default=8000, ge=0, le=65535)
    #: open REST connections served at once (each holds a thread); one more gets 503 and is closed
    http_max_connections: int = Field(default=1024, gt=0)
    #: Prometheus metrics over HTTP; None turns the endpoint off, 0 picks a free port
    metrics_port: int | None = Field(default=8002, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: largest gRPC message and HTTP body, each way; a batch of 64 RGB 224x224 float32 images is 38.5 MB
    max_message_mb: int = Field(default=256, gt=0, le=2047)
    #: threads that run RPCs (the native front end keeps two of them polling for calls, the rest wait until a
    #: handler blocks)
    workers: int = Field(default=16, gt=0, le=1024)
    #: the gRPC transport: 'native' is gRPC's C++ core (server/frontend.cc, built on first use against the system's
    #: libgrpc++; less than half the per-call CPU of 'python', grpcio's server); 'auto' takes native where it builds
    frontend: Literal["auto", "native", "python"] = "auto"
    #: reproducible sessions on GPUs: deterministic cuDNN algorithms and full-fp32 (no TF32) convolutions and
    #: matmuls, so a session gives the same outputs alone, interleaved with others, or resumed from a snapshot;
    #: turn off for speed when that does not matter
    deterministic: bool = True
    #: intra-op threads of the thread that runs PyTorch's computation (0 = torch's default: every core)
    torch_threads: int = Field(default=0, ge=0)
    #: live sessions kept before the least recently used is evicted
    max_sessions: int = Field(default=1024, gt=0)
    #: MiB of adaptation state the live sessions may hold together (None: only max_sessions bounds it); beyond it
    #: the least recently used idle session is evicted. A TENT session of a ResNet-50 holds ~0.2 MiB, an RMT one
    #: two copies of the model and their optimiser (~300 MiB): count alone does not bound the memory
    max_session_memory_mib: float | None = Field(default=None, gt=0)
    #: an evicted session is written to its snapshot file and restored by its next request, instead of losing its
    #: state: the table becomes a cache of the streams' states (a disk write and read per eviction)
    spill_evicted_sessions: bool = True
    #: a session unused this long expires (a spilled one too: its file is deleted)
    session_idle_timeout_s: float = Field(default=600.0, gt=0)
    #: where session snapshots are written (None = a 'snapshots' folder in the working directory)
    snapshot_dir: Path | None = None
    #: seconds a SIGTERM drain waits for in-flight requests
    drain_timeout_s: float = Field(default=30.0, ge=0)
    #: Triton's system shared-memory extension: clients on this host register /dev/shm objects and pass tensors
    #: through them. Off by default: a caller that may register keys may read and write any shared-memory object
    #: the server's user can open
    allow_shared_memory: bool = False
    #: TLS on the gRPC and REST ports: a PEM certificate chain and its private key (both or neither); the metrics
    #: port stays plaintext, for scrapers and probes inside the cluster
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: mutual TLS: clients must present a certificate this PEM CA bundle signed, and its name becomes the caller
    tls_client_ca: Path | None = None
    #: how often the TLS files are read again, so a rotated certificate is served without a restart
    tls_reload_interval_s: float = Field(default=60.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: 'json': one JSON object per line (time, level, logger, message and a record's own fields) for log pipelines
    log_format: Literal["text", "json"] = "text"
    #: one INFO line per inference request (model, strategy, caller, session, request id, images, status, ms)
    log_requests: bool = False

    @classmethod
    def from_sources(cls, config_file: Path | None = None, **overrides: Any) -> ServerSettings:
        """File values < environment < explicit overrides (CLI flags); ``None`` overrides are ignored."""
        file_values: dict[str, Any] = {}
        if config_file is not None:
            loaded = yaml.safe_load(config_file.read_text())
            if not isinstance(loaded, dict):
                raise ValueError(f"{config_file}: expected a mapping of settings")
            file_values = loaded
        explicit = {k: v for k, v in overrides.items() if v is not None}
        env_values = cls().model_dump(exclude_unset=True)
        return cls(**{**file_values, **env_values, **explicit})
