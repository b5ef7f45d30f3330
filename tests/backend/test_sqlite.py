"""SQLiteBackend against the shared contract, plus files, schema and threads.

These tests run on the real reactor (pytest-twisted): the backend hops to
its database thread and back through it. Expiry still follows the fake
``clock`` fixture.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, LoopingCall

from edgeaccess.backend.sqlite import (
    Migration,
    SQLiteBackend,
    UnsupportedSchemaVersion,
    apply_migrations,
    load_migrations,
    split_statements,
)
from edgeaccess.errors import EdgeError, NotFound

from .contract import BackendContract, expiring_in


async def open_backend(path: Path, clock: Clock, **options) -> SQLiteBackend:
    """A started backend on ``path``."""
    return await SQLiteBackend(path, clock, reactor, **options).start()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "backend.sqlite3"


@pytest_twisted.async_yield_fixture
async def sqlite_backend(db_path: Path, clock: Clock):
    backend = await open_backend(db_path, clock)
    yield backend
    await backend.close()


def raw_query(path: Path, sql: str, parameters: tuple = ()) -> list[tuple]:
    """Read the file with a separate connection, as another process would."""
    connection = sqlite3.connect(path)
    try:
        return connection.execute(sql, parameters).fetchall()
    finally:
        connection.close()


class TestSQLiteBackend(BackendContract):
    """The SQLite driver passes the whole contract."""

    @pytest.fixture
    def backend(self, sqlite_backend: SQLiteBackend) -> SQLiteBackend:
        return sqlite_backend


# -- durability and files -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_data_survives_closing_and_reopening(db_path: Path, clock: Clock) -> None:
    first = SQLiteBackend(db_path, clock, reactor)
    kept = await first.put("/users/alice", b"alice", expiring_in(clock, 3600))
    await first.put("/users/bob", b"bob")
    await first.delete("/users/bob")
    await first.close()

    second = await SQLiteBackend(db_path, clock, reactor).start()
    try:
        assert await second.get("/users/alice") == kept
        with pytest.raises(NotFound):
            await second.get("/users/bob")
        later = await second.put("/users/carol", b"carol")
        assert later.revision > kept.revision + 1
    finally:
        await second.close()


@pytest_twisted.ensureDeferred
async def test_database_file_is_private(db_path: Path, sqlite_backend: SQLiteBackend) -> None:
    await sqlite_backend.put("/a", b"1")
    for path in (db_path, Path(f"{db_path}-wal")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


@pytest_twisted.ensureDeferred
async def test_existing_world_readable_file_is_tightened(db_path: Path, clock: Clock) -> None:
    db_path.parent.mkdir()
    db_path.touch()
    db_path.chmod(0o644)
    backend = await open_backend(db_path, clock)
    await backend.close()
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600


@pytest_twisted.ensureDeferred
async def test_wal_journal_and_full_sync_are_on(sqlite_backend: SQLiteBackend) -> None:
    pragmas = await sqlite_backend._interact(
        lambda connection: (
            connection.execute("PRAGMA journal_mode").fetchone()[0],
            connection.execute("PRAGMA synchronous").fetchone()[0],
            connection.execute("PRAGMA busy_timeout").fetchone()[0],
        )
    )
    assert pragmas == ("wal", 2, 5000)  # synchronous 2 is FULL


@pytest_twisted.ensureDeferred
async def test_expired_rows_are_purged_by_a_later_write(db_path: Path, clock: Clock) -> None:
    backend = await open_backend(db_path, clock, purge_interval=60)
    try:
        await backend.put("/tokens/t1", b"x", expiring_in(clock, 10))
        clock.advance(30)
        await backend.put("/other", b"x")
        # Expired, hidden, but the last purge was under 60 s ago: still on disk.
        assert raw_query(db_path, "SELECT key FROM items ORDER BY key") == [("/other",), ("/tokens/t1",)]
        clock.advance(30)
        await backend.put("/other", b"y")
        assert raw_query(db_path, "SELECT key FROM items") == [("/other",)]
    finally:
        await backend.close()


# -- schema versions --------------------------------------------------------


def test_shipped_migrations_are_numbered_from_one() -> None:
    migrations = load_migrations()
    assert [migration.version for migration in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "0001_initial.sql"
    assert all(migration.statements for migration in migrations)


def test_new_database_records_every_schema_version(db_path: Path, sqlite_backend: SQLiteBackend) -> None:
    latest = len(load_migrations())
    versions = raw_query(db_path, "SELECT version FROM schema_version ORDER BY version")
    assert versions == [(version,) for version in range(1, latest + 1)]


@pytest_twisted.ensureDeferred
async def test_reopening_an_existing_database_changes_nothing(db_path: Path, clock: Clock) -> None:
    backend = await open_backend(db_path, clock)
    await backend.put("/a", b"1")
    await backend.close()
    before = raw_query(db_path, "SELECT * FROM schema_version")
    clock.advance(100)
    for _ in range(2):
        backend = await open_backend(db_path, clock)
        assert (await backend.get("/a")).value == b"1"
        await backend.close()
    assert raw_query(db_path, "SELECT * FROM schema_version") == before


@pytest_twisted.ensureDeferred
async def test_newer_schema_version_is_refused(db_path: Path, clock: Clock) -> None:
    await (await open_backend(db_path, clock)).close()
    connection = sqlite3.connect(db_path)
    with connection:
        connection.execute("INSERT INTO schema_version VALUES (999, 0)")
    connection.close()

    backend = SQLiteBackend(db_path, clock, reactor)
    try:
        with pytest.raises(UnsupportedSchemaVersion, match="version 999.*upgrade edgeaccess"):
            await backend.start()
        # Every later call reports the same reason, and nothing was written.
        with pytest.raises(UnsupportedSchemaVersion):
            await backend.put("/a", b"1")
    finally:
        await backend.close()
    assert raw_query(db_path, "SELECT count(*) FROM items") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_database_of_another_application_is_refused(db_path: Path, clock: Clock) -> None:
    db_path.parent.mkdir()
    connection = sqlite3.connect(db_path)
    connection.execute("CREATE TABLE photos (id INTEGER)")
    connection.close()
    backend = SQLiteBackend(db_path, clock, reactor)
    try:
        with pytest.raises(UnsupportedSchemaVersion, match="not an edgeaccess database"):
            await backend.start()
    finally:
        await backend.close()
    assert raw_query(db_path, "SELECT name FROM sqlite_master") == [("photos",)]


@pytest_twisted.ensureDeferred
async def test_file_that_is_not_a_database_fails_clearly(db_path: Path, clock: Clock) -> None:
    db_path.parent.mkdir()
    db_path.write_bytes(b"this is not SQLite" * 100)
    backend = SQLiteBackend(db_path, clock, reactor)
    try:
        with pytest.raises(EdgeError, match="cannot open database .*backend.sqlite3"):
            await backend.start()
    finally:
        await backend.close()


def test_failed_migration_leaves_the_previous_schema(tmp_path: Path) -> None:
    good = Migration(1, "0001_a.sql", ("CREATE TABLE a (x)",))
    bad = Migration(2, "0002_b.sql", ("CREATE TABLE b (x)", "INSERT INTO nowhere VALUES (1)"))
    connection = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    try:
        assert apply_migrations(connection, [good], now=0) == 1
        with pytest.raises(sqlite3.OperationalError):
            apply_migrations(connection, [good, bad], now=0)
        tables = connection.execute("SELECT name FROM sqlite_master ORDER BY name").fetchall()
        assert tables == [("a",), ("schema_version",)]
        assert connection.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
        assert not connection.in_transaction
    finally:
        connection.close()


def test_split_statements_keeps_triggers_whole() -> None:
    script = """
    -- a comment; with a semicolon
    CREATE TABLE t (x TEXT DEFAULT ';');
    CREATE TRIGGER t_insert AFTER INSERT ON t BEGIN
        UPDATE t SET x = 'a;b';
        DELETE FROM t WHERE x IS NULL;
    END;
    -- trailing comment
    """
    statements = split_statements(script)
    assert len(statements) == 2
    assert statements[1].startswith("CREATE TRIGGER") and statements[1].endswith("END;")


def test_split_statements_refuses_an_unfinished_statement() -> None:
    with pytest.raises(ValueError, match="incomplete"):
        split_statements("CREATE TABLE a (x);\nCREATE TABLE b (x)")


# -- threads ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_all_sql_runs_on_one_thread_other_than_the_reactor(sqlite_backend: SQLiteBackend) -> None:
    def thread_of(connection: sqlite3.Connection) -> int:
        return threading.get_ident()

    first = await sqlite_backend._interact(thread_of)
    second = await sqlite_backend._interact(thread_of)
    assert first == second != threading.get_ident()


@pytest_twisted.ensureDeferred
async def test_close_stops_the_database_thread(db_path: Path, clock: Clock) -> None:
    backend = await open_backend(db_path, clock)
    worker = await backend._interact(lambda connection: threading.current_thread())
    assert worker.is_alive()
    await backend.close()
    assert not worker.is_alive()


@pytest_twisted.ensureDeferred
async def test_constructor_does_no_io(db_path: Path, clock: Clock) -> None:
    backend = SQLiteBackend(db_path, clock, reactor)
    assert not db_path.parent.exists()
    await backend.close()
    assert not db_path.parent.exists()


@pytest_twisted.ensureDeferred
async def test_reactor_keeps_ticking_during_a_slow_query(db_path: Path, clock: Clock) -> None:
    # 200,000 rows written directly (fast), then read back through the
    # backend: building the items takes a few hundred milliseconds on the
    # database thread, while a LoopingCall must keep running on the reactor.
    await (await open_backend(db_path, clock)).close()
    rows = 200_000
    connection = sqlite3.connect(db_path)
    with connection:
        connection.executemany(
            "INSERT INTO items (key, value, expires, revision) VALUES (?, ?, NULL, ?)",
            ((f"/bulk/{index:07d}", b"v" * 64, index + 1) for index in range(rows)),
        )
    connection.close()

    backend = await SQLiteBackend(db_path, clock, reactor).start()
    ticks = 0

    def tick() -> None:
        nonlocal ticks
        ticks += 1

    ticker = LoopingCall(tick)
    ticker.start(0.005, now=False)
    try:
        pending = backend.get_range("/bulk/")
        assert not pending.called  # it really runs elsewhere
        items = await pending
        ticks_during_query = ticks
    finally:
        ticker.stop()
        await backend.close()
    assert len(items) == rows
    assert items[0].key == "/bulk/0000000" and items[-1].key == f"/bulk/{rows - 1:07d}"
    assert ticks_during_query >= 5


_FORGETFUL_PROGRAM = """
import sys
from twisted.internet import reactor
from edgeaccess.backend.sqlite import SQLiteBackend

backend = SQLiteBackend(sys.argv[1], reactor)

def stored(item):
    print("stored", item.revision, flush=True)
    reactor.stop()  # without backend.close()

reactor.callWhenRunning(lambda: backend.put("/a", b"1").addCallback(stored))
reactor.run()
print("closed" if backend._connection is None else "left open", flush=True)
"""


def test_reactor_shutdown_closes_a_forgotten_backend(db_path: Path) -> None:
    # Otherwise the database thread would keep the process alive at exit.
    result = subprocess.run(
        [sys.executable, "-c", _FORGETFUL_PROGRAM, str(db_path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["stored", "1", "closed"]
    assert raw_query(db_path, "SELECT key, value FROM items") == [("/a", b"1")]
    assert not Path(f"{db_path}-wal").exists()  # a clean close checkpoints the WAL
