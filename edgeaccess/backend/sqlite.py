"""The embedded default backend: one SQLite file, used from one thread.

Every statement runs on a dedicated single-thread ``ThreadPool``, so the
reactor never waits on disk, and the one connection is never shared
between threads. Calls queue in order on that thread; each write is one
``BEGIN IMMEDIATE`` transaction, so it is atomic even if another process
opens the same file.

Durability: WAL journal with ``synchronous=FULL``, so a committed write
survives a crash or power loss. The file is created with mode 0600 (it
holds CA keys and tokens).

The schema is versioned: ``migrations/NNNN_name.sql`` are applied in
order when the database is opened, in one transaction together with
their rows in ``schema_version``. A database written by a newer
edgeaccess (a version this code does not know) is refused.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from edgeaccess.backend import epoch_to_expires, is_live, prefix_upper_bound
from edgeaccess.backend.driver import (
    NOT_AN_EDGEACCESS_DATABASE,
    Statements,
    ThreadedDriver,
    UnsupportedSchemaVersion,
    check_schema_version,
    migration_scripts,
)
from edgeaccess.backend.interfaces import CompareFailed, IBackend, Item
from edgeaccess.errors import AlreadyExists, EdgeError, NotFound

_log = Logger()

_T = TypeVar("_T")

_CREATE_SCHEMA_VERSION = """
CREATE TABLE IF NOT EXISTS schema_version (
    version    INTEGER PRIMARY KEY,
    applied_at REAL    NOT NULL
)"""

_LIVE = "(expires IS NULL OR expires > ?)"


@attrs.frozen
class Migration:
    """One schema step read from ``migrations/NNNN_name.sql``."""

    version: int
    name: str
    statements: tuple[str, ...]


def split_statements(script: str) -> list[str]:
    """Split an SQL script into complete statements (triggers included).

    ``sqlite3.Connection.executescript`` would do this, but on Python 3.11
    it first commits any open transaction, and migrations must run inside
    one.
    """
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    leftover = [
        line for line in pending.splitlines() if line.strip() and not line.strip().startswith("--")
    ]
    if leftover:
        raise ValueError(f"incomplete SQL statement at end of script: {pending.strip()[:80]!r}")
    return statements


def load_migrations(package: str = "edgeaccess.backend", folder: str = "migrations") -> list[Migration]:
    """The migrations shipped in ``package/folder``, checked to be numbered 1..N."""
    return [
        Migration(version, name, tuple(split_statements(script)))
        for version, name, script in migration_scripts(folder, package)
    ]


def apply_migrations(connection: sqlite3.Connection, migrations: list[Migration], now: float) -> int:
    """Bring the schema to the newest version in one transaction; return it.

    Blocking: call it on the database thread.

    :raises UnsupportedSchemaVersion: if the database is newer than
        ``migrations``, or is some other application's database.
    """
    latest = migrations[-1].version if migrations else 0
    connection.execute("BEGIN IMMEDIATE")
    try:
        has_version_table = connection.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()[0]
        if not has_version_table:
            foreign_tables = connection.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            ).fetchone()[0]
            if foreign_tables:
                raise UnsupportedSchemaVersion(NOT_AN_EDGEACCESS_DATABASE)
            connection.execute(_CREATE_SCHEMA_VERSION)
        current = connection.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
        check_schema_version(current, latest)
        for migration in migrations[current:]:
            for statement in migration.statements:
                connection.execute(statement)
            connection.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                (migration.version, now),
            )
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    if current < latest:
        _log.info("database schema migrated from {old} to {new}", old=current, new=latest)
    return latest


def _create_private_file(path: str) -> None:
    """Create ``path`` with mode 0600, or tighten an existing file to it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        mode = stat.S_IMODE(os.fstat(descriptor).st_mode)
        if mode & 0o077:
            os.fchmod(descriptor, 0o600)
            _log.warn(
                "database {path} was readable by others (mode {mode:o}); changed it to 0600",
                path=path,
                mode=mode,
            )
    finally:
        os.close(descriptor)


