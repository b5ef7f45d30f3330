"""The shipper is event-driven (fake clock for its timers): it wakes when an
event is durable, without a timer; retries at once when the node's link comes
back; and resumes a streamed recording from the auth service's offset."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from zope.interface import implementer

from auditkit import clock, settle
from edgeaccess import errors
from edgeaccess.audit.interfaces import IAuditUploader
from edgeaccess.audit.recording import FileRecordingStore
from edgeaccess.audit.spool import Spool
from edgeaccess.audit.uploader import CHUNK_BYTES, SpoolShipper


class Highest:
    """Jitter that always draws the upper bound: the longest backoff."""

    def uniform(self, a: float, b: float) -> float:
        return b


@implementer(IAuditUploader)
class SwitchableUploader:
    """Takes events while up; fails while down; ``hold`` keeps answers pending.
    Recording chunks go to a real :class:`FileRecordingStore` when given."""

    def __init__(self, store=None) -> None:
        self.down = False
        self.hold = False
        self.pending: list[Deferred] = []
        self.delivered: list[str] = []
        self.chunks: list[tuple[int, int]] = []
        self.attempts = 0
        self.store = store

    def send_events(self, events):
        self.attempts += 1
        if self.hold:
            answer: Deferred = Deferred()
            self.pending.append(answer)
            return answer
        if self.down:
            return fail(errors.EdgeError("cannot reach the auth service"))
        self.delivered += [e["id"] for e in events]
        return succeed([e["id"] for e in events])

    def send_recording_chunk(self, session_id, offset, data, meta):
        self.chunks.append((offset, len(data)))
        if self.down:
            return fail(errors.EdgeError("cannot reach the auth service"))
        return maybeDeferred(self.store.append, session_id, offset, data, meta)

    def complete_recording(self, session_id, length, meta):
        if self.down:
            return fail(errors.EdgeError("cannot reach the auth service"))
        return maybeDeferred(self.store.complete, session_id, length)


def event(event_id: str) -> dict:
    return {"id": event_id, "event": "session.end"}


@pytest_twisted.ensureDeferred
async def test_the_shipper_wakes_when_an_event_is_durable_without_any_timer(tmp_path, writer):
    fake = clock()
    uploader = SwitchableUploader()
    spool = await Spool.open(tmp_path / "spool", writer)
    shipper = SpoolShipper(spool, uploader, fake, rng=Highest())
    shipper.startService()
    await settle(writer)
    assert fake.getDelayedCalls() == []  # idle: no poll
    await spool.append_event(event("ev-1"))
    assert uploader.delivered == ["ev-1"]  # shipped as the append became durable
    await spool.append_event(event("ev-2"))
    await settle(writer)
    assert uploader.delivered == ["ev-1", "ev-2"] and spool.pending_events() == []
    assert fake.getDelayedCalls() == [] and fake.seconds() == clock().seconds()
    shipper.stopService()


@pytest_twisted.async_yield_fixture
async def outage(tmp_path, writer):
    """A shipper whose uploader went down; several rounds failed, backoff at its cap."""
    fake = clock()
    uploader = SwitchableUploader()
    spool = await Spool.open(tmp_path / "spool", writer)
    shipper = SpoolShipper(spool, uploader, fake, rng=Highest(), max_delay=30.0)
    shipper.startService()
    uploader.down = True
    await spool.append_event(event("ev-1"))
    while shipper.failures < 8:
        fake.advance(shipper._call.getTime() - fake.seconds())
    yield fake, uploader, spool, shipper, writer
    shipper.stopService()


@pytest_twisted.ensureDeferred
async def test_link_restored_delivers_the_spool_at_once_instead_of_after_the_backoff(outage):
    fake, uploader, spool, shipper, writer = outage
    next_round = shipper._call.getTime()
    assert next_round - fake.seconds() == 30.0  # the backoff's cap
    uploader.down = False
    fake.advance(1)
    assert uploader.delivered == []  # nothing tells the shipper yet
    shipper.link_restored()
    await settle(writer)
    assert uploader.delivered == ["ev-1"]
    assert spool.pending_events() == [] and shipper.failures == 0
    assert fake.getDelayedCalls() == []  # no leftover backoff round, no poll


@pytest_twisted.ensureDeferred
async def test_a_round_in_flight_that_fails_is_followed_at_once_after_link_restored(outage):
    fake, uploader, spool, shipper, writer = outage
    uploader.hold = True
    fake.advance(shipper._call.getTime() - fake.seconds())  # a round starts, hangs
    [in_flight] = uploader.pending
    uploader.hold = uploader.down = False
    shipper.link_restored()  # e.g. the tunnel came back while that request hangs
    attempts = uploader.attempts
    in_flight.errback(errors.EdgeError("connection timed out"))
    await settle(writer)
    assert uploader.attempts == attempts + 1
    assert uploader.delivered == ["ev-1"]


@pytest_twisted.ensureDeferred
async def test_link_restored_while_the_link_is_still_down_retries_once_then_backs_off(outage):
    fake, uploader, spool, shipper, writer = outage
    attempts = uploader.attempts
    shipper.link_restored()
    await settle(writer)
    assert uploader.attempts == attempts + 1  # one retry, no spinning
    assert shipper._call.getTime() - fake.seconds() == 30.0


@pytest_twisted.ensureDeferred
async def test_link_restored_does_nothing_when_all_is_well_or_stopped(tmp_path, writer):
    fake = clock()
    uploader = SwitchableUploader()
    spool = await Spool.open(tmp_path / "spool", writer)
    shipper = SpoolShipper(spool, uploader, fake, rng=Highest())
    shipper.link_restored()  # not running yet
    assert shipper._call is None and uploader.attempts == 0
    shipper.startService()
    await settle(writer)
    rounds = shipper.rounds
    shipper.link_restored()
    assert shipper.rounds == rounds and shipper._call is None
    shipper.stopService()
    shipper.link_restored()
    assert shipper._call is None and shipper.rounds == rounds


@pytest_twisted.ensureDeferred
async def test_recording_output_is_sent_once_after_a_short_delay(tmp_path, writer):
    """Output wakes the shipper through one short timer (coalescing writes),
    and the recording is fsync'd once for that round, not per write."""
    fake = clock()
    store = FileRecordingStore(tmp_path / "store", fake, writer)
    uploader = SwitchableUploader(store)
    spool = await Spool.open(tmp_path / "spool", writer)
    shipper = SpoolShipper(spool, uploader, fake, rng=Highest(), recording_delay=0.5)
    shipper.startService()
    recording = spool.start_recording("s1", {"user": "alice"})
    for n in range(50):
        recording.write(b'[0.1, "o", "%d"]\n' % n)
    assert [call.getTime() - fake.seconds() for call in fake.getDelayedCalls()] == [0.5]
    await settle(writer)
    assert uploader.chunks == []
    fake.advance(0.5)
    await settle(writer)
    written = b"".join(b'[0.1, "o", "%d"]\n' % n for n in range(50))
    assert uploader.chunks == [(0, len(written))]
    assert await store.read("s1") == written
    assert fake.getDelayedCalls() == []
    shipper.stopService()


