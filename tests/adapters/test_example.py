"""The library example in ``ttaserve.adapters``' docstring runs as written."""

from __future__ import annotations

import doctest

import ttaserve.adapters


def test_package_docstring_example_runs() -> None:
    result = doctest.testmod(ttaserve.adapters, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 8 and result.failed == 0
