"""Batched TLS reads and writes, eager TCP writes (``edgeaccess.tunnel.fasttls``).

TLS runs for real (pyOpenSSL, TLS 1.3, in memory through iosim); the TCP
tests use a real socket pair under Twisted's ``tcp.Connection``.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from edgeaccess import internals
from edgeaccess import tls as edge_tls
from edgeaccess.tunnel.fasttls import FLUSH_AT, READ_BATCH, eager_tcp_writes, install_fast_tls
from tests.pkitools import Identity, issue_identities


class Recorder(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lost: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Any) -> None:
        self.lost = reason

    @property
    def received(self) -> bytes:
        return b"".join(self.chunks)


@pytest.fixture(scope="module")
def options() -> tuple[Any, Any]:
    pki = issue_identities(
        [("proxy", Identity(kind="proxy", name="p", cluster="root"), ("proxy.test",))])
    key, cert = pki["proxy"]
    server = edge_tls.server_options(key, cert, [pki["ca"]])
    client = edge_tls.client_options("proxy.test", [pki["ca"]], cluster="root")
    return server, client


def tls_pair(options: tuple[Any, Any]) -> tuple[Any, Recorder, Any, Recorder, iosim.IOPump, Any]:
    """A TLS client and server joined in memory, handshake done."""
    server_options, client_options = options
    clock = MemoryReactorClock()
    server_app, client_app = Recorder(), Recorder()
    server_factory = TLSMemoryBIOFactory(server_options, False,
                                         Factory.forProtocol(lambda: server_app), clock)
    client_factory = TLSMemoryBIOFactory(client_options, True,
                                         Factory.forProtocol(lambda: client_app), clock)
    server = server_factory.buildProtocol(None)
    client = client_factory.buildProtocol(None)
    pump = iosim.connect(server, iosim.makeFakeServer(server), client,
                         iosim.makeFakeClient(client), greet=False, clock=clock)
    pump.flush()
    assert client.negotiatedProtocol is None and client_app.transport is client
    return server, server_app, client, client_app, pump, clock


def count_writes(transport: Any) -> list[int]:
    sizes: list[int] = []
    original = transport.write

    def write(data: bytes) -> None:
        sizes.append(len(data))
        original(data)

    transport.write = write
    return sizes


def test_stock_twisted_delivers_a_large_write_record_by_record(options) -> None:
    # The baseline the module improves on (and a check that the test sees it).
    server, server_app, client, client_app, pump, clock = tls_pair(options)
    client.write(os.urandom(100_000))
    clock.advance(0)
    pump.flush()
    assert len(server_app.chunks) >= 6


def test_records_of_one_read_arrive_as_one_piece(options) -> None:
    server, server_app, client, client_app, pump, clock = tls_pair(options)
    assert install_fast_tls(server, clock) and install_fast_tls(client, clock)
    payload = os.urandom(100_000)
    client.write(payload)
    pump.flush()
    assert server_app.chunks == [payload]


def test_a_read_larger_than_the_batch_is_delivered_in_batches_in_order(options) -> None:
    server, server_app, client, client_app, pump, clock = tls_pair(options)
    install_fast_tls(server, clock)
    install_fast_tls(client, clock)
    payload = os.urandom(3 * READ_BATCH + 5)
    client.write(payload)
    pump.flush()
    assert server_app.received == payload
    assert 3 < len(server_app.chunks) <= 5
    assert max(map(len, server_app.chunks)) <= READ_BATCH


def test_a_large_write_leaves_in_one_piece_and_small_ones_wait_for_the_turn(options) -> None:
    server, server_app, client, client_app, pump, clock = tls_pair(options)
    install_fast_tls(server, clock)
    install_fast_tls(client, clock)
    wire = count_writes(client.transport)
    client.write(os.urandom(200_000))
    assert len(wire) == 1 and wire[0] > 200_000  # records and their overhead
    client.write(b"a")
    client.write(bytearray(b"b"))  # a mutable buffer is copied, not kept
    assert len(wire) == 1
    clock.advance(0)
    assert len(wire) == 2
    pump.flush()
    assert server_app.received.endswith(b"ab")
    client.write(b"x" * (FLUSH_AT - 1))
    client.write(b"y")  # reaching FLUSH_AT sends both at once, in order
    assert len(wire) == 3
    pump.flush()
    assert server_app.received.endswith(b"x" * (FLUSH_AT - 1) + b"y")


def test_a_small_reply_written_during_a_read_leaves_when_the_read_is_delivered(options) -> None:
    server, server_app, client, client_app, pump, clock = tls_pair(options)
    install_fast_tls(server, clock)
    install_fast_tls(client, clock)
    server_app.dataReceived = lambda data: server.write(b"ack %d" % len(data))
    client.write(os.urandom(40_000))
    pump.flush(advanceClock=False)  # no reactor turn: no timer may be needed
    assert client_app.received == b"ack 40000"
    assert not clock.getDelayedCalls()


@pytest.mark.parametrize("per_turn", [True, False])
def test_a_shared_transport_gathers_what_other_reads_write_until_the_turn_ends(
        options, per_turn) -> None:
    # A tunnel (``shared``) written to by two users' connections, each read
    # delivering one request: with gather_for_the_turn both requests leave in
    # one write at the end of the reactor turn; without, one write each when
    # its read ends (the shared transport's own reads still flush at once).
    shared, shared_app, peer, peer_app, shared_pump, shared_clock = tls_pair(options)
    for transport in (shared, peer):
        install_fast_tls(transport, shared_clock)
    if per_turn:
        assert internals.gather_for_the_turn(shared)
    wire = count_writes(shared.transport)
    users = []
    for name in (b"one", b"two"):
        server, server_app, client, client_app, pump, clock = tls_pair(options)
        install_fast_tls(server, clock)
        install_fast_tls(client, clock)
        server_app.dataReceived = (
            lambda data, name=name: shared.write(b"[%s:%s]" % (name, data)))
        users.append((client, pump, clock))
    for client, pump, clock in users:
        client.write(b"GET")
        clock.advance(0)  # the user's own clock: the shared one stays put
        pump.flush(advanceClock=False)
    assert len(wire) == (0 if per_turn else 2)
    shared_clock.advance(0)  # the end of the turn
    assert len(wire) == 1 if per_turn else 2
    shared_pump.flush()
    assert peer_app.received == b"[one:GET][two:GET]"
    # A reply written during the shared transport's own read leaves when that
    # read ends, without a timer, either way.
    shared_app.dataReceived = lambda data: shared.write(b"ack")
    peer.write(os.urandom(40_000))  # large: leaves at once
    shared_pump.flush(advanceClock=False)
    assert peer_app.received.endswith(b"ack")
    assert not shared_clock.getDelayedCalls()


def test_gathering_for_the_turn_needs_a_fast_tls_transport(options) -> None:
    server, server_app, client, client_app, pump, clock = tls_pair(options)
    assert internals.gather_for_the_turn(client) is False  # stock Twisted TLS
    client.write(b"still works")
    clock.advance(0)
    pump.flush()
    assert server_app.received == b"still works"


def test_steady_reads_and_writes_make_no_pyopenssl_error_round_trips(options, monkeypatch):
    # pyOpenSSL raises WantReadError at the end of every read, for an empty
    # send BIO, and checks errors after every successful SSL_write: the fast
    # transport asks OpenSSL itself and goes through pyOpenSSL only on errors.
    from OpenSSL import SSL

    server, server_app, client, client_app, pump, clock = tls_pair(options)
    install_fast_tls(server, clock)
    install_fast_tls(client, clock)
    server_app.dataReceived = lambda data: server.write(b"ack %d" % len(data))
    calls = []
    for name in ("_raise_ssl_error", "bio_write", "bio_read", "recv", "send"):
        original = getattr(SSL.Connection, name)
        monkeypatch.setattr(SSL.Connection, name,
                            lambda self, *a, _o=original, _n=name: calls.append(_n) or _o(self, *a))
    for size in (10, 70_000, 3):
        client.write(os.urandom(size))
        clock.advance(0)
        pump.flush()
    assert client_app.received == b"ack 10ack 70000ack 3"
    assert calls == []


def test_data_before_a_close_alert_is_delivered_then_the_connection_ends(options) -> None:
    server, server_app, client, client_app, pump, clock = tls_pair(options)
    install_fast_tls(server, clock)
    install_fast_tls(client, clock)
    client.write(b"last words")
    client.loseConnection()  # flushes the aggregator, then close_notify
    pump.flush()
    assert server_app.received == b"last words"
    assert server_app.lost is not None and server_app.lost.check(ConnectionDone)


def test_a_corrupted_record_ends_the_connection_with_a_tls_error(options) -> None:
    server, server_app, client, client_app, pump, clock = tls_pair(options)
    install_fast_tls(server, clock)
    client.write(b"fine")
    pump.flush()
    server.dataReceived(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # a forged record
    pump.flush()
    assert server_app.received == b"fine"
    assert server_app.lost is not None and not server_app.lost.check(ConnectionDone)


def test_other_transports_are_left_alone() -> None:
    from twisted.internet.testing import StringTransport

    transport = StringTransport()
    assert install_fast_tls(transport) is False
    assert eager_tcp_writes(transport) is False
    assert "write" not in vars(transport)


class _Sink(Protocol):
    pass


def tcp_pair() -> tuple[Any, socket.socket, MemoryReactorClock]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    reactor = MemoryReactorClock()
    theirs.settimeout(10)
    connection = tcp.Connection(ours, _Sink(), reactor)
    connection.connected = True  # what tcp.Server/Client set once connected
    connection.protocol.makeConnection(connection)
    return connection, theirs, reactor


def test_eager_writes_reach_the_socket_at_once_and_queue_the_rest() -> None:
    connection, theirs, reactor = tcp_pair()
    try:
        assert eager_tcp_writes(connection)
        connection.write(b"now")
        assert theirs.recv(10) == b"now"  # no reactor turn was needed
        assert connection not in reactor.getWriters()
        big = os.urandom(8 * 1024 * 1024)  # more than the socket buffers hold
        connection.write(big)
        assert connection in reactor.getWriters()  # the rest waits for doWrite
        queued = connection._tempDataLen
        assert 0 < queued < len(big)  # the socket took what it could at once
        connection.write(b"after")  # queued behind, never ahead
        assert connection._tempDataLen == queued + 5
        received = bytearray()
        theirs.setblocking(False)
        while len(received) < len(big) + 5:
            try:
                received += theirs.recv(1 << 20)
            except BlockingIOError:
                connection.doWrite()
        assert bytes(received) == big + b"after"
    finally:
        connection.socket.close()
        theirs.close()
