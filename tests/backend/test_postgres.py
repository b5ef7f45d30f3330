"""PostgresBackend against the shared contract, on a real PostgreSQL 15.

The test session starts its own throw-away server (``edgeaccess.devpostgres``); each
test gets a fresh database. Fault tests restart that server
(``pg_ctl restart -m fast|immediate``) under an open watch, so they use a
server of their own.
"""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater

from edgeaccess.backend.postgres import PostgresBackend, load_migrations
from edgeaccess.backend.watch import WatchClosed
from edgeaccess.errors import BadRequest, EdgeError

from .contract import BackendContract
from edgeaccess.devpostgres import BIN, PostgresServer

pytestmark = pytest.mark.skipif(not os.path.exists(BIN), reason="PostgreSQL 15 is not installed")


@pytest.fixture(scope="module")
def pg_server():
    server = PostgresServer()
    yield server
    server.stop()


@pytest_twisted.async_yield_fixture
async def pg_backend(pg_server: PostgresServer, clock: Clock):
    backend = await PostgresBackend(pg_server.create_database(), clock, reactor).start()
    yield backend
    await backend.close()


class TestPostgresBackend(BackendContract):
    """The PostgreSQL driver passes the whole contract."""

    @pytest.fixture
    def backend(self, pg_backend: PostgresBackend) -> PostgresBackend:
        return pg_backend


