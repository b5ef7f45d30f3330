"""The shipper retries at once when the node's link comes back (fake clock)."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from auditkit import clock
from edgeaccess import errors
from edgeaccess.audit.interfaces import IAuditUploader
from edgeaccess.audit.spool import Spool
from edgeaccess.audit.uploader import SpoolShipper


class Highest:
    """Jitter that always draws the upper bound: the longest backoff."""

    def uniform(self, a: float, b: float) -> float:
        return b


@implementer(IAuditUploader)
class SwitchableUploader:
    """Takes events while up; fails while down; ``hold`` keeps answers pending."""

    def __init__(self) -> None:
        self.down = False
        self.hold = False
        self.pending: list[Deferred] = []
        self.delivered: list[str] = []
        self.attempts = 0

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
        raise AssertionError("no recordings in these tests")

    def complete_recording(self, session_id, length, meta):
        raise AssertionError("no recordings in these tests")


@pytest.fixture
def outage(tmp_path):
    """A shipper whose uploader went down; several rounds failed, backoff at its cap."""
    fake = clock()
    uploader = SwitchableUploader()
    spool = Spool.open(tmp_path / "spool")
    shipper = SpoolShipper(spool, uploader, fake, rng=Highest(), max_delay=30.0)
    shipper.startService()
    uploader.down = True
    spool.append_event({"id": "ev-1", "event": "session.end"})
    shipper.kick()
    fake.advance(0)
    while shipper.failures < 8:
        fake.advance(shipper._call.getTime() - fake.seconds())
    yield fake, uploader, spool, shipper
    shipper.stopService()


def test_link_restored_delivers_the_spool_at_once_instead_of_after_the_backoff(outage):
    fake, uploader, spool, shipper = outage
    next_round = shipper._call.getTime()
    assert next_round - fake.seconds() == 30.0  # the backoff's cap
    uploader.down = False
    fake.advance(1)
    assert uploader.delivered == []  # nothing tells the shipper yet
    shipper.link_restored()
    fake.advance(0)
    assert uploader.delivered == ["ev-1"]
    assert spool.pending_events() == [] and shipper.failures == 0
    # Back to the normal rhythm: no leftover backoff round.
    assert shipper._call.getTime() - fake.seconds() == shipper.interval


def test_a_round_in_flight_that_fails_is_followed_at_once_after_link_restored(outage):
    fake, uploader, spool, shipper = outage
    uploader.hold = True
    fake.advance(shipper._call.getTime() - fake.seconds())  # a round starts, hangs
    [in_flight] = uploader.pending
    uploader.hold = uploader.down = False
    shipper.link_restored()  # e.g. the tunnel came back while that request hangs
    in_flight.errback(errors.EdgeError("connection timed out"))
    attempts = uploader.attempts
    fake.advance(0)
    assert uploader.attempts == attempts + 1
    assert uploader.delivered == ["ev-1"]


def test_link_restored_while_the_link_is_still_down_retries_once_then_backs_off(outage):
    fake, uploader, spool, shipper = outage
    attempts = uploader.attempts
    shipper.link_restored()
    fake.advance(0)
    fake.advance(0)
    assert uploader.attempts == attempts + 1  # one retry, no spinning
    assert shipper._call.getTime() - fake.seconds() == 30.0


def test_link_restored_does_nothing_when_all_is_well_or_stopped(tmp_path):
    fake = clock()
    uploader = SwitchableUploader()
    shipper = SpoolShipper(Spool.open(tmp_path / "spool"), uploader, fake, rng=Highest())
    shipper.link_restored()  # not running yet
    assert shipper._call is None
    shipper.startService()
    fake.advance(0)
    scheduled = shipper._call.getTime()
    shipper.link_restored()
    assert shipper._call.getTime() == scheduled
    shipper.stopService()
    shipper.link_restored()
    assert shipper._call is None
