"""Fixtures of the web UI's unit tests: the auth service's in-memory kit
(``tests/auth/authkit.py``) with the same fixtures as the auth tests."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
from twisted.internet.task import Clock

sys.path.insert(0, str(Path(__file__).parent.parent / "auth"))

from authkit import (  # noqa: E402
    START, AuditRecorder, InlineReactor, InlineThreadPool, make_authority, resolve)
from edgeaccess.auth.service import AuthServer  # noqa: E402
from edgeaccess.backend.memory import MemoryBackend  # noqa: E402
from edgeaccess.identity import passwords  # noqa: E402


@pytest.fixture(scope="session")
def authority():
    return make_authority()


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(START)
    return clock


@pytest.fixture
def audit() -> AuditRecorder:
    return AuditRecorder()


@pytest.fixture
def auth(authority, clock, monkeypatch, audit) -> AuthServer:
    """An AuthServer with the preset roles, over a MemoryBackend on the fake clock
    (bcrypt at its lowest cost)."""
    monkeypatch.setattr(passwords, "hash_password",
                        functools.partial(passwords.hash_password, rounds=4))
    server = AuthServer(authority, MemoryBackend(clock), clock, reactor=InlineReactor(),
                        threadpool=InlineThreadPool(), audit=audit)
    resolve(server.bootstrap())
    return server
