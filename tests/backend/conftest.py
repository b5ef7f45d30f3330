"""Fixtures shared by the backend tests."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

#: A realistic "now" (2023-11-14T22:13:20Z) for the fake clock.
START = 1_700_000_000.0


@pytest.fixture
def clock() -> Clock:
    """A fake clock that decides expiry; tests move it with ``advance``."""
    clock = Clock()
    clock.advance(START)
    return clock
