"""The agent pool: one tunnel per proxy, proxies appearing and leaving,
Reconnect, and every slot released on every error path (in memory)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import MemoryReactorClock

from edgeaccess.tunnel.agent import TunnelAgent
from edgeaccess.tunnel.pool import TunnelAgentPool
from edgeaccess.tunnel.protocol import Inventory

from .support import MemoryEndpoint, Pumps, TopRandom, make_server_factory


class Cluster:
    """Proxies in memory, each with its own tunnel server and address."""

    def __init__(self, *names: str) -> None:
        self.clock = MemoryReactorClock()
        self.pumps = Pumps()
        self.listed = [f"{name}:3024" for name in names]
        self.servers: dict[str, Any] = {}
        self.endpoints: dict[str, MemoryEndpoint] = {}
        for name in names:
            self.add_proxy(f"{name}:3024")

    def add_proxy(self, address: str) -> None:
        server = make_server_factory(self.clock, proxies=lambda: list(self.listed))
        self.servers[address] = server
        self.endpoints[address] = MemoryEndpoint(server, self.pumps, self.clock)

    def pool(self, **kwargs: Any) -> TunnelAgentPool:
        def make_agent(address: str) -> TunnelAgent:
            # An address of no proxy refuses, as a dead host would.
            endpoint = self.endpoints.get(address) or MemoryEndpoint(
                None, self.pumps, self.clock, refuse=True)
            self.endpoints.setdefault(address, endpoint)
            return TunnelAgent(endpoint_factory=lambda: endpoint,
                               inventory=Inventory(name="node-1"), clock=self.clock,
                               rng=TopRandom(), on_discover=lambda found: pool.set_proxies(found))

        kwargs.setdefault("spread", 2.0)
        pool = TunnelAgentPool(make_agent, self.clock, TopRandom(), **kwargs)
        return pool

    def settle(self, seconds: float = 0.0) -> None:
        for _ in range(4):
            self.pumps.flush()
            self.clock.advance(0)
        if seconds:
            self.clock.advance(seconds)
            for _ in range(4):
                self.pumps.flush()
                self.clock.advance(0)

    def holders(self) -> list[str]:
        """The proxies whose registry has the node's tunnel."""
        return [a for a, s in self.servers.items() if s.registry.lookup("root", "node-1")]

    def announce(self) -> None:
        for server in self.servers.values():
            server.announce_proxies()
        self.settle()


def test_a_node_keeps_one_tunnel_to_each_proxy_it_learns_of() -> None:
    cluster = Cluster("a", "b", "c")
    pool = cluster.pool()
    pool.set_proxies(["a:3024"])
    pool.startService()
    cluster.settle()
    # a's Discover named b and c: they are dialed after the spread, not at once.
    assert pool.addresses == ["a:3024", "b:3024", "c:3024"]
    assert cluster.holders() == ["a:3024"]
    cluster.settle(2.0)
    assert cluster.holders() == ["a:3024", "b:3024", "c:3024"]
    assert len(pool.tunnels()) == 3
    assert all(len(s.registry.connected()) == 1 for s in cluster.servers.values())


def test_a_proxy_that_leaves_the_list_loses_its_tunnel_and_one_that_joins_gets_one() -> None:
    cluster = Cluster("a", "b")
    pool = cluster.pool()
    pool.set_proxies(["a:3024"])
    pool.startService()
    cluster.settle(2.0)
    assert cluster.holders() == ["a:3024", "b:3024"]
    cluster.listed = ["b:3024"]
    cluster.announce()
    assert pool.addresses == ["b:3024"]
    assert cluster.holders() == ["b:3024"]
    assert pool.agent("a:3024") is None
    cluster.add_proxy("c:3024")
    cluster.listed = ["b:3024", "c:3024"]
    cluster.announce()
    cluster.settle(2.0)
    assert cluster.holders() == ["b:3024", "c:3024"]


def test_an_empty_proxy_list_changes_nothing() -> None:
    cluster = Cluster("a")
    pool = cluster.pool()
    pool.set_proxies(["a:3024"])
    pool.startService()
    cluster.settle()
    pool.set_proxies([])
    assert pool.addresses == ["a:3024"] and cluster.holders() == ["a:3024"]


def test_the_lone_live_tunnel_is_kept_until_another_is_up() -> None:
    # The node dialed a load balancer ("lb") that lands on proxy a; the
    # proxies name their own addresses, which are not up yet.
    cluster = Cluster("a")
    cluster.endpoints["lb:3024"] = cluster.endpoints["a:3024"]
    pool = cluster.pool(spread=5.0)
    pool.set_proxies(["lb:3024"])
    pool.startService()
    cluster.settle()
    assert pool.addresses == ["lb:3024", "a:3024"]
    lb_tunnel = pool.agent("lb:3024").tunnel
    assert lb_tunnel is not None and not lb_tunnel.when_lost().called
    cluster.settle(5.0)
    # a's own tunnel is up: the one through the balancer goes.
    assert pool.addresses == ["a:3024"]
    assert lb_tunnel.when_lost().called
    assert cluster.holders() == ["a:3024"]


