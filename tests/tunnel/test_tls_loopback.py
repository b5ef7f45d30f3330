"""One real tunnel over loopback: TLS 1.3, mutual certificates, ALPN edge-tunnel/1."""

from __future__ import annotations

import random
import socket
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOFactory

from edgeaccess.pki.x509ca import Identity, certificate_pem, identity_from_certificate
from edgeaccess.tunnel import fasttls
from edgeaccess.tunnel.agent import TunnelAgent
from edgeaccess.tunnel.endpoints import TunnelChannelEndpoint
from edgeaccess.tunnel.protocol import ALPN_PROTOCOL, Inventory
from edgeaccess.tunnel.server import TunnelServerFactory
from tests.pkitools import issue_identities


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Collect(Protocol):
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = bytearray()
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= self.expected and not self.done.called:
            self.done.callback(bytes(self.received))


def pki() -> dict[str, Any]:
    return issue_identities([
        ("proxy", Identity(kind="proxy", name="proxy-1", cluster="root"), ("proxy.test",)),
        ("node", Identity(kind="node", name="node-1", cluster="root", uuid="u-1"), ()),
    ])


def peer_identity(transport: Any) -> Identity:
    return identity_from_certificate(transport.getPeerCertificate().to_cryptography())


@pytest_twisted.inlineCallbacks
def test_tunnel_over_mutual_tls_carries_a_channel() -> Any:
    material = pki()
    trust = trustRootFromCertificates([Certificate.loadPEM(certificate_pem(material["ca"]))])
    proxy_key, proxy_cert = material["proxy"]
    server_options = CertificateOptions(
        privateKey=proxy_key,
        certificate=proxy_cert,
        trustRoot=trust,
        raiseMinimumTo=TLSVersion.TLSv1_3,
        acceptableProtocols=[ALPN_PROTOCOL],
    )
    tunnels = TunnelServerFactory(clock=reactor, identity_for=peer_identity)
    port = reactor.listenTCP(0, TLSMemoryBIOFactory(server_options, False, tunnels), interface="127.0.0.1")
    node_key, node_cert = material["node"]
    client_options = optionsForClientTLS(
        "proxy.test",
        trustRoot=trust,
        acceptableProtocols=[ALPN_PROTOCOL],
        extraCertificateOptions={
            "raiseMinimumTo": TLSVersion.TLSv1_3, "privateKey": node_key, "certificate": node_cert,
        },
    )
    address = port.getHost()
    agent = TunnelAgent(
        endpoint_factory=lambda: wrapClientTLS(
            client_options, TCP4ClientEndpoint(reactor, "127.0.0.1", address.port)
        ),
        inventory=Inventory(name="node-1"),
        clock=reactor,
        rng=random.Random(),
        accept_channel=lambda kind, target: Factory.forProtocol(Echo),
    )
    agent.startService()
    try:
        tunnel = yield agent.when_connected().addTimeout(10, reactor)
        assert tunnel.transport.negotiatedProtocol == ALPN_PROTOCOL
        proxy_side = tunnels.registry.lookup("root", "node-1")
        assert proxy_side is not None and proxy_side.identity.uuid == "u-1"
        payload = random.Random(5).randbytes(3 * 1024 * 1024)
        collector = Collect(len(payload))
        factory = Factory.forProtocol(lambda: collector)
        yield TunnelChannelEndpoint(proxy_side, "ssh", "node-1:22").connect(factory)
        collector.transport.write(payload)
        echoed = yield collector.done.addTimeout(20, reactor)
        assert echoed == payload
        # Both ends use the fast TLS I/O once a channel exists.
        for transport in (proxy_side.transport, tunnel.transport):
            assert {"_write", "_flushReceiveBIO", "write"} <= set(vars(transport))
            assert "write" in vars(transport.transport)  # eager TCP writes
            # The short send path below the scheduler (priority is on).
            assert "_isSendBufferFull" in vars(transport.transport)
            sock = transport.transport.getHandle()
            assert sock.getsockopt(socket.IPPROTO_TCP, fasttls._TCP_NOTSENT_LOWAT) == (
                fasttls.NOTSENT_LOWAT)
    finally:
        yield agent.stopService()
        yield port.stopListening()
