"""The storage contract every backend implements.

A backend is an ordered key/value store with optional expiry, like
Teleport's ``lib/backend``: resources (users, roles, tokens, nodes,
connectors, locks ...) are JSON documents under ``/kind/name`` keys.
Every method returns a ``Deferred`` and never blocks the reactor.
Expired items are invisible to every read, as if deleted.

One contract test suite (``tests/backend/contract.py``) runs against
every implementation: memory, SQLite, and later PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime

import attrs
from zope.interface import Attribute, Interface


@attrs.frozen
class Item:
    """One stored value.

    :ivar key: the full key, e.g. ``"/users/alice"``.
    :ivar value: opaque bytes (JSON by convention).
    :ivar expires: UTC expiry time, or ``None`` for never. Backends return
        it timezone-aware (UTC); a naive datetime passed in is taken as UTC.
        The item is invisible from that instant on (``expires <= now``).
    :ivar revision: increases on every write to this key. Drivers draw it
        from one backend-wide counter, so it also orders writes to different
        keys, and a key deleted and created again never reuses a revision
        (a delete draws a revision too: watch events carry it).
    """

    key: str
    value: bytes
    expires: datetime | None = None
    revision: int = 0


class CompareFailed(Exception):
    """``compare_and_swap`` found a different current value."""


class IBackend(Interface):
    """Ordered key/value storage with expiry."""

    clock = Attribute("IReactorTime used to decide expiry.")

    def get(key: str):  # -> Deferred[Item]
        """The item at ``key``; fails with ``edgeaccess.errors.NotFound``."""

    def put(key: str, value: bytes, expires: datetime | None = None):  # -> Deferred[Item]
        """Create or replace the item at ``key``."""

    def create(key: str, value: bytes, expires: datetime | None = None):  # -> Deferred[Item]
        """Create ``key``; fails with ``edgeaccess.errors.AlreadyExists`` if it exists."""

    def update(key: str, value: bytes, expires: datetime | None = None):  # -> Deferred[Item]
        """Replace an existing ``key``; fails with ``NotFound`` if it does not exist."""

    def compare_and_swap(key: str, expected: bytes, value: bytes, expires: datetime | None = None):
        """Replace ``key`` only if its value is ``expected``.

        Fails with ``NotFound`` if absent, ``CompareFailed`` if different.
        Returns a Deferred firing with the new ``Item``.
        """

    def delete(key: str):  # -> Deferred[None]
        """Delete ``key``; fails with ``NotFound`` if it does not exist."""

    def get_range(prefix: str, limit: int | None = None):  # -> Deferred[list[Item]]
        """Items whose key starts with ``prefix``, sorted by key."""

    def delete_range(prefix: str):  # -> Deferred[int]
        """Delete every item under ``prefix``; fires with how many were deleted."""

    def watch(prefixes, backlog=4096):  # -> edgeaccess.backend.watch.Watcher
        """A change feed of the keys under ``prefixes`` (a list; ``""`` is all).

        Returns a :class:`~edgeaccess.backend.watch.Watcher` at once: its first
        event is ``init``, then one ``put``/``delete`` per committed write, in
        commit order, each with the write's revision. On a gap (more than
        ``backlog`` events unread, the backend closing, a lost connection) it
        closes and the consumer re-reads and watches again. Expiry is not an
        event (consumers honour ``Item.expires``).
        """

    def close():  # -> Deferred[None]
        """Release connections and threads; open watchers close."""


class IAtomicUpdate(Interface):
    """Optional: several reads and writes as one transaction, serialized with
    every other writer of the store (every proxy sharing it).

    For a hash chain with several writers (``edgeaccess.audit.log``): read
    the head, append after it, move it, all at once; no retries, and several
    appends per transaction. Drivers whose writers are all in one process
    may leave it out (callers then fall back to ``create``/``compare_and_swap``).
    """

    def atomic_update(compute):  # -> Deferred[result]
        """Run ``compute(reader)`` inside one write transaction.

        ``reader.get_many(keys)`` returns ``{key: value}`` of the live items
        among ``keys``, as of this transaction (nobody else writes until it
        ends). ``compute`` returns ``(writes, result)``: ``writes`` a list of
        ``(key, value)`` stored in order (``put``, no expiry), then the
        transaction commits and the Deferred fires with ``result``.

        ``compute`` must be pure: it may run on another thread, and more than
        once (a driver retries a transaction that failed to commit); an
        exception it raises rolls everything back and fails the Deferred.
        Writes draw revisions and reach watchers as ``put`` events.
        """
