"""Compiling a source file that ships with the package into a shared library, once, in the cache folder.

Used for the C normalisation kernels (``adapters/kernels.c``) and the C++ gRPC front end (``server/frontend.cc``).
The library is named by a hash of the source, the command and the machine, so a change to any of them builds anew
and a library built before (perhaps into an image, on a machine that had the compiler) is used as it is.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .cache_dir import default_cache_dir


def build_shared_library(source: Path, stem: str, command: Sequence[str], link: Sequence[str] = ()) -> Path:
    """Compile ``source`` with ``command`` (compiler first, then flags) and ``link`` (libraries, after the source)
    into ``<cache>/<stem>-<hash>.so`` unless that file exists; return its path. RuntimeError when the compiler is
    missing or fails."""
    text = source.read_bytes()
    recipe = " ".join([*command, "|", *link, "|", platform.machine()]).encode()
    target = default_cache_dir() / f"{stem}-{hashlib.sha256(text + recipe).hexdigest()[:16]}.so"
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
