"""The proxies of one cluster: each registers itself, all watch each other.

Every proxy writes a record under ``/proxies/ID`` (its id, the tunnel
address nodes should dial, its web and SSH addresses) with a short TTL and
rewrites it every ``heartbeat`` seconds; a graceful stop deletes it. Every
proxy reads the records from its control cache (fed by the backend's watch),
so a new proxy or a deleted record is seen within one commit; a proxy that
died (kill -9) simply stops refreshing, and its record counts as gone once
its expiry passes (expiry is not an event: the membership looks every
``check_interval`` seconds). Whenever the set of tunnel addresses changes,
``on_change`` is told; the proxy then sends ``Discover`` to its agents.

With the defaults (refresh every 1 s, TTL 4 s, checked every 0.25 s) a
killed proxy is dropped by the others at most 4.25 s after it died.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from edgeaccess.errors import EdgeError

_log = Logger()

PROXY_PREFIX = "/proxies/"

#: Seconds between a proxy's record refreshes, the record's TTL, and how
#: often expiry is looked at (SPEC: a dead proxy is dropped within 5 s).
HEARTBEAT = 1.0
TTL = 4.0
CHECK_INTERVAL = 0.25

#: What a record may hold, each a short string (validated on read: a record
#: is written by another process).
RECORD_FIELDS = ("id", "cluster", "tunnel_addr", "web_addr", "ssh_addr", "version", "started",
                 "refreshed")


def parse_record(value: bytes) -> dict[str, str] | None:
    """A proxy record read from the backend, or None if it is not one."""
    try:
        record = json.loads(value)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    parsed = {}
    for name in RECORD_FIELDS:
        field = record.get(name, "")
        if not isinstance(field, str) or len(field) > 255:
            return None
        parsed[name] = field
    if not parsed["id"] or not parsed["tunnel_addr"]:
        return None
    host, sep, port = parsed["tunnel_addr"].rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return parsed


class ProxyMembership(Service):
    """This proxy's record in the backend and the live records of all.

    :param backend: the shared ``IBackend``.
    :param cache: the proxy's ``ControlCache`` (watching ``/proxies/``).
    :param clock: ``IReactorTime``.
    :param proxy_id: this proxy's id (stable across restarts).
    :param record: returns this proxy's record fields (without ``id``), or
        None while its addresses are not known yet (ports not bound).
    :param on_change: told the new list of tunnel addresses (this proxy's
        first) whenever it changes.
    """

    def __init__(self, backend, cache, clock, *, proxy_id: str,
                 record: Callable[[], dict[str, str] | None],
                 on_change: Callable[[list[str]], None] = lambda addresses: None,
                 heartbeat: float = HEARTBEAT, ttl: float = TTL,
                 check_interval: float = CHECK_INTERVAL) -> None:
        self.backend = backend
        self.cache = cache
        self.clock = clock
        self.proxy_id = proxy_id
        self.key = PROXY_PREFIX + proxy_id
        self._record = record
        self._on_change = on_change
        self.heartbeat = heartbeat
        self.ttl = ttl
        self.check_interval = check_interval
        self._refresher: LoopingCall | None = None
        self._checker: LoopingCall | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._own: dict[str, str] | None = None
        self._writing: Deferred[Any] | None = None
        self._failing = False
        self._withdrawn = False
        #: When this proxy's record was last written, and since when its
        #: writes have gone through without a failure (clock seconds).
        self._written_at: float | None = None
        #: Peers' record expiry (clock seconds), and ids whose record was deleted.
        self._expires: dict[str, float] = {}
        self._deleted: set[str] = set()
        self._healthy_since: float | None = None
        #: The last list told to on_change (None: not known yet).
        self.known: list[str] | None = None
        self._peers: dict[str, dict[str, str]] = {}

    # -- reads ----------------------------------------------------------------

    def records(self) -> list[dict[str, str]]:
        """The live records of every proxy of the cluster (this one's included
        once written), ordered by id."""
        if not self.cache.covers(PROXY_PREFIX):
            return [self._own] if self._own is not None else []
        found = {}
        for item in self.cache.get_range(PROXY_PREFIX):
            parsed = parse_record(item.value)
            if parsed is not None and item.key == PROXY_PREFIX + parsed["id"]:
                found[parsed["id"]] = parsed
                if item.expires is not None:
                    self._expires[parsed["id"]] = item.expires.timestamp()
        if self._own is not None and not self._withdrawn:
            found[self.proxy_id] = self._own
        return [found[key] for key in sorted(found)]

    def tunnel_addresses(self) -> list[str]:
        """Every proxy's tunnel address, this proxy's first; empty until the
        peers are known (a node told only of this proxy would drop the others)."""
        return list(self.known or [])

    def _may_drop(self) -> bool:
        """Whether an expired record means a dead proxy: only while this
        proxy's own writes go through, and have for a whole TTL. When the
        database is away every record ages alike; dropping the others then
        would tell every node to drop its tunnels to live proxies."""
        now = self.clock.seconds()
        return (self._written_at is not None and self._healthy_since is not None
                and now - self._written_at <= self.heartbeat + self.ttl / 2
                and now - self._healthy_since >= self.ttl)

    def _live_peers(self) -> dict[str, dict[str, str]] | None:
        if self._own is None or not self.cache.covers(PROXY_PREFIX):
            return None
        peers = {r["id"]: r for r in self.records()}
        if not self._may_drop():
            for proxy_id, record in self._peers.items():
                if proxy_id not in self._deleted:
                    peers.setdefault(proxy_id, record)
        return peers

    # -- service --------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._unsubscribe = self.cache.subscribe(self._cache_changed)
        self._refresher = LoopingCall(self._refresh)
        self._refresher.clock = self.clock
        self._refresher.start(self.heartbeat, now=True).addErrback(
            lambda f: _log.failure("proxy record refresher stopped", f))
        self._checker = LoopingCall(self._check)
        self._checker.clock = self.clock
        self._checker.start(self.check_interval, now=False).addErrback(
            lambda f: _log.failure("proxy membership check stopped", f))

    def stopService(self) -> None:
        super().stopService()
        self._stop_loops()

    def _stop_loops(self) -> None:
        for loop in (self._refresher, self._checker):
            if loop is not None and loop.running:
                loop.stop()
        self._refresher = self._checker = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def withdraw(self) -> Deferred[None]:
        """Graceful stop: delete this proxy's record (the others drop it at
        once); never fails."""
        self._stop_loops()
        self._withdrawn = True
        if self._own is None:
            return succeed(None)
        # At once, not after a refresh still on its way: the backend may be
        # closing already, and it lets calls under way finish but takes no
        # new ones. (Writers are serialized in the database; the refresh,
        # sent first, commits first. Were it not so, the record would live
        # on for its TTL, as a killed proxy's does.)
        writing: Deferred[None] = succeed(None)

        def delete(_: object) -> Deferred[Any]:
            return self.backend.delete(self.key)

        def done(result: object) -> None:
            if isinstance(result, Exception) or hasattr(result, "getErrorMessage"):
                _log.warn("could not delete this proxy's record {key}: {reason}",
                          key=self.key, reason=result.getErrorMessage())
            else:
                _log.info("proxy {id} withdrew from the cluster", id=self.proxy_id)

        deleting = writing.addCallback(delete)
        return deleting.addBoth(done)

    # -- the record -----------------------------------------------------------

    def _refresh(self) -> None:
        if self._writing is not None:
            return  # the last write is still on its way (a slow database)
        fields = self._record()
        if fields is None:
            return
        now = datetime.fromtimestamp(self.clock.seconds(), timezone.utc)
        own = {name: str(fields.get(name, "")) for name in RECORD_FIELDS}
        own["id"] = self.proxy_id
        own["started"] = now.isoformat() if self._own is None else self._own["started"]
        # A new value each time: the write is an event every proxy's cache
        # gets at once (a write that only moved the expiry would reach them
        # on the change feed's next poll at best: too late for a 4 s TTL).
        own["refreshed"] = now.isoformat()
        value = json.dumps(own, sort_keys=True).encode()
        writing = self._writing = self.backend.put(self.key, value,
                                                   expires=now + timedelta(seconds=self.ttl))

        def written(_: object) -> None:
            first = self._own is None
            self._own = own
            if first:
                _log.info("proxy {id} registered, tunnel address {addr}", id=self.proxy_id,
                          addr=own["tunnel_addr"])
            if self._failing:
                _log.info("proxy record {key} written again", key=self.key)
            now = self.clock.seconds()
            if self._failing or self._healthy_since is None:
                self._healthy_since = now
            self._written_at = now
            self._failing = False
            self._check()

        def failed(failure: Any) -> None:
            if not failure.check(EdgeError, Exception):
                return failure
            if not self._failing:
                _log.warn("cannot refresh this proxy's record ({reason}); retrying every "
                          "{interval} s", reason=failure.getErrorMessage(),
                          interval=self.heartbeat)
            self._failing = True
            return None

        def done(result: object) -> object:
            self._writing = None
            return result

        writing.addCallbacks(written, failed).addBoth(done)

    # -- the others -----------------------------------------------------------

    def _cache_changed(self, key: str, item: Any) -> None:
        if not key.startswith(PROXY_PREFIX):
            return
        proxy_id = key[len(PROXY_PREFIX):]
        if item is not None:
            self._deleted.discard(proxy_id)
        elif self._expires.get(proxy_id, 0.0) > self.clock.seconds():
            # Gone before its expiry: deleted by a proxy that withdrew (not
            # a record aged out while the database was away).
            self._deleted.add(proxy_id)
        self._check()

    def _check(self) -> None:
        if not self.running:
            return
        peers = self._live_peers()
        if peers is None:
            return
        others = [r["tunnel_addr"] for r in peers.values() if r["id"] != self.proxy_id]
        current = list(dict.fromkeys([self._own["tunnel_addr"], *others]))
        if current == self.known:
            self._peers = peers
            return
        for proxy_id in sorted(peers.keys() - self._peers.keys()):
            if proxy_id != self.proxy_id:
                _log.info("proxy {id} joined, tunnel address {addr}", id=proxy_id,
                          addr=peers[proxy_id]["tunnel_addr"])
                if peers[proxy_id]["tunnel_addr"] == self._own["tunnel_addr"]:
                    # A balancer's address given as --tunnel-public-addr:
                    # nodes then keep one tunnel, not one per proxy.
                    _log.warn("proxy {id} announces this proxy's tunnel address {addr}: "
                              "give each proxy its own --tunnel-public-addr",
                              id=proxy_id, addr=self._own["tunnel_addr"])
        for proxy_id in sorted(self._peers.keys() - peers.keys()):
            if proxy_id != self.proxy_id:
                _log.info("proxy {id} left, tunnel address {addr}", id=proxy_id,
                          addr=self._peers[proxy_id]["tunnel_addr"])
        self._peers = peers
        self.known = current
        try:
            self._on_change(list(current))
        except Exception:
            _log.failure("proxy list listener failed")