@pytest_twisted.ensureDeferred
async def test_a_streamed_recording_resumes_from_the_servers_offset_byte_exact(
        tmp_path, writer):
    """The node restarts (it no longer knows what was sent): it asks the auth
    service, which holds a prefix, and streams exactly the rest."""
    fake = clock()
    store = FileRecordingStore(tmp_path / "store", fake, writer)
    lines = [b'[%d.5, "o", "%s"]\n' % (n, b"\xc3\xa9" * (n % 300)) for n in range(3000)]
    cast = b"".join(lines)
    assert len(cast) > 3 * CHUNK_BYTES
    spool = await Spool.open(tmp_path / "spool", writer)
    recording = spool.start_recording("s1", {"user": "alice"})
    for line in lines:
        recording.write(line)
    await recording.close()
    # Before the restart, the auth service acknowledged a prefix.
    held = CHUNK_BYTES + 12345
    assert await store.append("s1", 0, cast[:held], {"user": "alice"}) == held

    reopened = await Spool.open(tmp_path / "spool", writer)  # the node restarted
    [pending] = reopened.pending_recordings()
    assert pending["uploaded"] is None and pending["complete"]
    uploader = SwitchableUploader(store)
    shipper = SpoolShipper(reopened, uploader, fake, rng=Highest())
    shipper.startService()
    await settle(writer, 40)
    assert uploader.chunks[0] == (0, 0)  # "where do you stand?"
    offsets = [offset for offset, size in uploader.chunks[1:]]
    assert offsets[0] == held  # resumed there, nothing sent twice
    assert all(size <= CHUNK_BYTES for _, size in uploader.chunks)
    assert sum(size for _, size in uploader.chunks[1:]) == len(cast) - held
    assert await store.read("s1") == cast  # byte-exact
    assert (await store.info("s1"))["complete"]
    assert reopened.pending_recordings() == []
    shipper.stopService()
