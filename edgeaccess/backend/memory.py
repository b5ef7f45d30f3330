"""An in-memory backend: the twin of the SQLite one, for tests and demos.

Every method returns an already-fired ``Deferred``. Keys are kept in a
sorted list beside a dict, so range reads cost ``O(log n + k)``.
"""

from __future__ import annotations

import bisect
from datetime import datetime

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from edgeaccess.backend import (
    check_key,
    check_limit,
    check_prefix,
    check_value,
    expires_to_epoch,
    is_live,
    normalize_expires,
    prefix_upper_bound,
)
from edgeaccess.backend.interfaces import CompareFailed, IAtomicUpdate, IBackend, Item
from edgeaccess.backend.watch import DEFAULT_BACKLOG, WatchFanout, Watcher
from edgeaccess.errors import AlreadyExists, EdgeError, NotFound

_log = Logger()


@attrs.frozen
class _Stored:
    item: Item
    expires_epoch: float | None


@implementer(IBackend, IAtomicUpdate)
class MemoryBackend:
    """:class:`IBackend` held in a dict; expiry decided by ``clock.seconds()``.

    :param clock: an ``IReactorTime`` (``twisted.internet.task.Clock`` in tests).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._items: dict[str, _Stored] = {}
        self._sorted_keys: list[str] = []
        self._revision = 0
        self._closed = False
        self._fanout = WatchFanout()

    # -- helpers ---------------------------------------------------------

    def _live(self, key: str) -> _Stored | None:
        stored = self._items.get(key)
        if stored is None:
            return None
        if not is_live(stored.expires_epoch, self.clock.seconds()):
            self._remove(key)
            return None
        return stored

    def _remove(self, key: str) -> None:
        del self._items[key]
        index = bisect.bisect_left(self._sorted_keys, key)
        del self._sorted_keys[index]

    def _write(self, key: str, value: bytes, expires: datetime | None) -> Item:
        expires_epoch = expires_to_epoch(expires)
        self._revision += 1
        item = Item(key, value, normalize_expires(expires), self._revision)
        if key not in self._items:
            bisect.insort(self._sorted_keys, key)
        self._items[key] = _Stored(item, expires_epoch)
        self._fanout.put(item)
        return item

    def _delete_live(self, key: str) -> None:
        self._remove(key)
        self._revision += 1
        self._fanout.delete(key, self._revision)

    def _keys_under(self, prefix: str) -> list[str]:
        start = bisect.bisect_left(self._sorted_keys, prefix)
        bound = prefix_upper_bound(prefix)
        end = len(self._sorted_keys) if bound is None else bisect.bisect_left(self._sorted_keys, bound)
        return self._sorted_keys[start:end]

    def _check_open(self) -> None:
        if self._closed:
            raise EdgeError("the storage backend is closed")

    # -- IBackend --------------------------------------------------------

    def get(self, key: str) -> Deferred[Item]:
        """See :meth:`IBackend.get`."""
        try:
            self._check_open()
            stored = self._live(check_key(key))
            if stored is None:
                raise NotFound("item not found")
        except Exception as error:
            return fail(error)
        return succeed(stored.item)

    def put(self, key: str, value: bytes, expires: datetime | None = None) -> Deferred[Item]:
        """See :meth:`IBackend.put`."""
        try:
            self._check_open()
            item = self._write(check_key(key), check_value(value), expires)
        except Exception as error:
            return fail(error)
        return succeed(item)

    def create(self, key: str, value: bytes, expires: datetime | None = None) -> Deferred[Item]:
        """See :meth:`IBackend.create`."""
        try:
            self._check_open()
            value = check_value(value)
            if self._live(check_key(key)) is not None:
                raise AlreadyExists("item already exists")
            item = self._write(key, value, expires)
        except Exception as error:
            return fail(error)
        return succeed(item)

    def update(self, key: str, value: bytes, expires: datetime | None = None) -> Deferred[Item]:
        """See :meth:`IBackend.update`."""
        try:
            self._check_open()
            value = check_value(value)
            if self._live(check_key(key)) is None:
                raise NotFound("item not found")
            item = self._write(key, value, expires)
        except Exception as error:
            return fail(error)
        return succeed(item)

    def compare_and_swap(
        self, key: str, expected: bytes, value: bytes, expires: datetime | None = None
    ) -> Deferred[Item]:
        """See :meth:`IBackend.compare_and_swap`."""
        try:
            self._check_open()
            expected = check_value(expected)
            value = check_value(value)
            stored = self._live(check_key(key))
            if stored is None:
                raise NotFound("item not found")
            if stored.item.value != expected:
                raise CompareFailed("the item changed since it was read")
            item = self._write(key, value, expires)
        except Exception as error:
            return fail(error)
        return succeed(item)

    def delete(self, key: str) -> Deferred[None]:
        """See :meth:`IBackend.delete`."""
        try:
            self._check_open()
            if self._live(check_key(key)) is None:
                raise NotFound("item not found")
            self._delete_live(key)
        except Exception as error:
            return fail(error)
        return succeed(None)

    def get_range(self, prefix: str, limit: int | None = None) -> Deferred[list[Item]]:
        """See :meth:`IBackend.get_range`."""
        try:
            self._check_open()
            limit = check_limit(limit)
            items: list[Item] = []
            for key in self._keys_under(check_prefix(prefix)):
                if limit is not None and len(items) >= limit:
                    break
                stored = self._live(key)
                if stored is not None:
                    items.append(stored.item)
        except Exception as error:
            return fail(error)
        return succeed(items)

    def delete_range(self, prefix: str) -> Deferred[int]:
        """See :meth:`IBackend.delete_range`."""
        try:
            self._check_open()
            deleted = 0
            for key in self._keys_under(check_prefix(prefix)):
                if self._live(key) is not None:
                    self._delete_live(key)
                    deleted += 1
        except Exception as error:
            return fail(error)
        _log.debug("deleted {count} items under {prefix}", count=deleted, prefix=prefix)
        return succeed(deleted)

    def atomic_update(self, compute) -> Deferred:
        """See :meth:`IAtomicUpdate.atomic_update` (one process: nothing interleaves)."""
        try:
            self._check_open()
            writes, result = compute(_MemoryReader(self))
            checked = [(check_key(key), check_value(value)) for key, value in writes]
            for key, value in checked:
                self._write(key, value, None)
        except Exception as error:
            return fail(error)
        return succeed(result)

    def watch(self, prefixes, backlog: int = DEFAULT_BACKLOG) -> Watcher:
        """See :meth:`IBackend.watch`."""
        self._check_open()
        return self._fanout.watch(prefixes, backlog)

    def close(self) -> Deferred[None]:
        """Forget everything; later calls fail; watchers close."""
        self._closed = True
        self._fanout.close_all("the storage backend closed")
        self._items.clear()
        self._sorted_keys.clear()
        return succeed(None)


class _MemoryReader:
    """What :meth:`MemoryBackend.atomic_update` gives ``compute``."""

    def __init__(self, backend: MemoryBackend) -> None:
        self._backend = backend

    def get_many(self, keys) -> dict[str, bytes]:
        found = {}
        for key in keys:
            stored = self._backend._live(check_key(key))
            if stored is not None:
                found[key] = stored.item.value
        return found
