"""backend_from_url and the shared rules in edgeaccess.backend."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from edgeaccess.backend import (
    backend_from_url,
    check_limit,
    epoch_to_expires,
    expires_to_epoch,
    is_live,
    prefix_upper_bound,
)
from edgeaccess.backend.memory import MemoryBackend
from edgeaccess.backend.sqlite import SQLiteBackend
from edgeaccess.errors import BadRequest


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (None, "DATA/backend.sqlite3"),
        ("", "DATA/backend.sqlite3"),
        ("sqlite:", "DATA/backend.sqlite3"),
        ("sqlite:state/edge.db", "DATA/state/edge.db"),
        ("sqlite:///var/lib/edge/edge.db", "/var/lib/edge/edge.db"),
        ("SQLITE:///var/lib/my%20edge.db", "/var/lib/my edge.db"),
    ],
)
def test_sqlite_urls_name_the_database_file(url, expected, clock: Clock, tmp_path: Path) -> None:
    backend = backend_from_url(url, clock, tmp_path)
    assert isinstance(backend, SQLiteBackend)
    assert backend.path == expected.replace("DATA", str(tmp_path))
    assert backend.clock is clock
    assert not any(tmp_path.iterdir())  # nothing is opened yet


def test_memory_url_gives_a_memory_backend(clock: Clock) -> None:
    backend = backend_from_url("memory:", clock, None)
    assert isinstance(backend, MemoryBackend)
    assert backend.clock is clock


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://edge:s3cret@/edge", "needs a host"),
        ("redis://localhost", "unknown backend URL scheme 'redis'"),
        ("sqlite://host/path.db", "no host"),
    ],
)
def test_unusable_urls_are_refused_without_echoing_them(url, message, clock: Clock, tmp_path) -> None:
    with pytest.raises(BadRequest, match=message) as caught:
        backend_from_url(url, clock, tmp_path)
    assert "s3cret" not in str(caught.value)


def test_postgresql_url_gives_a_postgres_backend_without_connecting(clock: Clock) -> None:
    from edgeaccess.backend.postgres import PostgresBackend, redact

    url = "postgresql://edge:s3cret@db.example:5433/edge?sslmode=verify-full"
    backend = backend_from_url(url, clock, None)
    assert isinstance(backend, PostgresBackend)
    assert backend.clock is clock
    assert "s3cret" not in redact(url) and "db.example:5433" in redact(url)


def test_relative_sqlite_path_needs_a_data_directory(clock: Clock) -> None:
    with pytest.raises(BadRequest, match="data directory"):
        backend_from_url("sqlite:edge.db", clock, None)


@pytest.mark.parametrize(
    ("prefix", "bound"),
    [
        ("", None),
        ("/users/", "/users0"),
        ("/a", "/b"),
        ("/\u00ff", "/\u0100"),
        ("/\ud7ff", "/\ue000"),
        ("/x\U0010ffff", "/y"),
        ("/x\U0010ffff\U0010ffff", "/y"),
        ("\U0010ffff", None),
    ],
)
def test_prefix_upper_bound(prefix: str, bound: str | None) -> None:
    assert prefix_upper_bound(prefix) == bound


def test_expiry_conversions_round_trip() -> None:
    moment = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    assert epoch_to_expires(expires_to_epoch(moment)) == moment
    assert expires_to_epoch(moment.replace(tzinfo=None)) == expires_to_epoch(moment)
    assert expires_to_epoch(None) is None and epoch_to_expires(None) is None


@pytest.mark.parametrize(
    ("expires", "now", "live"),
    [(None, 1e12, True), (100.0, 99.999, True), (100.0, 100.0, False), (100.0, 101.0, False)],
)
def test_an_item_expires_at_its_expiry_instant(expires, now, live) -> None:
    assert is_live(expires, now) is live


@pytest.mark.parametrize("limit", [-1, 1.5, "3", True])
def test_bad_limits_are_refused(limit) -> None:
    with pytest.raises(BadRequest):
        check_limit(limit)
