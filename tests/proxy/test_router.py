"""The router: node names to endpoints, in memory."""

from __future__ import annotations

import attrs
import pytest
from twisted.internet import error as ierror
from twisted.internet.defer import succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from edgeaccess.errors import BadRequest, ClusterOffline, NodeOffline, NotFound
from edgeaccess.proxy.interfaces import IRoutedEndpoint, IRouter
from edgeaccess.proxy.router import Router, split_address


@attrs.frozen
class Node:
    name: str
    uuid: str
    address: str
    labels: dict = attrs.field(factory=dict)


NODES = [
    Node("web1", "0b7e-web1", "10.0.0.5:3022"),
    Node("db", "0b7e-db", "10.0.0.6"),
    Node("edge7", "0b7e-edge7", "tunnel"),
    Node("web.prod", "0b7e-webprod", "10.0.0.8:2222"),
    Node("web", "0b7e-web", "10.0.0.9:3022"),
]


def lookup(name):
    for node in NODES:
        if name in (node.name, node.uuid):
            return succeed(node)
    return succeed(None)


class RecordingEndpoint:
    def __init__(self, label):
        self.label = label
        self.connected = []

    def connect(self, factory):
        self.connected.append(factory)
        return succeed(self.label)


def make_router(**kwargs):
    reactor = MemoryReactorClock()
    tunnels = []

    def tunnel_lookup(cluster, node, **extra):
        tunnels.append((cluster, node.name, extra))
        return RecordingEndpoint(f"tunnel to {node.name}")

    kwargs.setdefault("tunnel_lookup", tunnel_lookup)
    router = Router("example", lookup, reactor=reactor, **kwargs)
    return router, reactor, tunnels


def connect(endpoint):
    results = []
    endpoint.connect(Factory.forProtocol(Protocol)).addBoth(results.append)
    return results[0] if results else None


def test_router_provides_the_interface():
    router, _, _ = make_router()
    assert verifyObject(IRouter, router)
    assert verifyObject(IRoutedEndpoint, router.route("example", "web1"))


def test_lan_node_is_dialled_at_its_address():
    router, reactor, _ = make_router()
    endpoint = router.route("example", "web1")
    connect(endpoint)
    host, port, _factory, timeout, _bind = reactor.tcpClients[0]
    assert (host, port) == ("10.0.0.5", 3022)
    assert endpoint.route_kind == "direct"
    assert endpoint.node.uuid == "0b7e-web1"


def test_lan_node_without_port_is_dialled_on_3022():
    router, reactor, _ = make_router()
    connect(router.route("example", "db"))
    assert reactor.tcpClients[0][:2] == ("10.0.0.6", 3022)


def test_node_is_found_by_uuid():
    router, reactor, _ = make_router()
    connect(router.route("example", "0b7e-web1"))
    assert reactor.tcpClients[0][:2] == ("10.0.0.5", 3022)


def test_tunnelled_node_goes_through_its_tunnel():
    router, reactor, tunnels = make_router()
    endpoint = router.route("example", "edge7")
    assert connect(endpoint) == "tunnel to edge7"
    assert tunnels == [("example", "edge7", {})]
    assert endpoint.route_kind == "tunnel"
    assert reactor.tcpClients == []


def test_tunnel_lookup_is_told_other_kinds():
    router, _, tunnels = make_router()
    connect(router.route("example", "edge7", kind="kube"))
    assert tunnels == [("example", "edge7", {"kind": "kube"})]


def test_unknown_node_is_not_found_with_a_clear_message():
    router, _, _ = make_router()
    failure = connect(router.route("example", "nope"))
    assert failure.check(NotFound)
    assert str(failure.value) == "node nope not found in cluster example"


def test_tunnelled_node_without_tunnel_is_offline():
    def no_tunnel(cluster, node):
        raise NodeOffline(f"node {node.name}.{cluster} is offline")

    router, _, _ = make_router(tunnel_lookup=no_tunnel)
    failure = connect(router.route("example", "edge7"))
    assert failure.check(NodeOffline)
    assert str(failure.value) == "node edge7.example is offline"


def test_lan_node_refusing_connections_is_offline():
    router, reactor, _ = make_router()
    results = []
    router.route("example", "web1").connect(Factory.forProtocol(Protocol)).addBoth(
        results.append
    )
    connector = reactor.connectors[0]
    reactor.tcpClients[0][2].clientConnectionFailed(
        connector, ierror.ConnectionRefusedError()
    )
    assert results[0].check(NodeOffline)
    assert str(results[0].value) == "node web1.example is offline"


@pytest.mark.parametrize(
    "host, expected_address",
    [
        ("web1.example", ("10.0.0.5", 3022)),  # NAME.CLUSTER
        ("web1", ("10.0.0.5", 3022)),  # NAME alone: the local cluster
        ("WEB1.Example", None),  # cluster match is case-insensitive, names are not
        ("web.prod", ("10.0.0.8", 2222)),  # unknown cluster: a dotted node name
        ("web.prod.example", ("10.0.0.8", 2222)),
        ("web.example", ("10.0.0.9", 3022)),
        ("0b7e-web1.example", ("10.0.0.5", 3022)),  # UUID.CLUSTER
    ],
)
def test_host_names_as_clients_type_them(host, expected_address):
    router, reactor, _ = make_router()
    result = connect(router.route_host(host))
    if expected_address is None:
        assert result.check(NotFound)
    else:
        assert reactor.tcpClients[0][:2] == expected_address


