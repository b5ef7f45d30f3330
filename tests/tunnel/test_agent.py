"""The agent's reconnect loop, backoff, heartbeats, Reconnect and Discover, shutdown."""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.test import iosim

from edgeaccess.pki.x509ca import Identity
from edgeaccess.tunnel.agent import TunnelAgent
from edgeaccess.tunnel.backoff import backoff_ceiling, backoff_delay
from edgeaccess.tunnel.protocol import Inventory

from .support import MemoryEndpoint, Pumps, TopRandom, connected_pair, make_server_factory


@pytest.mark.parametrize(
    "attempt, ceiling",
    [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0), (6, 60.0), (10, 60.0), (5000, 60.0)],
)
def test_backoff_ceiling_doubles_up_to_the_cap(attempt: int, ceiling: float) -> None:
    assert backoff_ceiling(attempt) == ceiling
    assert backoff_delay(attempt, TopRandom()) == ceiling


def test_backoff_jitter_stays_within_bounds_and_spreads() -> None:
    rng = random.Random(1)
    for attempt in range(12):
        delays = [backoff_delay(attempt, rng) for _ in range(300)]
        ceiling = backoff_ceiling(attempt)
        assert all(0.0 <= d <= ceiling for d in delays)
        # Full jitter: the draws cover the whole range, not a band near the top.
        assert min(delays) < 0.1 * ceiling and max(delays) > 0.9 * ceiling


def test_backoff_rejects_negative_attempts() -> None:
    with pytest.raises(ValueError):
        backoff_delay(-1, TopRandom())


def make_agent(clock: MemoryReactorClock, endpoint: Any, **kwargs: Any) -> TunnelAgent:
    kwargs.setdefault("rng", TopRandom())
    return TunnelAgent(
        endpoint_factory=lambda: endpoint,
        inventory=Inventory(name="node-1"),
        clock=clock,
        **kwargs,
    )


def world(**server_kwargs: Any) -> tuple:
    clock = MemoryReactorClock()
    factory = make_server_factory(clock, **server_kwargs)
    pumps = Pumps()
    endpoint = MemoryEndpoint(factory, pumps, clock)
    return clock, factory, pumps, endpoint


def settle(clock: MemoryReactorClock, pumps: Pumps) -> None:
    for _ in range(3):
        pumps.flush()
        clock.advance(0)
    pumps.flush()


def test_agent_connects_and_is_registered() -> None:
    clock, factory, pumps, endpoint = world()
    agent = make_agent(clock, endpoint)
    connected: list[Any] = []
    agent.when_connected().addCallback(connected.append)
    agent.startService()
    settle(clock, pumps)
    assert agent.state == "connected"
    assert connected == [agent.tunnel]
    assert factory.registry.lookup("root", "node-1") is not None


def test_agent_backs_off_exponentially_forever_while_the_proxy_is_unreachable() -> None:
    clock, factory, pumps, endpoint = world()
    endpoint.refuse = True
    agent = make_agent(clock, endpoint)
    agent.startService()
    delays = []
    for _ in range(9):
        assert agent.state == "waiting"
        delays.append(agent.last_delay)
        clock.advance(agent.last_delay)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert endpoint.connects == 10
    connected: list[Any] = []
    agent.when_connected().addCallback(connected.append)
    # The proxy comes back: the next attempt connects and the backoff resets.
    endpoint.refuse = False
    clock.advance(agent.last_delay)
    settle(clock, pumps)
    assert agent.state == "connected" and connected == [agent.tunnel]
    agent.tunnel.disconnect("test")
    settle(clock, pumps)
    assert agent.state == "waiting" and agent.last_delay == 1


def test_agent_jitter_uses_the_injected_random() -> None:
    clock, factory, pumps, endpoint = world()
    endpoint.refuse = True
    agent = make_agent(clock, endpoint, rng=random.Random(3))
    agent.startService()
    expected = random.Random(3)
    for attempt in range(5):
        assert agent.last_delay == backoff_delay(attempt, expected)
        clock.advance(agent.last_delay)