def test_a_dead_proxy_in_the_list_backs_off_alone_and_its_slot_is_released() -> None:
    cluster = Cluster("a", "b")
    cluster.listed = ["a:3024", "b:3024", "dead:3024"]
    pool = cluster.pool(spread=0.0)
    pool.set_proxies(["a:3024"])
    pool.startService()
    cluster.settle()
    dead = pool.agent("dead:3024")
    assert dead.state == "waiting"
    assert cluster.holders() == ["a:3024", "b:3024"]
    cluster.listed = ["a:3024", "b:3024"]
    cluster.announce()
    assert pool.agent("dead:3024") is None and dead.state == "stopped"
    # No retry of the dead proxy stays scheduled.
    before = cluster.endpoints["dead:3024"].connects
    cluster.settle(120.0)
    assert cluster.endpoints["dead:3024"].connects == before


def test_reconnect_advice_moves_one_tunnel_and_leaves_the_others() -> None:
    cluster = Cluster("a", "b")
    pool = cluster.pool(spread=0.0)
    pool.set_proxies(["a:3024"])
    pool.startService()
    cluster.settle()
    b_tunnel = pool.agent("b:3024").tunnel
    stopped: list[Any] = []
    cluster.servers["a:3024"].shutdown(delay=7.0, reason="upgrade").addCallback(stopped.append)
    cluster.settle()
    assert stopped == [None]
    assert pool.agent("a:3024").state == "waiting"
    assert pool.agent("a:3024").last_delay == 7.0
    assert pool.tunnel is b_tunnel and not b_tunnel.when_lost().called


def test_a_proxy_added_while_none_is_up_is_dialed_at_once() -> None:
    cluster = Cluster("a")
    pool = cluster.pool(spread=30.0)
    pool.startService()
    pool.add("a:3024")
    cluster.settle()
    assert cluster.holders() == ["a:3024"]


def test_when_connected_fires_with_the_first_tunnel_and_fails_when_the_pool_stops() -> None:
    cluster = Cluster("a")
    pool = cluster.pool()
    first = pool.when_connected()
    pool.set_proxies(["a:3024"])
    seen: list[str] = []
    pool.subscribe(lambda address, tunnel: seen.append(address))
    pool.startService()
    cluster.settle()
    assert first.called and seen == ["a:3024"]
    pool.stopService()
    cluster.settle()
    never = pool.when_connected()
    failures: list[Any] = []
    never.addErrback(failures.append)
    assert not never.called or failures == []
    stopping = pool.stopService()
    cluster.settle()
    assert stopping.called


def test_stopping_the_pool_stops_every_agent_and_cancels_pending_starts() -> None:
    cluster = Cluster("a", "b")
    pool = cluster.pool(spread=10.0)
    pool.set_proxies(["a:3024"])
    pool.startService()
    cluster.settle()
    assert pool.agent("b:3024").state == "idle"  # its start is still pending
    done: list[Any] = []
    pool.stopService().addCallback(done.append)
    cluster.settle()
    assert done == [None]
    assert [pool.agent(a).state for a in ("a:3024", "b:3024")] == ["stopped", "idle"]
    assert cluster.holders() == []
    assert cluster.clock.getDelayedCalls() == [] or all(
        not c.active() for c in cluster.clock.getDelayedCalls())
    # Started again, every slot dials again.
    pool.startService()
    cluster.settle()
    assert cluster.holders() == ["a:3024", "b:3024"]


def test_an_agent_whose_stop_fails_still_frees_its_slot() -> None:
    cluster = Cluster("a", "b")
    pool = cluster.pool(spread=0.0)
    pool.set_proxies(["a:3024"])
    pool.startService()
    cluster.settle()
    broken = pool.agent("b:3024")
    broken.stopService = lambda: fail(RuntimeError("stop failed"))  # type: ignore[method-assign]
    cluster.listed = ["a:3024"]
    cluster.announce()
    assert pool.addresses == ["a:3024"]
    done: list[Any] = []
    pool.stopService().addCallback(done.append)
    cluster.settle()
    assert done == [None]


def test_an_agent_whose_stop_never_ends_does_not_hold_the_slot() -> None:
    cluster = Cluster("a", "b")
    pool = cluster.pool(spread=0.0)
    pool.set_proxies(["a:3024"])
    pool.startService()
    cluster.settle()
    hanging: Deferred[None] = Deferred()
    pool.agent("b:3024").stopService = lambda: hanging  # type: ignore[method-assign]
    cluster.listed = ["a:3024"]
    cluster.announce()
    # b may come back at once: a fresh slot, not the one still stopping.
    cluster.listed = ["a:3024", "b:3024"]
    cluster.announce()
    assert pool.addresses == ["a:3024", "b:3024"]
    assert pool.agent("b:3024").stopService is not hanging
    done: list[Any] = []
    pool.stopService().addCallback(done.append)
    cluster.settle()
    assert done == []  # waits for the hanging stop
    hanging.callback(None)
    assert done == [None]


def test_a_graceful_stop_staggers_the_reconnect_advice() -> None:
    cluster = Cluster("a")
    endpoint = cluster.endpoints["a:3024"]
    agents = [TunnelAgent(endpoint_factory=lambda: endpoint, inventory=Inventory(name="node-1"),
                          clock=cluster.clock, rng=TopRandom()) for _ in range(4)]
    for agent in agents:
        agent.startService()
    cluster.settle()
    assert len(cluster.servers["a:3024"]._live) == 4
    cluster.servers["a:3024"].shutdown(delay=1.0, spread=2.0)
    cluster.settle()
    assert sorted(agent.last_delay for agent in agents) == [1.0, 1.5, 2.0, 2.5]
