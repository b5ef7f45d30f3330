"""The node side end to end: observer -> spool -> shipper -> auth log and store
(in memory but for the disk writer's thread; a fake clock for times and timers)."""

from __future__ import annotations

import random

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from zope.interface import implementer
from zope.interface.verify import verifyObject

from auditkit import Counter, clock, run, settle
from edgeaccess import errors
from edgeaccess.audit.interfaces import IAuditUploader
from edgeaccess.audit.log import AuditLog
from edgeaccess.audit.observer import AuditingObserver, SpoolGuardAuthorizer
from edgeaccess.audit.recording import FileRecordingStore, parse_cast
from edgeaccess.audit.spool import Spool
from edgeaccess.audit.uploader import SpoolShipper
from edgeaccess.backend.memory import MemoryBackend
from edgeaccess.ssh.interfaces import ISessionObserver, SessionInfo, StaticAuthorizer
from edgeaccess.ssh.interfaces import SessionPermissions


@implementer(IAuditUploader)
class LoopbackUploader:
    """Delivers straight into an AuditLog and a store; can lose the link or the answer."""

    def __init__(self, log, store) -> None:
        self.log = log
        self.store = store
        self.down = False
        self.lose_answers = 0
        self.calls = []

    def _answer(self, value):
        d = value if isinstance(value, Deferred) else succeed(value)

        def answer(result):
            if self.lose_answers:
                self.lose_answers -= 1
                raise errors.EdgeError("connection lost before the answer")
            return result

        return d.addCallback(answer)

    def send_events(self, events):
        self.calls.append(("events", [e["id"] for e in events]))
        if self.down:
            return fail(errors.EdgeError("cannot reach the auth service"))
        acked = run(self.log.ingest(events, node_name="n1", node_id="uuid-1"))
        return self._answer(acked)

    def send_recording_chunk(self, session_id, offset, data, meta):
        self.calls.append(("chunk", session_id, offset, len(data)))
        if self.down:
            return fail(errors.EdgeError("cannot reach the auth service"))
        return self._answer(maybeDeferred(self.store.append, session_id, offset, data, meta))

    def complete_recording(self, session_id, length, meta):
        self.calls.append(("complete", session_id, length))
        if self.down:
            return fail(errors.EdgeError("cannot reach the auth service"))
        return self._answer(maybeDeferred(self.store.complete, session_id, length))


SESSION = SessionInfo(session_id="5e55-1", username="alice", login="root",
                      peer_address="127.0.0.1", node_name="n1", roles=("access",))


@pytest_twisted.async_yield_fixture
async def world(tmp_path, writer):
    fake = clock()
    log = AuditLog(MemoryBackend(fake), "example", fake, new_id=Counter("auth"))
    store = FileRecordingStore(tmp_path / "auth-recordings", fake, writer)
    uploader = LoopbackUploader(log, store)
    spool = await Spool.open(tmp_path / "spool", writer)
    shipper = SpoolShipper(spool, uploader, fake, rng=random.Random(1))
    observer = AuditingObserver(spool, cluster="example", node_name="n1", node_id="uuid-1",
                                clock=fake, new_id=Counter("node"))
    shipper.startService()
    yield fake, log, store, uploader, spool, shipper, observer, writer
    shipper.stopService()


def test_the_observer_is_a_session_observer(world):
    assert verifyObject(ISessionObserver, world[6])


@pytest_twisted.ensureDeferred
async def test_an_interactive_session_arrives_with_its_recording(world):
    fake, log, store, uploader, spool, shipper, observer, writer = world
    await observer.session_started(SESSION, "shell")
    recorder = observer.open_recording(SESSION, 80, 24, "xterm-256color")
    fake.advance(0.2)
    recorder.output(b"$ echo hi\r\nhi\r\n")
    recorder.resize(120, 40)
    fake.advance(0.3)
    observer.session_ended(SESSION, 0, None)
    await settle(writer)
    events = run(log.search())
    assert [e["event"] for e in events] == ["session.start", "session.end"]
    start, end = events
    for e in events:
        assert (e["user"], e["login"], e["node"], e["session_id"], e["remote_addr"],
                e["cluster"]) == ("alice", "root", "n1", "5e55-1", "127.0.0.1", "example")
    assert start["kind"] == "shell" and end["exit_status"] == 0 and end["recorded"] is True
    header, frames = parse_cast(await store.read("5e55-1"))
    assert header["width"] == 80 and header["env"] == {"TERM": "xterm-256color"}
    assert frames == [[0.2, "o", "$ echo hi\r\nhi\r\n"], [0.2, "r", "120x40"]]
    info = await store.info("5e55-1")
    assert info["complete"] and info["user"] == "alice"
    assert spool.pending_events() == [] and spool.pending_recordings() == []
    assert spool.open_sessions() == [] and not list((spool.directory / "sessions").iterdir())


