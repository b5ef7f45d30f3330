"""The user's address is routed along to tunnelled nodes (in memory)."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock

from edgeaccess.proxy.router import Router
from edgeaccess.proxy.sshproxy import ProxyAvatar
from edgeaccess.proxy.tap import _router
from edgeaccess.ssh.forwarding import DirectTCPIPChannel
from edgeaccess.ssh.interfaces import SessionPermissions

from datetime import datetime, timedelta, timezone

from twisted.conch.ssh.forwarding import packOpen_direct_tcpip

from edgeaccess.pki.keys import generate_private_key
from edgeaccess.pki.sshca import issue_user_certificate, user_identity_from_certificate
from edgeaccess.ssh.certauth import VerifiedCertificate

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def avatar_with(router: Router) -> ProxyAvatar:
    cert = issue_user_certificate(
        generate_private_key(), generate_private_key().public_key(), username="alice",
        principals=["root"], roles=["access"], cluster="example", now=NOW,
        ttl=timedelta(hours=1))
    verified = VerifiedCertificate(
        certificate=cert, identity=user_identity_from_certificate(cert), login="root",
        peer_address="127.0.0.1", force_command=None)
    return ProxyAvatar(verified, SessionPermissions(port_forwarding=True), router)


def direct_tcpip(host: str, port: int = 22) -> bytes:
    return packOpen_direct_tcpip((host, port), ("127.0.0.1", 40000))


TUNNELLED = {"name": "edge7", "uuid": "0b7e-edge7", "address": "tunnel"}


class FakeTunnel:
    """An ITunnel recording the channels asked of it."""

    def __init__(self) -> None:
        self.opened: list[tuple] = []

    def connect_channel(self, kind: str, target: str, factory: Any, source: Any = None) -> Any:
        self.opened.append((kind, target, source))
        protocol = factory.buildProtocol(None)
        return succeed(protocol)


def lookup(name: str) -> Any:
    return succeed(TUNNELLED if name in ("edge7", "0b7e-edge7") else None)


def recording_router(**kwargs: Any) -> tuple[Router, list]:
    calls: list = []

    def tunnel_lookup(cluster: str, node: Any, **extra: Any) -> Any:
        calls.append((cluster, node["name"], extra))
        return FakeEndpoint()

    return Router("example", lookup, tunnel_lookup=tunnel_lookup,
                  reactor=MemoryReactorClock(), **kwargs), calls


class FakeEndpoint:
    def connect(self, factory: Any) -> Any:
        return succeed(factory.buildProtocol(None))


def connect(endpoint: Any) -> Any:
    results: list = []
    endpoint.connect(Factory.forProtocol(Protocol)).addBoth(results.append)
    return results[0]


def test_the_router_gives_the_source_to_the_tunnel_lookup() -> None:
    router, calls = recording_router()
    connect(router.route("example", "edge7", source="198.51.100.4:5000"))
    connect(router.route_host("edge7.example", source="198.51.100.5:6000"))
    connect(router.route("example", "edge7", kind="kube", source="198.51.100.6:7000"))
    assert [extra for _, _, extra in calls] == [
        {"source": "198.51.100.4:5000"},
        {"source": "198.51.100.5:6000"},
        {"kind": "kube", "source": "198.51.100.6:7000"},
    ]


def test_without_a_source_the_tunnel_lookup_is_called_as_before() -> None:
    router, calls = recording_router()
    connect(router.route_host("edge7"))
    assert calls == [("example", "edge7", {})]


def test_the_router_gives_the_source_to_a_leaf_cluster() -> None:
    asked: list = []

    class Leaf:
        def route(self, cluster: str, name: str, kind: str = "ssh", source: Any = None) -> Any:
            asked.append((cluster, name, kind, source))
            return FakeEndpoint()

    router, _ = recording_router(leaf_lookup={"leaf": Leaf()}.get)
    connect(router.route_host("n1.leaf", source="203.0.113.1:22"))
    connect(router.route("leaf", "n2"))
    assert asked == [("leaf", "n1", "ssh", "203.0.113.1:22"), ("leaf", "n2", "ssh", None)]


def test_the_proxy_routes_with_the_tunnel_endpoint_carrying_the_source() -> None:
    tunnel = FakeTunnel()

    class Registry:
        def lookup(self, cluster: str, uuid: str) -> Any:
            return tunnel if (cluster, uuid) == ("example", "0b7e-edge7") else None

    class Auth:
        async def find_node(self, name: str) -> Any:
            return TUNNELLED if name == "edge7" else None

    class Clusters:
        def leaf_router(self, cluster: str) -> None:
            return None

    router = _router(MemoryReactorClock(), Auth(), "example", Registry(), Clusters())
    connect(router.route_host("edge7", source="192.0.2.44:40000"))
    connect(router.route_host("edge7"))
    assert tunnel.opened == [("ssh", "0b7e-edge7", "192.0.2.44:40000"),
                             ("ssh", "0b7e-edge7", None)]


class _Conn:
    """Stands for the avatar's SSH connection: its transport's TCP peer."""

    def __init__(self, address: Any) -> None:
        tcp = type("TCP", (), {"getPeer": lambda self: address})()
        self.transport = type("SSHTransport", (), {"transport": tcp})()


def open_through(avatar: ProxyAvatar) -> Any:
    results: list = []
    avatar.lookupChannel(b"direct-tcpip", 5000, 1000, direct_tcpip("edge7.example")).addBoth(
        results.append)
    return results[0]


def test_the_ssh_entry_passes_the_clients_address_as_the_source() -> None:
    router, calls = recording_router()
    avatar = avatar_with(router)
    avatar.conn = _Conn(IPv4Address("TCP", "198.51.100.23", 51515))
    assert isinstance(open_through(avatar), DirectTCPIPChannel)
    assert calls == [("example", "edge7", {"source": "198.51.100.23:51515"})]


def test_the_ssh_entry_falls_back_to_the_verified_peer_address() -> None:
    router, calls = recording_router()
    avatar = avatar_with(router)  # verified from 127.0.0.1, no connection attached
    assert isinstance(open_through(avatar), DirectTCPIPChannel)
    assert calls == [("example", "edge7", {"source": "127.0.0.1:0"})]
