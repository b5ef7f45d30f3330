"""What the SQL drivers share: the ``IBackend`` method shapes and the schema rules.

:class:`ThreadedDriver` is the base of
:class:`~edgeaccess.backend.sqlite.SQLiteBackend` and
:class:`~edgeaccess.backend.postgres.PostgresBackend`. It checks every
argument on the reactor thread (a bad call fails at once, and never
reaches a database thread), hands the checked row to the driver's own
statement functions (:class:`Statements`), and owns the thread pool's
start, its shutdown trigger and ``close``. Each driver keeps its SQL, its
threading (one SQLite thread, a bounded PostgreSQL pool that retries) and
how a committed write reaches watchers.

The schema rules are shared too: migrations are files ``NNNN_name.sql``
numbered 1..N, and a database written by a newer edgeaccess (or by some
other application) is refused with :class:`UnsupportedSchemaVersion`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from importlib import resources
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads, IReactorTime
from twisted.python.threadpool import ThreadPool

from edgeaccess.backend import check_key, check_limit, check_value, expires_to_epoch
from edgeaccess.backend.watch import DEFAULT_BACKLOG, WatchFanout, Watcher
from edgeaccess.errors import EdgeError

_T = TypeVar("_T")

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

#: Why a database with tables but no ``schema_version`` is refused.
NOT_AN_EDGEACCESS_DATABASE = "the database has tables but no schema_version: not an edgeaccess database"


class UnsupportedSchemaVersion(EdgeError):
    """the database was written by a newer or unknown edgeaccess"""

    code = "unsupported_schema_version"


def migration_scripts(folder: str, package: str = "edgeaccess.backend") -> list[tuple[int, str, str]]:
    """``(version, file name, script)`` of the migrations in ``package/folder``, in order.

    :raises ValueError: unless they are numbered 1..N without gaps.
    """
    found = []
    for entry in resources.files(package).joinpath(folder).iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match is not None:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [version for version, _, _ in found]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migrations in {folder} must be numbered 1..N without gaps, found {versions}")
    return found


def check_schema_version(current: int, latest: int) -> None:
    """Refuse a database whose schema is newer than the migrations this code ships.

    :raises UnsupportedSchemaVersion: if ``current > latest``.
    """
    if current > latest:
        raise UnsupportedSchemaVersion(
            f"the database schema is version {current}, but this edgeaccess knows only "
            f"versions up to {latest}: upgrade edgeaccess (or restore a backup)"
        )


def default_reactor(clock: IReactorTime, reactor: Any = None) -> Any:
    """``reactor``; else ``clock`` if it can take calls from threads; else the global reactor."""
    if reactor is not None:
        return reactor
    if IReactorFromThreads.providedBy(clock):
        return clock
    from twisted.internet import reactor as global_reactor

    return global_reactor


@attrs.frozen
class Statements:
    """A driver's statement functions, run on its database threads.

    Reads take ``(connection, *arguments, now)``; writes are handed to the
    driver's ``_write`` with the checked arguments, and it decides what
    else they receive (its transaction, the time, a revision counter).
    """

    get: Callable[..., Any]
    get_range: Callable[..., Any]
    store: Callable[..., Any]
    create: Callable[..., Any]
    update: Callable[..., Any]
    compare_and_swap: Callable[..., Any]
    delete: Callable[..., Any]
    delete_range: Callable[..., Any]


class ThreadedDriver:
    """The ``IBackend`` methods of a driver whose statements run on a thread pool.

    A subclass provides :meth:`_interact` (run a read on a database
    thread), :meth:`_write` (run a write in one transaction and fire once
    its change is published to this process's watchers) and
    :meth:`_close_pool` (close connections, stop the threads), and may
    tighten :meth:`_check_key`.

    :param statements: the driver's statement functions.
    :param clock: decides expiry (``clock.seconds()`` is UTC epoch seconds).
    :param reactor: delivers results from the threads (see :func:`default_reactor`).
    :param purge_interval: at most this often (clock seconds) a write also
        deletes expired rows; reads never see them anyway.
    """

    def __init__(
        self, statements: Statements, clock: IReactorTime, reactor: Any, purge_interval: float
    ) -> None:
        self.clock = clock
        self._statements = statements
        self._reactor = default_reactor(clock, reactor)
        self._purge_interval = purge_interval
        self._last_purge: float | None = None
        self._pool: ThreadPool | None = None
        self._shutdown_trigger: Any = None
        self._close_result: Deferred[None] | None = None
        self._fanout = WatchFanout()

    # -- for the drivers -------------------------------------------------------

    def _interact(self, function: Callable[..., _T], *args: Any) -> Deferred[_T]:
        raise NotImplementedError

    def _write(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        raise NotImplementedError

    def _close_pool(self) -> Deferred[None]:
        raise NotImplementedError

    def _check_key(self, key: str) -> str:
        return check_key(key)

    def _check_prefix(self, prefix: str) -> str:
        """Like :meth:`_check_key`, but the empty prefix (everything) is allowed."""
        return prefix if prefix == "" else self._check_key(prefix)

    def _check_open(self) -> None:
        if self._close_result is not None:
            raise EdgeError("the storage backend is closed")

    def _start_pool(self, name: str, max_threads: int) -> ThreadPool:
        """Start the thread pool, and close when the reactor shuts down."""
        pool = ThreadPool(minthreads=1, maxthreads=max_threads, name=name)
        pool.start()
        self._pool = pool
        if IReactorCore.providedBy(self._reactor):
            # "before": only those triggers can delay shutdown with a Deferred.
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "before", "shutdown", self.close
            )
        return pool

    def _remove_shutdown_trigger(self) -> None:
        if self._shutdown_trigger is not None:
            try:
                self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            except (ValueError, KeyError):
                pass  # we are being called by that very trigger
            self._shutdown_trigger = None

    def _purge_due(self, now: float) -> bool:
        """Whether a write at ``now`` also purges expired rows (at most once an interval)."""
        purge = self._last_purge is None or now - self._last_purge >= self._purge_interval
        if purge:
            self._last_purge = now
        return purge

    def _row(self, key: str, value: bytes, expires: datetime | None) -> tuple[str, bytes, float | None]:
        return (self._check_key(key), check_value(value), expires_to_epoch(expires))

    # -- IBackend ----------------------------------------------------------------

    def watch(self, prefixes, backlog: int = DEFAULT_BACKLOG) -> Watcher:
        """See :meth:`IBackend.watch`: fed by this process's own writes."""
        self._check_open()
        return self._fanout.watch(prefixes, backlog)

    def get(self, key: str) -> Deferred[Any]:
        """See :meth:`IBackend.get`."""
        return self._checked(self._interact, self._statements.get,
                             lambda: (self._check_key(key), self.clock.seconds()))

    def put(self, key: str, value: bytes, expires: datetime | None = None) -> Deferred[Any]:
        """See :meth:`IBackend.put`."""
        return self._checked(self._write, self._statements.store,
                             lambda: self._row(key, value, expires))

    def create(self, key: str, value: bytes, expires: datetime | None = None) -> Deferred[Any]:
        """See :meth:`IBackend.create`."""
        return self._checked(self._write, self._statements.create,
                             lambda: self._row(key, value, expires))

    def update(self, key: str, value: bytes, expires: datetime | None = None) -> Deferred[Any]:
        """See :meth:`IBackend.update`."""
        return self._checked(self._write, self._statements.update,
                             lambda: self._row(key, value, expires))

    def compare_and_swap(
        self, key: str, expected: bytes, value: bytes, expires: datetime | None = None
    ) -> Deferred[Any]:
        """See :meth:`IBackend.compare_and_swap`."""
        return self._checked(self._write, self._statements.compare_and_swap,
                             lambda: (*self._row(key, value, expires), check_value(expected)))

    def delete(self, key: str) -> Deferred[None]:
        """See :meth:`IBackend.delete`."""
        deleted = self._checked(self._write, self._statements.delete,
                                lambda: (self._check_key(key),))
        return deleted.addCallback(lambda _: None)

    def get_range(self, prefix: str, limit: int | None = None) -> Deferred[Any]:
        """See :meth:`IBackend.get_range`."""
        return self._checked(
            self._interact, self._statements.get_range,
            lambda: (self._check_prefix(prefix), check_limit(limit), self.clock.seconds()))

    def delete_range(self, prefix: str) -> Deferred[Any]:
        """See :meth:`IBackend.delete_range`."""
        return self._checked(self._write, self._statements.delete_range,
                             lambda: (self._check_prefix(prefix),))

    @staticmethod
    def _checked(run: Callable[..., Deferred[Any]], statement: Callable[..., Any],
                 arguments: Callable[[], tuple[Any, ...]]) -> Deferred[Any]:
        """``run(statement, *arguments())``, or a failed Deferred if the
        arguments are refused (the checks run here, on the reactor thread)."""
        try:
            checked = arguments()
        except Exception as error:
            return fail(error)
        return run(statement, *checked)

    def close(self) -> Deferred[None]:
        """Close the connections and stop the threads once running calls are done.

        Calls made after ``close`` fail; closing twice is harmless.
        """
        if self._close_result is None:
            self._fanout.close_all("the storage backend closed")
            self._close_result = self._close_pool()
        waiter: Deferred[None] = Deferred()

        def relay(result: object) -> object:
            waiter.callback(None)
            return result

        self._close_result.addBoth(relay)
        return waiter
