"""Group commit for a busy emitter: many audit events, few appends to the log.

A proxy that audits every request (``kube.request``) would append one event
at a time: each append takes the log's lock and writes the event, its id and
the chain head, one backend transaction each, and while one append runs the
next ones queue behind it. :class:`BatchingEmitter` keeps the events
emitted while an append is under way (or during the current reactor
iteration) and appends them together with :meth:`AuditLog.emit_many`: the
lock, the head write and the Deferred chain are paid once per batch. An idle
emitter appends each event at the end of the reactor iteration that emitted
it, so nothing waits for a timer; under load the batches grow by themselves.

What a crash can lose: the events emitted and not yet appended, i.e. those
of the current reactor iteration plus those queued behind the append under
way (at most ``max_pending``). The request they describe has been answered
already. Each event's time is taken when it is emitted, not when it is
written.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

_log = Logger()

#: Events appended together at most (the log's own limit on one batch).
MAX_BATCH = 1000
#: Events kept waiting at most; beyond this, new events are dropped (and counted in the log).
MAX_PENDING = 100_000


class BatchingEmitter:
    """Emits audit events through ``audit.emit_many`` in batches.

    :param audit: the ``AuditLog`` (``emit_many(list of (type, fields))``,
        ``make(type, fields)``).
    :param clock: ``IReactorTime``; the first event of a batch schedules its
        append with ``callLater(0)``.
    """

    def __init__(self, audit, clock, *, max_batch: int = MAX_BATCH,
                 max_pending: int = MAX_PENDING) -> None:
        self.audit = audit
        self.clock = clock
        self.max_batch = max_batch
        self.max_pending = max_pending
        self._pending: list[dict] = []
        self._scheduled = None
        self._in_flight: Deferred | None = None
        self.dropped = 0
        #: Batches appended so far (what tests and benchmarks look at).
        self.batches = 0

    def emit(self, event_type: str, **fields: Any) -> None:
        """Queue an event (made now: its time is now); never raises."""
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                _log.error("audit: {count} events dropped, the audit log cannot keep up",
                           count=self.dropped)
            return
        event = self.audit.make(event_type, fields)
        if event is None:
            return
        self._pending.append(event)
        if self._in_flight is None and self._scheduled is None:
            self._scheduled = self.clock.callLater(0, self._flush)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _flush(self) -> None:
        self._scheduled = None
        if self._in_flight is not None or not self._pending:
            return
        batch = self._pending[:self.max_batch]
        del self._pending[:self.max_batch]
        self.batches += 1
        self._in_flight = d = self.audit.append_made(batch)
        d.addBoth(self._appended)

    def _appended(self, _result) -> None:
        self._in_flight = None
        if self._pending:
            self._flush()

    def flush(self) -> Deferred:
        """Fires once every event queued now is appended (for a clean stop)."""
        from twisted.internet.defer import succeed

        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
            self._scheduled = None
        if not self._pending and self._in_flight is None:
            return succeed(None)
        done = Deferred()

        def check(_=None):
            if not self._pending and self._in_flight is None:
                done.callback(None)
            else:
                if self._in_flight is None:
                    self._flush()
                self._in_flight.addBoth(lambda r: (check(), r)[1])

        check()
        return done
