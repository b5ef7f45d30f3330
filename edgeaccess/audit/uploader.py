"""Shipping the node's spool to the auth service.

:class:`HTTPSAuditUploader` is the first :class:`IAuditUploader`: JSON
POSTs to the auth API with the node's client certificate, through the
node's :class:`~edgeaccess.clusterclient.ClusterClient` (one persistent,
identity-checked connection). The reverse tunnel can later provide
another implementation of the same three calls.

:class:`SpoolShipper` is the service that empties the spool: events first
(oldest first, in batches), then recording chunks by offset, then the end
of each finished recording. A failed round is retried with capped
exponential backoff and full jitter; :meth:`SpoolShipper.kick` starts a
round soon after something was spooled, and :meth:`SpoolShipper.link_restored`
at once when the node knows its link is back (its tunnel reconnected, a
heartbeat went through), so a spool drains within seconds of an outage
rather than after the backoff.
"""

from __future__ import annotations

import base64
import random
from typing import Callable
from urllib.parse import quote

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from edgeaccess import errors
from edgeaccess.audit.interfaces import IAuditUploader

_log = Logger()

#: Raw bytes per recording chunk (base64 in JSON stays under the API's 256 KiB).
CHUNK_BYTES = 128 * 1024
EVENT_BATCH = 200


@implementer(IAuditUploader)
class HTTPSAuditUploader:
    """Delivers to the auth API over HTTPS (mutual TLS).

    :param client_factory: returns the node's
        :class:`edgeaccess.clusterclient.ClusterClient` (called per request).
    """

    def __init__(self, client_factory: Callable) -> None:
        self._client_factory = client_factory

    def _post(self, path: str, body: dict):
        return self._client_factory().post_json(path, body)

    @defer.inlineCallbacks
    def send_events(self, events: list):
        answer = yield self._post("/v1/audit/events", {"events": events})
        return list(answer.get("acknowledged", []))

    @defer.inlineCallbacks
    def send_recording_chunk(self, session_id: str, offset: int, data: bytes, meta: dict):
        answer = yield self._post(f"/v1/recordings/{quote(session_id, safe='')}/chunks", {
            "offset": offset, "data": base64.b64encode(data).decode("ascii"), "meta": meta})
        return int(answer["length"])

    @defer.inlineCallbacks
    def complete_recording(self, session_id: str, length: int, meta: dict):
        answer = yield self._post(f"/v1/recordings/{quote(session_id, safe='')}/complete",
                                  {"length": length, "meta": meta})
        return int(answer["length"])


class SpoolShipper(service.Service):
    """Empties a :class:`~edgeaccess.audit.spool.Spool` through an uploader.

    :param interval: seconds between rounds when all is well (the spool is
        also shipped at once after :meth:`kick`).
    :param max_delay: cap of the backoff after failures.
    """

    def __init__(self, spool, uploader: IAuditUploader, clock, *, interval: float = 1.0,
                 max_delay: float = 30.0, rng: random.Random | None = None) -> None:
        self.spool = spool
        self.uploader = uploader
        self.clock = clock
        self.interval = interval
        self.max_delay = max_delay
        self.rng = rng or random.SystemRandom()
        self.failures = 0
        self._call = None
        self._busy = False
        self._again = False
        self._retry_now = False

    def startService(self) -> None:
        super().startService()
        self._schedule(0)

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.spool.sync_recordings()

    def kick(self) -> None:
        """Ship soon (something new was spooled)."""
        if not self.running:
            return
        if self._busy:
            self._again = True
        elif self.failures == 0:
            self._schedule(0)

    def link_restored(self) -> None:
        """The link to the auth service is back: retry a failed delivery now.

        Skips the rest of the backoff. A round already in flight is let
        finish; if it fails, the next one starts at once (only once per call,
        so a link that flaps cannot make the shipper spin).
        """
        if not self.running:
            return
        if self._busy:
            self._retry_now = True
        elif self.failures:
            _log.info("link to the auth service restored: retrying audit delivery now "
                      "({events} events spooled)", events=len(self.spool._events))
            self._schedule(0)  # replaces the backoff's later round

    def _schedule(self, delay: float) -> None:
        if self._call is not None and self._call.active():
            if self._call.getTime() <= self.clock.seconds() + delay:
                return
            self._call.cancel()
        self._call = self.clock.callLater(delay, self._round)

    def _round(self) -> defer.Deferred:
        self._call = None
        self._busy = True
        d = defer.Deferred.fromCoroutine(self.ship_once())

        def done(_):
            if self.failures:
                _log.info("audit spool delivered again after {n} failed rounds",
                          n=self.failures)
            self.failures = 0
            return self.interval

        def failed(failure):
            self.failures += 1
            delay = self.rng.uniform(0, min(self.max_delay, 0.5 * 2 ** min(self.failures, 20)))
            reason = failure.value if failure.check(errors.EdgeError) else failure.getErrorMessage()
            _log.warn("audit delivery failed ({reason}); {events} events spooled; retrying "
                      "in {delay:.1f}s", reason=reason, events=len(self.spool._events),
                      delay=delay)
            return delay

        def next_round(delay):
            self._busy = False
            now = (self._again and not self.failures) or (self._retry_now and self.failures)
            if self.running:
                self._schedule(0 if now else delay)
            self._again = self._retry_now = False

        d.addCallbacks(done, failed)
        d.addCallback(next_round)
        return d

    async def ship_once(self) -> None:
        """Deliver everything spooled now; raises on the first failure."""
        self.spool.sync_recordings()
        while True:
            batch = self.spool.pending_events(EVENT_BATCH)
            if not batch:
                break
            acknowledged = await self.uploader.send_events(batch)
            if not acknowledged:
                raise errors.EdgeError("the auth service acknowledged no event")
            self.spool.acknowledge_events(acknowledged)
        for pending in self.spool.pending_recordings():
            await self._ship_recording(pending)

    async def _ship_recording(self, pending: dict) -> None:
        session_id, meta = pending["session_id"], pending["meta"]
        offset, length = pending["uploaded"], pending["length"]
        while offset < length:
            data = self.spool.read_recording(session_id, offset,
                                             min(CHUNK_BYTES, length - offset))
            stored = await self.uploader.send_recording_chunk(session_id, offset, data, meta)
            if stored == offset and data:
                raise errors.EdgeError(f"recording {session_id}: chunk at {offset} not taken")
            offset = min(stored, length)
            self.spool.recording_acknowledged(session_id, offset)
        if pending["complete"]:
            stored = await self.uploader.complete_recording(session_id, length, meta)
            if stored != length:
                self.spool.recording_acknowledged(session_id, min(stored, length))
                raise errors.EdgeError(f"recording {session_id}: the auth service holds "
                                       f"{stored} of {length} bytes; resending")
            self.spool.recording_delivered(session_id)
