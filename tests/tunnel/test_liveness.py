"""Proxy-side liveness: one shared check for every tunnel, cheap heartbeats, live node records."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols import amp

from edgeaccess.pki.x509ca import Identity
from edgeaccess.tunnel.liveness import LivenessMonitor
from edgeaccess.tunnel.protocol import Inventory
from edgeaccess.tunnel.server import LiveTunnelNodes

from .support import connected_pair, make_server_factory
from .test_protocol import hello_box, raw_server


class Silent:
    """A watched tunnel that records being dropped."""

    def __init__(self, last_heard: float) -> None:
        self.last_heard = last_heard
        self.dropped_after: float | None = None

    def silence_timeout(self, silent_for: float) -> None:
        self.dropped_after = silent_for


def test_monitor_drops_a_tunnel_silent_for_three_intervals_within_a_quarter_interval() -> None:
    clock = MemoryReactorClock()
    monitor = LivenessMonitor(clock, interval=10.0)
    clock.advance(1.0)
    tunnel = Silent(last_heard=clock.seconds())
    monitor.watch(tunnel)
    clock.advance(29.9)
    assert tunnel.dropped_after is None
    clock.advance(2.5)
    assert tunnel.dropped_after is not None and 30.0 <= tunnel.dropped_after <= 32.5
    assert len(monitor) == 0


def test_monitor_keeps_tunnels_whose_peer_is_heard() -> None:
    clock = MemoryReactorClock()
    monitor = LivenessMonitor(clock, interval=10.0)
    tunnel = Silent(last_heard=0.0)
    monitor.watch(tunnel)
    for _ in range(40):
        clock.advance(2.5)
        tunnel.last_heard = clock.seconds()
    assert tunnel.dropped_after is None and len(monitor) == 1


def test_monitor_uses_one_timer_for_many_tunnels_and_none_when_idle() -> None:
    clock = MemoryReactorClock()
    monitor = LivenessMonitor(clock, interval=30.0)
    tunnels = [Silent(last_heard=0.0) for _ in range(100)]
    for tunnel in tunnels:
        monitor.watch(tunnel)
    assert len(clock.getDelayedCalls()) == 1
    for tunnel in tunnels:
        monitor.forget(tunnel)
    assert clock.getDelayedCalls() == []


def test_proxy_tunnels_share_the_factorys_monitor() -> None:
    clock = MemoryReactorClock()
    factory = make_server_factory(clock, heartbeat_interval=10.0)
    pairs = [connected_pair(clock, server_factory=factory) for _ in range(5)]
    assert len(factory.liveness) == 5
    # The agents keep their own timers (they ping); the proxy adds one for all.
    assert len(clock.getDelayedCalls()) == 5 + 1
    for agent, server, pump, _ in pairs:
        agent.disconnect("test")
        pump.flush()
    assert len(factory.liveness) == 0


def test_heartbeat_is_answered_with_an_empty_answer() -> None:
    server, transport, factory, clock = raw_server()
    server.dataReceived(hello_box())
    transport.clear()
    server.dataReceived(amp.AmpBox(_command=b"Heartbeat", _ask=b"7").serialize())
    assert transport.value() == amp.AmpBox(_answer=b"7").serialize()
    assert not transport.disconnecting


def test_heartbeat_without_ask_is_taken_silently_as_a_sign_of_life() -> None:
    server, transport, factory, clock = raw_server()
    server.dataReceived(hello_box())
    transport.clear()
    clock.advance(25.0)
    server.dataReceived(amp.AmpBox(_command=b"Heartbeat").serialize())
    assert transport.value() == b"" and not transport.disconnecting
    assert server.last_heard == 25.0


def test_heartbeat_before_hello_still_closes_the_tunnel() -> None:
    server, transport, factory, clock = raw_server()
    server.dataReceived(amp.AmpBox(_command=b"Heartbeat", _ask=b"1").serialize())
    assert transport.disconnecting
    assert "before Hello" in server.closed_reason


def test_heartbeat_from_the_proxy_is_refused_by_the_agent() -> None:
    agent, server, pump, factory = connected_pair()
    agent.dataReceived(amp.AmpBox(_command=b"Heartbeat", _ask=b"9").serialize())
    pump.flush()
    assert agent.when_lost().called
    assert "not allowed" in agent.closed_reason


def test_live_tunnel_nodes_lists_and_finds_connected_nodes_only() -> None:
    clock = MemoryReactorClock()
    node = Identity(kind="node", name="node-1", cluster="root", uuid="uuid-1")
    factory = make_server_factory(clock, identity=node)
    agent, server, pump, _ = connected_pair(
        clock, server_factory=factory, inventory=Inventory(name="node-1", labels={"env": "prod"})
    )
    live = LiveTunnelNodes(factory.registry, "root")
    expected = {"name": "node-1", "uuid": "uuid-1", "address": "tunnel", "labels": {"env": "prod"}}
    assert live.records() == [expected]
    assert live.find("node-1") == [expected] and live.find("uuid-1") == [expected]
    assert live.find("node-2") == []
    agent.disconnect("test")
    pump.flush()
    assert live.records() == [] and live.find("node-1") == []


def test_live_tunnel_nodes_leave_out_leaf_cluster_tunnels() -> None:
    clock = MemoryReactorClock()
    leaf = Identity(kind="cluster", name="leaf", cluster="root")
    factory = make_server_factory(clock, identity=leaf)
    connected_pair(clock, server_factory=factory, inventory=Inventory(name="leaf"))
    assert LiveTunnelNodes(factory.registry, "root").records() == []
