"""The audit log's HTTP handlers, shared by the auth API and the proxy web app.

Nodes (client certificate of kind ``node``) deliver events (JSON batches)
and recording chunks (raw bytes by offset, streamed, never in JSON); the auth API serves them on 3025 and the proxy's web port on 3080
(for nodes that reach only the proxy). Readers need the ``event`` (search,
verify) or ``session`` (recordings) rules of their roles, as the preset
``auditor`` role grants; a user may always replay their own sessions.
"""

from __future__ import annotations

from datetime import timedelta

from twisted.logger import Logger

from edgeaccess import errors, httpapi
from edgeaccess.audit import events as ev
from edgeaccess.audit.recording import check_session_id
from edgeaccess.httpapi import field, json_response, read_json

_log = Logger()


def _audit(auth):
    if getattr(auth, "audit", None) is None:
        raise errors.EdgeError("the audit log is not configured on this server")
    return auth.audit


def _recordings(auth):
    store = getattr(_audit(auth), "recordings", None)
    if store is None:
        raise errors.EdgeError("session recordings are not configured on this server")
    return store


def _calling_node(auth, request):
    identity = httpapi.caller(request)
    if identity.kind != "node" or identity.cluster != auth.cluster_name:
        raise errors.AccessDenied("only nodes of this cluster may call this")
    return identity


async def _allowed(auth, identity, resource: str, verb: str) -> bool:
    from edgeaccess.identity import rbac

    if identity.cluster != auth.cluster_name:
        return False
    if identity.kind == "admin":
        return True
    if identity.kind != "user":
        return False
    checker = rbac.AccessChecker(await auth.get_roles(identity.roles), identity.traits)
    try:
        checker.check_action(resource, verb)
    except errors.AccessDenied:
        return False
    return True


async def require(auth, request, resource: str, verb: str):
    """The caller, if its roles allow ``verb`` on ``resource``."""
    identity = httpapi.caller(request)
    if not await _allowed(auth, identity, resource, verb):
        _log.warn("{kind} {name} may not {verb} {resource}", kind=identity.kind,
                  name=identity.name, verb=verb, resource=resource)
        raise errors.AccessDenied(f"{identity.name} may not {verb} {resource}s")
    return identity


# --- nodes deliver --------------------------------------------------------------

async def node_events(auth, request):
    """``POST /v1/audit/events`` ``{"events": [...]}`` -> ``{"acknowledged": [ids]}``."""
    identity = _calling_node(auth, request)
    batch = field(read_json(request), "events", list)
    acknowledged = await _audit(auth).ingest(batch, node_name=identity.name,
                                             node_id=identity.uuid)
    return json_response(request, {"acknowledged": acknowledged})


def _meta(identity, meta: dict) -> dict:
    meta = {k: v for k, v in meta.items() if isinstance(v, str)}
    meta.update(node=identity.name, node_id=identity.uuid or "", cluster=identity.cluster)
    return meta


#: Largest recording chunk taken in one request (nodes send 96 KiB).
MAX_CHUNK_BYTES = 1024 * 1024
#: Meta fields a node may give in the query of a chunk.
_META_QUERY = ("user", "login", "started")


async def node_recording_put(auth, request, session_id: str):
    """``PUT /v1/recordings/ID?offset=N[&user=&login=&started=]`` with the raw
    bytes (``application/octet-stream``) found at ``offset`` of the session's
    cast -> ``{"length"}`` (the stored length: where the next chunk starts;
    an empty body asks for it)."""
    identity = _calling_node(auth, request)
    check_session_id(session_id)
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip()
    if content_type.lower() != b"application/octet-stream":
        raise errors.BadRequest("a recording chunk is application/octet-stream")
    offset_text = _arg(request, "offset")
    if offset_text is None or not offset_text.isdigit() or len(offset_text) > 15:
        raise errors.BadRequest("offset must be a non-negative integer")
    chunk = request.content.read(MAX_CHUNK_BYTES + 1)
    if len(chunk) > MAX_CHUNK_BYTES:
        raise errors.BadRequest("recording chunk too large")
    meta = {name: value for name in _META_QUERY
            if (value := _arg(request, name)) is not None}
    store = _recordings(auth)
    await _check_owner(store, session_id, identity)
    length = await store.append(session_id, int(offset_text), chunk, _meta(identity, meta))
    return json_response(request, {"length": length})


