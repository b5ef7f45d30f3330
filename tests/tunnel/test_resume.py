"""Resumable channels in memory: a channel outlives the tunnel that carried it.

A real agent (:class:`TunnelAgent`, its redial machine) and a real proxy
factory talk over iosim pumps; a *cut* delivers only a prefix of what each
side had written (anywhere: inside a frame, a box, the handshake or the
re-attach itself), then loses both connections. The channel's protocols on
both ends must then see every byte once, in order, and never a close.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure

from edgeaccess.pki.x509ca import Identity
from edgeaccess.tunnel.agent import TunnelAgent
from edgeaccess.tunnel.protocol import ChannelState, ChannelStates, Inventory, ProtocolViolation

from .support import NODE, Acceptor, Collecting, MemoryEndpoint, Pumps, Recorder, make_server_factory


class World:
    """One proxy factory, one resuming agent, the pumps between them."""

    def __init__(self, *, window: int = 1024 * 1024, budget: float = 60.0,
                 fast: bool = True, identity: Identity = NODE) -> None:
        self.clock = MemoryReactorClock()
        self.factory = make_server_factory(self.clock, identity=identity, window=window,
                                           resume_budget=budget)
        self.pumps = Pumps()
        self.endpoint = MemoryEndpoint(self.factory, self.pumps, self.clock)
        self.acceptor = Acceptor()
        self.agent = TunnelAgent(
            endpoint_factory=lambda: self.endpoint, inventory=Inventory(name=identity.name),
            clock=self.clock, rng=random.Random(1), accept_channel=self.acceptor,
            window=window, resume_budget=budget)
        if not fast:
            self.agent._core.protocol_factory = self._slow(self.agent._core.protocol_factory)
        self.agent.startService()
        self.settle()
        assert self.agent.state == "connected"

    @staticmethod
    def _slow(build: Any) -> Any:
        def slow() -> Any:
            protocol = build()
            protocol.fast_data_offered = False
            return protocol
        return slow

    @property
    def server(self) -> Any:
        return self.endpoint.servers[-1]

    def settle(self, rounds: int = 400) -> None:
        for _ in range(rounds):
            moved = False
            for pump in list(self.pumps.pumps):
                moved = pump.pump(advanceClock=False) or moved
            self.clock.advance(0)
            if not moved:
                for pump in list(self.pumps.pumps):
                    moved = pump.pump(advanceClock=False) or moved
                if not moved:
                    return

    def open(self) -> tuple[Recorder, Recorder]:
        """A channel opened by the proxy: (proxy side, node side) protocols."""
        users = Collecting()
        self.server.connect_channel("ssh", "node-1", users)
        self.settle()
        return users.built[0], self.acceptor.protocols[-1]

    def cut(self, client_part: float = 1.0, server_part: float = 1.0) -> None:
        """Deliver a prefix of what each side wrote, then lose the connection
        on both sides (no FIN: a reset)."""
        pump = self.pumps.pumps.pop()
        to_server = pump.clientIO.getOutBuffer()
        to_client = pump.serverIO.getOutBuffer()
        for io in (pump.clientIO, pump.serverIO):
            io.disconnecting = io.disconnected = True
        if to_server:
            pump.server.dataReceived(to_server[:int(len(to_server) * client_part)])
        if to_client:
            pump.client.dataReceived(to_client[:int(len(to_client) * server_part)])
        pump.client.connectionLost(Failure(ConnectionLost("cut")))
        pump.server.connectionLost(Failure(ConnectionLost("cut")))

    def redial(self) -> None:
        assert self.agent.state == "waiting"
        assert self.agent.last_delay is not None and self.agent.last_delay <= 1.0
        self.clock.advance(self.agent.last_delay)
        self.settle()

    def step(self, rounds: int) -> None:
        """Move data back and forth ``rounds`` times (a transfer in progress)."""
        for _ in range(rounds):
            for pump in list(self.pumps.pumps):
                pump.pump(advanceClock=False)
            self.clock.advance(0)


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def test_a_channel_survives_a_cut_with_data_in_flight_both_ways() -> None:
    world = World()
    user, node = world.open()
    up, down = payload(300_000, 1), payload(200_000, 2)
    user.transport.write(up)
    node.transport.write(down)
    world.step(1)
    world.cut(0.37, 0.61)
    assert world.agent.state == "waiting"
    # Both channels are still there, their protocols told nothing.
    assert "lost" not in user.events and "lost" not in node.events
    user.transport.write(b"written while detached")
    world.redial()
    assert world.agent.state == "connected"
    assert bytes(node.received) == up + b"written while detached"
    assert bytes(user.received) == down
    # The channel goes on as before, and closes as before.
    node.transport.write(b"after")
    node.transport.loseConnection()
    world.settle()
    assert bytes(user.received) == down + b"after"
    assert user.lost_reason is not None and node.lost_reason is not None


def test_a_leaf_clusters_tunnel_resumes_under_its_cluster_identity() -> None:
    # A leaf proxy's tunnel to its root (edgeaccess.cluster.leaf): the root
    # holds the session under the leaf's cluster identity, as a node's.
    leaf = Identity(kind="cluster", name="leaf", cluster="root")
    world = World(identity=leaf)
    user, node = world.open()
    world.cut()
    assert world.factory.sessions.detached_count() == 1
    user.transport.write(b"typed during the outage")
    world.redial()
    assert world.agent.state == "connected"
    assert bytes(node.received) == b"typed during the outage"
    assert world.server.identity == leaf and world.factory.sessions.detached_count() == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    up=st.integers(0, 150_000),
    down=st.integers(0, 150_000),
    cuts=st.lists(st.tuples(st.integers(0, 6), st.floats(0, 1), st.floats(0, 1)),
                  min_size=1, max_size=3),
    window=st.sampled_from([16 * 1024, 1024 * 1024]),
    fast=st.booleans(),
    eof=st.booleans(),
)
def test_no_byte_is_lost_repeated_or_reordered_wherever_the_cuts_fall(
        up: int, down: int, cuts: list, window: int, fast: bool, eof: bool) -> None:
    world = World(window=window, fast=fast)
    user, node = world.open()
    sent_up, sent_down = payload(up, up), payload(down, down + 1)
    # Written in pieces, some before and some after the cuts.
    user.transport.write(sent_up[: up // 2])
    node.transport.write(sent_down[: down // 3])
    for rounds, client_part, server_part in cuts:
        world.step(rounds)
        world.cut(client_part, server_part)
        # A cut may also fall into the handshake or the re-attach itself:
        # the next tunnel is then cut after ``rounds`` steps too.
        world.clock.advance(world.agent.last_delay)
        world.step(rounds)
    user.transport.write(sent_up[up // 2:])
    node.transport.write(sent_down[down // 3:])
    if eof:
        node.transport.loseWriteConnection()
    world.settle(4000)
    assert world.agent.state == "connected"
    assert bytes(node.received) == sent_up
    assert bytes(user.received) == sent_down
    assert "lost" not in user.events and "lost" not in node.events
    assert ("read-closed" in user.events) == eof
    # What is kept for a resumption is bounded by the window.
    for side in (user, node):
        assert side.transport.retained <= window


def test_data_written_just_before_a_graceful_close_survives_a_cut() -> None:
    world = World()
    user, node = world.open()
    tail = payload(100_000, 3)
    node.transport.write(tail)
    node.transport.loseConnection()  # the node side is done (closed at once)
    assert "lost" in node.events
    world.cut(0.2, 0.2)
    world.redial()
    assert bytes(user.received) == tail
    assert user.lost_reason is not None
    assert user.lost_reason.check(ConnectionLost) is None  # a clean close, not a loss


def test_the_budget_closes_every_channel_with_the_reason() -> None:
    world = World(budget=30.0)
    user, node = world.open()
    world.endpoint.refuse = True
    world.cut()
    for _ in range(58):
        world.clock.advance(0.5)
    assert "lost" not in user.events and "lost" not in node.events
    # The agent redials every second or so while channels wait.
    connects = world.endpoint.connects
    assert connects >= 20
    for _ in range(3):
        world.clock.advance(0.5)
    for side in (user, node):
        assert "lost" in side.events
        assert "tunnel outage exceeded 30s" in side.lost_reason.getErrorMessage()
        assert side.transport.lost_reason == "tunnel outage exceeded 30s"
    assert world.factory.sessions.detached_count() == 0
    # A tunnel after the budget starts a new session; new channels work.
    world.endpoint.refuse = False
    world.clock.advance(world.agent.last_delay or 1.0)
    world.settle()
    assert world.agent.state == "connected"
    user2, node2 = world.open()
    user2.transport.write(b"fresh")
    world.settle()
    assert bytes(node2.received) == b"fresh"


def test_a_restarted_agent_makes_the_proxy_close_the_old_sessions_channels() -> None:
    world = World()
    user, _node = world.open()
    world.cut()
    # A new agent process: same identity, a new session.
    pumps, clock = world.pumps, world.clock
    world.agent.stopService()
    other = TunnelAgent(endpoint_factory=lambda: world.endpoint,
                        inventory=Inventory(name="node-1"), clock=clock,
                        rng=random.Random(2), accept_channel=Acceptor(), resume_budget=60.0)
    other.startService()
    world.settle()
    assert other.state == "connected"
    assert "lost" in user.events
    assert user.transport.lost_reason == "the node started a new tunnel session"
    del pumps


def test_a_proxy_that_lost_the_session_makes_the_agent_close_its_channels() -> None:
    world = World()
    _user, node = world.open()
    world.cut()
    # The proxy restarted: it holds no session.
    world.factory.sessions._by_peer.clear()
    world.redial()
    assert world.agent.state == "connected"
    assert node.transport.lost_reason == "the proxy no longer holds the channels"


def test_another_node_cannot_attach_someone_elses_session() -> None:
    world = World()
    user, node = world.open()
    session = world.agent.tunnel.mux.session_id
    world.endpoint.refuse = True
    world.cut()
    # A tunnel with another node's certificate offers the stolen session id.
    other_factory_identity = Identity(kind="node", name="node-2", cluster="root", uuid="uuid-2")
    world.factory.identity_for = lambda transport: other_factory_identity
    thief = TunnelAgent(endpoint_factory=lambda: MemoryEndpoint(world.factory, world.pumps,
                                                                world.clock),
                        inventory=Inventory(name="node-2"), clock=world.clock,
                        rng=random.Random(3), resume_budget=60.0)
    thief._core.protocol_factory = _with_session(thief._core.protocol_factory, session)
    thief.startService()
    world.settle()
    assert thief.state == "connected"
    assert thief.tunnel.mux.channels == {}
    # Nothing was taken: the real node's session still waits, and resumes.
    world.factory.identity_for = lambda transport: NODE
    world.endpoint.refuse = False
    world.clock.advance(1.0)
    world.settle()
    user.transport.write(b"still mine")
    world.settle()
    assert bytes(node.received) == b"still mine"
    assert "lost" not in user.events


def _with_session(build: Any, session: str) -> Any:
    def forged() -> Any:
        protocol = build()
        protocol.mux.session_id = session
        return protocol
    return forged


def test_a_newer_tunnel_takes_the_session_from_one_the_proxy_still_thinks_alive() -> None:
    """A black hole, or NAT rebinding: the agent gives up its tunnel (or its
    address changed), the proxy never heard of it; the agent's next tunnel,
    from a new address, takes the session over."""
    world = World()
    user, node = world.open()
    old_pump = world.pumps.pumps.pop()
    old_server = old_pump.server
    user.transport.write(b"into the hole")
    # Only the agent sees its tunnel die (probes unanswered).
    old_pump.clientIO.disconnecting = old_pump.clientIO.disconnected = True
    old_pump.client.connectionLost(Failure(ConnectionLost("probes unanswered")))
    assert not old_server._is_lost
    world.redial()
    assert old_server._dropping  # replaced by the newer tunnel
    old_server.connectionLost(Failure(ConnectionLost("aborted")))
    world.settle()
    assert bytes(node.received) == b"into the hole"
    node.transport.write(b"back")
    world.settle()
    assert bytes(user.received) == b"back"
    assert "lost" not in user.events and "lost" not in node.events


def test_a_second_resume_on_the_same_tunnel_closes_it() -> None:
    world = World()
    world.open()
    world.cut()
    world.redial()
    server = world.server
    logged = _warnings()
    try:
        server.dataReceived(amp.AmpBox(_command=b"ResumeChannels", channels=b"").serialize())
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert server._dropping
    assert any("ResumeChannels without a session" in str(e.get("reason")) for e in logged)


def test_a_resume_on_a_tunnel_that_resumed_nothing_closes_it() -> None:
    world = World()
    server = world.server
    server.dataReceived(amp.AmpBox(_command=b"ResumeChannels", channels=b"").serialize())
    assert server._dropping


def _warnings() -> list[dict]:
    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    return logged


def _lying_resume(world: World, lie: Any) -> tuple[Recorder, Recorder, list[dict]]:
    user, node = world.open()
    user.transport.write(payload(50_000, 5))
    world.settle()
    world.cut()
    # The agent's next account lies about the channel.
    build = world.agent._core.protocol_factory

    def lying() -> Any:
        protocol = build()
        mux = protocol.mux
        honest = mux.states

        def states(only: Any = None) -> list[ChannelState]:
            return [lie(state) for state in honest(only)]

        mux.states = states
        return protocol

    world.agent._core.protocol_factory = lying
    logged = _warnings()
    try:
        world.redial()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    return user, node, logged


@pytest.mark.parametrize("lie, words", [
    (lambda s: ChannelState(s.channel, s.received + 10, s.received + 10, s.eof),
     "claims 50010 bytes received, 50000 were sent"),
    (lambda s: ChannelState(s.channel, 0, 0, s.eof), "no longer held"),
    (lambda s: ChannelState(s.channel, s.received, s.granted, True), "never sent"),
])
def test_a_peer_that_lies_about_offsets_gets_the_channel_closed_and_logged(
        lie: Any, words: str) -> None:
    world = World(window=16 * 1024)
    user, node, logged = _lying_resume(world, lie)
    assert "lost" in user.events
    assert user.transport.lost_reason.startswith("resume refused")
    assert any(words in str(e.get("reason", "")) for e in logged
               if e.get("log_level") == LogLevel.warn)
    # The tunnel itself stays: other channels are not the liar's victims.
    assert world.agent.state == "connected" and not world.server._dropping
    assert "lost" in node.events  # told by the proxy's close


def test_malformed_channel_states_are_refused() -> None:
    states = ChannelStates()
    with pytest.raises(ProtocolViolation):
        states.fromString(b"\x00" * 20)
    packed = states.toString([ChannelState(3, 10, 11)])
    with pytest.raises(ProtocolViolation, match="beyond"):
        states.fromString(packed)
    twice = states.toString([ChannelState(3, 10, 5), ChannelState(3, 10, 5)])
    with pytest.raises(ProtocolViolation):
        states.fromString(twice)
    assert states.fromString(states.toString([ChannelState(5, 7, 3, True)])) == [
        ChannelState(5, 7, 3, True)]


def test_an_agent_without_resumption_still_works_with_a_resuming_proxy() -> None:
    clock = MemoryReactorClock()
    factory = make_server_factory(clock)
    pumps = Pumps()
    endpoint = MemoryEndpoint(factory, pumps, clock)
    acceptor = Acceptor()
    agent = TunnelAgent(endpoint_factory=lambda: endpoint, inventory=Inventory(name="node-1"),
                        clock=clock, rng=random.Random(1), accept_channel=acceptor)
    agent.startService()
    for _ in range(5):
        pumps.flush()
        clock.advance(0)
    server = endpoint.servers[-1]
    assert not server.resume_negotiated
    users = Collecting()
    server.connect_channel("ssh", "node-1", users)
    for _ in range(5):
        pumps.flush()
        clock.advance(0)
    pumps.pumps[-1].server.transport.loseConnection()
    for _ in range(5):
        pumps.flush()
        clock.advance(0)
    # Without resumption a lost tunnel loses its channels, as before.
    assert "lost" in users.built[0].events
    assert factory.sessions.detached_count() == 0


def test_probes_find_a_black_hole_in_seconds_while_channels_are_open() -> None:
    world = World()
    user, node = world.open()
    old = world.agent.tunnel
    world.endpoint.refuse = True
    # Nothing arrives any more, nothing is reset.
    pump = world.pumps.pumps.pop()
    for _ in range(20):  # 10 s: within 4 probe intervals
        world.clock.advance(0.5)
        pump.clientIO.getOutBuffer()
        pump.serverIO.getOutBuffer()
        for end in (pump.client, pump.server):
            if end._dropping and not end._is_lost:  # an abort: lost at once
                end.connectionLost(Failure(ConnectionLost("aborted")))
    # The agent dropped it (3 probes of 2 s) and redials; so did the proxy.
    assert old._dropping and world.agent.tunnel is not old
    assert world.endpoint.connects >= 2
    assert pump.server._dropping
    assert "lost" not in user.events and "lost" not in node.events


def test_an_idle_tunnel_keeps_the_slow_heartbeat() -> None:
    world = World()
    tunnel = world.agent.tunnel
    assert tunnel._liveness_period == 30.0
    world.open()
    assert tunnel._liveness_period == 2.0


def test_a_channel_opened_on_the_new_tunnel_before_the_accounts_is_left_alone() -> None:
    world = World()
    user, node = world.open()
    world.cut()
    world.clock.advance(world.agent.last_delay)
    # Deliver the agent's Hello only; the proxy answers and registers the
    # tunnel, and a user opens a channel before the agent's account arrives.
    pump = world.pumps.pumps[-1]
    hello = pump.clientIO.getOutBuffer()
    pump.server.dataReceived(hello)
    answer = pump.serverIO.getOutBuffer()
    pump.client.dataReceived(answer)  # the agent now sends ResumeChannels
    world.clock.advance(0)
    fresh = Collecting()
    pump.server.connect_channel("ssh", "node-1", fresh)
    # The proxy's OpenChannel reaches the agent before its account does.
    world.settle()
    assert fresh.built and "lost" not in fresh.built[0].events
    fresh.built[0].transport.write(b"new")
    user.transport.write(b"old")
    world.settle()
    assert bytes(world.acceptor.protocols[-1].received) == b"new"
    assert bytes(node.received) == b"old"


def test_an_idle_resumable_tunnel_holds_no_multiplexer_on_the_proxy() -> None:
    world = World()
    server = world.server
    assert server.resume_negotiated and server._mux is None
    assert set(vars(server)) <= set(__import__(
        "edgeaccess.tunnel.server", fromlist=["x"]).SERVER_TUNNEL_ATTRIBUTES)
    # A session that ends with its tunnel (no channel held) is forgotten.
    user, node = world.open()
    user.transport.loseConnection()
    world.settle()
    world.cut()
    world.redial()
    assert world.factory.sessions.detached_count() == 0
    assert world.server._mux is None


def test_stopping_the_agent_ends_its_channels_at_once() -> None:
    world = World()
    user, node = world.open()
    world.agent.stopService()
    world.settle()
    assert node.transport.lost_reason == "the node is stopping"
    assert "lost" in node.events


def test_stopping_the_agent_ends_the_proxys_side_of_its_channels_at_once() -> None:
    # Not held for the proxy's budget: a node stopping, a leaf's trust disabled.
    world = World()
    user, node = world.open()
    world.agent.stopService()
    world.settle()
    assert "lost" in user.events
    assert world.factory.sessions.detached_count() == 0


def test_past_the_budget_the_agent_comes_back_within_seconds_of_the_link() -> None:
    # The quick redials of the outage do not grow the backoff: the agent is
    # back soon after the link, and the proxy learns the channels ended.
    world = World(budget=10.0)
    user, node = world.open()
    world.endpoint.refuse = True
    world.cut()
    while world.clock.seconds() < 12.0:  # every redial refused, past the budget
        world.clock.advance(0.1)
        world.settle()
    assert node.transport.lost_reason == "tunnel outage exceeded 10s"
    assert world.agent.state == "waiting"
    world.endpoint.refuse = False  # the link is back 2 s after the budget
    back_at = world.clock.seconds() + 4.0
    while world.agent.state != "connected" and world.clock.seconds() < back_at:
        world.clock.advance(0.1)
        world.settle()
    assert world.agent.state == "connected"
    assert "lost" in user.events  # the new session told the proxy


def test_credit_for_what_was_taken_while_detached_is_granted_after_the_resume() -> None:
    world = World(window=16 * 1024)
    user, node = world.open()
    node.transport.pauseProducing()  # the node's program reads nothing for now
    user.transport.write(payload(40_000, 9))
    world.settle()
    assert len(node.received) == 0 and user.transport.send_credit == 0
    world.endpoint.refuse = True
    world.cut()
    node.transport.resumeProducing()  # it reads the window while the link is down
    assert len(node.received) == 16 * 1024
    world.endpoint.refuse = False
    world.clock.advance(1.0)
    world.settle()
    assert bytes(node.received) == payload(40_000, 9)