@pytest_twisted.ensureDeferred
async def test_exec_scp_port_and_refused_auth_events(world):
    fake, log, store, uploader, spool, shipper, observer, writer = world
    await observer.session_started(SESSION, "exec")
    await observer.exec_started(SESSION, "scp -t /tmp/x")
    observer.port_forward(SESSION, "db", 5432, False)
    observer.auth_refused("eve", "root", "10.0.0.9", "certificate expired")
    await settle(writer)
    found = {e["event"]: e for e in run(log.search())}
    assert found["exec"]["command"] == "scp -t /tmp/x"
    assert found["scp"]["action"] == "upload" and found["scp"]["path"] == "/tmp/x"
    assert found["port"]["addr"] == "db:5432" and found["port"]["success"] is False
    assert found["auth"]["user"] == "eve" and found["auth"]["success"] is False
    assert found["auth"]["error"] == "certificate expired"


@pytest_twisted.ensureDeferred
async def test_an_outage_keeps_everything_spooled_and_retries_with_backoff(world):
    fake, log, store, uploader, spool, shipper, observer, writer = world
    uploader.down = True
    await observer.session_started(SESSION, "exec")
    await observer.exec_started(SESSION, "uptime")
    await settle(writer)
    assert shipper.failures >= 1 and len(spool.pending_events()) == 2
    assert run(log.search()) == []
    uploader.down = False
    fake.advance(60)
    await settle(writer)
    assert [e["event"] for e in run(log.search())] == ["session.start", "exec"]
    assert spool.pending_events() == [] and shipper.failures == 0


@pytest_twisted.ensureDeferred
async def test_a_lost_acknowledgement_creates_no_duplicates(world):
    fake, log, store, uploader, spool, shipper, observer, writer = world
    uploader.lose_answers = 1
    await observer.session_started(SESSION, "shell")
    recorder = observer.open_recording(SESSION, 80, 24)
    recorder.output(b"abc")
    observer.session_ended(SESSION, None, "HUP")
    uploader.lose_answers = 3
    for _ in range(10):
        await settle(writer)
        fake.advance(30)
    await settle(writer)
    events = run(log.search())
    assert [e["event"] for e in events] == ["session.start", "session.end"]
    assert len({e["id"] for e in events}) == 2
    assert events[1]["exit_signal"] == "HUP"
    _, frames = parse_cast(await store.read(SESSION.session_id))
    assert frames == [[0.0, "o", "abc"]]
    assert spool.pending_recordings() == []


@pytest_twisted.ensureDeferred
async def test_after_a_crash_open_sessions_are_ended_and_their_recordings_delivered(
        world, tmp_path):
    fake, log, store, uploader, spool, shipper, observer, writer = world
    uploader.down = True
    await observer.session_started(SESSION, "shell")
    recorder = observer.open_recording(SESSION, 80, 24)
    recorder.output(b"before the crash")
    await spool.sync_recording(SESSION.session_id)
    shipper.stopService()  # the node dies: nothing else runs

    uploader.down = False
    reopened = await Spool.open(tmp_path / "spool", writer)
    shipper2 = SpoolShipper(reopened, uploader, fake, rng=random.Random(2))
    observer2 = AuditingObserver(reopened, cluster="example", node_name="n1",
                                 node_id="uuid-1", clock=fake)
    assert await observer2.recover() == 1
    shipper2.startService()
    await settle(writer)
    events = run(log.search(session_id=SESSION.session_id))
    assert [e["event"] for e in events] == ["session.start", "session.end"]
    assert events[1]["reason"] == "node restarted" and events[1]["user"] == "alice"
    _, frames = parse_cast(await store.read(SESSION.session_id))
    assert frames[0][2] == "before the crash"
    assert (await store.info(SESSION.session_id))["complete"]
    assert (await Spool.open(tmp_path / "spool", writer)).open_sessions() == []
    shipper2.stopService()


@pytest_twisted.ensureDeferred
async def test_a_session_cannot_start_when_its_event_cannot_be_made_durable(tmp_path):
    from twisted.internet import reactor

    from edgeaccess.audit.diskwriter import DiskWriter

    def broken_disk(fd):
        raise OSError(28, "No space left on device")

    disk = DiskWriter(reactor, fsync=broken_disk)
    disk.start()
    try:
        spool = await Spool.open(tmp_path / "spool", disk)
        observer = AuditingObserver(spool, cluster="example", node_name="n1",
                                    node_id="uuid-1", clock=clock())
        with pytest.raises(errors.EdgeError, match="cannot write its audit spool"):
            await observer.session_started(SESSION, "exec")
        assert spool.pending_events() == []
    finally:
        await disk.stop()


@pytest_twisted.ensureDeferred
async def test_a_full_spool_refuses_new_sessions_with_a_reason(tmp_path, writer):
    spool = await Spool.open(tmp_path, writer, max_bytes=10)
    inner = StaticAuthorizer({("*", "root"): SessionPermissions()})
    guard = SpoolGuardAuthorizer(inner, spool)

    class Who:
        username = "alice"

    assert run(guard.authorize(Who(), "root", "127.0.0.1")) == SessionPermissions()
    await spool.append_event({"id": "e1", "event": "exec", "time": "2024-01-01T00:00:00Z"})
    with pytest.raises(errors.AccessDenied, match="audit spool is full"):
        run(guard.authorize(Who(), "root", "127.0.0.1"))