def test_agent_redials_after_the_tunnel_drops() -> None:
    clock, factory, pumps, endpoint = world()
    agent = make_agent(clock, endpoint)
    agent.startService()
    settle(clock, pumps)
    first = agent.tunnel
    endpoint.servers[0].transport.loseConnection()
    settle(clock, pumps)
    assert agent.state == "waiting"
    clock.advance(agent.last_delay)
    settle(clock, pumps)
    assert agent.state == "connected" and agent.tunnel is not first
    assert factory.registry.lookup("root", "node-1") is endpoint.servers[1]


def test_refused_hello_counts_as_a_failed_attempt() -> None:
    clock, factory, pumps, endpoint = world(identity=Identity(kind="node", name="other", cluster="root"))
    agent = make_agent(clock, endpoint)
    agent.startService()
    settle(clock, pumps)
    assert agent.state == "waiting" and agent.last_delay == 1


def test_reconnect_request_moves_the_agent_after_the_proxys_delay() -> None:
    clock, factory, pumps, endpoint = world()
    agent = make_agent(clock, endpoint)
    agent.startService()
    settle(clock, pumps)
    endpoint.servers[0].request_reconnect(5.0, "proxy draining")
    settle(clock, pumps)
    assert agent.state == "waiting" and agent.last_delay == 5.0
    clock.advance(4.9)
    assert endpoint.connects == 1
    clock.advance(0.1)
    settle(clock, pumps)
    assert endpoint.connects == 2 and agent.state == "connected"


def test_reconnect_with_no_delay_moves_at_once() -> None:
    clock, factory, pumps, endpoint = world()
    agent = make_agent(clock, endpoint)
    agent.startService()
    settle(clock, pumps)
    endpoint.servers[0].request_reconnect(0.0)
    settle(clock, pumps)
    assert endpoint.connects == 2 and agent.state == "connected"


def test_invalid_reconnect_delay_is_refused() -> None:
    agent, server, pump, factory = connected_pair()
    failures: list[Any] = []
    server.request_reconnect(-3.0).addErrback(failures.append)
    results: list[Any] = []
    from edgeaccess.tunnel.protocol import Reconnect

    server.call(Reconnect, delay=float("nan"), reason="x").addErrback(results.append)
    pump.flush()
    assert results and "invalid reconnect delay" in str(results[0].value)
    assert agent.requested_delay is None


def test_graceful_shutdown_asks_every_agent_to_reconnect() -> None:
    clock, factory, pumps, endpoint = world()
    agents = [make_agent(clock, endpoint) for _ in range(2)]
    for agent in agents:
        agent.startService()
    settle(clock, pumps)
    done: list[Any] = []
    factory.shutdown(delay=2.0).addCallback(done.append)
    settle(clock, pumps)
    assert done
    assert [a.state for a in agents] == ["waiting", "waiting"]
    assert [a.last_delay for a in agents] == [2.0, 2.0]
    assert factory.registry.connected() == []
    # A stopped proxy refuses new tunnels.
    clock.advance(2.0)
    settle(clock, pumps)
    assert [a.state for a in agents] == ["waiting", "waiting"]


def test_discover_tells_the_agent_every_proxy() -> None:
    clock, factory, pumps, endpoint = world(proxies=lambda: ["p1.example:3024", "p2.example:3024"])
    seen: list[Any] = []
    agent = make_agent(clock, endpoint, on_discover=seen.append)
    agent.startService()
    settle(clock, pumps)
    assert seen == [["p1.example:3024", "p2.example:3024"]]


def test_heartbeats_keep_a_quiet_tunnel_alive() -> None:
    agent, server, pump, factory = connected_pair(heartbeat_interval=30.0)
    clock = agent.clock
    for _ in range(20):
        clock.advance(30.0)
        pump.flush()
    assert not agent.when_lost().called and not server.when_lost().called


