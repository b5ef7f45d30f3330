"""Fixtures of the audit tests: a disk writer, and a guard that fails any test
in which something fsyncs on the reactor thread."""

from __future__ import annotations

import os
import threading
import traceback

import pytest
import pytest_twisted
from twisted.internet import reactor

from edgeaccess.audit.diskwriter import DiskWriter


@pytest.fixture(autouse=True)
def no_fsync_on_the_reactor_thread(monkeypatch):
    """Wraps ``os.fsync``: a call from the reactor's thread (the main thread,
    where pytest-twisted runs the reactor) fails the test at teardown."""
    real = os.fsync
    offenders: list[str] = []
    reactor_thread = threading.main_thread()

    def checked(fd: int) -> None:
        if threading.current_thread() is reactor_thread:
            offenders.append("".join(traceback.format_stack(limit=8)))
        real(fd)

    monkeypatch.setattr(os, "fsync", checked)
    yield
    assert not offenders, "fsync on the reactor thread:\n" + offenders[0]


@pytest_twisted.async_yield_fixture
async def writer():
    """A started :class:`DiskWriter` delivering on the reactor."""
    disk = DiskWriter(reactor, name="test-disk-writer")
    disk.start()
    yield disk
    await disk.stop()
