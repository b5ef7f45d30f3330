"""The proxy's cache of what every decision reads: fed by the backend's watch.

:class:`ControlCache` holds the items under a few prefixes (roles and other
resources, locks, trusted-cluster state, nodes) in memory, kept current by
``IBackend.watch``: reads on the connection path never wait on storage.
When the watch closes (a gap), the cache watches again, re-reads, and
tells its listeners only what differs. A slow full re-read
(``resync_interval``) is the safety net against anything missed.

Listeners are called as ``listener(key, item_or_None)`` after each change,
in commit order, on the reactor thread.
"""

from __future__ import annotations

import bisect
from typing import Callable, Iterable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from edgeaccess.backend import is_live, prefix_upper_bound
from edgeaccess.backend.interfaces import Item
from edgeaccess.backend.watch import DELETE, INIT, PUT, WatchClosed
from edgeaccess.errors import EdgeError

_log = Logger()

#: What the proxy caches: resources (roles, connectors, trusted clusters),
#: locks, a leaf's state of each trusted root, nodes, the cluster's proxies.
DEFAULT_PREFIXES = ("/resources/", "/locks/", "/trusted_state/", "/nodes/", "/proxies/")

Listener = Callable[[str, "Item | None"], None]


class ControlCache(Service):
    """Items under ``prefixes``, in memory, current within one commit.

    :param backend: an ``IBackend``.
    :param clock: ``IReactorTime`` (expiry, retries, the safety-net re-read).
    :param resync_interval: seconds between full re-reads.
    """

    def __init__(self, backend, clock, prefixes: Iterable[str] = DEFAULT_PREFIXES, *,
                 resync_interval: float = 600.0, retry_delay: float = 0.2) -> None:
        self.backend = backend
        self.clock = clock
        self.prefixes = tuple(prefixes)
        self.resync_interval = resync_interval
        self.retry_delay = retry_delay
        self._items: dict[str, Item] = {}
        self._keys: list[str] = []
        self._listeners: list[Listener] = []
        self._watcher = None
        self._loop: Deferred[None] | None = None
        self._resync_call = None
        self._ready_waiters: list[Deferred[None]] = []
        self.ready = False
        #: How many times the watch was (re)started: for tests and logs.
        self.generation = 0

    # -- reads -------------------------------------------------------------

    def get(self, key: str) -> Item | None:
        """The live item at ``key``, or None."""
        item = self._items.get(key)
        if item is None or not self._is_live(item):
            return None
        return item

    def get_range(self, prefix: str) -> list[Item]:
        """Live items under ``prefix``, sorted by key."""
        start = bisect.bisect_left(self._keys, prefix)
        bound = prefix_upper_bound(prefix)
        end = len(self._keys) if bound is None else bisect.bisect_left(self._keys, bound)
        items = (self._items[key] for key in self._keys[start:end])
        return [item for item in items if self._is_live(item)]

    def covers(self, prefix: str) -> bool:
        """Whether reads under ``prefix`` can be answered here (loaded, watched)."""
        return self.ready and prefix.startswith(self.prefixes)

    def when_ready(self) -> Deferred[None]:
        """Fires once the first full read is in."""
        waiter: Deferred[None] = Deferred()
        if self.ready:
            waiter.callback(None)
        else:
            self._ready_waiters.append(waiter)
        return waiter

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Be told of every change; returns an unsubscribe callable."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _is_live(self, item: Item) -> bool:
        expires = item.expires
        return expires is None or is_live(expires.timestamp(), self.clock.seconds())

    # -- the feed ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._loop = Deferred.fromCoroutine(self._follow())
        self._loop.addErrback(lambda f: None if f.check(CancelledError) else
                              _log.failure("control cache stopped", f))

    def stopService(self):
        super().stopService()
        if self._resync_call is not None and self._resync_call.active():
            self._resync_call.cancel()
        if self._watcher is not None:
            self._watcher.close("the cache is stopping")
        if self._loop is not None:
            self._loop.cancel()

    def resync(self) -> None:
        """Re-read everything now (closing the watch makes the loop start over)."""
        if self._watcher is not None:
            self._watcher.close("resync")

    async def _follow(self) -> None:
        delay = self.retry_delay
        while self.running:
            try:
                await self._watch_once()
                delay = self.retry_delay
            except WatchClosed as closed:
                if not self.running:
                    return
                if str(closed) != "resync":
                    _log.info("control cache: the watch closed ({reason}); re-reading",
                              reason=closed)
                delay = self.retry_delay
            except EdgeError as error:
                _log.warn("control cache: cannot read the backend ({reason}); retrying in "
                          "{delay:.1f} s", reason=error, delay=delay)
                await deferLater(self.clock, delay, lambda: None)
                delay = min(delay * 2, 10.0)

    async def _watch_once(self) -> None:
        watcher = self._watcher = self.backend.watch(list(self.prefixes))
        self.generation += 1
        event = await watcher.next()
        assert event.type == INIT
        fresh: dict[str, Item] = {}
        for prefix in self.prefixes:
            for item in await self.backend.get_range(prefix):
                fresh[item.key] = item
        self._replace(fresh)
        self._schedule_resync()
        if not self.ready:
            self.ready = True
            waiters, self._ready_waiters = self._ready_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        while True:
            for event in [await watcher.next(), *watcher.pending()]:
                self._apply(event)

    def _schedule_resync(self) -> None:
        if self._resync_call is not None and self._resync_call.active():
            self._resync_call.cancel()
        self._resync_call = self.clock.callLater(self.resync_interval, self.resync)

    def _apply(self, event) -> None:
        if event.type == PUT:
            current = self._items.get(event.key)
            if current is not None and current.revision >= event.revision:
                return  # already in the snapshot read after init
            self._store(event.item)
            self._tell(event.key, event.item)
        elif event.type == DELETE:
            if event.key in self._items:
                self._drop(event.key)
                self._tell(event.key, None)

    def _replace(self, fresh: dict[str, Item]) -> None:
        old = self._items
        changed = [key for key, item in fresh.items() if old.get(key) != item]
        gone = [key for key in old if key not in fresh]
        self._items = dict(fresh)
        self._keys = sorted(fresh)
        for key in changed:
            self._tell(key, fresh[key])
        for key in gone:
            self._tell(key, None)

    def _store(self, item: Item) -> None:
        if item.key not in self._items:
            bisect.insort(self._keys, item.key)
        self._items[item.key] = item

    def _drop(self, key: str) -> None:
        del self._items[key]
        del self._keys[bisect.bisect_left(self._keys, key)]

    def _tell(self, key: str, item: Item | None) -> None:
        for listener in list(self._listeners):
            try:
                listener(key, item)
            except Exception:
                _log.failure("control cache listener failed on {key}", key=key)
