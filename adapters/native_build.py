"""Compiling a source file that ships with the package into a shared library, once, in the cache folder.

Used for the C normalisation kernels (``adapters/kernels.c``) and the C++ gRPC front end (``server/frontend.cc``).
A library is named by a hash of its source and a hash of the command and machine that built it
(``<stem>-<source>-<recipe>.so``), so a change to any of them builds anew, and a library built before (perhaps
into an image, on a machine that had the compiler) is used as it is. Where the recipe itself cannot be worked out
at run time (the front end's flags come from ``pkg-config``, which a slim runtime image lacks) or nothing can be
compiled, ``shared_library`` takes a library built from the same source by any recipe.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .cache_dir import default_cache_dir

log = logging.getLogger(__name__)


def _source_hash(source: Path) -> str:
    return hashlib.sha256(source.read_bytes()).hexdigest()[:16]


def build_shared_library(source: Path, stem: str, command: Sequence[str], link: Sequence[str] = ()) -> Path:
    """Compile ``source`` with ``command`` (compiler first, then flags) and ``link`` (libraries, after the source)
    into ``<cache>/<stem>-<source hash>-<recipe hash>.so`` unless that file exists; return its path. RuntimeError
    when the compiler is missing or fails."""
    recipe = " ".join([*command, "|", *link, "|", platform.machine()]).encode()
    recipe_hash = hashlib.sha256(recipe).hexdigest()[:8]
    target = default_cache_dir() / f"{stem}-{_source_hash(source)}-{recipe_hash}.so"
    if target.is_file():
        return target
    compiler = command[0]
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no compiler {compiler!r} on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: processes compiling at once never load a half-written library.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [*command, "-o", str(built), str(source), *link], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {source.name}: {result.stderr.strip()[:2000]}")
        os.replace(built, target)
    return target


def shared_library(source: Path, stem: str, recipe: Callable[[], tuple[Sequence[str], Sequence[str]]]) -> Path:
    """``build_shared_library`` with the (command, link) that ``recipe`` works out; where that or the build raises
    RuntimeError, a library prebuilt from the same source, else RuntimeError naming both."""
    try:
        return build_shared_library(source, stem, *recipe())
    except RuntimeError as exc:
        prebuilt = _prebuilt_library(source, stem)
        if prebuilt is None:
            raise RuntimeError(
                f"{exc}; and no {stem} library prebuilt from this source in {default_cache_dir()}"
            ) from exc
        log.info("%s: cannot build here (%s); using the one prebuilt at %s", stem, exc, prebuilt)
        return prebuilt


def _prebuilt_library(source: Path, stem: str) -> Path | None:
    """The newest library in the cache folder built from this exact ``source`` (by any recipe), or None."""
    found = default_cache_dir().glob(f"{stem}-{_source_hash(source)}-*.so")
    return max(found, key=lambda path: path.stat().st_mtime_ns, default=None)