@implementer(IBackend)
class SQLiteBackend(ThreadedDriver):
    """:class:`IBackend` on one SQLite file; nothing blocks the reactor.

    The constructor does no I/O. The database is opened (created, migrated)
    by :meth:`start` or by the first call; a failure to open fails that and
    every later call. :meth:`close` closes the file and stops the thread;
    the reactor's shutdown does it too if nobody did.

    :param path: the database file (created mode 0600 if missing).
    :param clock: decides expiry (``clock.seconds()`` is UTC epoch seconds).
    :param reactor: delivers results from the database thread; defaults to
        ``clock`` if it can, else the global reactor.
    :param busy_timeout: seconds to wait for another process's lock.
    :param purge_interval: at most this often (clock seconds) a write also
        deletes expired rows; reads never see them anyway.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        clock: IReactorTime,
        reactor: Any = None,
        busy_timeout: float = 5.0,
        purge_interval: float = 60.0,
    ) -> None:
        super().__init__(_STATEMENTS, clock, reactor, purge_interval)
        self.path = os.fspath(path)
        self._busy_timeout = busy_timeout
        # Touched only on the database thread:
        self._connection: sqlite3.Connection | None = None
        self._open_error: BaseException | None = None

    # -- thread plumbing -------------------------------------------------

    def start(self) -> Deferred[SQLiteBackend]:
        """Open the database (once); fire with ``self`` when it is ready."""
        return self._interact(lambda connection: self)

    def _ensure_started(self) -> ThreadPool:
        self._check_open()
        if self._pool is None:
            pool = self._start_pool(f"edgeaccess-sqlite:{self.path}", max_threads=1)
            # First in the queue, so every call finds the database open.
            opened = deferToThreadPool(self._reactor, pool, self._open, self.clock.seconds())
            opened.addErrback(
                lambda failure: _log.error(
                    "cannot open database {path}: {error}", path=self.path, error=failure.value
                )
            )
        return self._pool

    def _interact(self, function: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """Run ``function(connection, *args)`` on the database thread."""
        try:
            pool = self._ensure_started()
        except Exception as error:
            return fail(error)
        return deferToThreadPool(self._reactor, pool, self._call, function, args)

    def _open(self, now: float) -> None:
        try:
            _create_private_file(self.path)
            connection = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # one thread uses it, but not the creating call
            )
            try:
                connection.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
                journal = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if journal.lower() != "wal":
                    raise EdgeError(f"cannot use the WAL journal for {self.path} (got {journal})")
                connection.execute("PRAGMA synchronous = FULL")
                apply_migrations(connection, load_migrations(), now)
            except BaseException:
                connection.close()
                raise
        except sqlite3.Error as error:
            self._open_error = EdgeError(f"cannot open database {self.path}: {error}")
            raise self._open_error from error
        except BaseException as error:
            self._open_error = error
            raise
        self._connection = connection

    def _call(self, function: Callable[..., _T], args: tuple[Any, ...]) -> _T:
        if self._connection is None:
            if self._open_error is not None:
                raise self._open_error
            raise EdgeError("the storage backend is closed")
        try:
            return function(self._connection, *args)
        except sqlite3.Error as error:
            raise EdgeError(f"storage failure: {error}") from error

    def _write(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run ``function(connection, now, *args)`` in a write transaction,
        then tell watchers of the committed write before its caller hears of it.

        Results come back from the one database thread in commit order
        (``callFromThread`` is FIFO), so watchers see commit order too.
        """
        now = self.clock.seconds()
        written = self._interact(_in_transaction, function, now, self._purge_due(now), args)

        def publish(result: Any) -> Any:
            if isinstance(result, Item):
                self._fanout.put(result)
            elif isinstance(result, _Deleted):
                for key, revision in result.keys:
                    self._fanout.delete(key, revision)
                return result.count
            return result

        return written.addCallback(publish)

    def _close_pool(self) -> Deferred[None]:
        pool = self._pool
        if pool is None:
            return succeed(None)
        self._remove_shutdown_trigger()

        def stop_thread(result: object) -> object:
            # The thread has just finished its last job, so this join is short.
            pool.stop()
            return result

        closed = deferToThreadPool(self._reactor, pool, self._close_connection)
        closed.addBoth(stop_thread)
        closed.addErrback(lambda failure: _log.failure("closing {path}", failure, path=self.path))
        return closed

    def _close_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


# -- the statements, run on the database thread ----------------------------


@attrs.frozen
class _Deleted:
    """What a delete committed: ``(key, revision)`` of each deleted live key."""

    count: int
    keys: tuple[tuple[str, int], ...]


def _next_revision(connection: sqlite3.Connection) -> int:
    (revision,) = connection.execute(
        "UPDATE revision_counter SET value = value + 1 WHERE id = 1 RETURNING value"
    ).fetchone()
    return int(revision)


