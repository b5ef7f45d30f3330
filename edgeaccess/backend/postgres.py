"""The shared backend: PostgreSQL, for several proxies on one database.

Queries use psycopg 3's sync API on a bounded Twisted ``ThreadPool``
(one connection per pool thread), so the reactor never waits on the
network. Every write is one READ COMMITTED transaction that first locks
the one-row revision counter: writers are serialized, and revision order
is commit order, across every proxy sharing the database.

The change feed (``watch``): each write also appends its change to the
``changes`` table, whose trigger calls ``pg_notify`` with (op, revision,
key), never the value. One LISTEN connection per backend is read by the
reactor (through an ``os.dup()`` of its socket: libpq closes its own on
EOF); a notification makes the backend read the change log from its last
revision on and publish the rows in order. A write of this process fires
its caller only once its change is published, as the SQLite driver does.
A hole in the log, a lost LISTEN connection or a database restart closes
every watcher: the consumer re-reads, nothing is silently lost. While the
LISTEN connection is down, ``watch`` fails with ``EdgeError`` (consumers
back off) and the backend reconnects with backoff.

Lost connections and serialization failures are retried with backoff on
the pool thread. A connection lost *during* COMMIT is ambiguous (the write
may have landed); it is retried like any other, so a retried ``create``
may report ``AlreadyExists`` for its own write.

The schema is versioned like SQLite's: ``migrations_postgres/NNNN_*.sql``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import attrs
import psycopg
from psycopg import errors as pg_errors
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IReactorTime, IReadDescriptor
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from edgeaccess.backend import check_key, check_value, epoch_to_expires, is_live, prefix_upper_bound
from edgeaccess.backend.driver import (
    NOT_AN_EDGEACCESS_DATABASE,
    Statements,
    ThreadedDriver,
    UnsupportedSchemaVersion,
    check_schema_version,
    migration_scripts,
)
from edgeaccess.backend.interfaces import CompareFailed, IAtomicUpdate, IBackend, Item
from edgeaccess.backend.watch import DEFAULT_BACKLOG, Watcher
from edgeaccess.errors import AlreadyExists, BadRequest, EdgeError, NotFound

_log = Logger()

_T = TypeVar("_T")

CHANNEL = "edgeaccess_changes"
#: Seconds close() waits for calls already running on the pool's threads.
CLOSE_WAIT = 5.0
_LIVE = "(expires IS NULL OR expires > %s)"
#: Errors after which the same statement may succeed on a new try.
_RETRYABLE = (psycopg.OperationalError, pg_errors.SerializationFailure, pg_errors.DeadlockDetected)
#: Arbitrary key of the advisory lock taken while migrating.
_MIGRATION_LOCK = 0x6564676561636373


def redact(url: str) -> str:
    """``url`` without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def load_migrations() -> list[tuple[int, str, str]]:
    """``(version, name, script)`` of the shipped migrations, numbered 1..N."""
    return migration_scripts("migrations_postgres")


def apply_migrations(connection: psycopg.Connection, now: float) -> int:
    """Bring the schema to the newest version in one transaction (blocking)."""
    migrations = load_migrations()
    latest = migrations[-1][0] if migrations else 0
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        has_version = connection.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
            " AND tablename = 'schema_version'"
        ).fetchone()[0]
        if not has_version:
            others = connection.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
            ).fetchone()[0]
            if others:
                raise UnsupportedSchemaVersion(NOT_AN_EDGEACCESS_DATABASE)
            connection.execute(
                "CREATE TABLE schema_version (version integer PRIMARY KEY,"
                " applied_at double precision NOT NULL)"
            )
        current = connection.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
        check_schema_version(current, latest)
        for version, _name, script in migrations[current:]:
            connection.execute(script.encode("utf-8"))  # several statements: no parameters
            connection.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (%s, %s)", (version, now)
            )
    if current < latest:
        _log.info("database schema migrated from {old} to {new}", old=current, new=latest)
    return latest


def check_pg_key(key: str) -> str:
    """PostgreSQL text cannot hold NUL."""
    check_key(key)
    if "\x00" in key:
        raise BadRequest("a key must not contain NUL")
    return key


@attrs.frozen
class _Written:
    """What a write committed: the caller's result and its highest revision."""

    result: Any
    revision: int


