"""The tunnel port's ALPN dispatcher and the user relay, over real TLS in memory (iosim)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.internet.address import IPv4Address
from twisted.test.iosim import FakeTransport, connectedServerAndClient

from edgeaccess.errors import NotFound
from edgeaccess.pki.x509ca import Identity, certificate_pem
from edgeaccess.proxy.tlsrouting import ALPN_SSH, tls_routing_factory
from tests.pkitools import issue_identities

TUNNEL_ALPN = b"edge-tunnel/1"
#: Names the user dials (the TLS server name); the test proxy's certificate
#: carries them so that the client's hostname check passes.
TARGETS = ("web.root", "ghost.root")
USER_ADDRESS = IPv4Address("TCP", "10.0.0.7", 40001)


@pytest.fixture(scope="module")
def pki() -> dict[str, Any]:
    return issue_identities([
        ("proxy", Identity(kind="proxy", name="proxy.test", cluster="root"), TARGETS),
        ("alice", Identity(kind="user", name="alice", cluster="root", roles=("access",)), ()),
        ("node", Identity(kind="node", name="node-1", cluster="root", uuid="u-1"), ()),
        ("foreign", Identity(kind="user", name="mallory", cluster="other"), ()),
    ])


class Recorder(Protocol):
    """The tunnel stand-in and the user's client: records what happens."""

    def __init__(self) -> None:
        self.received = b""
        self.made = False
        self.lost = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.lost = True


class FakeEndpoint:
    """What the router answers: connects a protocol to a StringTransport when
    ``result`` (a Deferred or None for at once) fires."""

    def __init__(self, route_kind: str = "direct", result: Deferred | None = None) -> None:
        self.route_kind = None
        self._kind = route_kind
        self._result = result
        self.protocol: Any = None
        self.transport = StringTransport()

    def connect(self, factory) -> Deferred:
        def connected(_):
            self.route_kind = self._kind
            self.protocol = factory.buildProtocol(None)
            self.protocol.makeConnection(self.transport)
            return self.protocol

        if self._result is None:
            return succeed(None).addCallback(connected)
        return self._result.addCallback(connected)


class FakeRouter:
    local_cluster = "root"

    def __init__(self, endpoint: FakeEndpoint | None = None, refuse: Exception | None = None,
                 refuse_at_once: bool = False) -> None:
        self.endpoint = endpoint or FakeEndpoint()
        self.refuse = refuse
        self.refuse_at_once = refuse_at_once
        self.calls: list[tuple] = []

    def route_host(self, host: str, kind: str = "ssh", source: str | None = None):
        self.calls.append((host, kind, source))
        if self.refuse is not None:
            if self.refuse_at_once:
                raise self.refuse
            refusal = self.refuse

            class Refusing:
                route_kind = None

                def connect(self, factory):
                    return fail(refusal)

            return Refusing()
        return self.endpoint


class Connection:
    """A client and the proxy's tunnel port, connected in memory over TLS."""

    def __init__(self, pki, *, client: str, alpn: bytes | None, server_name: str = "web.root",
                 router: FakeRouter | None = None, relay_clock: Any = None) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(datetime.now(timezone.utc).timestamp())
        self.router = router or FakeRouter()
        self.tunnels = Factory.forProtocol(Recorder)
        self.tunnel_protocols: list[Recorder] = []
        build = self.tunnels.buildProtocol

        def build_tunnel(addr):
            protocol = build(addr)
            self.tunnel_protocols.append(protocol)
            return protocol

        self.tunnels.buildProtocol = build_tunnel
        trust = trustRootFromCertificates([Certificate.loadPEM(certificate_pem(pki["ca"]))])
        proxy_key, proxy_cert = pki["proxy"]
        server_options = CertificateOptions(
            privateKey=proxy_key, certificate=proxy_cert, trustRoot=trust,
            raiseMinimumTo=TLSVersion.TLSv1_3, acceptableProtocols=[TUNNEL_ALPN, ALPN_SSH])
        dispatch = tls_routing_factory(self.tunnels, self.router, "root",
                                       relay_clock or self.clock, tunnel_alpn=TUNNEL_ALPN)
        key, cert = pki[client]
        client_options = optionsForClientTLS(
            server_name, trustRoot=trust,
            acceptableProtocols=[alpn] if alpn else None,
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_3,
                                     "privateKey": key, "certificate": cert})
        self.user = Recorder()
        server_factory = TLSMemoryBIOFactory(server_options, False, dispatch, self.clock)
        client_factory = TLSMemoryBIOFactory(client_options, True,
                                             Factory.forProtocol(lambda: self.user), self.clock)
        self.client_tls, self.server_tls, self.pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            serverTransportFactory=lambda protocol: FakeTransport(
                protocol, isServer=True, peerAddress=USER_ADDRESS),
            clock=self.clock)

    def send(self, data: bytes) -> None:
        self.user.transport.write(data)
        self.pump.flush()

    @property
    def node(self) -> FakeEndpoint:
        return self.router.endpoint


def logged_routes(events) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events if "tls route" in e.get("log_format", "")]


# --- dispatch by ALPN -------------------------------------------------------------

