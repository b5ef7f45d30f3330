"""What an idle tunnel keeps: TLS buffers given back, a shared attribute table."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient

from twisted.test import iosim

from edgeaccess import tls
from edgeaccess.memory import share_instance_attributes
from edgeaccess.errors import NodeOffline
from edgeaccess.tunnel.agent import AgentTunnelProtocol
from edgeaccess.tunnel.framing import MAX_FAST_FRAME
from edgeaccess.tunnel.protocol import Inventory
from edgeaccess.tunnel.server import SERVER_TUNNEL_ATTRIBUTES, ServerTunnelProtocol
from tests.pkitools import Identity, issue_identities

from .support import Acceptor, Collecting, connected_pair, make_server_factory


@pytest.fixture(scope="module")
def pki() -> dict[str, Any]:
    return issue_identities([
        ("proxy", Identity(kind="proxy", name="proxy.test", cluster="root"), ("proxy.test",)),
        ("node", Identity(kind="node", name="node-1", cluster="root", uuid="u-1"), ()),
    ])


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def tls_pair(pki: dict[str, Any]):
    """A mutual TLS 1.3 connection in memory: (server TLS, client TLS, pump, server app, client app)."""
    key, cert = pki["proxy"]
    server_options = tls.server_options(key, cert, [pki["ca"]], client_certificates="required",
                                        alpn=[b"edge-tunnel/1"])
    node_key, node_cert = pki["node"]
    client_options = tls.client_options("proxy.test", [pki["ca"]], cluster="root", key=node_key, cert=node_cert,
                                        alpn=[b"edge-tunnel/1"])
    server_app, client_app = Recorder(), Recorder()
    clock = MemoryReactorClock()
    server_tls = TLSMemoryBIOFactory(server_options, False, Factory.forProtocol(lambda: server_app),
                                     clock=clock).buildProtocol(None)
    client_tls = TLSMemoryBIOFactory(client_options, True, Factory.forProtocol(lambda: client_app),
                                     clock=clock).buildProtocol(None)
    _, _, pump = connectedServerAndClient(lambda: server_tls, lambda: client_tls)

    def flush() -> None:
        for _ in range(5):
            clock.advance(0)  # the TLS transports aggregate small writes for a reactor turn
            pump.flush()

    flush()
    return server_tls, client_tls, flush, server_app, client_app


def test_shrinking_replaces_the_buffers_of_an_established_connection_and_it_still_works(pki):
    server_tls, client_tls, flush, server_app, client_app = tls_pair(pki)
    connection = server_tls.getHandle()
    before = (connection._into_ssl, connection._from_ssl)

    assert connection._alpn_select_callback_args is not None

    assert tls.shrink_tls_buffers(server_tls) is True

    assert (connection._into_ssl, connection._from_ssl) != before
    assert connection._alpn_select_callback_args is None
    assert server_tls.negotiatedProtocol == b"edge-tunnel/1"
    client_tls.write(b"ping" * 1000)
    server_tls.write(b"pong")
    flush()
    assert server_app.received == b"ping" * 1000
    assert client_app.received == b"pong"
    # Shrinking again (after data) is as harmless.
    assert tls.shrink_tls_buffers(server_tls) is True
    client_tls.write(b"again")
    flush()
    assert server_app.received.endswith(b"again")


def test_shrinking_leaves_a_connection_with_bytes_pending_alone(pki):
    server_tls, client_tls, flush, server_app, _ = tls_pair(pki)
    connection = server_tls.getHandle()
    connection.send(b"not yet flushed")  # straight into the outgoing BIO
    before = (connection._into_ssl, connection._from_ssl)

    assert tls.shrink_tls_buffers(server_tls) is False

    assert (connection._into_ssl, connection._from_ssl) == before


def test_shrinking_needs_a_finished_handshake_over_memory_bios(pki):
    key, cert = pki["proxy"]
    options = tls.server_options(key, cert, [pki["ca"]], client_certificates="required")
    fresh = TLSMemoryBIOFactory(options, False, Factory.forProtocol(Recorder),
                                clock=MemoryReactorClock()).buildProtocol(None)
    fresh.makeConnection(StringTransport())

    assert tls.shrink_tls_buffers(fresh) is False  # the handshake is not done
    assert tls.shrink_tls_buffers(StringTransport()) is False  # no TLS at all


def test_every_attribute_an_idle_proxy_tunnel_sets_is_declared_for_sharing():
    # An attribute missing from SERVER_TUNNEL_ATTRIBUTES would give each
    # tunnel of a burst a dict of its own (~1.3 KB more per idle tunnel).
    clock = MemoryReactorClock()
    factory = make_server_factory(clock, proxies=lambda: ["proxy.test:3024"])
    agent, server, pump, _ = connected_pair(clock, server_factory=factory)
    clock.advance(factory.heartbeat_interval)
    pump.flush()

    assert server.hello_done and not server._is_lost
    assert set(vars(server)) <= set(SERVER_TUNNEL_ATTRIBUTES)
    assert len(SERVER_TUNNEL_ATTRIBUTES) <= 30


def test_tunnels_made_in_a_burst_keep_only_their_values_once_names_are_shared():
    class BurstTunnel(ServerTunnelProtocol):
        """A class of its own: a fresh attribute table, as at proxy start."""

    share_instance_attributes(BurstTunnel, SERVER_TUNNEL_ATTRIBUTES)
    clock = MemoryReactorClock()
    factory = make_server_factory(clock, proxies=lambda: ["proxy.test:3024"])
    factory.protocol = BurstTunnel
    # 60 tunnels exist before any of them says Hello (a reconnect storm).
    servers = [BurstTunnel(factory) for _ in range(60)]
    for server in servers:
        agent = AgentTunnelProtocol(clock=clock, inventory=Inventory(name="node-1"))
        pump = iosim.connect(server, iosim.makeFakeServer(server), agent,
                             iosim.makeFakeClient(agent), greet=False, clock=clock)
        pump.flush(advanceClock=False)
    clock.advance(0)

    assert all(server.hello_done for server in servers)
    assert max(sys.getsizeof(vars(server)) for server in servers) < 600


def test_a_closed_tunnel_still_logs_and_fires_its_waiters():
    agent, server, pump, _ = connected_pair()
    waiter = server.when_lost()
    peer = server._transportPeer
    assert peer is not None and peer == server.transport.getPeer()

    server.disconnect("test")
    pump.flush()

    assert waiter.called
    assert server.closed_reason == "test"
    assert server.when_lost().called


def test_an_idle_tunnel_has_no_multiplexer_until_a_channel_opens():
    acceptor = Acceptor()
    agent, server, pump, _ = connected_pair(accept_channel=acceptor)
    assert server._mux is None and "_mux" not in vars(server)
    assert server.peer_name == "node:node-1.root"

    opened: list[Any] = []
    server.connect_channel("ssh", "node-1:22", Collecting()).addCallback(opened.append)
    pump.flush()

    assert len(opened) == 1 and acceptor.requests == [("ssh", "node-1:22")]
    assert server._mux is not None
    assert server.mux.local_name == "proxy" and server.mux.peer_name == "node:node-1.root"
    # Hello chose fast frames before the multiplexer existed: it knows.
    assert server.mux.max_frame_in == server.mux.max_frame_out == MAX_FAST_FRAME
    opened[0].transport.write(b"hello")
    pump.flush()
    assert bytes(acceptor.protocols[0].received) == b"hello"


def test_a_multiplexer_made_after_the_tunnel_closed_refuses_channels():
    agent, server, pump, _ = connected_pair()
    server.disconnect("test")
    pump.flush()
    assert server._mux is None

    failures: list[Any] = []
    server.connect_channel("ssh", "node-1:22", Collecting()).addErrback(failures.append)

    assert failures and failures[0].check(NodeOffline)


def test_an_answered_question_leaves_no_table_behind():
    clock = MemoryReactorClock()
    factory = make_server_factory(clock, proxies=lambda: ["proxy.test:3024"])
    discovered: list[list[str]] = []
    agent, server, pump, _ = connected_pair(clock, server_factory=factory,
                                            on_discover=discovered.append)
    assert discovered == [["proxy.test:3024"]]  # Discover was asked and answered
    assert server._counter >= 1

    assert server._outstandingRequests == {}
    assert sys.getsizeof(server._outstandingRequests) == sys.getsizeof({})


def test_tunnels_share_the_strings_of_their_labels_and_names():
    def hello(labels: dict[str, str]) -> Any:
        return connected_pair(inventory=Inventory(name="node-1", labels=labels))[1]

    first, second = hello({"env": "prod-eu-1"}), hello({"env": "prod-eu-1"})

    assert first.inventory.labels == {"env": "prod-eu-1"}
    (key_1, value_1), = first.inventory.labels.items()
    (key_2, value_2), = second.inventory.labels.items()
    assert key_1 is key_2 and value_1 is value_2  # not two copies decoded from two Hellos
    assert first.inventory.name is first.identity.name