def test_dotted_name_falls_back_to_the_whole_name_in_the_local_cluster():
    nodes = {"api.example": Node("api.example", "u1", "10.0.0.1:3022")}
    router = Router(
        "example", lambda n: succeed(nodes.get(n)), reactor=MemoryReactorClock()
    )
    reactor = router._reactor
    connect(router.route_host("api.example"))
    assert reactor.tcpClients[0][:2] == ("10.0.0.1", 3022)


def test_unknown_dotted_name_names_the_first_candidate():
    router, _, _ = make_router()
    failure = connect(router.route_host("ghost.example"))
    assert str(failure.value) == "node ghost not found in cluster example"


def test_leaf_cluster_nodes_are_routed_through_the_leaf():
    leaf_calls = []

    class LeafRouter:
        def route(self, cluster, name, kind="ssh"):
            leaf_calls.append((cluster, name, kind))
            return RecordingEndpoint(f"{name} via {cluster}")

    leaves = {"leaf.corp": LeafRouter()}
    router, reactor, _ = make_router(leaf_lookup=leaves.get)
    endpoint = router.route_host("node3.leaf.corp")
    assert connect(endpoint) == "node3 via leaf.corp"
    assert leaf_calls == [("leaf.corp", "node3", "ssh")]
    assert endpoint.route_kind == "leaf"


def test_offline_leaf_cluster_reports_it():
    class OfflineLeaf:
        def route(self, cluster, name, kind="ssh"):
            raise ClusterOffline(f"cluster {cluster} is offline")

    router, _, _ = make_router(leaf_lookup={"leaf": OfflineLeaf()}.get)
    failure = connect(router.route("leaf", "n1"))
    assert failure.check(ClusterOffline)


def test_unknown_cluster_is_not_found():
    router, _, _ = make_router()
    with pytest.raises(NotFound, match="cluster elsewhere not found"):
        router.route("elsewhere", "web1")


def test_empty_name_is_a_bad_request():
    router, _, _ = make_router()
    with pytest.raises(BadRequest):
        router.route_host("")


def test_direct_route_for_non_ssh_kind_is_refused():
    router, _, _ = make_router()
    assert connect(router.route("example", "web1", kind="app")).check(NodeOffline)


@pytest.mark.parametrize(
    "address, expected",
    [
        ("10.0.0.1:22", ("10.0.0.1", 22)),
        ("node.lan", ("node.lan", 3022)),
        ("[::1]:2022", ("::1", 2022)),
        ("[::1]", ("::1", 3022)),
        ("::1", ("::1", 3022)),
    ],
)
def test_split_address(address, expected):
    assert split_address(address) == expected


@pytest.mark.parametrize("address", ["", ":22", "host:0", "host:99999", "host:x", "[::1"])
def test_split_address_rejects_malformed(address):
    with pytest.raises(BadRequest):
        split_address(address)


# --- LAN nodes with an agent port ------------------------------------------------------


class FailingEndpoint:
    def __init__(self, error):
        self.error = error

    def connect(self, factory):
        from twisted.internet.defer import fail

        return fail(self.error)


def test_a_lan_node_that_announces_an_agent_port_is_reached_through_it():
    asked = []

    def agent_lookup(node, **extra):
        asked.append((node.name, extra))
        return RecordingEndpoint(f"agent of {node.name}")

    router, reactor, _ = make_router(agent_lookup=agent_lookup)
    endpoint = router.route("example", "web1", source="192.0.2.7:5000")
    assert connect(endpoint) == "agent of web1"
    assert endpoint.route_kind == "agent"
    assert asked == [("web1", {"source": "192.0.2.7:5000"})]
    assert reactor.tcpClients == []


def test_a_lan_node_without_an_agent_is_dialled_over_tcp():
    router, reactor, _ = make_router(agent_lookup=lambda node, **extra: None)
    endpoint = router.route("example", "web1")
    connect(endpoint)
    assert endpoint.route_kind == "direct"
    assert reactor.tcpClients[0][:2] == ("10.0.0.5", 3022)


def test_an_unreachable_agent_port_falls_back_to_tcp():
    router, reactor, _ = make_router(
        agent_lookup=lambda node, **extra: FailingEndpoint(NodeOffline("agent port down")))
    endpoint = router.route("example", "web1")
    connect(endpoint)
    assert endpoint.route_kind == "direct"
    assert reactor.tcpClients[0][:2] == ("10.0.0.5", 3022)


def test_a_node_refusing_the_channel_on_its_agent_port_is_not_retried_over_tcp():
    from edgeaccess.errors import AccessDenied

    router, reactor, _ = make_router(
        agent_lookup=lambda node, **extra: FailingEndpoint(AccessDenied("serves no SSH")))
    endpoint = router.route("example", "web1")
    result = connect(endpoint)
    assert result.check(AccessDenied)
    assert reactor.tcpClients == []
