"""Audit events: their shape, their canonical bytes, and the chain hash.

An event is a flat JSON object with at least ``id`` (unique), ``event``
(its type, e.g. ``session.start``), ``time`` (RFC 3339, UTC) and
``cluster``; where they apply ``user``, ``login``, ``node``,
``session_id``, ``remote_addr``, ``command`` and ``success`` (SPEC.md,
"Audit"). Fields whose value is ``None`` are left out.

The chain: each stored event gets a sequence number and
``hash = SHA-256(prev_hash || canonical_json(event))`` (hex), the first
one chaining to :data:`GENESIS_HASH`. Canonical JSON is sorted keys, no
insignificant white space, UTF-8: the same event always hashes the same
whichever process wrote it.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from typing import Any, Callable

from edgeaccess import errors

#: ``prev_hash`` of the first event of a chain.
GENESIS_HASH = "0" * 64

# Event types emitted at the node (SSH server).
SESSION_START = "session.start"
SESSION_END = "session.end"
EXEC = "exec"
SCP = "scp"
SFTP = "sftp"
PORT = "port"
AUTH = "auth"

#: The types a node may report; anything else from a node is refused.
NODE_EVENT_TYPES = frozenset({SESSION_START, SESSION_END, EXEC, SCP, SFTP, PORT, AUTH})

#: At most this many bytes of canonical JSON per event.
MAX_EVENT_BYTES = 16 * 1024

_TYPE_PATTERN = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FIELD_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")


def canonical_json(event: dict) -> bytes:
    """The bytes an event is hashed with (sorted keys, compact, UTF-8)."""
    return json.dumps(event, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def chain_hash(prev_hash: str, event: dict) -> str:
    """``SHA-256(prev_hash || canonical_json(event))`` as lower-case hex."""
    digest = hashlib.sha256(prev_hash.encode("ascii"))
    digest.update(canonical_json(event))
    return digest.hexdigest()


def rfc3339(when: datetime) -> str:
    """``2024-05-01T12:00:00.123456Z`` (UTC, microseconds)."""
    text = when.astimezone(timezone.utc).isoformat(timespec="microseconds")
    return text.replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """An RFC 3339 time; :class:`~edgeaccess.errors.BadRequest` otherwise."""
    if not isinstance(text, str) or len(text) > 40:
        raise errors.BadRequest("a time must be an RFC 3339 string")
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise errors.BadRequest(f"invalid time {text!r} (use RFC 3339, e.g. "
                                f"2024-05-01T12:00:00Z)")
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when


def make_event(event_type: str, *, cluster: str, when: datetime,
               new_id: Callable[[], str], **fields: Any) -> dict:
    """A new event of ``event_type`` with a fresh id; ``None`` fields dropped."""
    event = {key: value for key, value in fields.items() if value is not None}
    event.update(id=new_id(), event=event_type, time=rfc3339(when), cluster=cluster)
    return validate_event(event)


def validate_event(event: Any) -> dict:
    """Check an event received from elsewhere (a node, a client).

    :raises errors.BadRequest: not an object, missing or malformed ``id``,
        ``event`` or ``time``, odd field names or values, or too large.
    """
    if not isinstance(event, dict):
        raise errors.BadRequest("an audit event must be a JSON object")
    event_id = event.get("id")
    if not isinstance(event_id, str) or not _ID_PATTERN.fullmatch(event_id):
        raise errors.BadRequest("an audit event needs an id of 1-64 letters, digits, '.-_'")
    event_type = event.get("event")
    if not isinstance(event_type, str) or len(event_type) > 64 or \
            not _TYPE_PATTERN.fullmatch(event_type):
        raise errors.BadRequest(f"audit event {event_id}: invalid event type")
    parse_time(event.get("time"))
    for key, value in event.items():
        if not isinstance(key, str) or not _FIELD_PATTERN.fullmatch(key):
            raise errors.BadRequest(f"audit event {event_id}: invalid field name")
        if not _plain(value, depth=0):
            raise errors.BadRequest(f"audit event {event_id}: field {key} has a bad value")
    try:
        size = len(canonical_json(event))
    except (TypeError, ValueError):
        raise errors.BadRequest(f"audit event {event_id}: not plain JSON")
    if size > MAX_EVENT_BYTES:
        raise errors.BadRequest(f"audit event {event_id} is larger than {MAX_EVENT_BYTES} bytes")
    return event


def _plain(value: Any, depth: int) -> bool:
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return value == value and value not in (float("inf"), float("-inf"))
    if depth >= 3:
        return False
    if isinstance(value, list):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False
