"""The user's address across a trusted-cluster hop: root -> leaf -> leaf node."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from edgeaccess import errors
from edgeaccess.cluster.leaf import LeafLinks
from edgeaccess.cluster.root import RootClusters
from edgeaccess.tunnel.channels import TunnelAddress


class FakeTunnel:
    def __init__(self) -> None:
        self.opened: list[tuple] = []

    def connect_channel(self, kind: str, target: str, factory: Any, source: Any = None) -> Any:
        self.opened.append((kind, target, source))
        return succeed(factory.buildProtocol(None))


class Factory:
    def buildProtocol(self, addr: Any) -> object:
        return object()


def test_the_root_opens_the_leaf_channel_with_the_users_source() -> None:
    clusters = RootClusters(auth=None)
    clusters.known = {"leaf"}
    tunnel = FakeTunnel()
    clusters.tunnels["leaf"] = tunnel
    route = clusters.leaf_router("leaf")
    route.route("leaf", "n1", "ssh", source="198.51.100.8:4000").connect(Factory())
    route.route("leaf", "n2", "ssh").connect(Factory())
    assert tunnel.opened == [("cluster", "ssh:n1", "198.51.100.8:4000"),
                             ("cluster", "ssh:n2", None)]


class FakeTrust:
    def __init__(self) -> None:
        self.links = None
        self.auth = type("Auth", (), {"cluster_name": "leaf"})()


class RecordingRouter:
    def __init__(self) -> None:
        self.asked: list = []

    def route(self, cluster: str, name: str, kind: str = "ssh", source: Any = None) -> Any:
        self.asked.append((cluster, name, kind, source))
        raise errors.NotFound(f"node {name} not found")


def test_the_leaf_routes_to_its_node_with_the_source_the_root_asserted() -> None:
    router = RecordingRouter()
    links = LeafLinks(FakeTrust(), router, Clock())
    links.current = {"root": {"name": "root"}}
    factory = links._accept("root", "cluster", "ssh:leafnode")
    for peer in (TunnelAddress("proxy", "cluster", "ssh:leafnode", 2, "192.0.2.5:3300"),
                 TunnelAddress("proxy", "cluster", "ssh:leafnode", 4)):
        try:
            factory.endpoint_for(peer)
        except errors.NotFound:
            pass
    assert router.asked == [("leaf", "leafnode", "ssh", "192.0.2.5:3300"),
                            ("leaf", "leafnode", "ssh", None)]


def test_a_splice_with_peer_routes_with_the_inbound_connections_address() -> None:
    from twisted.internet.defer import Deferred
    from twisted.internet.testing import StringTransport

    from edgeaccess.proxy.splice import SpliceFactory

    seen: list = []

    class Pending:
        def connect(self, factory: Any) -> Deferred:
            return Deferred()

    def endpoint_for(peer: Any) -> Pending:
        seen.append(peer)
        return Pending()

    address = TunnelAddress("proxy", "cluster", "ssh:n", 2, "192.0.2.7:1")
    inbound = SpliceFactory(endpoint_for, "n.leaf", with_peer=True).buildProtocol(address)
    inbound.makeConnection(StringTransport(peerAddress=address))
    assert [peer.host for peer in seen] == ["192.0.2.7"]