@implementer(IBackend, IAtomicUpdate)
class PostgresBackend(ThreadedDriver):
    """:class:`IBackend` on a PostgreSQL database shared by several proxies.

    The constructor does no I/O; :meth:`start` (or the first call) migrates
    the schema and opens the LISTEN connection.

    :param url: ``postgresql://USER:PASS@HOST:PORT/DB[?sslmode=...]`` (libpq).
    :param clock: decides expiry (UTC epoch seconds).
    :param reactor: runs threads, reads the LISTEN socket, schedules retries.
    :param max_threads: size of the query thread pool (= connections).
    :param retry_for: seconds a call keeps retrying lost connections.
    :param log_retention: seconds the change log keeps a row.
    :param feed_tick: seconds between the LISTEN connection's polls: it
        asks for the newest revision, and reads the change log when it moved
        (quiet changes, and any notification that did not come, arrive
        within a tick).
    :param feed_timeout: seconds without an answer to a poll after which
        the LISTEN connection counts as lost (a frozen server sends
        nothing, and TCP keepalives stay silent).
    """

    def __init__(
        self,
        url: str,
        clock: IReactorTime,
        reactor: Any = None,
        max_threads: int = 4,
        retry_for: float = 30.0,
        purge_interval: float = 60.0,
        log_retention: float = 600.0,
        feed_tick: float = 1.0,
        feed_timeout: float = 10.0,
    ) -> None:
        super().__init__(_STATEMENTS, clock, reactor, purge_interval)
        self.url = url
        self._max_threads = max_threads
        self._retry_for = retry_for
        self._log_retention = log_retention
        self._feed_tick = feed_tick
        self._feed_timeout = max(feed_timeout, feed_tick)
        #: Prefixes this process registered in watched_prefixes (or is registering).
        self._registered_prefixes: set[str] = set()
        #: (time, revision) seen at most once per purge interval: the change
        #: log is purged by revision (its primary key), never by a scan.
        self._revision_marks: list[tuple[float, int]] = []
        self._started: Deferred[None] | None = None
        self._ready = False
        self._open_error: BaseException | None = None
        self._start_waiters: list[Deferred[PostgresBackend]] = []
        self._in_flight: dict[Deferred[Any], None] = {}
        self._local = threading.local()
        self._connections: list[psycopg.Connection] = []
        self._connections_lock = threading.Lock()
        # The change feed (reactor thread only):
        self._listener: _Listener | None = None
        self._reconnect_call: Any = None
        self._reconnect_delay = 0.1
        self._last = 0  # highest revision published (or skipped with no watcher)
        self._wanted = 0  # highest revision known to be committed
        self._fetching = False
        self._catch_up: list[tuple[int, Deferred[None]]] = []

    # -- threads and connections ------------------------------------------

    def start(self) -> Deferred[PostgresBackend]:
        """Migrate and start the change feed (once); fire with ``self``."""
        try:
            self._ensure_pool()
        except Exception as error:
            return fail(error)
        if self._open_error is not None:
            return fail(self._open_error)
        if self._ready:
            return succeed(self)
        waiter: Deferred[PostgresBackend] = Deferred()
        self._start_waiters.append(waiter)
        if self._started is None:
            self._started = self._run(apply_migrations, self.clock.seconds())
            self._started.addCallback(lambda _: self._start_feed())
            self._started.addBoth(self._start_done)
        return waiter

    def _start_done(self, result: object) -> None:
        waiters, self._start_waiters = self._start_waiters, []
        if isinstance(result, Failure):
            self._open_error = result.value
            _log.error("cannot open database {url}: {error}", url=redact(self.url),
                       error=result.value)
            for waiter in waiters:
                waiter.errback(result)
            return
        self._ready = True
        for waiter in waiters:
            waiter.callback(self)

    def _ensure_pool(self) -> ThreadPool:
        self._check_open()
        if self._pool is None:
            self._start_pool("edgeaccess-postgres", self._max_threads)
        return self._pool

    def _connection(self) -> psycopg.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is not None and not connection.closed:
            return connection
        connection = psycopg.connect(self.url, autocommit=True, connect_timeout=10,
                                     application_name="edgeaccess")
        self._local.connection = connection
        with self._connections_lock:
            self._connections.append(connection)
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            with self._connections_lock:
                if connection in self._connections:
                    self._connections.remove(connection)
            try:
                connection.close()
            except Exception:
                pass

    def _retrying(self, function: Callable[..., _T], *args: Any) -> _T:
        """Run ``function(connection, *args)`` on this pool thread, retrying."""
        deadline = time.monotonic() + self._retry_for
        delay = 0.05
        while True:
            try:
                return function(self._connection(), *args)
            except _RETRYABLE as error:
                if isinstance(error, psycopg.OperationalError) and not isinstance(
                    error, (pg_errors.SerializationFailure, pg_errors.DeadlockDetected)
                ):
                    self._drop_connection()
                if self._close_result is not None or time.monotonic() + delay > deadline:
                    raise EdgeError(f"storage failure: {error}") from error
                time.sleep(delay)  # a pool thread, never the reactor
                delay = min(delay * 2, 2.0)
            except psycopg.Error as error:
                raise EdgeError(f"storage failure: {error}") from error

    def _run(self, function: Callable[..., _T], *args: Any) -> Deferred[_T]:
        try:
            pool = self._ensure_pool()
        except Exception as error:
            return fail(error)
        running = deferToThreadPool(self._reactor, pool, self._retrying, function, *args)
        # Closing waits for calls already on a thread (their connections
        # must not be closed under them: a graceful stop's last writes).
        self._in_flight[running] = None

        def finished(result: object) -> object:
            self._in_flight.pop(running, None)
            return result

        return running.addBoth(finished)

    def _interact(self, function: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """Run after the backend started (migrated); queries retry."""
        if self._close_result is not None:
            return fail(EdgeError("the storage backend is closed"))
        if self._ready:
            return self._run(function, *args)
        started: Deferred[Any] = Deferred()
        self.start().addCallbacks(lambda _: started.callback(None), started.errback)
        return started.addCallback(lambda _: self._run(function, *args))

    def _write(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """One write transaction, then its change published to watchers."""
        now = self.clock.seconds()
        purge = self._purge_due(now)
        purge_log_to = None
        if purge:
            purge_log_to = self._purgeable_revision(now)
        written = self._interact(_in_transaction, function, now, purge, purge_log_to, args)
        return written.addCallback(self._mark).addCallback(self._published)

    def _mark(self, written: _Written) -> _Written:
        now = self.clock.seconds()
        if not self._revision_marks or now - self._revision_marks[-1][0] >= self._purge_interval:
            self._revision_marks.append((now, written.revision))
        return written

    def _purgeable_revision(self, now: float) -> int | None:
        """The newest revision written more than ``log_retention`` ago (as
        this process saw it), or None."""
        old = [mark for mark in self._revision_marks if mark[0] <= now - self._log_retention]
        if not old:
            return None
        self._revision_marks = [m for m in self._revision_marks if m[0] > old[-1][0]]
        return old[-1][1]

    def _published(self, written: _Written) -> Deferred[Any]:
        if written.revision <= self._last:
            return succeed(written.result)
        if not self._fanout.has_watchers() or self._listener is None:
            self._last = max(self._last, written.revision)
            return succeed(written.result)
        waiter: Deferred[None] = Deferred()
        self._catch_up.append((written.revision, waiter))
        self._want(written.revision)
        return waiter.addCallback(lambda _: written.result)

    # -- the change feed (reactor thread) ---------------------------------

    def _start_feed(self) -> Deferred[None]:
        def opened(result: tuple[psycopg.Connection, int]) -> None:
            connection, revision = result
            if self._close_result is not None:
                connection.close()
                return
            self._last = self._wanted = revision
            self._listener = _Listener(self, connection)
            self._reconnect_delay = 0.1

        return deferToThreadPool(self._reactor, self._ensure_pool(), self._open_listener).addCallback(opened)

    def _open_listener(self) -> tuple[psycopg.Connection, int]:
        connection = psycopg.connect(self.url, autocommit=True, connect_timeout=10,
                                     application_name="edgeaccess-listen")
        try:
            connection.execute(f"LISTEN {CHANNEL}")
            (revision,) = connection.execute("SELECT value FROM revision_counter WHERE id = 1").fetchone()
        except BaseException:
            connection.close()
            raise
        return connection, int(revision)

    def _notified(self, payload: str) -> None:
        try:
            revision = int(json.loads(payload)["revision"])
        except (ValueError, KeyError, TypeError):
            _log.warn("ignoring a malformed change notification")
            return
        if self._fanout.has_watchers():
            self._want(revision)
        else:
            self._last = max(self._last, revision)

    def _want(self, revision: int) -> None:
        self._wanted = max(self._wanted, revision)
        if self._fetching or self._wanted <= self._last:
            return
        self._fetching = True
        fetched = self._run(_read_changes, self._last, self._fanout.prefixes())
        fetched.addCallbacks(self._deliver, self._fetch_failed)

    def _deliver(self, rows: list[tuple]) -> None:
        self._fetching = False
        for revision, op, key, value, expires in rows:
            if revision <= self._last:
                continue
            if revision != self._last + 1:
                self._feed_gap(f"the change log has a gap after revision {self._last}")
                self._last = revision
                continue
            self._last = revision
            if op == "put" and value is None:
                # Not under a watched prefix when the log was read (its value
                # was left in the database: audit appends, sessions). A
                # watcher that came meanwhile and wants it must re-read.
                if self._fanout.matches(key):
                    self._feed_gap(f"a watcher of {key[:100]!r} started while the log was read")
                continue
            if op == "put":
                self._fanout.put(Item(key, bytes(value), epoch_to_expires(expires), revision))
            else:
                self._fanout.delete(key, revision)
        if self._wanted > self._last and rows:
            self._want(self._wanted)
            self._release_caught_up()
            return
        if self._wanted > self._last:
            # Nothing newer in the log although it was announced: it was purged.
            self._feed_gap("the change log lost announced revisions")
            self._last = self._wanted
        self._release_caught_up()

    def _fetch_failed(self, failure: Any) -> None:
        self._fetching = False
        self._feed_gap(f"cannot read the change log: {failure.value}")
        self._last = max(self._last, self._wanted)
        self._release_caught_up()

    def _release_caught_up(self) -> None:
        still, done = [], []
        for revision, waiter in self._catch_up:
            (done if revision <= self._last else still).append((revision, waiter))
        self._catch_up = still
        for _, waiter in done:
            waiter.callback(None)

    def _feed_gap(self, reason: str) -> None:
        _log.warn("change feed: {reason}; closing watchers", reason=reason)
        self._fanout.close_all(reason)

    def _listener_lost(self, reason: str) -> None:
        self._listener = None
        self._fanout.close_all(f"lost the database change feed: {reason}")
        self._last = max(self._last, self._wanted)
        for _, waiter in self._catch_up:
            waiter.callback(None)  # their writes committed; nobody is watching
        self._catch_up = []
        if self._close_result is not None:
            return
        _log.warn("change feed lost ({reason}); reconnecting", reason=reason)
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        delay, self._reconnect_delay = self._reconnect_delay, min(self._reconnect_delay * 2, 5.0)
        self._reconnect_call = self._reactor.callLater(delay, self._reconnect)

    def _reconnect(self) -> None:
        self._reconnect_call = None
        if self._close_result is not None:
            return

        def failed(failure: Any) -> None:
            _log.info("change feed: reconnect failed ({error})", error=failure.value)
            self._schedule_reconnect()

        self._start_feed().addErrback(failed)

    # -- IBackend ----------------------------------------------------------

    def watch(self, prefixes, backlog: int = DEFAULT_BACKLOG) -> Watcher:
        """See :meth:`IBackend.watch`: fed by every proxy's writes.

        :raises EdgeError: when closed, not started yet, or while the
            change feed reconnects (try again later).
        """
        self._check_open()
        if self._listener is None:
            if self._started is None:
                self.start()
            raise EdgeError("the database change feed is not connected yet")
        watcher = self._fanout.watch(prefixes, backlog)
        self._register_prefixes(list(prefixes))
        return watcher

    def _register_prefixes(self, prefixes: list[str]) -> None:
        """Make writes under ``prefixes`` notify (migration 0002). Until this
        commits they reach the watcher on the next poll: later, not lost."""
        new = sorted({p for p in prefixes if isinstance(p, str)} - self._registered_prefixes)
        if not new:
            return
        self._registered_prefixes.update(new)

        def failed(failure: Any) -> None:
            self._registered_prefixes.difference_update(new)
            _log.warn("cannot register watched prefixes {prefixes}: {error}",
                      prefixes=new, error=failure.value)

        self._run(_register_watched, new, self.clock.seconds()).addErrback(failed)

    def _polled(self, revision: int) -> None:
        """The poll's answer: the newest committed revision."""
        if self._fanout.has_watchers():
            self._want(revision)
        elif not self._catch_up:
            self._last = max(self._last, revision)

    def _check_key(self, key: str) -> str:
        return check_pg_key(key)

    def atomic_update(self, compute: Callable[[Any], tuple[list, Any]]) -> Deferred[Any]:
        """See :meth:`IAtomicUpdate.atomic_update`: one READ COMMITTED
        transaction holding the revision counter's row lock, which every
        writer of every proxy takes first, so nothing interleaves (and no
        serialization failure needs a retry)."""
        return self._write(_atomic_update, compute)

    def _close_pool(self) -> Deferred[None]:
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        for _, waiter in self._catch_up:
            waiter.callback(None)
        self._catch_up = []
        pool = self._pool
        if pool is None:
            return succeed(None)
        self._remove_shutdown_trigger()

        def close_all() -> None:
            with self._connections_lock:
                connections, self._connections = self._connections, []
            for connection in connections:
                try:
                    connection.close()
                except Exception:
                    pass

        def stop(result: object) -> object:
            pool.stop()
            return result

        # Calls already running finish first (bounded: a retrying call gives
        # up after retry_for seconds anyway).
        in_flight = [d for d in self._in_flight if not d.called]
        waited: Deferred[Any] = DeferredList(in_flight, consumeErrors=True) if in_flight \
            else succeed(None)
        if in_flight:
            waited.addTimeout(CLOSE_WAIT, self._reactor).addErrback(lambda _: None)
        closed = waited.addCallback(lambda _: deferToThreadPool(self._reactor, pool, close_all))
        closed.addBoth(stop)
        closed.addErrback(lambda failure: _log.failure("closing the PostgreSQL backend", failure))
        return closed


@implementer(IReadDescriptor)
class _Listener:
    """The LISTEN connection, read by the reactor through a dup of its socket."""

    def __init__(self, backend: PostgresBackend, connection: psycopg.Connection) -> None:
        self._backend = backend
        self._connection = connection
        self._fd = os.dup(connection.pgconn.socket)
        self._stopped = False
        self._reactor = backend._reactor
        self._awaiting_since: float | None = None
        connection.pgconn.nonblocking = 1
        self._reactor.addReader(self)
        self._tick_call = self._reactor.callLater(backend._feed_tick, self._tick)

    def _tick(self) -> None:
        """Ask for the newest revision; no answer for ``feed_timeout`` means
        the server is gone."""
        self._tick_call = None
        if self._stopped:
            return
        now = self._reactor.seconds()
        if self._awaiting_since is not None:
            if now - self._awaiting_since >= self._backend._feed_timeout:
                self._lost(f"no answer from the database for {now - self._awaiting_since:.0f} s")
                return
            self._tick_call = self._reactor.callLater(self._backend._feed_tick, self._tick)
            return
        pgconn = self._connection.pgconn
        try:
            pgconn.send_query(b"SELECT value FROM revision_counter WHERE id = 1")
            pgconn.flush()
        except psycopg.Error as error:
            self._lost(str(error).strip() or "connection lost")
            return
        self._awaiting_since = now
        self._tick_call = self._reactor.callLater(self._backend._feed_tick, self._tick)

    def _lost(self, reason: str) -> None:
        self.stop()
        self._backend._listener_lost(reason)

    def fileno(self) -> int:
        return -1 if self._stopped else self._fd

    def logPrefix(self) -> str:
        return "edgeaccess-postgres-listen"

    def doRead(self) -> None:
        pgconn = self._connection.pgconn
        try:
            pgconn.consume_input()
            if pgconn.status != psycopg.pq.ConnStatus.OK:
                raise psycopg.OperationalError("the connection is not open")
        except psycopg.Error as error:
            self._lost(str(error).strip() or "connection lost")
            return
        while not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:
                break
            self._awaiting_since = None  # the poll answered
            if result.status == psycopg.pq.ExecStatus.TUPLES_OK and result.ntuples == 1:
                value = result.get_value(0, 0)
                if value is not None:
                    self._backend._polled(int(value))
        while (notify := pgconn.notifies()) is not None:
            if notify.relname.decode() == CHANNEL:
                self._backend._notified(notify.extra.decode("utf-8", "replace"))

    def connectionLost(self, reason: Any) -> None:
        if not self._stopped:
            self.stop()
            self._backend._listener_lost(str(reason.value))

    def stop(self) -> None:
        if self._stopped:
            return
        if self._tick_call is not None and self._tick_call.active():
            self._tick_call.cancel()
        self._tick_call = None
        self._backend._reactor.removeReader(self)
        self._stopped = True
        os.close(self._fd)
        try:
            self._connection.close()
        except Exception:
            pass


# -- the statements, run on a pool thread ------------------------------------


class _Revisions:
    """The locked counter of one write transaction."""

    def __init__(self, connection: psycopg.Connection) -> None:
        self._connection = connection
        (value,) = connection.execute(
            "SELECT value FROM revision_counter WHERE id = 1 FOR UPDATE"
        ).fetchone()
        self.value = int(value)
        self.start = self.value

    def next(self) -> int:
        self.value += 1
        return self.value

    def save(self) -> None:
        if self.value != self.start:
            self._connection.execute(
                "UPDATE revision_counter SET value = %s WHERE id = 1", (self.value,)
            )


def _in_transaction(
    connection: psycopg.Connection,
    function: Callable[..., Any],
    now: float,
    purge: bool,
    purge_log_to: int | None,
    args: tuple[Any, ...],
) -> _Written:
    with connection.transaction():
        revisions = _Revisions(connection)
        if purge:
            connection.execute("DELETE FROM items WHERE expires IS NOT NULL AND expires <= %s", (now,))
            if purge_log_to is not None:
                connection.execute("DELETE FROM changes WHERE revision <= %s", (purge_log_to,))
        result = function(connection, revisions, now, *args)
        revisions.save()
    return _Written(result, revisions.value)


_INSERT_CHANGE = ("INSERT INTO changes (revision, op, key, value, expires, written_at, quiet)"
                  " VALUES (%s, %s, %s, %s, %s, %s, %s)")
_UPSERT_ITEM = ("INSERT INTO items (key, value, expires, revision) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (key) DO UPDATE SET"
                " value = excluded.value, expires = excluded.expires, revision = excluded.revision")


def _log_change(connection, revision: int, op: str, key: str, value, expires, now: float,
                quiet: bool = False) -> None:
    # quiet: the value did not change (a heartbeat moving an expiry): the
    # trigger does not notify; listeners find it on their next tick.
    connection.execute(_INSERT_CHANGE, (revision, op, key, value, expires, now, quiet))


def _row_to_item(key: str, value: bytes, expires: float | None, revision: int) -> Item:
    return Item(key, bytes(value), epoch_to_expires(expires), int(revision))


def _live_value(connection, key: str, now: float) -> bytes | None:
    row = connection.execute(f"SELECT value FROM items WHERE key = %s AND {_LIVE}", (key, now)).fetchone()
    return None if row is None else bytes(row[0])


_UNREAD = object()


def _store(connection, revisions: _Revisions, now: float, key: str, value: bytes, expires,
           previous=_UNREAD) -> Item:
    if previous is _UNREAD:
        previous = _live_value(connection, key, now)
    revision = revisions.next()
    connection.execute(_UPSERT_ITEM, (key, value, expires, revision))
    _log_change(connection, revision, "put", key, value, expires, now, quiet=previous == value)
    return _row_to_item(key, value, expires, revision)


def _get(connection, key: str, now: float) -> Item:
    row = connection.execute(
        f"SELECT key, value, expires, revision FROM items WHERE key = %s AND {_LIVE}", (key, now)
    ).fetchone()
    if row is None:
        raise NotFound("item not found")
    return _row_to_item(*row)


def _create(connection, revisions, now, key, value, expires) -> Item:
    if _live_value(connection, key, now) is not None:
        raise AlreadyExists("item already exists")
    return _store(connection, revisions, now, key, value, expires, None)


def _update(connection, revisions, now, key, value, expires) -> Item:
    previous = _live_value(connection, key, now)
    if previous is None:
        raise NotFound("item not found")
    return _store(connection, revisions, now, key, value, expires, previous)


def _compare_and_swap(connection, revisions, now, key, value, expires, expected) -> Item:
    current = _live_value(connection, key, now)
    if current is None:
        raise NotFound("item not found")
    if current != expected:
        raise CompareFailed("the item changed since it was read")
    return _store(connection, revisions, now, key, value, expires, current)


def _delete(connection, revisions, now, key) -> None:
    row = connection.execute("DELETE FROM items WHERE key = %s RETURNING expires", (key,)).fetchone()
    if row is None or not is_live(row[0], now):
        raise NotFound("item not found")  # rolls back: an expired row stays for the purge
    _log_change(connection, revisions.next(), "delete", key, None, None, now)


def _range_condition(prefix: str) -> tuple[str, tuple[str, ...]]:
    bound = prefix_upper_bound(prefix)
    if bound is None:
        return "key >= %s", (prefix,)
    return "key >= %s AND key < %s", (prefix, bound)


def _get_range(connection, prefix: str, limit: int | None, now: float) -> list[Item]:
    condition, parameters = _range_condition(prefix)
    rows = connection.execute(
        f"SELECT key, value, expires, revision FROM items WHERE {condition} AND {_LIVE}"
        " ORDER BY key LIMIT %s",
        (*parameters, now, limit),
    ).fetchall()
    return [_row_to_item(*row) for row in rows]


def _delete_range(connection, revisions, now, prefix: str) -> int:
    condition, parameters = _range_condition(prefix)
    rows = connection.execute(
        f"DELETE FROM items WHERE {condition} RETURNING key, expires", parameters
    ).fetchall()
    live = sorted(key for key, expires in rows if is_live(expires, now))
    for key in live:
        _log_change(connection, revisions.next(), "delete", key, None, None, now)
    return len(live)


def _read_changes(connection, after: int, prefixes: list[str]) -> list[tuple]:
    # Values only of keys some watcher of this process follows: a proxy does
    # not pull every audit event through its change feed.
    return connection.execute(
        "SELECT revision, op, key, CASE WHEN EXISTS (SELECT 1 FROM unnest(%s::text[])"
        " AS p(prefix) WHERE starts_with(key, prefix)) THEN value END, expires"
        " FROM changes WHERE revision > %s ORDER BY revision LIMIT 1000",
        (prefixes, after),
    ).fetchall()


class _Reader:
    """What :meth:`PostgresBackend.atomic_update` gives ``compute``: reads
    inside the write transaction (which holds the counter lock)."""

    def __init__(self, connection: psycopg.Connection, now: float) -> None:
        self._connection = connection
        self._now = now

    def get_many(self, keys) -> dict[str, bytes]:
        keys = [check_pg_key(key) for key in keys]
        if not keys:
            return {}
        rows = self._connection.execute(
            f"SELECT key, value FROM items WHERE key = ANY(%s) AND {_LIVE}", (keys, self._now)
        ).fetchall()
        return {key: bytes(value) for key, value in rows}


def _atomic_update(connection, revisions: _Revisions, now: float, compute) -> Any:
    writes, result = compute(_Reader(connection, now))
    items, changes = [], []
    for key, value in writes:
        key, value = check_pg_key(key), check_value(value)
        revision = revisions.next()
        items.append((key, value, None, revision))
        changes.append((revision, "put", key, value, None, now, False))
    if len({key for key, _, _, _ in items}) == len(items):
        # One statement each for all the rows (a round trip per row is most
        # of the cost of a large batch).
        if items:
            keys_, values, _, revisions_ = zip(*items)
            connection.execute(
                "INSERT INTO items (key, value, expires, revision)"
                " SELECT k, v, NULL, r FROM unnest(%s::text[], %s::bytea[], %s::bigint[])"
                " AS t(k, v, r) ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                " expires = excluded.expires, revision = excluded.revision",
                (list(keys_), list(values), list(revisions_)))
            connection.execute(
                "INSERT INTO changes (revision, op, key, value, expires, written_at, quiet)"
                " SELECT r, 'put', k, v, NULL, %s, false"
                " FROM unnest(%s::bigint[], %s::text[], %s::bytea[]) AS t(r, k, v)",
                (now, list(revisions_), list(keys_), list(values)))
    else:
        with connection.cursor() as cursor:
            cursor.executemany(_UPSERT_ITEM, items)
            cursor.executemany(_INSERT_CHANGE, changes)
    return result


def _register_watched(connection, prefixes: list[str], now: float) -> None:
    with connection.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO watched_prefixes (prefix, added_at) VALUES (%s, %s)"
            " ON CONFLICT (prefix) DO NOTHING", [(prefix, now) for prefix in prefixes])


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