def _row_to_item(key: str, value: bytes, expires: float | None, revision: int) -> Item:
    return Item(key, bytes(value), epoch_to_expires(expires), revision)


def _in_transaction(
    connection: sqlite3.Connection,
    function: Callable[..., _T],
    now: float,
    purge: bool,
    args: tuple[Any, ...],
) -> _T:
    connection.execute("BEGIN IMMEDIATE")
    try:
        if purge:
            connection.execute("DELETE FROM items WHERE expires IS NOT NULL AND expires <= ?", (now,))
        result = function(connection, now, *args)
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    return result


def _live_value(connection: sqlite3.Connection, key: str, now: float) -> bytes | None:
    row = connection.execute(f"SELECT value FROM items WHERE key = ? AND {_LIVE}", (key, now)).fetchone()
    return None if row is None else bytes(row[0])


def _store(
    connection: sqlite3.Connection, now: float, key: str, value: bytes, expires: float | None
) -> Item:
    revision = _next_revision(connection)
    connection.execute(
        "INSERT INTO items (key, value, expires, revision) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (key) DO UPDATE SET"
        " value = excluded.value, expires = excluded.expires, revision = excluded.revision",
        (key, value, expires, revision),
    )
    return _row_to_item(key, value, expires, revision)


def _get(connection: sqlite3.Connection, key: str, now: float) -> Item:
    row = connection.execute(
        f"SELECT key, value, expires, revision FROM items WHERE key = ? AND {_LIVE}", (key, now)
    ).fetchone()
    if row is None:
        raise NotFound("item not found")
    return _row_to_item(*row)


def _create(
    connection: sqlite3.Connection, now: float, key: str, value: bytes, expires: float | None
) -> Item:
    if _live_value(connection, key, now) is not None:
        raise AlreadyExists("item already exists")
    return _store(connection, now, key, value, expires)


def _update(
    connection: sqlite3.Connection, now: float, key: str, value: bytes, expires: float | None
) -> Item:
    if _live_value(connection, key, now) is None:
        raise NotFound("item not found")
    return _store(connection, now, key, value, expires)


def _compare_and_swap(
    connection: sqlite3.Connection,
    now: float,
    key: str,
    value: bytes,
    expires: float | None,
    expected: bytes,
) -> Item:
    current = _live_value(connection, key, now)
    if current is None:
        raise NotFound("item not found")
    if current != expected:
        raise CompareFailed("the item changed since it was read")
    return _store(connection, now, key, value, expires)


def _delete(connection: sqlite3.Connection, now: float, key: str) -> _Deleted:
    row = connection.execute("DELETE FROM items WHERE key = ? RETURNING expires", (key,)).fetchone()
    if row is None or not is_live(row[0], now):
        raise NotFound("item not found")  # rolls back: an expired row stays for the purge
    return _Deleted(1, ((key, _next_revision(connection)),))


def _range_condition(prefix: str) -> tuple[str, tuple[str, ...]]:
    bound = prefix_upper_bound(prefix)
    if bound is None:
        return "key >= ?", (prefix,)
    return "key >= ? AND key < ?", (prefix, bound)


def _get_range(
    connection: sqlite3.Connection, prefix: str, limit: int | None, now: float
) -> list[Item]:
    condition, parameters = _range_condition(prefix)
    rows = connection.execute(
        f"SELECT key, value, expires, revision FROM items WHERE {condition} AND {_LIVE}"
        " ORDER BY key LIMIT ?",
        (*parameters, now, -1 if limit is None else limit),
    )
    return [_row_to_item(*row) for row in rows]


def _delete_range(connection: sqlite3.Connection, now: float, prefix: str) -> _Deleted:
    condition, parameters = _range_condition(prefix)
    live = [
        key
        for (key,) in connection.execute(
            f"SELECT key FROM items WHERE {condition} AND {_LIVE} ORDER BY key",
            (*parameters, now),
        )
    ]
    connection.execute(f"DELETE FROM items WHERE {condition}", parameters)
    return _Deleted(len(live), tuple((key, _next_revision(connection)) for key in live))


_STATEMENTS = Statements(
    get=_get,
    get_range=_get_range,
    store=_store,
    create=_create,
    update=_update,
    compare_and_swap=_compare_and_swap,
    delete=_delete,
    delete_range=_delete_range,
)
