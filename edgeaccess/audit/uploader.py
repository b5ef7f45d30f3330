"""Shipping the node's spool to the auth service.

:class:`HTTPSAuditUploader` is the :class:`IAuditUploader` over HTTPS (the
auth API, or the proxy's web port for a node behind a tunnel) through the
node's :class:`~edgeaccess.clusterclient.ClusterClient` (one persistent,
identity-checked connection): events as JSON batches, recordings
**streamed** as raw bytes by offset (``PUT /v1/recordings/ID?offset=N``,
``application/octet-stream``), never embedded in JSON.

:class:`SpoolShipper` is the service that empties the spool: events first
(oldest first, in batches), then recording bytes by offset, then the end of
each finished recording. It is event-driven: it wakes when an event became
durable (the spool tells it), when recording output was written (after a
short delay, so a busy terminal is sent in chunks, not per write), and when
the node knows its link is back (:meth:`SpoolShipper.link_restored`). An
idle shipper has no timer. A failed round is retried with capped
exponential backoff and full jitter. Recording bytes are read from the
spool chunk by chunk as they are sent, never a whole tail at a time.
"""

from __future__ import annotations

import random
from typing import Callable
from urllib.parse import quote, urlencode

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from edgeaccess import errors
from edgeaccess.audit.interfaces import IAuditUploader

_log = Logger()

#: Raw bytes per recording request. Below twisted.web's 100,000-byte limit
#: for bodies kept in memory: larger ones are spooled to a temporary file
#: (disk I/O on the receiving reactor thread).
CHUNK_BYTES = 96 * 1024
EVENT_BATCH = 200
#: Spooled bytes of events per request: under the same in-memory body limit,
#: and far under the auth API's 256 KiB body limit (200 events of up to
#: 16 KiB each would not be, and that batch would be refused for ever).
EVENT_BATCH_BYTES = 64 * 1024
#: Meta fields sent with a recording's bytes (the rest comes from the
#: node's certificate).
_META_QUERY = ("user", "login", "started")


def recording_path(session_id: str, offset: int, meta: dict) -> str:
    """``/v1/recordings/ID?offset=N&user=..``: where a chunk is PUT."""
    query = {"offset": str(offset)}
    query.update((k, meta[k]) for k in _META_QUERY if isinstance(meta.get(k), str))
    return f"/v1/recordings/{quote(session_id, safe='')}?{urlencode(query)}"


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
        answer = yield self._client_factory().put_bytes(
            recording_path(session_id, offset, meta), bytes(data))
        return int(answer["length"])

    @defer.inlineCallbacks
    def complete_recording(self, session_id: str, length: int, meta: dict):
        answer = yield self._post(f"/v1/recordings/{quote(session_id, safe='')}/complete",
                                  {"length": length, "meta": meta})
        return int(answer["length"])


class SpoolShipper(service.Service):
    """Empties a :class:`~edgeaccess.audit.spool.Spool` through an uploader.

    :param recording_delay: seconds between recording output being written
        and it being sent (output written meanwhile goes in the same round).
    :param max_delay: cap of the backoff after failures.
    """

    def __init__(self, spool, uploader: IAuditUploader, clock, *,
                 recording_delay: float = 0.5, max_delay: float = 30.0,
                 rng: random.Random | None = None) -> None:
        self.spool = spool
        self.uploader = uploader
        self.clock = clock
        self.recording_delay = recording_delay
        self.max_delay = max_delay
        self.rng = rng or random.SystemRandom()
        self.failures = 0
        self.rounds = 0
        self._call = None
        self._busy = False
        self._again = False
        self._retry_now = False
        spool.subscribe(self._spooled)

    def startService(self) -> None:
        super().startService()
        self._start_round()  # what a previous run left in the spool

    def stopService(self):
        super().stopService()
        self._cancel_timer()

    def _spooled(self, recording: bool = False) -> None:
        if recording:
            self.kick_later(self.recording_delay)
        else:
            self.kick()

    def kick(self) -> None:
        """Ship now (something new was spooled); no timer involved."""
        if not self.running:
            return
        if self._busy:
            self._again = True
        elif self.failures == 0:
            self._cancel_timer()
            self._start_round()

    def kick_later(self, delay: float) -> None:
        """Ship within ``delay`` seconds (recording output: coalesced)."""
        if not self.running or self.failures:
            return
        if self._busy:
            self._again = True
        elif self._call is None:
            self._call = self.clock.callLater(delay, self._start_round)

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
                      "({events} events spooled)", events=self.spool.pending_event_count())
            self._cancel_timer()
            self._start_round()

    def _cancel_timer(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _start_round(self) -> defer.Deferred:
        self._call = None
        self._busy = True
        self._again = False
        self.rounds += 1
        d = defer.Deferred.fromCoroutine(self.ship_once())

        def done(_):
            if self.failures:
                _log.info("audit spool delivered again after {n} failed rounds",
                          n=self.failures)
            self.failures = 0
            return None

        def failed(failure):
            self.failures += 1
            delay = self.rng.uniform(0, min(self.max_delay, 0.5 * 2 ** min(self.failures, 20)))
            reason = failure.value if failure.check(errors.EdgeError) else failure.getErrorMessage()
            _log.warn("audit delivery failed ({reason}); {events} events spooled; retrying "
                      "in {delay:.1f}s", reason=reason, events=self.spool.pending_event_count(),
                      delay=delay)
            return delay

        def next_round(delay):
            self._busy = False
            again, retry_now = self._again, self._retry_now
            self._again = self._retry_now = False
            if not self.running:
                return
            if delay is None:
                if again or self._has_work():
                    self._start_round()
            elif retry_now:
                self._start_round()
            else:
                self._call = self.clock.callLater(delay, self._start_round)

        d.addCallbacks(done, failed)
        d.addCallback(next_round)
        return d

    def _has_work(self) -> bool:
        """Something durable is left that the last round did not send."""
        if self.spool.pending_event_count():
            return True
        return any(p["uploaded"] is None or p["uploaded"] < p["length"] or p["complete"]
                   for p in self.spool.pending_recordings())

    async def ship_once(self) -> None:
        """Deliver everything spooled now; raises on the first failure."""
        while True:
            batch = self.spool.pending_events(EVENT_BATCH, max_bytes=EVENT_BATCH_BYTES)
            if not batch:
                break
            acknowledged = await self.uploader.send_events(batch)
            if not acknowledged:
                raise errors.EdgeError("the auth service acknowledged no event")
            await self.spool.acknowledge_events(acknowledged)
        for pending in self.spool.pending_recordings():
            await self._ship_recording(pending)

    async def _ship_recording(self, pending: dict) -> None:
        session_id, meta = pending["session_id"], pending["meta"]
        length = pending["length"]
        if pending["written"] > length:
            length = await self.spool.sync_recording(session_id)
        offset = pending["uploaded"]
        if offset is None:
            # After a restart: ask where the auth service stands (an empty
            # chunk at 0 is answered with the stored length).
            offset = await self.uploader.send_recording_chunk(session_id, 0, b"", meta)
            offset = min(offset, length)
            self.spool.recording_acknowledged(session_id, offset)
        while offset < length:
            data = await self.spool.read_recording(session_id, offset,
                                                   min(CHUNK_BYTES, length - offset))
            if not data:
                raise errors.EdgeError(f"recording {session_id}: nothing to read at {offset}")
            stored = await self.uploader.send_recording_chunk(session_id, offset, data, meta)
            if stored == offset:
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
