"""Kernels that compile or import on first use: loaded once per process, thread-safely, behind an on/off switch."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class LoadOnce(Generic[T]):
    """``load()`` run on the first ``get()`` (by one thread, the others waiting), its result kept from then on."""

    def __init__(self, load: Callable[[], T]) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._loaded: list[T] = []

    def get(self) -> T:
        if self._loaded:
            return self._loaded[0]
        with self._lock:
            if not self._loaded:
                self._loaded.append(self._load())
        return self._loaded[0]


def switched_off(variable: str) -> bool:
    """Whether the environment switch ``variable`` (on unless set) is set to 0, false, no or off."""
    return os.environ.get(variable, "1").strip().lower() in {"0", "false", "no", "off"}
