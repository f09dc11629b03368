"""Following the model repository on disk (Triton's ``--model-control-mode=poll``): a model whose files changed is
reloaded, a new model folder is loaded, a removed one is unloaded, with no RPC. A deployment that ships models by
copying folders onto a volume (a git-sync or object-store sidecar) gets them served as they land.

A change is taken once the folder has held still for one poll, so a version still being copied is not loaded half
written. A reload that fails leaves the versions loaded before serving (``ModelRepository.load``), and the same
files are not tried again until they change. Explicit RepositoryModelLoad / Unload still work beside it: the poller
acts on changes of the files only, so it does not undo an unload of a folder that stays as it was.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from .repository import ModelRepository

log = logging.getLogger(__name__)

#: (path relative to the model folder, size, modification time in ns) of each file
Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(model_dir: Path) -> Fingerprint:
    """What a copy, an edit or a new version changes. Links are followed (a Kubernetes volume's files are links
    into a hidden folder swapped in one step) and hidden names are skipped (half-copied temporary files, and that
    hidden folder, which would count every file twice)."""
    entries: list[tuple[str, int, int]] = []
    for folder, subfolders, files in os.walk(model_dir, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(folder) / name
            try:
                status = path.stat()
            except OSError:  # removed while walking: the next poll sees the folder settled
                continue
            entries.append((str(path.relative_to(model_dir)), status.st_size, status.st_mtime_ns))
    return tuple(entries)


class RepositoryPoller:
    """Polls ``repository`` every ``interval_s`` (only the models in ``names``, when given); ``load`` (re)loads a
    model by name: the caller decides on which thread the tensors are copied."""

    def __init__(
        self,
        repository: ModelRepository,
        interval_s: float,
        names: tuple[str, ...] | None,
        load: Callable[[str], None],
    ) -> None:
        self.repository = repository
        self.interval_s = interval_s
        self._names = names
        self._load = load
        #: the files each model was last loaded (or tried) from
        self._applied = self._scan()
        #: what the last poll saw of a folder that differs from ``_applied``, to load once it holds still
        self._settling: dict[str, Fingerprint] = {}

    def _scan(self) -> dict[str, Fingerprint]:
        return {
            folder.name: fingerprint(folder)
            for folder in self.repository.model_dirs()
            if self._names is None or folder.name in self._names
        }

    def poll(self) -> None:
        """Apply what changed on disk since the last poll that held still."""
        present = self._scan()
        for name, files in present.items():
            if self._applied.get(name) == files:
                self._settling.pop(name, None)
            elif self._settling.get(name) != files:
                self._settling[name] = files  # changed since the last poll: may still be being written
            else:
                del self._settling[name]
                self._applied[name] = files
                self._reload(name)
        for name in sorted(set(self._applied) - set(present)):
            del self._applied[name]
            self._settling.pop(name, None)
            if self.repository.versions(name):
                log.info("model %s: its folder is gone from the repository, unloading", name)
                self.repository.unload(name)

    def _reload(self, name: str) -> None:
        action = "reloading" if self.repository.versions(name) else "loading"
        log.info("model %s: its files changed on disk, %s", name, action)
        try:
            self._load(name)
        except Exception as exc:  # any failure of one model must not stop the poller
            log.error("model %s failed to load from the changed files (still serving what was loaded): %s", name, exc)

    def start(self, stopped: threading.Event) -> None:
        """Poll on a daemon thread until ``stopped`` is set."""

        def run() -> None:
            while not stopped.wait(self.interval_s):
                try:
                    self.poll()
                except Exception:  # a folder vanishing mid-scan, an unload racing an RPC: try again next time
                    log.exception("polling the model repository failed")

        threading.Thread(target=run, name="ttaserve-repository-poller", daemon=True).start()
