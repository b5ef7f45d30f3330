"""Recordings and the audit log for the web UI (no HTTP routing here).

The recording store answers with Deferreds (its file I/O runs on the disk
writer's thread); listing checks each listed session's recording.

Who sees what is the audit API's rule (:mod:`edgeaccess.audit.http`):
recordings of one's own sessions always; everyone's with the ``session``
rules (``auditor``); the audit log with the ``event`` rules.
"""

from __future__ import annotations

from datetime import datetime, timezone
from urllib.parse import urlencode

from edgeaccess import errors
from edgeaccess.audit import events as ev
from edgeaccess.audit.log import MAX_SEARCH_LIMIT
from edgeaccess.audit.recording import check_session_id
from edgeaccess.web import render as r


def _audit(auth):
    if getattr(auth, "audit", None) is None:
        raise errors.EdgeError("the audit log is not configured on this proxy")
    return auth.audit


async def list_recordings(auth, user: str | None) -> list[dict]:
    """Sessions with a terminal (newest first): of ``user``, or everyone's."""
    audit = _audit(auth)
    started = await audit.search(types=[ev.SESSION_START], user=user, limit=MAX_SEARCH_LIMIT)
    store = audit.recordings
    found = []
    for event in reversed(started):
        session_id = event.get("session_id")
        if not isinstance(session_id, str) or event.get("kind") not in (None, "shell", "exec"):
            continue
        try:
            check_session_id(session_id)
            available = store is not None and bool(await store.info(session_id))
        except errors.EdgeError:
            available = False
        if event.get("kind") == "exec" and not available:
            continue
        found.append({"session_id": session_id, "time": event.get("time", ""),
                      "user": event.get("user", ""), "login": event.get("login", ""),
                      "node": event.get("node", ""), "available": available})
    return found


async def read_recording(auth, session, checker, session_id: str, *, data: bool = True):
    """``(info, cast bytes or None)`` of a recording the session may read."""
    check_session_id(session_id)
    store = _audit(auth).recordings
    if store is None:
        raise errors.NotFound("recordings are not kept on this proxy")
    try:
        info = await store.info(session_id)
    except errors.NotFound:
        info = None
    own = info is not None and info.get("user") == session.user and info.get(
        "cluster", auth.cluster_name) == auth.cluster_name
    if not own and not checker.can("session", "read"):
        raise errors.AccessDenied(f"{session.user} may not read the recording of "
                                  f"session {session_id}")
    if info is None:
        raise errors.NotFound(f"no recording of session {session_id}")
    return info, ((await store.read(session_id)) if data else None)


def _filters(request) -> dict:
    return {name: r.query_value(request, name, limit=100).strip()
            for name in ("since", "until", "type", "user")}


def _time(text: str) -> datetime | None:
    """A ``datetime-local`` value (taken as UTC), RFC 3339, or a duration
    back from now (``1h``)."""
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise errors.BadRequest(f"invalid time {text!r} (use 2024-05-01T12:00:00)")
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


async def audit_events(auth, request) -> list[dict]:
    """Events matching the request's filters, newest first."""
    f = _filters(request)
    types = [t.strip() for t in f["type"].split(",") if t.strip()]
    found = await _audit(auth).search(
        since=_time(f["since"]), until=_time(f["until"]), types=types,
        user=f["user"] or None, limit=MAX_SEARCH_LIMIT)
    return list(reversed(found))


async def audit_page(auth, request, page_size: int) -> dict:
    """The audit page's context: one page of events, the pager, the verdict."""
    f = _filters(request)
    offset_text = r.query_value(request, "offset", limit=10)
    offset = int(offset_text) if offset_text.isdigit() else 0
    events = await audit_events(auth, request)
    page = events[offset:offset + page_size]
    result = await _audit(auth).verify()
    base = {k: v for k, v in f.items() if v}

    def link(at: int) -> str:
        return urlencode({**base, "offset": at})

    return {
        "f": f, "events": page, "total": len(events), "first": offset + 1,
        "last": offset + len(page), "query": urlencode(base),
        "prev_page": link(max(0, offset - page_size)) if offset > 0 else None,
        "next_page": link(offset + page_size) if offset + page_size < len(events) else None,
        "verdict": {"ok": result.ok, "count": result.events,
                    "problem": result.problems[0].message if result.problems else ""},
    }
