"""The proxy's route to LAN agents, in memory: the dial pool and the directory.

The node's side is the real agent-port protocol (:class:`LanAgentFactory`,
an ``AgentTunnelProtocol``) joined to the pool's protocol by iosim; only
TLS is left out (the identity the handshake would give is passed in).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from edgeaccess.backend.interfaces import Item
from edgeaccess.errors import NodeOffline
from edgeaccess.node.lanagent import LanAgentFactory
from edgeaccess.pki.x509ca import Identity
from edgeaccess.proxy.lanagents import (
    CombinedRegistry,
    LanAgent,
    LanAgentDirectory,
    LanAgentPool,
)
from edgeaccess.tunnel.interfaces import ITunnel, ITunnelRegistry
from edgeaccess.tunnel.protocol import App, Inventory
from edgeaccess.tunnel.server import TunnelRegistry
from tests.tunnel.support import Acceptor, Collecting, MemoryEndpoint, Pumps

UUID = "6f1d7c1e-0000-4000-8000-000000000001"
NODE = Identity(kind="node", name="lan-1", cluster="root", uuid=UUID)
#: Who the pool's proxy is to the node (TLS would say: its certificate).
PROXY_KEY = ("proxy", "root", "proxy-a", "key-a")
INVENTORY = Inventory(name="lan-1", kube_clusters=("k1",), kube_labels={"k1": {"env": "dev"}},
                      apps=(App(name="web", uri="http://127.0.0.1:8080"),))


class World:
    """A pool whose dials reach an in-memory node agent."""

    def __init__(self, *, peer: Identity = NODE, node_factory=None, refuse: bool = False,
                 connect_timeout: float = 5.0) -> None:
        self.clock = MemoryReactorClock()
        self.pumps = Pumps()
        self.acceptor = Acceptor(targets=("k1", "web"))
        self.node_factory = node_factory or LanAgentFactory(
            clock=self.clock, inventory=lambda: INVENTORY, accept_channel=self.acceptor,
            proxy_identity=lambda transport: PROXY_KEY)
        self.endpoint = MemoryEndpoint(self.node_factory, self.pumps, self.clock, refuse=refuse)
        self.dialled: list[tuple[str, int]] = []

        def endpoint_for(host, port):
            self.dialled.append((host, port))
            return self.endpoint

        self.pool = LanAgentPool(reactor=self.clock, cluster="root", ca_certs=lambda: [],
                                 credentials=lambda: (None, None), endpoint_for=endpoint_for,
                                 identity_for=lambda transport: peer,
                                 connect_timeout=connect_timeout)
        self.agent = LanAgent(self.pool, NODE, INVENTORY, "10.0.0.5:3027", None)

    def settle(self) -> None:
        for _ in range(3):
            self.pumps.flush()
            self.clock.advance(0)
        self.pumps.flush()

    def open(self, kind: str = "kube", target: str = "k1"):
        results: list = []
        opening = self.agent.connect_channel(kind, target, Collecting(), source="192.0.2.7:5000")
        opening.addBoth(results.append)
        return results


def test_the_first_channel_dials_and_later_ones_reuse_the_connection():
    world = World()
    first = world.open()
    world.settle()
    assert isinstance(first[0], Protocol), first
    assert world.dialled == [("10.0.0.5", 3027)]
    second = world.open("app", "web")
    world.settle()
    assert isinstance(second[0], Protocol), second
    assert world.endpoint.connects == 1
    assert world.acceptor.requests == [("kube", "k1"), ("app", "web")]
    assert len(world.pool.connections()) == 1


def test_channels_asked_for_during_the_dial_share_it():
    world = World()
    waiting = [world.open() for _ in range(3)]
    world.settle()
    assert world.endpoint.connects == 1
    assert all(isinstance(w[0], Protocol) for w in waiting), waiting


def test_a_failed_dial_fails_every_waiter_and_the_next_channel_dials_again():
    world = World(refuse=True)
    waiting = [world.open(), world.open()]
    world.settle()
    for w in waiting:
        assert w[0].check(NodeOffline), w
        assert "unreachable" in str(w[0].value)
    world.endpoint.refuse = False
    again = world.open()
    world.settle()
    assert isinstance(again[0], Protocol), again
    # A refusal at once leaves nothing pending: each open dialled on its own.
    assert world.endpoint.connects == 3


def test_a_server_that_is_another_node_is_refused_and_dropped():
    other = Identity(kind="node", name="lan-1", cluster="root",
                     uuid="6f1d7c1e-0000-4000-8000-000000000002")
    world = World(peer=other)
    registered: list = []
    world.pool.factory.registry.subscribe(registered.append, lambda t: None)
    result = world.open()
    world.settle()
    assert result[0].check(NodeOffline), result
    assert world.pool.connections() == []
    assert world.acceptor.requests == []  # no channel reached it
    assert registered == []  # its Hello was refused, not accepted and then dropped
    assert world.endpoint.servers[0]._is_lost


def test_an_agent_that_never_says_hello_times_out():
    world = World(node_factory=Factory.forProtocol(Protocol), connect_timeout=5.0)
    result = world.open()
    world.settle()
    assert result == []
    world.clock.advance(5.0)
    world.settle()
    assert result[0].check(NodeOffline) and "did not answer" in str(result[0].value)
    assert world.pool._pending == {} and world.pool._dialled == {}


def test_a_lost_connection_is_forgotten_and_the_next_channel_redials():
    world = World()
    world.open()
    world.settle()
    connection = world.pool.connections()[0]
    connection.transport.loseConnection()
    world.settle()
    assert world.pool.connections() == []
    again = world.open()
    world.settle()
    assert isinstance(again[0], Protocol), again
    assert world.endpoint.connects == 2


def test_the_node_refuses_what_it_does_not_serve():
    world = World()
    result = world.open("kube", "not-mine")
    world.settle()
    assert result[0].check(Exception) and "no not-mine" in str(result[0].value)
    # The connection stays up for the next channel.
    assert len(world.pool.connections()) == 1


def test_lan_agent_and_registries_have_the_tunnel_faces():
    world = World()
    verifyObject(ITunnel, world.agent)
    directory = LanAgentDirectory(_Cache([]), world.pool, world.clock)
    verifyObject(ITunnelRegistry, directory)
    verifyObject(ITunnelRegistry, CombinedRegistry(TunnelRegistry(), directory))


# --- the directory -----------------------------------------------------------------------


class _Cache:
    """The two reads the directory makes of the control cache."""

    def __init__(self, items) -> None:
        self.items = list(items)
        self.listeners: list = []

    def subscribe(self, listener):
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener)

    def get_range(self, prefix):
        return [i for i in self.items if i.key.startswith(prefix)]

    def put(self, item) -> None:
        for listener in list(self.listeners):
            listener(item.key, item)


def _item(uuid=UUID, *, inventory=INVENTORY, address="10.0.0.5:3027", expires=1000.0,
          revision=1, agent=True) -> Item:
    record = {"name": inventory.name, "uuid": uuid, "address": "10.0.0.5:3022"}
    if agent:
        record["agent"] = {"address": address, "inventory": json.loads(inventory.to_json())}
    return Item(key=f"/nodes/{uuid}", value=json.dumps(record).encode(),
                expires=datetime.fromtimestamp(expires, timezone.utc), revision=revision)


def _directory(items=()):
    world = World()
    cache = _Cache(items)
    directory = LanAgentDirectory(cache, world.pool, world.clock, sweep_interval=5.0)
    events: list[tuple[str, str]] = []
    directory.subscribe(lambda a: events.append(("up", a.identity.name)),
                        lambda a: events.append(("down", a.identity.name)))
    directory.startService()
    return world, cache, directory, events


def test_the_directory_lists_agents_from_node_records_and_follows_changes():
    world, cache, directory, events = _directory([_item()])
    [agent] = directory.connected()
    assert agent.identity == NODE and agent.inventory == INVENTORY
    assert agent.address == "10.0.0.5:3027"
    assert directory.lookup("root", "lan-1") is agent and directory.lookup("other", UUID) is None
    # A heartbeat with the same announcement: nothing to tell.
    cache.put(_item(expires=1030.0, revision=2))
    assert directory.connected() == [agent] and events == [("up", "lan-1")]
    # A new inventory: the old entry goes, the new one comes.
    cache.put(_item(inventory=Inventory(name="lan-1", kube_clusters=("k2",)), revision=3))
    assert events == [("up", "lan-1"), ("down", "lan-1"), ("up", "lan-1")]
    assert directory.connected()[0].inventory.kube_clusters == ("k2",)
    # The node stops announcing it; a deleted record is gone too.
    cache.put(_item(agent=False, revision=4))
    assert directory.connected() == [] and events[-1] == ("down", "lan-1")
    directory.stopService()


def test_expired_records_are_swept_and_malformed_ones_ignored():
    bad = Item(key="/nodes/x", value=b'{"name": "x", "uuid": "x", "agent": {"address": 5}}',
               expires=None, revision=1)
    forged = _item(uuid="6f1d7c1e-0000-4000-8000-000000000009",
                   inventory=Inventory(name="someone-else"))
    forged_record = json.loads(forged.value)
    forged_record["name"] = "lan-9"  # the inventory names another node
    forged = Item(key=forged.key, value=json.dumps(forged_record).encode(),
                  expires=forged.expires, revision=1)
    world, cache, directory, events = _directory([_item(expires=12.0), bad, forged])
    assert [a.identity.name for a in directory.connected()] == ["lan-1"]
    world.clock.advance(12.0)
    assert directory.connected() == []  # no longer listed once expired
    world.clock.advance(5.0)  # and the sweep tells the subscribers
    assert events == [("up", "lan-1"), ("down", "lan-1")]
    directory.stopService()


def test_the_combined_registry_reads_both():
    world, cache, directory, events = _directory([_item()])
    tunnels = TunnelRegistry()
    combined = CombinedRegistry(tunnels, directory)
    assert [a.identity.name for a in combined.connected()] == ["lan-1"]
    assert combined.lookup("root", UUID) is directory.connected()[0]
    seen: list = []
    unsubscribe = combined.subscribe(lambda a: seen.append(a), lambda a: None)
    cache.put(_item(inventory=Inventory(name="lan-1", kube_clusters=("k3",)), revision=2))
    assert [a.inventory.kube_clusters for a in seen] == [("k3",)]
    unsubscribe()
    directory.stopService()
