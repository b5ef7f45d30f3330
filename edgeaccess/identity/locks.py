"""Locks: an administrator cuts a user or a node off, at once.

A lock is a small JSON document under ``/locks/ID``::

    {"id": "...", "target": {"user": "alice"} | {"node": "web-1"},
     "message": "...", "expires": RFC 3339 | null, "created": RFC 3339,
     "created_by": "admin"}

stored with the backend's own expiry (so it disappears by itself), pushed
to every node and leaf (:mod:`edgeaccess.controlplane`) and enforced by
the proxy and by each node: :func:`matching_lock` is the one decision both
make. A user target names a user of the cluster that made the lock; a lock
relayed from a root cluster to a leaf carries ``cluster`` (the root's
name) so that it applies to that root's users only.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Iterable

from edgeaccess import errors

#: Longest lock message (shown to users, written to terminals).
MAX_MESSAGE = 512
TARGET_KINDS = ("user", "node")
DEFAULT_MESSAGE = "access is locked by an administrator"

# A relayed lock (root -> leaf) is ROOT.ID.
_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_-]{0,252}\.)?[0-9a-f]{32}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,252}$")


class Locked(errors.AccessDenied):
    """access is locked"""

    code = "locked"


def check_lock_id(lock_id: Any) -> str:
    if not isinstance(lock_id, str) or not _ID.match(lock_id):
        raise errors.NotFound("lock not found")
    return lock_id


def _checked_id(lock_id: Any) -> str:
    if not isinstance(lock_id, str) or not _ID.match(lock_id):
        raise errors.BadRequest("invalid lock id")
    return lock_id


def check_message(message: Any) -> str:
    """A lock message as users will see it: one line, printable, bounded."""
    if message is None or message == "":
        return DEFAULT_MESSAGE
    if not isinstance(message, str) or len(message) > MAX_MESSAGE:
        raise errors.BadRequest(f"the lock message must be text of at most {MAX_MESSAGE} characters")
    cleaned = "".join(c if c.isprintable() else " " for c in message).strip()
    return cleaned or DEFAULT_MESSAGE


def check_target(target: Any) -> dict[str, str]:
    """``{"user": NAME}`` or ``{"node": NAME}``; BadRequest for anything else."""
    if not isinstance(target, dict) or len(target) != 1:
        raise errors.BadRequest('a lock target is {"user": NAME} or {"node": NAME}')
    ((kind, name),) = target.items()
    if kind not in TARGET_KINDS:
        raise errors.BadRequest(f"a lock targets a user or a node, not {str(kind)[:32]!r}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise errors.BadRequest(f"invalid {kind} name in lock target")
    return {kind: name}


def parse_lock(data: Any) -> dict[str, Any]:
    """A lock document received from storage or the network, checked.

    Unknown fields are dropped; what comes back is safe to match and show.
    """
    if not isinstance(data, dict):
        raise errors.BadRequest("a lock is an object")
    expires = data.get("expires")
    if expires is not None:
        parse_time(expires)
    lock = {
        "id": _checked_id(data.get("id")),
        "target": check_target(data.get("target")),
        "message": check_message(data.get("message")),
        "expires": expires,
        "created": data.get("created") if isinstance(data.get("created"), str) else None,
        "created_by": str(data.get("created_by") or "")[:256],
    }
    cluster = data.get("cluster")
    if cluster is not None:
        if not isinstance(cluster, str) or not _NAME.match(cluster):
            raise errors.BadRequest("invalid cluster in lock")
        lock["cluster"] = cluster
    return lock


def parse_time(text: Any) -> datetime:
    if not isinstance(text, str) or len(text) > 64:
        raise errors.BadRequest("invalid time in lock")
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise errors.BadRequest("invalid time in lock") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment


def is_in_force(lock: dict[str, Any], now: float) -> bool:
    """Whether ``lock`` has not expired at ``now`` (epoch seconds)."""
    expires = lock.get("expires")
    return expires is None or parse_time(expires).timestamp() > now


def matching_lock(
    locks: Iterable[dict[str, Any]],
    now: float,
    *,
    user: str | None = None,
    user_cluster: str | None = None,
    local_cluster: str | None = None,
    node_names: Iterable[str] = (),
) -> dict[str, Any] | None:
    """The first lock in force that targets this user or node, else None.

    :param user: the user's name (certificate key id).
    :param user_cluster: the cluster that issued the user's certificate.
    :param local_cluster: the cluster deciding; a lock without ``cluster``
        is one of this cluster's and targets its own users, a relayed lock
        (``cluster`` = a root) targets that root's users.
    :param node_names: this node's name and UUID (a node lock names either).
    """
    nodes = set(node_names)
    for lock in locks:
        if not is_in_force(lock, now):
            continue
        target = lock["target"]
        if "node" in target and target["node"] in nodes:
            return lock
        if user is not None and target.get("user") == user:
            lock_cluster = lock.get("cluster", local_cluster)
            if user_cluster is None or lock_cluster is None or lock_cluster == user_cluster:
                return lock
    return None


def refusal(lock: dict[str, Any]) -> Locked:
    """The error (and so the user's message) for a refusal by ``lock``."""
    target = lock["target"]
    ((kind, name),) = target.items()
    return Locked(f"{kind} {name} is locked: {lock['message']}")