def test_agent_adopts_the_proxys_heartbeat_interval() -> None:
    clock = MemoryReactorClock()
    factory = make_server_factory(clock, heartbeat_interval=5.0)
    agent, server, pump, _ = connected_pair(clock, server_factory=factory, heartbeat_interval=30.0)
    assert agent.heartbeat_interval == 5.0


def test_proxy_drops_a_silent_agent_after_three_intervals() -> None:
    clock = MemoryReactorClock()
    factory = make_server_factory(clock, heartbeat_interval=10.0)
    server = factory.buildProtocol(None)
    silent = amp.AMP()  # says nothing at all
    pump = iosim.connect(server, iosim.makeFakeServer(server), silent, iosim.makeFakeClient(silent), clock=clock)
    for _ in range(2):
        clock.advance(10.0)
        pump.flush()
    assert not server.when_lost().called
    clock.advance(10.0)
    pump.flush()
    assert server.when_lost().called and server.closed_reason == "heartbeat timeout"


class DeafProxy(amp.AMP):
    """Answers Hello, then never answers anything again (a hung proxy)."""

    from edgeaccess.tunnel.protocol import Hello as _Hello

    @_Hello.responder
    def hello(self, protocol_version, capabilities, inventory):
        return {"protocol_version": 1, "capabilities": [], "heartbeat_interval": 10.0}

    def dispatchCommand(self, box):
        if box[amp.COMMAND] == b"Hello":
            return super().dispatchCommand(box)
        from twisted.internet.defer import Deferred

        return Deferred()  # never answered


def test_agent_drops_a_hung_proxy_after_three_intervals_and_redials() -> None:
    clock = MemoryReactorClock()
    pumps = Pumps()

    class DeafFactory:
        def buildProtocol(self, addr: Any) -> DeafProxy:
            return DeafProxy()

    endpoint = MemoryEndpoint(DeafFactory(), pumps, clock)
    agent = make_agent(clock, endpoint)
    agent.startService()
    settle(clock, pumps)
    assert agent.state == "connected"
    tunnel = agent.tunnel
    # The first interval heard the Hello answer; the next three hear nothing.
    for _ in range(3):
        clock.advance(10.0)
        pumps.flush()
    assert agent.state == "connected"
    clock.advance(10.0)
    settle(clock, pumps)
    assert tunnel.closed_reason == "heartbeat timeout"
    assert agent.state == "waiting"


def test_stopping_a_connected_agent_closes_its_tunnel() -> None:
    clock, factory, pumps, endpoint = world()
    agent = make_agent(clock, endpoint)
    agent.startService()
    settle(clock, pumps)
    stopped: list[Any] = []
    agent.stopService().addCallback(stopped.append)
    settle(clock, pumps)
    assert stopped == [None] and agent.state == "stopped"
    assert factory.registry.connected() == []
    clock.advance(120.0)
    assert endpoint.connects == 1


def test_stopping_a_waiting_agent_cancels_the_retry() -> None:
    clock, factory, pumps, endpoint = world()
    endpoint.refuse = True
    agent = make_agent(clock, endpoint)
    agent.startService()
    stopped: list[Any] = []
    agent.stopService().addCallback(stopped.append)
    assert stopped == [None] and agent.state == "stopped"
    clock.advance(120.0)
    assert endpoint.connects == 1
    failures: list[Any] = []
    agent.when_connected().addErrback(failures.append)
    assert failures


def test_stopping_during_the_handshake_aborts_it() -> None:
    clock, factory, pumps, endpoint = world()
    agent = make_agent(clock, endpoint)
    agent.startService()
    assert agent.state == "connecting"  # Hello not yet answered
    stopped: list[Any] = []
    agent.stopService().addCallback(stopped.append)
    settle(clock, pumps)
    assert stopped == [None] and agent.state == "stopped"
    assert factory.registry.connected() == []