def test_edge_tunnel_alpn_gets_the_tunnel_protocol_unchanged(pki):
    conn = Connection(pki, client="node", alpn=TUNNEL_ALPN)
    [tunnel] = conn.tunnel_protocols
    assert tunnel.made and conn.server_tls.wrappedProtocol is tunnel
    assert tunnel.transport.negotiatedProtocol == TUNNEL_ALPN
    conn.send(b"agent hello")
    assert tunnel.received == b"agent hello"
    tunnel.transport.write(b"proxy hello")
    conn.pump.flush()
    assert conn.user.received == b"proxy hello"
    assert conn.router.calls == []


def test_a_connection_without_alpn_is_closed_and_served_by_nobody(pki):
    with capturedLogs() as events:
        conn = Connection(pki, client="alice", alpn=None)
    assert conn.user.lost
    assert conn.tunnel_protocols == [] and conn.router.calls == []
    assert any("ALPN none is not served here" in e.get("log_format", "").replace(
        "{alpn}", e.get("alpn", "")) for e in events)


# --- the user relay ------------------------------------------------------------------

def test_a_user_stream_is_routed_by_server_name_and_spliced_both_ways(pki):
    with capturedLogs() as events:
        conn = Connection(pki, client="alice", alpn=ALPN_SSH)
    [(host, kind, source)] = conn.router.calls
    assert (host, kind) == ("web.root", "ssh")
    assert source == "10.0.0.7:40001"
    assert conn.tunnel_protocols == []
    conn.send(b"SSH-2.0-OpenSSH\r\n")
    assert conn.node.transport.value() == b"SSH-2.0-OpenSSH\r\n"
    conn.node.protocol.dataReceived(b"SSH-2.0-node\r\n")
    conn.pump.flush()
    assert conn.user.received == b"SSH-2.0-node\r\n"
    [line] = logged_routes(events)
    assert "user=alice" in line and "target=web.root" in line
    assert "route=direct" in line and "outcome=ok" in line


def test_each_side_is_registered_as_the_producer_of_the_other(pki):
    conn = Connection(pki, client="alice", alpn=ALPN_SSH)
    assert conn.node.transport.producer is conn.server_tls
    # The TLS wrapper hands its producer, wrapped, to the transport below it.
    assert conn.server_tls._producer._producer is conn.node.transport


def test_bytes_sent_before_the_node_answers_are_held_then_delivered(pki):
    pending: Deferred = Deferred()
    router = FakeRouter(FakeEndpoint(route_kind="tunnel", result=pending))
    conn = Connection(pki, client="alice", alpn=ALPN_SSH, router=router)
    conn.send(b"early bytes")
    assert conn.node.protocol is None
    pending.callback(None)
    conn.pump.flush()
    assert conn.node.transport.value() == b"early bytes"
    conn.send(b" and later ones")
    assert conn.node.transport.value() == b"early bytes and later ones"


def test_the_node_closing_closes_the_users_stream_after_its_bytes(pki):
    conn = Connection(pki, client="alice", alpn=ALPN_SSH)
    conn.node.protocol.dataReceived(b"last words")
    conn.node.protocol.connectionLost(None)
    conn.pump.flush()
    assert conn.user.received == b"last words"
    assert conn.user.lost
    assert conn.server_tls._producer is None


def test_the_user_leaving_closes_the_node_connection(pki):
    conn = Connection(pki, client="alice", alpn=ALPN_SSH)
    conn.user.transport.loseConnection()
    conn.pump.flush()
    assert conn.node.transport.disconnecting
    assert conn.node.transport.producer is None


def test_the_user_leaving_while_connecting_drops_the_late_node_connection(pki):
    pending: Deferred = Deferred()
    router = FakeRouter(FakeEndpoint(result=pending))
    with capturedLogs() as events:
        conn = Connection(pki, client="alice", alpn=ALPN_SSH, router=router)
        conn.user.transport.loseConnection()
        conn.pump.flush()
        pending.callback(None)
    assert conn.node.transport.disconnecting
    assert "outcome=user left while connecting" in logged_routes(events)[-1]


@pytest.mark.parametrize("at_once", [False, True])
def test_an_unknown_node_closes_the_stream_with_one_routing_line(pki, at_once):
    router = FakeRouter(refuse=NotFound("node ghost not found in cluster root"),
                        refuse_at_once=at_once)
    with capturedLogs() as events:
        conn = Connection(pki, client="alice", alpn=ALPN_SSH, server_name="ghost.root",
                          router=router)
    assert conn.user.lost and conn.user.received == b""
    [line] = logged_routes(events)
    assert "user=alice" in line and "target=ghost.root" in line
    assert "outcome=refused: node ghost not found in cluster root" in line


@pytest.mark.parametrize("client, why", [
    ("node", "only user certificates"),
    ("foreign", "certificate of cluster other"),
])
def test_identities_other_than_this_clusters_users_are_refused(pki, client, why):
    with capturedLogs() as events:
        conn = Connection(pki, client=client, alpn=ALPN_SSH)
    assert conn.user.lost and conn.router.calls == []
    [line] = logged_routes(events)
    assert "outcome=refused" in line and why in line


def test_a_certificate_expired_by_the_injected_clock_is_refused(pki):
    later = MemoryReactorClock()
    later.advance((datetime.now(timezone.utc) + timedelta(hours=2)).timestamp())
    with capturedLogs() as events:
        conn = Connection(pki, client="alice", alpn=ALPN_SSH, relay_clock=later)
    assert conn.user.lost and conn.router.calls == []
    assert "client certificate is not valid now" in logged_routes(events)[0]