async def node_recording_complete(auth, request, session_id: str):
    """``POST /v1/recordings/ID/complete`` ``{"length"}`` -> ``{"length"}``."""
    identity = _calling_node(auth, request)
    check_session_id(session_id)
    data = read_json(request)
    store = _recordings(auth)
    await _check_owner(store, session_id, identity)
    return json_response(request, {"length": await store.complete(
        session_id, field(data, "length", int))})


async def _check_owner(store, session_id, identity) -> None:
    try:
        info = await store.info(session_id)
    except errors.NotFound:
        return
    if info.get("node_id") and info.get("node_id") != identity.uuid:
        raise errors.AccessDenied(f"session {session_id} was recorded by another node")


# --- readers --------------------------------------------------------------------

def _arg(request, name: str) -> str | None:
    values = request.args.get(name.encode())
    if not values:
        return None
    return values[0].decode("utf-8", "replace")


async def search(auth, request):
    """``GET /v1/audit/events?since=&until=&type=&user=&node=&session=&limit=``."""
    await require(auth, request, "event", "list")
    since, until = _arg(request, "since"), _arg(request, "until")
    limit = _arg(request, "limit")
    if limit is not None and not limit.isdigit():
        raise errors.BadRequest("limit must be a number")
    types = [t for value in request.args.get(b"type", [])
             for t in value.decode("utf-8", "replace").split(",") if t]
    found = await _audit(auth).search(
        since=ev.parse_time(since) if since else None,
        until=ev.parse_time(until) if until else None,
        types=types, user=_arg(request, "user"), node=_arg(request, "node"),
        session_id=_arg(request, "session"), limit=int(limit) if limit else None)
    return json_response(request, found)


async def verify(auth, request):
    """``GET /v1/audit/verify`` -> the :class:`~edgeaccess.audit.log.VerifyResult`."""
    identity = await require(auth, request, "event", "list")
    result = await _audit(auth).verify()
    if not result.ok:
        _log.error("audit chain verification by {who} failed: {problem}", who=identity.name,
                   problem=result.problems[0].message)
    return json_response(request, result.to_dict())


async def recording(auth, request, session_id: str):
    """``GET /v1/recordings/ID`` -> ``{"session_id", "complete", "cast"}``: for the
    session's own user, or callers whose roles may read sessions."""
    identity = httpapi.caller(request)
    check_session_id(session_id)
    store = _recordings(auth)
    try:
        info = await store.info(session_id)
    except errors.NotFound:
        info = None
    own = (identity.kind == "user" and info is not None and info.get("user") == identity.name
           and info.get("cluster") == auth.cluster_name == identity.cluster)
    if not own and not await _allowed(auth, identity, "session", "read"):
        raise errors.AccessDenied(f"{identity.name} may not read the recording of "
                                  f"session {session_id}")
    if info is None:
        raise errors.NotFound(f"no recording of session {session_id}")
    return json_response(request, {
        "session_id": session_id, "complete": bool(info.get("complete")),
        "user": info.get("user"), "node": info.get("node"),
        "cast": (await store.read(session_id)).decode("utf-8", "replace")})


def parse_since(text: str, now) -> str:
    """``1h`` (relative to ``now``) or an RFC 3339 time, as RFC 3339 text."""
    try:
        delta: timedelta = httpapi.parse_duration(text)
    except errors.BadRequest:
        return ev.rfc3339(ev.parse_time(text))
    return ev.rfc3339(now - delta)
