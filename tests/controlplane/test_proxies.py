"""Proxy self-registration: records with a TTL, refreshed; the others see a
new proxy at once, a killed one within the TTL, a withdrawn one at once."""

from __future__ import annotations

import json

from twisted.internet.task import Clock

from edgeaccess.backend.memory import MemoryBackend
from edgeaccess.controlplane.cache import ControlCache
from edgeaccess.controlplane.proxies import PROXY_PREFIX, ProxyMembership, parse_record


class Proxy:
    def __init__(self, backend, clock, name: str, *, ready: bool = True) -> None:
        self.name = name
        self.ready = ready
        self.cache = ControlCache(backend, clock, [PROXY_PREFIX])
        self.heard: list[list[str]] = []
        self.membership = ProxyMembership(
            backend, self.cache, clock, proxy_id=f"id-{name}", record=self.record,
            on_change=self.heard.append)

    def record(self):
        if not self.ready:
            return None
        return {"tunnel_addr": f"{self.name}:3024", "web_addr": f"{self.name}:3080",
                "cluster": "c"}

    def start(self) -> "Proxy":
        self.cache.startService()
        self.membership.startService()
        return self

    def kill(self) -> None:
        """As kill -9: nothing is written any more."""
        self.membership.stopService()
        self.cache.stopService()


def world():
    clock = Clock()
    return clock, MemoryBackend(clock)


def test_each_proxy_learns_every_other_and_itself_first():
    clock, backend = world()
    a = Proxy(backend, clock, "a").start()
    assert a.heard == [["a:3024"]]
    b = Proxy(backend, clock, "b").start()
    clock.advance(0.25)
    assert a.heard[-1] == ["a:3024", "b:3024"]
    assert b.heard[-1] == ["b:3024", "a:3024"]
    assert a.membership.tunnel_addresses() == ["a:3024", "b:3024"]
    stored = json.loads(backend.get(PROXY_PREFIX + "id-a").result.value)
    assert stored["tunnel_addr"] == "a:3024" and stored["web_addr"] == "a:3080"


def test_a_killed_proxy_is_dropped_within_its_ttl_and_refreshes_keep_a_live_one():
    clock, backend = world()
    a = Proxy(backend, clock, "a").start()
    b = Proxy(backend, clock, "b").start()
    clock.advance(0.25)
    for _ in range(40):  # 10 s of refreshes: nobody is dropped
        clock.advance(0.25)
    assert a.heard[-1] == ["a:3024", "b:3024"]
    changes = len(a.heard)
    b.kill()
    dropped_after = None
    for step in range(1, 40):
        clock.advance(0.25)
        if a.heard[-1] == ["a:3024"]:
            dropped_after = step * 0.25
            break
    assert dropped_after is not None and dropped_after <= 4.25 + 1e-9
    assert len(a.heard) == changes + 1


def test_a_withdrawn_proxy_is_dropped_at_once():
    clock, backend = world()
    a = Proxy(backend, clock, "a").start()
    b = Proxy(backend, clock, "b").start()
    clock.advance(0.25)
    done = []
    b.membership.withdraw().addCallback(done.append)
    assert done == [None]
    assert a.heard[-1] == ["a:3024"]  # the delete is an event: no wait for expiry
    assert backend.get_range(PROXY_PREFIX).result[0].key == PROXY_PREFIX + "id-a"


def test_nothing_is_announced_before_the_own_record_is_written():
    clock, backend = world()
    Proxy(backend, clock, "a").start()
    b = Proxy(backend, clock, "b", ready=False).start()
    clock.advance(2.0)
    # b's ports are not bound yet: an empty list, never "a alone".
    assert b.heard == [] and b.membership.tunnel_addresses() == []
    b.ready = True
    clock.advance(1.0)
    assert b.heard == [["b:3024", "a:3024"]]


def test_a_malformed_record_is_ignored():
    clock, backend = world()
    a = Proxy(backend, clock, "a").start()
    backend.put(PROXY_PREFIX + "id-x", b"not json")
    backend.put(PROXY_PREFIX + "id-y", json.dumps({"id": "id-y", "tunnel_addr": "nohost"}).encode())
    backend.put(PROXY_PREFIX + "id-z", json.dumps({"id": "other", "tunnel_addr": "z:1"}).encode())
    clock.advance(0.5)
    assert a.membership.tunnel_addresses() == ["a:3024"]
    assert parse_record(json.dumps({"id": "p", "tunnel_addr": "h:70000"}).encode()) is None
    assert parse_record(json.dumps({"id": "p", "tunnel_addr": "h:1", "web_addr": 5}).encode()) is None
    assert parse_record(json.dumps({"id": "p", "tunnel_addr": "h:1"}).encode())["id"] == "p"


def test_a_failing_backend_is_retried_without_losing_the_record():
    clock, backend = world()
    a = Proxy(backend, clock, "a").start()
    real_put = backend.put
    from twisted.internet.defer import fail

    from edgeaccess.errors import EdgeError

    backend.put = lambda *args, **kwargs: fail(EdgeError("database away"))
    clock.advance(3.0)
    backend.put = real_put
    clock.advance(1.0)
    assert a.membership.tunnel_addresses() == ["a:3024"]
    item = backend.get(PROXY_PREFIX + "id-a").result
    assert item.expires.timestamp() > clock.seconds()


def test_while_the_database_is_away_nobody_is_dropped():
    # Every record ages alike while no proxy can write: dropping the others
    # would make every node drop its tunnels to live proxies.
    clock, backend = world()
    a = Proxy(backend, clock, "a").start()
    b = Proxy(backend, clock, "b").start()
    clock.advance(6.0)
    assert a.heard[-1] == ["a:3024", "b:3024"]
    from twisted.internet.defer import fail

    from edgeaccess.errors import EdgeError

    real_put = backend.put
    backend.put = lambda *args, **kwargs: fail(EdgeError("database away"))
    for _ in range(60):  # 15 s away
        clock.advance(0.25)
    assert a.heard[-1] == ["a:3024", "b:3024"] and b.heard[-1] == ["b:3024", "a:3024"]
    backend.put = real_put
    for _ in range(40):  # back: the records are rewritten before anyone may drop
        clock.advance(0.25)
    assert a.heard[-1] == ["a:3024", "b:3024"] and b.heard[-1] == ["b:3024", "a:3024"]
    # And a proxy that really died is still dropped afterwards.
    b.kill()
    for _ in range(20):
        clock.advance(0.25)
    assert a.heard[-1] == ["a:3024"]
