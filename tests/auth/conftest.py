"""Fixtures for the auth service's unit tests (helpers in :mod:`authkit`)."""

from __future__ import annotations

import functools

import pytest
from twisted.internet.task import Clock

from authkit import START, AuditRecorder, InlineReactor, InlineThreadPool, make_authority, resolve
from edgeaccess.auth.service import AuthServer
from edgeaccess.backend.memory import MemoryBackend
from edgeaccess.identity import passwords
from edgeaccess.pki.authority import CertificateAuthority


@pytest.fixture(scope="session")
def authority() -> CertificateAuthority:
    return make_authority()


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(START)
    return clock


@pytest.fixture
def fast_bcrypt(monkeypatch):
    """bcrypt at its lowest cost: these tests check the policy, not the cost."""
    monkeypatch.setattr(passwords, "hash_password",
                        functools.partial(passwords.hash_password, rounds=4))


@pytest.fixture
def audit() -> AuditRecorder:
    return AuditRecorder()


@pytest.fixture
def auth(authority, clock, fast_bcrypt, audit) -> AuthServer:
    """An AuthServer with the preset roles, over a MemoryBackend on the fake clock."""
    server = AuthServer(authority, MemoryBackend(clock), clock, reactor=InlineReactor(),
                        threadpool=InlineThreadPool(), audit=audit)
    server.ca_key = lambda: b"c" * 32  # seals the app assertion keys
    resolve(server.bootstrap())
    return server
