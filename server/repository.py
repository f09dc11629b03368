"""The model repository: which models exist on disk, which are loaded, and loading/unloading them at run time."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InvalidArgument, NotFound, Unavailable
from .loaded_model import LoadedModel, available_versions, load_version
from .model_config import CONFIG_FILENAMES, ConfigError, load_model_config
from .warmup import cancel_warmups, start_source_warmups

log = logging.getLogger(__name__)

#: the embedded default model, shipped as package data
DEFAULT_REPOSITORY = Path(__file__).resolve().parent / "default_model"
#: why a model's loaded versions were retired (``on_retired``'s reason; a metrics label)
UNLOADED = "unloaded"
RELOADED = "reloaded"

#: ``on_retired(name, reason)``
RetiredListener = Callable[[str, str], None]


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str  # READY, UNAVAILABLE, LOADING, UNLOADING
    reason: str = ""


class ModelRepository:
    def __init__(
        self,
        root: Path | None,
        device: torch.device,
        on_change: Callable[[str], None] | None = None,
        on_retired: RetiredListener | None = None,
    ) -> None:
        """``on_change(name)`` runs after each load, reload, unload or failed load of a model (metrics);
        ``on_retired(name, reason)`` after the versions that served ``name`` were closed by an unload or a successful
        reload (sessions adapted on them end)."""
        self.root = (root or DEFAULT_REPOSITORY).resolve()
        if not self.root.is_dir():
            raise ConfigError(f"model repository {self.root} is not a directory")
        self.device = device
        self._lock = threading.RLock()
        self._loaded: dict[str, dict[int, LoadedModel]] = {}
        self._state: dict[str, tuple[str, str]] = {}
        self._on_change = on_change
        self._on_retired = on_retired

    def model_dirs(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir() and any((p / f).is_file() for f in CONFIG_FILENAMES))

    def load_all(self, names: tuple[str, ...] | None = None) -> None:
        """Load every model (or ``names``); a model that fails is logged and marked UNAVAILABLE with the reason."""
        for model_dir in self.model_dirs():
            if names is not None and model_dir.name not in names:
                continue
            try:
                self.load(model_dir.name)
            except (ConfigError, NotFound, ValueError, RuntimeError, OSError) as exc:
                log.error("model %s failed to load: %s", model_dir.name, exc)
        if names is not None:
            missing = sorted(set(names) - {p.name for p in self.model_dirs()})
            if missing:
                raise ConfigError(f"{self.root}: no model folder for {', '.join(missing)}")

    def load(self, name: str) -> None:
        """(Re)load every version of ``name`` from disk; the old versions keep serving until the new ones are ready."""
        model_dir = self.root / name
        if not name or "/" in name or name.startswith(".") or not model_dir.is_dir():
            raise NotFound(f"model '{name}' is not in repository {self.root}")
        with self._lock:
            self._state[name] = ("LOADING", "")
        try:
            config = load_model_config(model_dir)
            versions = available_versions(model_dir, config)
            if not versions:
                raise ConfigError(f"{model_dir}: no version folder (e.g. 1/) holds {config.weights_filename}")
            loaded = {v: load_version(model_dir, config, v, self.device) for v in versions}
        except Exception as exc:
            with self._lock:
                self._state[name] = ("UNAVAILABLE", str(exc))
            self._changed(name)
            raise
        with self._lock:
            old = self._loaded.get(name, {})
            self._loaded[name] = loaded
            self._state[name] = ("READY", "")
        if old:
            self._retire(name, old, RELOADED)
        for model in loaded.values():
            start_source_warmups(model)
        self._changed(name)

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self._loaded:
                raise NotFound(f"model '{name}' is not loaded")
            old = self._loaded.pop(name)
            self._state[name] = ("UNAVAILABLE", "unloaded")
        self._retire(name, old, UNLOADED)
        self._changed(name)

    def _retire(self, name: str, versions: dict[int, LoadedModel], reason: str) -> None:
        for model in versions.values():
            _close(model)
        if self._on_retired is not None:
            self._on_retired(name, reason)

    def _changed(self, name: str) -> None:
        if self._on_change is not None:
            self._on_change(name)

    def get(self, name: str, version: str = "") -> LoadedModel:
        with self._lock:
            versions = self._loaded.get(name)
            if versions is None:
                state, reason = self._state.get(name, ("", ""))
                if state:
                    raise Unavailable(f"model '{name}' is not ready: {state.lower()}{': ' + reason if reason else ''}")
                available = ", ".join(sorted(self._loaded)) or "none"
                raise NotFound(f"unknown model '{name}'; loaded models: {available}")
            if not version:
                return versions[max(versions)]
            if not version.isdigit():
                raise InvalidArgument(f"model '{name}': version must be a positive integer, got {version!r}")
            model = versions.get(int(version))
            if model is None:
                raise NotFound(
                    f"model '{name}' has no version {version}; available: {', '.join(map(str, sorted(versions)))}"
                )
            return model

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return [model for versions in self._loaded.values() for model in versions.values()]

    def versions(self, name: str) -> list[int]:
        with self._lock:
            return sorted(self._loaded.get(name, {}))

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        entries: list[IndexEntry] = []
        with self._lock:
            for model_dir in self.model_dirs():
                name = model_dir.name
                if name in self._loaded:
                    entries += [IndexEntry(name, str(v), "READY") for v in sorted(self._loaded[name])]
                elif not ready_only:
                    state, reason = self._state.get(name, ("UNAVAILABLE", "not loaded"))
                    entries.append(IndexEntry(name, "", state, reason))
        return entries

    def close(self) -> None:
        with self._lock:
            models = [m for versions in self._loaded.values() for m in versions.values()]
            self._loaded.clear()
        for model in models:
            _close(model)


def _close(model: LoadedModel) -> None:
    """Close the version, then stop its source warm-ups: nothing may keep computing for a model that is gone."""
    model.close()
    cancel_warmups(model)
