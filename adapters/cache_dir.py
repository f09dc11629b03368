"""Where ttaserve keeps what it builds or downloads once: compiled kernels, corrupted data sets, fine-tuned experts."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$TTASERVE_CACHE``, else ``$XDG_CACHE_HOME/ttaserve``, else ``~/.cache/ttaserve``."""
    if "TTASERVE_CACHE" in os.environ:
        return Path(os.environ["TTASERVE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ttaserve"