async def eventually(condition, what: str, timeout: float = 30.0):
    """Poll ``condition`` (a coroutine function) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = await condition()
        except EdgeError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_keys_with_nul_are_refused(pg_backend: PostgresBackend) -> None:
    with pytest.raises(BadRequest):
        await pg_backend.put("/a\x00b", b"x")
    with pytest.raises(BadRequest):
        await pg_backend.get_range("/a\x00")
    with pytest.raises(BadRequest):
        await pg_backend.delete_range("/a\x00")


@pytest_twisted.ensureDeferred
async def test_a_second_proxy_sees_writes_through_the_watch(pg_server, clock) -> None:
    url = pg_server.create_database()
    first = await PostgresBackend(url, clock, reactor).start()
    second = await PostgresBackend(url, clock, reactor).start()
    try:
        watcher = second.watch(["/roles/"])
        assert (await watcher.next()).type == "init"
        written = await first.put("/roles/a", b"1")
        await first.delete("/roles/a")
        put, delete = await watcher.next(), await watcher.next()
        assert put.item == written
        assert (delete.type, delete.key) == ("delete", "/roles/a")
        assert delete.revision > written.revision
        assert await second.get_range("/roles/") == []
        watcher.close()
    finally:
        await first.close()
        await second.close()


@pytest_twisted.ensureDeferred
async def test_reopening_keeps_data_and_schema(pg_server, clock) -> None:
    url = pg_server.create_database()
    first = await PostgresBackend(url, clock, reactor).start()
    kept = await first.put("/users/alice", b"alice")
    await first.close()
    second = await PostgresBackend(url, clock, reactor).start()
    try:
        assert await second.get("/users/alice") == kept
        assert (await second.put("/users/bob", b"b")).revision > kept.revision
    finally:
        await second.close()
    with psycopg.connect(url) as connection:
        latest = connection.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        assert latest == len(load_migrations()) == 2


@pytest_twisted.ensureDeferred
async def test_a_foreign_database_is_refused(pg_server, clock) -> None:
    url = pg_server.create_database()
    with psycopg.connect(url) as connection:
        connection.execute("CREATE TABLE payroll (id integer)")
    with pytest.raises(EdgeError, match="not an edgeaccess database"):
        await PostgresBackend(url, clock, reactor).start()


# -- faults: the database restarts under an open watch ----------------------


@pytest.fixture(scope="module")
def restart_server():
    server = PostgresServer(durable=True)
    yield server
    server.stop()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
@pytest_twisted.ensureDeferred
async def test_a_database_restart_closes_the_watch_and_writes_resume(restart_server, clock, mode) -> None:
    url = restart_server.create_database()
    backend = await PostgresBackend(url, clock, reactor).start()
    try:
        before = await backend.put("/roles/a", b"before")
        watcher = backend.watch(["/roles/"])
        assert (await watcher.next()).type == "init"
        pending = watcher.next()
        restart_server.restart(mode)
        with pytest.raises(WatchClosed):
            await pending
        # A write after the restart succeeds (its connection is re-made).
        after = await backend.put("/roles/b", b"after")
        assert after.revision > before.revision
        # The next watch comes once the feed reconnected; its consumer re-reads.
        again = await eventually(lambda: _watch(backend), "the change feed to reconnect")
        assert (await again.next()).type == "init"
        assert [i.key for i in await backend.get_range("/roles/")] == ["/roles/a", "/roles/b"]
        third = await backend.put("/roles/c", b"3")
        event = await again.next()
        assert event.item == third
        again.close()
    finally:
        await backend.close()


async def _watch(backend):
    return backend.watch(["/roles/"])


@pytest_twisted.ensureDeferred
async def test_a_frozen_database_closes_the_watch(pg_server, clock) -> None:
    """SIGSTOP the server process behind the LISTEN connection: nothing arrives,
    no error either; the liveness tick notices and the watch closes."""
    backend = await PostgresBackend(pg_server.create_database(), clock, reactor,
                                    feed_tick=0.5, feed_timeout=1.0).start()
    with psycopg.connect(backend.url, autocommit=True) as probe:
        pids = {pid for (pid,) in probe.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'edgeaccess-listen'")}
    assert len(pids) == 1
    (pid,) = pids
    try:
        watcher = backend.watch([""])
        assert (await watcher.next()).type == "init"
        await deferLater(reactor, 1.2, lambda: None)  # ticks answered: still open
        assert watcher.closed_reason is None
        os.kill(pid, signal.SIGSTOP)
        try:
            reason = await watcher.when_closed().addTimeout(15, reactor)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert "no answer" in reason
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_two_proxies_starting_at_once_share_one_ca_set(pg_server, clock, tmp_path) -> None:
    """Two first starts on an empty database: create() decides, both load one set."""
    import base64
    from datetime import datetime, timezone

    from twisted.internet import defer

    from edgeaccess.pki import castore

    url = pg_server.create_database()
    backends = [await PostgresBackend(url, clock, reactor).start() for _ in range(2)]
    secret = base64.b64encode(os.urandom(32)).decode()
    now = datetime.now(timezone.utc)
    try:
        loaded = await defer.gatherResults([
            defer.Deferred.fromCoroutine(castore.load_or_create_authority(
                backend, "example", now,
                castore.CAKeySource.from_options(None, {castore.CA_KEY_ENV: secret},
                                                 tmp_path / f"p{index}")))
            for index, backend in enumerate(backends)])
        assert loaded[0].fingerprints() == loaded[1].fingerprints()
        assert loaded[0].pin == loaded[1].pin
        items = await backends[0].get_range("/authorities/")
        assert [item.key for item in items] == [castore.AUTHORITIES_KEY]
    finally:
        for backend in backends:
            await backend.close()


# -- change feed hygiene: only watched prefixes, only changed values notify --


class _Notifications:
    """A LISTEN connection of its own, counting what the trigger sends."""

    def __init__(self, url: str) -> None:
        self.connection = psycopg.connect(url, autocommit=True)
        self._received: list[str] = []
        self.connection.add_notify_handler(lambda notify: self._received.append(notify.payload))
        self.connection.execute("LISTEN edgeaccess_changes")

    def keys(self) -> list[str]:
        """The keys notified since the last call (a query reads what arrived)."""
        import json as _json

        deadline = time.monotonic() + 1.0  # what is sent at commit may lag a little
        while time.monotonic() < deadline:
            self.connection.execute("SELECT 1")
            time.sleep(0.05)
        received, self._received = self._received, []
        return [_json.loads(payload)["key"] for payload in received]

    def close(self) -> None:
        self.connection.close()


@pytest_twisted.ensureDeferred
async def test_only_watched_prefixes_and_changed_values_notify(pg_server, clock) -> None:
    from datetime import datetime, timedelta, timezone

    url = pg_server.create_database()
    writer = await PostgresBackend(url, clock, reactor).start()
    watching = await PostgresBackend(url, clock, reactor, feed_tick=0.2).start()
    listen = _Notifications(url)
    try:
        watcher = watching.watch(["/nodes/"])
        assert (await watcher.next()).type == "init"
        await eventually(lambda: _registered(url, "/nodes/"), "the prefix to be registered")
        expires = datetime.fromtimestamp(clock.seconds(), timezone.utc) + timedelta(minutes=5)
        await writer.put("/audit/events/1", b"unwatched")
        first = await writer.put("/nodes/n1", b"v1", expires)
        # A heartbeat: same value, the expiry moved.
        beat = await writer.put("/nodes/n1", b"v1", expires + timedelta(seconds=30))
        changed = await writer.put("/nodes/n1", b"v2", expires + timedelta(seconds=60))
        await writer.delete("/nodes/n1")
        assert listen.keys() == ["/nodes/n1", "/nodes/n1", "/nodes/n1"]  # put, put v2, delete
        # Every change still reaches the watcher, the quiet one included, in order.
        seen = [await watcher.next() for _ in range(4)]
        assert [(e.type, e.revision) for e in seen] == [
            ("put", first.revision), ("put", beat.revision), ("put", changed.revision),
            ("delete", changed.revision + 1)]
        assert seen[1].item.expires == beat.expires
        # The quiet write alone (nothing notifies): the poll brings it.
        quiet = await writer.put("/nodes/n2", b"x", expires)
        await watcher.next()
        again = await writer.put("/nodes/n2", b"x", expires + timedelta(seconds=5))
        assert listen.keys() == ["/nodes/n2"]
        event = await watcher.next().addTimeout(10, reactor)
        assert event.revision == again.revision > quiet.revision
    finally:
        listen.close()
        await writer.close()
        await watching.close()


async def _registered(url: str, prefix: str) -> bool:
    with psycopg.connect(url, autocommit=True) as connection:
        return bool(connection.execute("SELECT 1 FROM watched_prefixes WHERE prefix = %s",
                                       (prefix,)).fetchone())


@pytest.mark.parametrize("mode", ["fast", "immediate"])
@pytest_twisted.ensureDeferred
async def test_a_cache_misses_nothing_written_by_another_proxy_across_a_restart(
        restart_server, clock, mode) -> None:
    """Proxy A's cache across a database restart: what proxy B writes while
    A's feed is down is there once A's watch resumes (it re-reads)."""
    from edgeaccess.controlplane.cache import ControlCache

    url = restart_server.create_database()
    a = await PostgresBackend(url, clock, reactor).start()
    b = await PostgresBackend(url, clock, reactor).start()
    cache = ControlCache(a, reactor, prefixes=["/resources/"], retry_delay=0.1)
    cache.startService()
    try:
        await eventually(lambda: _succeed(cache.ready), "the cache to load")
        await b.put("/resources/role/before", b"1")
        await eventually(lambda: _succeed(cache.get("/resources/role/before")), "before")
        generation = cache.generation
        restart_server.restart(mode)
        # Written at once by B (its calls retry until the server is back),
        # while A's change feed is still down or reconnecting.
        await b.put("/resources/role/during", b"2")
        await b.put("/resources/role/before", b"changed")
        await eventually(lambda: _succeed(cache.get("/resources/role/during")), "during",
                         timeout=60)
        await eventually(lambda: _succeed(
            cache.get("/resources/role/before").value == b"changed"), "the change", timeout=60)
        assert cache.generation > generation, "the watch was restarted (re-read)"
        await b.put("/resources/role/after", b"3")
        await eventually(lambda: _succeed(cache.get("/resources/role/after")), "after")
    finally:
        cache.stopService()
        await a.close()
        await b.close()


async def _succeed(value):
    return value


# -- the audit chain with several writers ------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_proxies_appending_at_once_keep_one_verifiable_chain(pg_server) -> None:
    """Two proxies' audit logs on one database, emitting and ingesting at the
    same time: one chain, every event once, verify passes; a broken link is
    still found."""
    import json as _json

    from twisted.internet import defer

    from edgeaccess.audit.log import AuditLog, event_key

    url = pg_server.create_database()
    backends = [await PostgresBackend(url, reactor, reactor).start() for _ in range(2)]
    logs = [AuditLog(backend, "example", reactor) for backend in backends]
    assert all(log._atomic for log in logs), "PostgreSQL appends in one transaction"
    try:
        def node_batch(proxy: int, batch: int) -> list[dict]:
            return [{"id": f"n{proxy}-{batch}-{i}", "event": "exec", "cluster": "example",
                     "time": "2026-12-02T12:00:00Z", "user": "alice", "login": "root",
                     "command": "true", "success": True} for i in range(20)]

        async def proxy(index: int) -> None:
            log = logs[index]
            work = [log.emit("user.login", user=f"p{index}-{i}", success=True)
                    for i in range(60)]
            for batch in range(5):
                work.append(defer.Deferred.fromCoroutine(
                    log.ingest(node_batch(index, batch), node_name=f"node{index}")))
            # A redelivered batch (an acknowledgement lost) is stored once.
            work.append(defer.Deferred.fromCoroutine(
                log.ingest(node_batch(index, 0), node_name=f"node{index}")))
            results = await defer.gatherResults(work)
            assert all(result for result in results)

        await defer.gatherResults([defer.Deferred.fromCoroutine(proxy(i)) for i in range(2)])
        records = await logs[1].records()
        ids = [record["event"]["id"] for record in records]
        assert len(ids) == len(set(ids)) == 2 * (60 + 5 * 20)
        assert [record["seq"] for record in records] == list(range(1, len(records) + 1))
        result = await logs[0].verify()
        assert result.ok, result.problems
        assert result.head_seq == len(records)
        # Alter one event behind the chain's back: verify names it.
        tampered = dict(records[41])
        tampered["event"] = {**tampered["event"], "user": "mallory"}
        await backends[0].put(event_key(42), _json.dumps(tampered).encode())
        broken = await logs[1].verify()
        assert not broken.ok and broken.problems[0].seq == 42
        assert broken.problems[0].kind == "altered"
    finally:
        for backend in backends:
            await backend.close()


@pytest_twisted.ensureDeferred
async def test_the_change_log_is_purged_by_revision_after_its_retention(pg_server, clock) -> None:
    url = pg_server.create_database()
    backend = await PostgresBackend(url, clock, reactor, purge_interval=60,
                                    log_retention=600).start()

    def logged() -> list[int]:
        with psycopg.connect(url, autocommit=True) as connection:
            return [r for (r,) in connection.execute(
                "SELECT revision FROM changes ORDER BY revision").fetchall()]

    try:
        first = await backend.put("/a", b"1")
        clock.advance(300)
        second = await backend.put("/b", b"2")
        assert logged() == [first.revision, second.revision]  # within the retention
        clock.advance(301)
        third = await backend.put("/c", b"3")
        assert logged() == [second.revision, third.revision]
        clock.advance(601)
        fourth = await backend.put("/d", b"4")
        assert logged() == [fourth.revision]
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_the_feed_reads_only_the_values_someone_watches(pg_server, clock) -> None:
    from edgeaccess.backend import postgres

    url = pg_server.create_database()
    backend = await PostgresBackend(url, clock, reactor).start()
    try:
        await backend.put("/audit/events/1", b"big event")
        await backend.put("/nodes/n1", b"node")
        with psycopg.connect(url, autocommit=True) as connection:
            rows = postgres._read_changes(connection, 0, ["/nodes/"])
        assert [(key, value) for _, _, key, value, _ in rows] == [
            ("/audit/events/1", None), ("/nodes/n1", b"node")]
        # The watcher still sees its key, and revisions stay contiguous.
        watcher = backend.watch(["/nodes/"])
        assert (await watcher.next()).type == "init"
        await backend.put("/audit/events/2", b"another")
        item = await backend.put("/nodes/n2", b"second")
        event = await watcher.next()
        assert (event.key, event.item.value, event.revision) == ("/nodes/n2", b"second",
                                                                 item.revision)
        assert watcher.closed_reason is None
    finally:
        await backend.close()
