"""Optional per-request audit events of web apps (``app.request``), batched.

Off by default: ``twistd edgeproxy --app-request-audit '*'`` (every app) or
``--app-request-audit grafana,wiki`` (those apps) switches them on for the
apps this proxy serves (for an app of a leaf cluster, the leaf's proxy
decides: its audit log is the leaf's).

Each event names ``user``, ``app``, ``app_cluster``, ``method``, ``path``
(without the query string, which may carry secrets; at most
:data:`MAX_PATH` characters), ``status`` (the app's, or the proxy's own
refusal), ``remote_addr`` and ``session_id``.

Recording one costs the request path one event made and queued: the events
go to the audit log through :class:`~edgeaccess.audit.batch.BatchingEmitter`
(the same group commit as ``kube.request``), one append for all the events of
a reactor iteration and those queued behind an append under way. So a proxy
that dies loses at most those (session start and end events are not
batched). When the audit log cannot keep up, at most
:data:`~edgeaccess.audit.batch.MAX_PENDING` events wait; further ones are
dropped and counted in an error line.
"""

from __future__ import annotations

from twisted.internet import defer

from edgeaccess.audit.batch import MAX_BATCH, MAX_PENDING, BatchingEmitter

EVENT = "app.request"
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
    """Records ``app.request`` events for the apps it covers, in batches.

    :param audit: the :class:`~edgeaccess.audit.log.AuditLog`.
    :param clock: ``IReactorTime``.
    :param apps: the app names audited (None: every app).
    """

    def __init__(self, audit, clock, apps: frozenset[str] | None = None, *,
                 max_batch: int = MAX_BATCH, max_pending: int = MAX_PENDING) -> None:
        self.apps = apps
        self._emitter = BatchingEmitter(audit, clock, max_batch=max_batch,
                                        max_pending=max_pending)

    def covers(self, app: str) -> bool:
        return self.apps is None or app in self.apps

    def record(self, fields: dict) -> None:
        """Queue one event (``fields`` without id, type, time or cluster)."""
        self._emitter.emit(EVENT, **fields)

    @property
    def pending(self) -> int:
        return self._emitter.pending

    @property
    def dropped(self) -> int:
        """Events dropped since the start (the audit log did not keep up)."""
        return self._emitter.dropped

    def flush(self) -> defer.Deferred:
        """Fires once every event queued now is appended (for a clean stop)."""
        return self._emitter.flush()


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
