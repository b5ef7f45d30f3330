"""Resumable channels to LAN nodes, in memory: the proxy redials, the node keeps a session per proxy.

The real pool (:class:`LanAgentPool`, the proxy's end) dials the real
agent-port protocol (:class:`LanAgentFactory`, the node's end) over iosim
pumps; only TLS is left out: the identities it would give (the node's
server certificate, the proxy's client certificate) are passed in. A *cut*
delivers a prefix of what each side wrote and loses both ends (a reset);
a *stall* delivers nothing and closes nothing (a black hole) until the
ends notice the silence themselves.
"""

from __future__ import annotations

import random

from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, NoRouteError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim

from edgeaccess.node.lanagent import LanAgentFactory
from edgeaccess.pki.x509ca import Identity
from edgeaccess.proxy.lanagents import LanAgentPool
from edgeaccess.tunnel.protocol import Inventory
from tests.tunnel.support import Acceptor, Collecting, Pumps

UUID = "6f1d7c1e-0000-4000-8000-00000000000a"
NODE = Identity(kind="node", name="lan-1", cluster="root", uuid=UUID)
RECORD = {"name": "lan-1", "uuid": UUID, "address": "10.0.0.5:3022",
          "agent": {"address": "10.0.0.5:3027", "inventory": {"name": "lan-1"}}}
PROXY_A = ("proxy", "root", "proxy.example", "key-a")
PROXY_B = ("proxy", "root", "proxy.example", "key-b")  # same name, another key
BUDGET = 20.0


def node_factory(clock, acceptor, budget: float = BUDGET) -> LanAgentFactory:
    return LanAgentFactory(clock=clock, inventory=lambda: Inventory(name="lan-1"),
                           accept_channel=acceptor, resume_budget=budget,
                           proxy_identity=lambda transport: transport.proxy_key)


class KeyedEndpoint:
    """A proxy's dials, in memory, to the world's node: the transport the
    node sees carries the proxy's key (what its TLS certificate would say)."""

    def __init__(self, proxy: "Proxy") -> None:
        self.proxy = proxy
        self.connects = 0
        self.servers: list = []

    def connect(self, factory):
        world = self.proxy.world
        self.connects += 1
        if world.refuse:
            return fail(NoRouteError("the link is down"))
        if world.node is None:
            return fail(ConnectionRefusedError("nothing listens: the node is not running"))
        server = world.node.buildProtocol(None)
        client = factory.buildProtocol(None)
        self.servers.append(server)
        server_io = iosim.makeFakeServer(server)
        server_io.proxy_key = self.proxy.key
        pump = iosim.connect(server, server_io, client, iosim.makeFakeClient(client),
                             greet=False, clock=world.clock)
        world.pumps.pumps.append(pump)
        return succeed(client)


class Proxy:
    """One proxy's pool, dialling the shared node through its own endpoint."""

    def __init__(self, world: "World", key, budget: float) -> None:
        self.world = world
        self.key = key
        self.endpoint = KeyedEndpoint(self)
        self.pool = LanAgentPool(
            reactor=world.clock, cluster="root", ca_certs=lambda: [],
            credentials=lambda: (None, None), endpoint_for=lambda host, port: self.endpoint,
            identity_for=lambda transport: NODE, resume_budget=budget,
            rng=random.Random(3))

    def open(self):
        """An ssh channel through the router's endpoint: (proxy side, node side)."""
        users = Collecting()
        results: list = []
        self.pool.endpoint(RECORD, "ssh", source="192.0.2.7:5000").connect(users).addBoth(
            results.append)
        self.world.settle()
        assert results and not isinstance(results[0], Failure), results
        return users.built[0], self.world.acceptor.protocols[-1]


