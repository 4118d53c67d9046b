"""Shared pytest setup for ``_test``.

``@pytest.mark.slow`` marks exhaustive cases (e.g. the full fault cross product of
``_test/test_fault_matrix.py``). They are skipped unless ``FLEX_SLOW=1`` is set, so the
README's ``python -m pytest -q _test`` stays the bounded default run:

    FLEX_SLOW=1 python -m pytest -q _test -m slow     # only the slow cases
"""
from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: exhaustive case, skipped unless FLEX_SLOW=1 is set")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if os.environ.get("FLEX_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set FLEX_SLOW=1 to run it")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)
