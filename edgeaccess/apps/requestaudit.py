"""Optional per-request audit events of web apps (``app.request``), batched.

Off by default: ``twistd edgeproxy --app-request-audit '*'`` (every app) or
``--app-request-audit grafana,wiki`` (those apps) switches them on for the
apps this proxy serves (for an app of a leaf cluster, the leaf's proxy
decides: its audit log is the leaf's).

Each event names ``user``, ``app``, ``app_cluster``, ``method``, ``path``
(without the query string, which may carry secrets; at most
:data:`MAX_PATH` characters), ``status`` (the app's, or the proxy's own
refusal), ``remote_addr`` and ``session_id``.

Recording one costs the request path a tuple appended to a list: the
events are made and appended to the audit log in batches, every
:data:`FLUSH_INTERVAL` seconds or :data:`MAX_BATCH` events, whichever comes
first. So a proxy that dies loses at most the last interval's request
events (session start and end events are not batched). When the audit log
cannot keep up, at most :data:`MAX_PENDING` events wait; further ones are
dropped and counted in a warning.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from twisted.internet import defer
from twisted.logger import Logger

from edgeaccess.audit import events as ev

_log = Logger()

EVENT = "app.request"
FLUSH_INTERVAL = 0.5
MAX_BATCH = 500
MAX_PENDING = 20000
MAX_PATH = 1024


def parse_selection(text: str | None) -> frozenset[str] | None:
    """``--app-request-audit``: ``*`` is every app (None); app names separated
    by commas (those apps); empty: off (an empty set)."""
    from edgeaccess.apps.spec import check_app_name

    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if "*" in names:
        return None
    return frozenset(check_app_name(n) for n in names)


class RequestAudit:
    """Batches ``app.request`` events into the cluster's audit log.

    :param audit: the :class:`~edgeaccess.audit.log.AuditLog`.
    :param clock: ``IReactorTime``.
    :param apps: the app names audited (None: every app).
    """

    def __init__(self, audit, clock, apps: frozenset[str] | None = None, *,
                 interval: float = FLUSH_INTERVAL, max_batch: int = MAX_BATCH,
                 max_pending: int = MAX_PENDING) -> None:
        self.audit = audit
        self.clock = clock
        self.apps = apps
        self.interval = interval
        self.max_batch = max_batch
        self.max_pending = max_pending
        self._pending: list[tuple[float, dict]] = []
        self._timer = None
        self._flushing: defer.Deferred | None = None
        self.dropped = 0
        #: events dropped since the start (the audit log did not keep up)
        self.dropped_total = 0

    def covers(self, app: str) -> bool:
        return self.apps is None or app in self.apps

    def record(self, fields: dict) -> None:
        """Queue one event (``fields`` without id, type, time or cluster)."""
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            self.dropped_total += 1
            return
        self._pending.append((self.clock.seconds(), fields))
        if len(self._pending) >= self.max_batch:
            self._flush_soon(0)
        elif self._timer is None:
            self._flush_soon(self.interval)

    def _flush_soon(self, delay: float) -> None:
        if self._timer is not None:
            if delay > 0 or not self._timer.active():
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._timed_flush)

    def _timed_flush(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> defer.Deferred:
        """Append what is queued now (one append at a time); fires when done."""
        if self._flushing is not None:
            # One batch at a time: the next one follows this.
            d = defer.Deferred()

            def again(result):
                self.flush().addBoth(d.callback)
                return result

            self._flushing.addBoth(again)
            return d
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
        if self.dropped:
            _log.warn("{n} app.request audit events were dropped: the audit log did not "
                      "keep up", n=self.dropped)
            self.dropped = 0
        if not batch:
            return defer.succeed(None)
        self._flushing = defer.Deferred.fromCoroutine(self._append(batch))

        def done(result):
            self._flushing = None
            if self._pending and self._timer is None:
                self._flush_soon(0 if len(self._pending) >= self.max_batch else self.interval)
            return None

        self._flushing.addBoth(done)
        return self._flushing

    async def _append(self, batch: list[tuple[float, dict]]) -> None:
        events = []
        for when, fields in batch:
            try:
                events.append(ev.make_event(
                    EVENT, cluster=self.audit.cluster_name,
                    when=datetime.fromtimestamp(when, timezone.utc),
                    new_id=lambda: str(uuid.uuid4()), **fields))
            except Exception as e:
                _log.error("app.request audit event not recorded: {why}", why=e)
        if not events:
            return
        try:
            await self.audit.ingest(events)
        except Exception:
            _log.failure("{n} app.request audit events could not be stored", n=len(events))


def request_fields(*, user: str | None, app: str, cluster: str, method: bytes,
                   target: bytes, status: int, remote_addr: str,
                   session_id: str | None) -> dict:
    """The fields of one ``app.request`` event."""
    path = target.split(b"?", 1)[0].decode("latin-1")
    if len(path) > MAX_PATH:
        path = path[:MAX_PATH] + "..."
    return {"user": user or None, "app": app, "app_cluster": cluster,
            "method": method.decode("latin-1")[:32], "path": path, "status": status,
            "remote_addr": remote_addr or None, "session_id": session_id or None}