class World:
    """A node's agent port and the proxies that dial it."""

    def __init__(self, budget: float = BUDGET) -> None:
        self.clock = MemoryReactorClock()
        self.pumps = Pumps()
        self.acceptor = Acceptor(targets=(UUID,))
        self.node = node_factory(self.clock, self.acceptor, budget)
        self.stalled: set = set()
        #: Every dial fails (the link is down).
        self.refuse = False
        self.a = Proxy(self, PROXY_A, budget)
        self.b = Proxy(self, PROXY_B, budget)

    def settle(self, rounds: int = 400) -> None:
        for _ in range(rounds):
            moved = False
            for pump in list(self.pumps.pumps):
                if pump in self.stalled:
                    # A black hole: what either side writes goes nowhere.
                    pump.clientIO.getOutBuffer()
                    pump.serverIO.getOutBuffer()
                moved = pump.pump(advanceClock=False) or moved
            self.clock.advance(0)
            if not moved:
                return

    def advance(self, seconds: float, step: float = 0.25) -> None:
        for _ in range(int(seconds / step)):
            self.clock.advance(step)
            self.settle()

    def cut(self, pump=None, *, proxy_side_only: bool = False) -> None:
        """A reset: both ends (or only the proxy's) lose the connection."""
        pump = pump or self.pumps.pumps[-1]
        self.pumps.pumps.remove(pump)
        for io in (pump.clientIO, pump.serverIO):
            io.disconnecting = io.disconnected = True
        pump.client.connectionLost(Failure(ConnectionLost("cut")))
        if not proxy_side_only:
            pump.server.connectionLost(Failure(ConnectionLost("cut")))


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def test_the_pool_redials_after_a_cut_and_the_channel_resumes_whole():
    world = World()
    user, node = world.a.open()
    first = world.a.pool.current(UUID)
    assert first.resume_negotiated
    up, down = payload(200_000, 1), payload(150_000, 2)
    user.transport.write(up)
    node.transport.write(down)
    world.settle(3)
    world.cut()
    assert "lost" not in user.events and "lost" not in node.events
    assert UUID in world.a.pool.waiting
    user.transport.write(b"+typed during the outage")
    # The first redial comes within a second (jittered).
    world.advance(1.25)
    second = world.a.pool.current(UUID)
    assert second is not None and second is not first
    assert world.a.endpoint.connects == 2
    world.settle()
    assert bytes(node.received) == up + b"+typed during the outage"
    assert bytes(user.received) == down
    assert world.a.pool.waiting == {}
    node.transport.write(b"after")
    world.settle()
    assert bytes(user.received) == down + b"after"
    assert "lost" not in user.events and "lost" not in node.events


def test_a_black_hole_is_found_by_the_proxy_which_redials():
    world = World()
    user, node = world.a.open()
    first = world.a.pool.current(UUID)
    world.stalled.add(world.pumps.pumps[-1])
    world.refuse = True  # new connections do not get through either, for now
    world.advance(5.0)
    assert world.a.pool.current(UUID) is first  # not yet: < 3 probes of silence
    world.advance(2.5)
    # Nothing heard for 3 probe intervals (2 s): dropped, channels waiting.
    assert first._is_lost
    assert UUID in world.a.pool.waiting
    assert "lost" not in user.events and "lost" not in node.events
    user.transport.write(b"typed in the dark")
    world.refuse = False
    world.advance(5.0)
    assert world.a.pool.current(UUID) not in (None, first)
    assert bytes(node.received) == b"typed in the dark"
    node.transport.write(b"and the answer")
    world.settle()
    assert bytes(user.received) == b"and the answer"


def test_a_new_connection_takes_the_channels_over_from_one_the_node_thinks_alive():
    world = World()
    user, node = world.a.open()
    old_node_side = world.a.endpoint.servers[-1]
    # Only the proxy noticed (its end was reset); the node's end looks alive.
    world.cut(proxy_side_only=True)
    assert not old_node_side._is_lost
    world.advance(1.25)
    assert world.a.endpoint.connects == 2
    world.settle()
    # It handed its channels over and is closing (its transport aborted).
    assert old_node_side._mux is None and old_node_side._dropping
    user.transport.write(b"still here")
    world.settle()
    assert bytes(node.received) == b"still here"
    assert "lost" not in user.events and "lost" not in node.events


