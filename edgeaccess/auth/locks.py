"""Locks as the auth service keeps them (``/locks/ID``, expiring with their TTL).

Mixed into :class:`~edgeaccess.auth.service.AuthServer`; the documents and
the matching rule are :mod:`edgeaccess.identity.locks`.
"""

from __future__ import annotations

import secrets
from datetime import timedelta

from twisted.logger import Logger

from edgeaccess import errors
from edgeaccess.auth.common import _dumps, _iso, _loads
from edgeaccess.identity import locks

_log = Logger()

LOCK_PREFIX = "/locks/"
MAX_LOCK_TTL = timedelta(days=366)


class LockAdmin:
    """``create_lock``, ``list_locks``, ``delete_lock`` over ``self.backend``.

    Reads come from the control-plane cache when there is one (``self._range``).
    """

    async def create_lock(self, target: dict, *, ttl: timedelta | None = None,
                          message: str | None = None, created_by: str = "") -> dict:
        target = locks.check_target(target)
        message = locks.check_message(message)
        if ttl is not None and (ttl <= timedelta(0) or ttl > MAX_LOCK_TTL):
            raise errors.BadRequest("lock ttl must be between 1s and 366 days")
        now = self.now()
        expires = now + ttl if ttl is not None else None
        lock = {
            "id": secrets.token_hex(16),
            "target": target,
            "message": message,
            "expires": _iso(expires) if expires is not None else None,
            "created": _iso(now),
            "created_by": created_by[:256],
        }
        await self.backend.create(LOCK_PREFIX + lock["id"], _dumps(lock), expires=expires)
        ((kind, name),) = target.items()
        _log.info("lock {id} created on {kind} {name} by {by}: {message}", id=lock["id"],
                  kind=kind, name=name, by=created_by, message=message)
        self._emit("lock.created", lock_id=lock["id"], target=target, message=message,
                   expires=lock["expires"], user=created_by)
        return lock

    async def list_locks(self) -> list[dict]:
        """The locks in force, oldest first."""
        items = await self._range(LOCK_PREFIX)
        found = []
        for item in items:
            try:
                found.append(locks.parse_lock(_loads(item)))
            except errors.EdgeError:
                _log.warn("stored lock {key} is malformed; ignored", key=item.key)
        return sorted(found, key=lambda l: (l.get("created") or "", l["id"]))

    async def delete_lock(self, lock_id: str, deleted_by: str = "") -> None:
        locks.check_lock_id(lock_id)
        try:
            await self.backend.delete(LOCK_PREFIX + lock_id)
        except errors.NotFound:
            raise errors.NotFound(f"lock {lock_id} not found")
        _log.info("lock {id} deleted by {by}", id=lock_id, by=deleted_by)
        self._emit("lock.deleted", lock_id=lock_id, user=deleted_by)
