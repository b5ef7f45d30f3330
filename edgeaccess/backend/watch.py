"""Change feeds of a backend: ``IBackend.watch(prefixes)``.

A :class:`Watcher` delivers an ``init`` event first, then one ``put`` or
``delete`` event per committed write under its prefixes, in commit order
(each carries the backend-wide revision of that write). It never skips
anything silently: when it cannot keep up (its backlog overflows) or its
source is gone (the backend closes; for PostgreSQL, a lost LISTEN
connection), it *closes*, and the consumer re-reads what it needs and
watches again (Teleport's backend watchers work the same way).

The consumer's recipe::

    watcher = backend.watch(["/resources/role/"])
    assert (await watcher.next()).type == "init"
    snapshot = await backend.get_range("/resources/role/")   # after init
    while True:
        event = await watcher.next()      # WatchClosed: start again

Events of writes committed before the snapshot read may still follow it;
applied in order they leave the same state, and a put whose revision is
not newer than the cached one can be skipped.

Expiry is not an event: an item's ``expires`` travels with its put, and
consumers treat an expired item as absent (as every read does).

:class:`WatchFanout` is what drivers share: they call :meth:`publish`
after each commit, in commit order, on the reactor thread.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from edgeaccess.backend.interfaces import Item
from edgeaccess.errors import BadRequest, EdgeError

_log = Logger()

#: Events a watcher holds for a consumer that does not read them.
DEFAULT_BACKLOG = 4096

INIT = "init"
PUT = "put"
DELETE = "delete"


class WatchClosed(EdgeError):
    """the watch closed: re-read and watch again"""

    code = "watch_closed"


@attrs.frozen
class Event:
    """One change.

    :ivar type: ``init``, ``put`` or ``delete``.
    :ivar key: the key written (``""`` for ``init``).
    :ivar revision: the backend-wide revision of the write (0 for ``init``).
    :ivar item: the item stored, for ``put``.
    """

    type: str
    key: str = ""
    revision: int = 0
    item: Item | None = None


def check_prefixes(prefixes: Iterable[str]) -> tuple[str, ...]:
    """The prefixes as a tuple of text; refuses anything else."""
    if isinstance(prefixes, str):
        raise BadRequest("watch takes a list of prefixes, not one string")
    found = tuple(prefixes)
    if not found or not all(isinstance(p, str) for p in found):
        raise BadRequest("watch needs at least one text prefix ('' watches everything)")
    return found


class Watcher:
    """One consumer's view of the change feed (see the module docstring).

    :param prefixes: keys starting with any of these are delivered.
    :param backlog: events held for the consumer before the watcher closes
        as overflowed.
    """

    def __init__(self, fanout: WatchFanout, prefixes: tuple[str, ...], backlog: int) -> None:
        self.prefixes = prefixes
        self._fanout = fanout
        self._backlog = backlog
        self._queue: deque[Event] = deque([Event(INIT)])
        self._waiting: Deferred[Event] | None = None
        self.closed_reason: str | None = None
        self._closed_waiters: list[Deferred[str]] = []

    def matches(self, key: str) -> bool:
        """Whether changes of ``key`` are delivered here."""
        return key.startswith(self.prefixes)

    def next(self) -> Deferred[Event]:
        """The next event, now or when it comes; fails with :class:`WatchClosed`
        once the watcher is closed (nothing queued survives a close: a gap
        is never followed by later events)."""
        if self._waiting is not None:
            return fail(BadRequest("next() is already pending"))
        if self._queue:
            return succeed(self._queue.popleft())
        if self.closed_reason is not None:
            return fail(WatchClosed(self.closed_reason))
        waiting: Deferred[Event] = Deferred()
        self._waiting = waiting
        return waiting

    def pending(self) -> list[Event]:
        """Take every queued event at once (a consumer draining in batches)."""
        events = list(self._queue)
        self._queue.clear()
        return events

    def deliver(self, event: Event) -> None:
        """Queue or hand over one event (called by the fanout)."""
        if self.closed_reason is not None:
            return
        waiting = self._waiting
        if waiting is not None:
            self._waiting = None
            waiting.callback(event)
            return
        if len(self._queue) >= self._backlog:
            # A gap: what is queued is dropped too (close does it), so the
            # consumer re-reads instead of applying a stream with a hole in it.
            self.close(f"overflow: more than {self._backlog} events not read")
            return
        self._queue.append(event)

    def close(self, reason: str = "closed by the consumer") -> None:
        """Stop; a pending or later :meth:`next` fails with :class:`WatchClosed`."""
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        self._queue.clear()
        self._fanout.forget(self)
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(WatchClosed(reason))
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            waiter.callback(reason)

    def when_closed(self) -> Deferred[str]:
        """Fires with the reason once the watcher is closed."""
        if self.closed_reason is not None:
            return succeed(self.closed_reason)
        waiter: Deferred[str] = Deferred()
        self._closed_waiters.append(waiter)
        return waiter


class WatchFanout:
    """The watchers of one backend; drivers :meth:`publish` each commit."""

    def __init__(self) -> None:
        self._watchers: dict[Watcher, None] = {}

    def watch(self, prefixes: Iterable[str], backlog: int = DEFAULT_BACKLOG) -> Watcher:
        """A new :class:`Watcher`; its ``init`` event is already queued."""
        if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 1:
            raise BadRequest("backlog must be a positive integer")
        watcher = Watcher(self, check_prefixes(prefixes), backlog)
        self._watchers[watcher] = None
        return watcher

    def has_watchers(self) -> bool:
        """Whether anyone is watching (drivers skip reading their change log if not)."""
        return bool(self._watchers)

    def prefixes(self) -> list[str]:
        """Every prefix some watcher follows (drivers read only those values)."""
        return sorted({prefix for watcher in self._watchers for prefix in watcher.prefixes})

    def matches(self, key: str) -> bool:
        """Whether some watcher follows ``key``."""
        return any(watcher.matches(key) for watcher in self._watchers)

    def forget(self, watcher: Watcher) -> None:
        self._watchers.pop(watcher, None)

    def publish(self, event: Event) -> None:
        """Deliver one committed change to every watcher whose prefix matches."""
        for watcher in list(self._watchers):
            if watcher.matches(event.key):
                try:
                    watcher.deliver(event)
                except Exception:
                    _log.failure("watch consumer failed on {key}", key=event.key)

    def put(self, item: Item) -> None:
        self.publish(Event(PUT, item.key, item.revision, item))

    def delete(self, key: str, revision: int) -> None:
        self.publish(Event(DELETE, key, revision))

    def close_all(self, reason: str) -> None:
        """The source is gone: close every watcher."""
        for watcher in list(self._watchers):
            watcher.close(reason)