def test_another_proxy_never_gets_the_detached_channels():
    world = World()
    user_a, node_a = world.a.open()
    session_a = world.a.pool.current(UUID).mux.session_id
    world.refuse = True
    world.cut()
    world.refuse = False
    # Proxy B (same name, another key) dials the node before A is back.
    user_b, node_b = world.b.open()
    session_b = world.b.pool.current(UUID).mux.session_id
    assert session_b != session_a
    assert set(world.node.slots) == {PROXY_A, PROXY_B}
    assert "lost" not in node_a.events  # B's session is its own
    world.advance(5.0)  # A redials and gets its own back
    assert world.a.pool.current(UUID).mux.session_id == session_a
    user_a.transport.write(b"to a")
    user_b.transport.write(b"to b")
    world.settle()
    assert bytes(node_a.received) == b"to a" and bytes(node_b.received) == b"to b"
    assert "lost" not in user_a.events and "lost" not in user_b.events


def test_past_the_budget_the_channels_close_with_the_reason_and_redials_stop():
    world = World(budget=10.0)
    user, node = world.a.open()
    world.refuse = True
    world.cut()
    world.advance(9.5)
    assert "lost" not in user.events and "lost" not in node.events
    dials = world.a.endpoint.connects
    assert dials >= 4  # redialled, backing off, at most REDIAL_CAP apart
    world.advance(1.0)
    for side in (user, node):
        assert "lost" in side.events
        assert side.transport.lost_reason == "tunnel outage exceeded 10s"
    # The redial already due finds nothing waiting; none follows.
    world.advance(5.0)
    assert world.a.pool.waiting == {} and world.a.pool._redials == {}
    dials = world.a.endpoint.connects
    world.advance(20.0)
    assert world.a.endpoint.connects == dials
    # The next channel dials afresh and works.
    world.refuse = False
    user2, node2 = world.a.open()
    user2.transport.write(b"fresh")
    world.settle()
    assert bytes(node2.received) == b"fresh"


def test_a_restarted_node_makes_the_proxy_close_the_old_channels_at_once():
    world = World()
    user, _node = world.a.open()
    world.cut()
    # A new node process: its slots (and session ids) are new.
    world.node = node_factory(world.clock, world.acceptor)
    world.advance(1.25)
    assert "lost" in user.events
    assert user.transport.lost_reason == "the node started a new tunnel session"
    assert world.a.pool.waiting == {}


def test_closing_on_purpose_ends_the_channels_at_both_ends_and_redials_nothing():
    world = World()
    user, node = world.a.open()
    world.a.pool.close(reason="proxy shutting down")
    world.settle()
    assert "lost" in user.events
    assert "proxy shutting down" in user.lost_reason.getErrorMessage()
    # The node was told before the connection went: nothing waits out the budget.
    assert "lost" in node.events
    assert "proxy shutting down" in node.lost_reason.getErrorMessage()
    assert all(not slot.waiting for slot in world.node.slots.values())
    world.advance(5.0)
    assert world.a.endpoint.connects == 1


def test_without_a_budget_a_lost_connection_ends_the_channels():
    world = World(budget=0.0)
    user, node = world.a.open()
    assert not world.a.pool.current(UUID).resume_negotiated
    world.cut()
    world.settle()
    assert "lost" in user.events and "lost" in node.events
    world.advance(3.0)
    assert world.a.endpoint.connects == 1


def test_a_record_gone_closes_an_idle_connection_but_not_users_sessions():
    world = World()
    user, node = world.a.open()
    world.a.pool.close(UUID, "the node no longer announces this agent", idle_only=True)
    world.settle()
    assert world.a.pool.current(UUID) is not None
    assert "lost" not in user.events
    user.transport.write(b"goes on")
    world.settle()
    assert bytes(node.received) == b"goes on"
    user.transport.loseConnection()
    world.settle()
    world.a.pool.close(UUID, "the node no longer announces this agent", idle_only=True)
    world.settle()
    assert world.a.pool.current(UUID) is None
    world.advance(5.0)
    assert world.a.endpoint.connects == 1  # an idle connection closed is not redialled


def test_a_node_that_stopped_ends_its_channels_at_the_first_refused_redial():
    world = World()
    user, _node = world.a.open()
    world.cut()
    world.node = None  # killed: its host refuses connections to the agent port
    world.advance(1.25)
    assert "lost" in user.events
    assert user.transport.lost_reason == \
        "the node's agent port refused the connection (node stopped)"
    assert world.a.pool.waiting == {}
    world.advance(10.0)
    assert world.a.endpoint.connects == 2
