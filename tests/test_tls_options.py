"""TLS set-up (``edgeaccess.tls``) raises no deprecation warning: pyOpenSSL
deprecates its own X509/PKey objects in contexts, and service-identity's
older releases used its deprecated extension API. Here both become errors."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from edgeaccess import tls
from tests.pkitools import Identity, issue_identities


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


@pytest.fixture(scope="module")
def pki() -> dict[str, Any]:
    return issue_identities([
        ("proxy", Identity(kind="proxy", name="proxy.test", cluster="root"), ("proxy.test",)),
        ("node", Identity(kind="node", name="node-1", cluster="root", uuid="u-1"), ()),
    ])


def handshake(server_options: Any, client_options: Any) -> tuple[Any, Any, Recorder]:
    clock = MemoryReactorClock()
    server_app, client_app = Recorder(), Recorder()
    server = TLSMemoryBIOFactory(server_options, False, Factory.forProtocol(lambda: server_app),
                                 clock=clock).buildProtocol(None)
    client = TLSMemoryBIOFactory(client_options, True, Factory.forProtocol(lambda: client_app),
                                 clock=clock).buildProtocol(None)
    _, _, pump = iosim.connectedServerAndClient(lambda: server, lambda: client)
    client.write(b"hello")
    for _ in range(3):
        clock.advance(0)
        pump.flush()
    return server, client, server_app


@pytest.mark.parametrize("client_certificates", ["none", "optional", "required"])
def test_tls_set_up_and_handshake_raise_no_deprecation_warning(pki, client_certificates):
    key, cert = pki["proxy"]
    node_key, node_cert = pki["node"]
    with_cert = client_certificates != "none"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        server_options = tls.server_options(key, cert, [pki["ca"]],
                                            client_certificates=client_certificates,
                                            alpn=[b"edge-tunnel/1"])
        client_options = tls.client_options(
            "proxy.test", [pki["ca"]], cluster="root", key=node_key if with_cert else None,
            cert=node_cert if with_cert else None, alpn=[b"edge-tunnel/1"])
        server, client, server_app = handshake(server_options, client_options)
        # Verification ran (service-identity checked the name) and data moved.
        assert server_app.received == b"hello"
        assert client.negotiatedProtocol == b"edge-tunnel/1"
        identity = tls.peer_identity(server)
        assert (identity is not None and identity.name == "node-1") is with_cert
        assert tls.peer_certificate(client) is not None  # the server's, verified


def test_the_https_policy_raises_no_deprecation_warning(pki):
    key, cert = pki["proxy"]
    node_key, node_cert = pki["node"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        policy = tls.ClusterPolicy([pki["ca"]], cluster="root",
                                   credentials=lambda: (node_key, node_cert))
        creator = policy.creatorForNetloc(b"proxy.test", 3080)
        server, client, server_app = handshake(
            tls.server_options(key, cert, [pki["ca"]], client_certificates="required"), creator)
        assert server_app.received == b"hello"
