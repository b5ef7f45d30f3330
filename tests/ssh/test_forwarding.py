"""The direct-tcpip splice, in memory: a real Conch connection service driven
with packets, a fake SSH transport recording what it sends, and a fake
target transport standing for TCP or a tunnel channel."""

from __future__ import annotations

import struct

import pytest
from twisted.conch.avatar import ConchUser
from twisted.conch.ssh import common, connection
from twisted.conch.ssh.forwarding import packOpen_direct_tcpip
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from edgeaccess.errors import AccessDenied, BadRequest, NodeOffline, NotFound
from edgeaccess.ssh.forwarding import (
    MAX_PACKET,
    WINDOW_SIZE,
    DirectTCPIPChannel,
    ForwardingSSHConnection,
    open_direct_tcpip,
    parse_direct_tcpip,
)

CLIENT_CHANNEL = 7


class FakeTarget(StringTransport):
    """A target transport with half-close, like TCP and tunnel channels."""

    def __init__(self) -> None:
        super().__init__()
        self.write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class FakeEndpoint:
    """Connects on demand; the test decides when and how."""

    def __init__(self) -> None:
        self.attempts: list[Deferred] = []
        self.protocol = None
        self.transport = FakeTarget()
        self.cancelled = False

    def connect(self, factory):
        def cancel(d):
            self.cancelled = True

        d = Deferred(cancel)
        self.attempts.append(d)
        self._factory = factory
        return d

    def succeed(self):
        self.protocol = self._factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        self.attempts[-1].callback(self.protocol)

    def fail(self, error: Exception):
        self.attempts[-1].errback(Failure(error))


class FakeSSHTransport:
    """Stands for the SSH transport under the connection service."""

    def __init__(self, avatar) -> None:
        self.avatar = avatar
        self.packets: list[tuple[int, bytes]] = []
        self.transport = StringTransport()

    def sendPacket(self, kind: int, payload: bytes) -> None:
        self.packets.append((kind, payload))

    def logPrefix(self) -> str:
        return "fake"

    def take(self, kind: int | None = None) -> list[bytes]:
        """Packets sent since last call, optionally of one kind only."""
        taken, self.packets = self.packets, []
        return [p for k, p in taken if kind is None or k == kind]


class Avatar(ConchUser):
    def __init__(self, endpoint) -> None:
        super().__init__()
        self.endpoint = endpoint

    def lookupChannel(self, channelType, windowSize, maxPacket, data):
        (host, port), _origin = parse_direct_tcpip(data)
        return open_direct_tcpip(
            self.endpoint,
            remote_window=windowSize,
            remote_max_packet=maxPacket,
            avatar=self,
            target_description=f"{host}:{port}",
        )


class Harness:
    def __init__(self, client_window: int = WINDOW_SIZE, client_packet: int = MAX_PACKET):
        self.endpoint = FakeEndpoint()
        self.ssh = FakeSSHTransport(Avatar(self.endpoint))
        self.conn = ForwardingSSHConnection()
        self.conn.transport = self.ssh
        self.conn.serviceStarted()
        self.client_window = client_window
        self.client_packet = client_packet

    def request_open(self) -> None:
        self.conn.ssh_CHANNEL_OPEN(
            common.NS(b"direct-tcpip")
            + struct.pack(">3L", CLIENT_CHANNEL, self.client_window, self.client_packet)
            + packOpen_direct_tcpip(("web1", 3022), ("127.0.0.1", 50000))
        )

    def open(self) -> DirectTCPIPChannel:
        self.request_open()
        self.endpoint.succeed()
        (confirmation,) = self.ssh.take(connection.MSG_CHANNEL_OPEN_CONFIRMATION)
        sender, self.local_id, window, packet = struct.unpack(">4L", confirmation[:16])
        assert sender == CLIENT_CHANNEL
        assert (window, packet) == (WINDOW_SIZE, MAX_PACKET)
        return self.conn.channels[self.local_id]

    @property
    def target(self) -> FakeTarget:
        return self.endpoint.transport

    def client_sends(self, data: bytes) -> None:
        self.conn.ssh_CHANNEL_DATA(struct.pack(">L", self.local_id) + common.NS(data))

    def client_eof(self) -> None:
        self.conn.ssh_CHANNEL_EOF(struct.pack(">L", self.local_id))

    def client_close(self) -> None:
        self.conn.ssh_CHANNEL_CLOSE(struct.pack(">L", self.local_id))

    def client_grants(self, credit: int) -> None:
        self.conn.ssh_CHANNEL_WINDOW_ADJUST(struct.pack(">2L", self.local_id, credit))

    def data_to_client(self) -> bytes:
        return b"".join(
            common.getNS(p[4:])[0] for p in self.ssh.take(connection.MSG_CHANNEL_DATA)
        )

    def window_granted(self) -> int:
        return sum(
            struct.unpack(">2L", p)[1]
            for p in self.ssh.take(connection.MSG_CHANNEL_WINDOW_ADJUST)
        )


def open_failure_of(payload: bytes) -> tuple[int, int, str]:
    sender, code = struct.unpack(">2L", payload[:8])
    return sender, code, common.getNS(payload[8:])[0].decode()


def test_bytes_flow_both_ways():
    h = Harness()
    h.open()
    h.client_sends(b"hello node")
    assert h.target.value() == b"hello node"
    h.endpoint.protocol.dataReceived(b"hello client")
    assert h.data_to_client() == b"hello client"


def test_channel_is_confirmed_only_once_the_target_is_connected():
    h = Harness()
    h.request_open()
    assert h.ssh.packets == []
    h.endpoint.succeed()
    assert [k for k, _ in h.ssh.packets] == [connection.MSG_CHANNEL_OPEN_CONFIRMATION]


def test_target_bytes_sent_before_confirmation_arrive_first_and_in_order():
    h = Harness()
    h.request_open()
    h.endpoint.protocol = h.endpoint._factory.buildProtocol(None)
    h.endpoint.protocol.makeConnection(h.target)
    # Nothing may be read from the target before the client knows the channel.
    assert h.target.producerState == "paused"
    h.endpoint.protocol.dataReceived(b"SSH-2.0-banner\r\n")
    h.endpoint.attempts[-1].callback(h.endpoint.protocol)
    kinds = [k for k, _ in h.ssh.packets]
    assert kinds == [connection.MSG_CHANNEL_OPEN_CONFIRMATION, connection.MSG_CHANNEL_DATA]
    assert h.target.producerState == "producing"
    h.endpoint.protocol.dataReceived(b"more")
    assert h.data_to_client() == b"SSH-2.0-banner\r\nmore"


def test_window_is_reopened_while_the_target_keeps_up():
    h = Harness()
    h.open()
    chunk = b"x" * MAX_PACKET
    for _ in range(WINDOW_SIZE // MAX_PACKET // 2 + 1):
        h.client_sends(chunk)
    assert h.window_granted() > 0


def test_no_window_is_granted_while_the_target_is_paused():
    h = Harness()
    channel = h.open()
    chunk = b"y" * MAX_PACKET
    h.client_sends(chunk)
    channel.pauseProducing()  # the target's buffer is full
    sent = len(chunk)
    while sent + len(chunk) <= WINDOW_SIZE:
        h.client_sends(chunk)
        sent += len(chunk)
    assert h.window_granted() == 0
    assert channel.localWindowLeft == WINDOW_SIZE - sent
    assert len(h.target.value()) == sent
    # The target drained its buffer: what was held back is granted, no more.
    channel.resumeProducing()
    assert h.window_granted() == sent
    assert channel.localWindowLeft == WINDOW_SIZE


def test_client_exceeding_the_window_is_cut_off():
    h = Harness()
    channel = h.open()
    channel.pauseProducing()
    chunk = b"z" * MAX_PACKET
    for _ in range(WINDOW_SIZE // MAX_PACKET):
        h.client_sends(chunk)
    h.ssh.take()
    h.client_sends(b"one byte too many")
    assert h.ssh.take(connection.MSG_CHANNEL_CLOSE)
    assert len(h.target.value()) == WINDOW_SIZE


def test_target_is_paused_while_the_client_window_is_full():
    h = Harness(client_window=100, client_packet=40)
    h.open()
    h.endpoint.protocol.dataReceived(b"a" * 150)
    assert h.data_to_client() == b"a" * 100
    assert h.target.producerState == "paused"
    h.client_grants(30)
    assert h.data_to_client() == b"a" * 30
    assert h.target.producerState == "paused"
    h.client_grants(1000)
    assert h.data_to_client() == b"a" * 20
    assert h.target.producerState == "producing"


def test_client_packets_respect_its_maximum_packet_size():
    h = Harness(client_packet=1000)
    h.open()
    h.endpoint.protocol.dataReceived(b"p" * 2500)
    sizes = [len(common.getNS(p[4:])[0]) for p in h.ssh.take(connection.MSG_CHANNEL_DATA)]
    assert sizes == [1000, 1000, 500]


def test_client_eof_half_closes_the_target_and_replies_still_flow():
    h = Harness()
    h.open()
    h.client_sends(b"request")
    h.client_eof()
    assert h.target.write_closed
    assert not h.target.disconnecting
    h.endpoint.protocol.dataReceived(b"response")
    assert h.data_to_client() == b"response"
    assert h.ssh.take(connection.MSG_CHANNEL_CLOSE) == []


def test_target_eof_is_sent_to_the_client_and_requests_still_flow():
    h = Harness()
    h.open()
    h.endpoint.protocol.readConnectionLost()
    assert len(h.ssh.take(connection.MSG_CHANNEL_EOF)) == 1
    h.client_sends(b"still writing")
    assert h.target.value() == b"still writing"
    assert not h.target.disconnecting


def test_target_eof_waits_for_data_held_by_the_client_window():
    h = Harness(client_window=10)
    h.open()
    h.endpoint.protocol.dataReceived(b"0123456789abcdef")
    h.endpoint.protocol.readConnectionLost()
    kinds = [k for k, _ in h.ssh.packets]
    assert connection.MSG_CHANNEL_EOF not in kinds
    h.ssh.take()
    h.client_grants(100)
    kinds = [k for k, _ in h.ssh.packets]
    assert kinds == [connection.MSG_CHANNEL_DATA, connection.MSG_CHANNEL_EOF]


def test_both_eofs_close_the_target_and_then_the_channel():
    h = Harness()
    h.open()
    h.client_eof()
    h.endpoint.protocol.readConnectionLost()
    assert h.target.disconnecting
    h.ssh.take()
    h.endpoint.protocol.connectionLost(Failure(ierror.ConnectionDone()))
    assert [k for k, _ in h.ssh.packets] == [connection.MSG_CHANNEL_CLOSE]
    h.client_close()
    assert h.conn.channels == {}


def test_target_disconnect_sends_eof_then_close():
    h = Harness()
    h.open()
    h.endpoint.protocol.connectionLost(Failure(ierror.ConnectionLost()))
    kinds = [k for k, _ in h.ssh.packets]
    assert kinds == [connection.MSG_CHANNEL_EOF, connection.MSG_CHANNEL_CLOSE]


def test_client_close_closes_the_target():
    h = Harness(client_window=10)
    h.open()
    h.endpoint.protocol.dataReceived(b"more than the window allows")
    h.ssh.take()
    h.client_close()
    assert h.target.disconnecting
    assert h.target.producer is None
    assert [k for k, _ in h.ssh.packets] == [connection.MSG_CHANNEL_CLOSE]
    assert h.conn.channels == {}


@pytest.mark.parametrize(
    "error, code, message",
    [
        (NodeOffline("node web1.example is offline"), connection.OPEN_CONNECT_FAILED,
         "node web1.example is offline"),
        (NotFound("node web1 not found in cluster example"), connection.OPEN_CONNECT_FAILED,
         "node web1 not found in cluster example"),
        (AccessDenied("user alice is locked"), connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
         "user alice is locked"),
        (ierror.ConnectionRefusedError(), connection.OPEN_CONNECT_FAILED,
         "connection refused to web1:3022"),
        (ierror.TCPTimedOutError(), connection.OPEN_CONNECT_FAILED,
         "connection timed out to web1:3022"),
        (RuntimeError("secret internals"), connection.OPEN_CONNECT_FAILED,
         "cannot connect to web1:3022"),
    ],
)
def test_unreachable_target_is_an_open_failure_with_a_clear_message(error, code, message):
    h = Harness()
    h.request_open()
    h.endpoint.fail(error)
    (payload,) = h.ssh.take(connection.MSG_CHANNEL_OPEN_FAILURE)
    assert open_failure_of(payload) == (CLIENT_CHANNEL, code, message)
    assert h.conn.channels == {}


def test_malformed_open_request_is_refused():
    h = Harness()
    h.conn.ssh_CHANNEL_OPEN(
        common.NS(b"direct-tcpip") + struct.pack(">3L", 3, 1000, 1000) + b"\x00\x00"
    )
    (payload,) = h.ssh.take(connection.MSG_CHANNEL_OPEN_FAILURE)
    assert open_failure_of(payload) == (3, connection.OPEN_CONNECT_FAILED,
                                        "malformed direct-tcpip request")


def test_lost_ssh_connection_cancels_a_pending_connect():
    h = Harness()
    h.request_open()
    h.conn.serviceStopped()
    assert h.endpoint.cancelled
    assert h.ssh.packets == []


def test_lost_ssh_connection_closes_the_target():
    h = Harness()
    h.open()
    h.conn.serviceStopped()
    assert h.target.disconnecting


def test_synchronous_channels_are_still_confirmed_at_once():
    class SyncAvatar(ConchUser):
        def lookupChannel(self, channelType, windowSize, maxPacket, data):
            from twisted.conch.ssh.channel import SSHChannel

            return SSHChannel(remoteWindow=windowSize, remoteMaxPacket=maxPacket)

    ssh = FakeSSHTransport(SyncAvatar())
    conn = ForwardingSSHConnection()
    conn.transport = ssh
    conn.serviceStarted()
    conn.ssh_CHANNEL_OPEN(common.NS(b"session") + struct.pack(">3L", 1, 1000, 1000))
    assert [k for k, _ in ssh.packets] == [connection.MSG_CHANNEL_OPEN_CONFIRMATION]


def test_parse_direct_tcpip_reads_target_and_origin():
    data = packOpen_direct_tcpip(("web1.example", 22), ("10.0.0.9", 41000))
    assert parse_direct_tcpip(data) == (("web1.example", 22), ("10.0.0.9", 41000))
    with pytest.raises(BadRequest):
        parse_direct_tcpip(data[:5])


# -- write_channel_data: the packets within the window leave in one write --------------

class _SealingTransport:
    """Records send_data_packets calls (the real one is covered by
    test_transport_sealing)."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes, bytes, int]] = []

    def send_data_packets(self, message_type: int, prefix: bytes, data, max_chunk: int) -> None:
        self.sent.append((message_type, prefix, bytes(data), max_chunk))


class _Conn:
    def __init__(self, transport) -> None:
        self.transport = transport
        self.channelsToRemoteChannel: dict = {}
        self.packets: list[bytes] = []

    def sendData(self, channel, data: bytes) -> None:
        self.packets.append(data)


def _channel(transport, window: int, max_packet: int = 1000):
    from twisted.conch.ssh.channel import SSHChannel

    conn = _Conn(transport)
    channel = SSHChannel(remoteWindow=window, remoteMaxPacket=max_packet, conn=conn)
    conn.channelsToRemoteChannel[channel] = 7
    return channel, conn


def test_channel_data_within_the_window_is_sealed_in_one_call() -> None:
    from twisted.conch.ssh.connection import MSG_CHANNEL_DATA

    from edgeaccess.ssh.transport import write_channel_data

    transport = _SealingTransport()
    channel, conn = _channel(transport, window=10_000)
    write_channel_data(channel, b"x" * 4500)
    assert transport.sent == [(MSG_CHANNEL_DATA, b"\x00\x00\x00\x07", b"x" * 4500, 1000)]
    assert channel.remoteWindowLeft == 5500 and conn.packets == []


def test_channel_data_beyond_the_window_waits_in_the_channel_buffer() -> None:
    from edgeaccess.ssh.transport import write_channel_data

    transport = _SealingTransport()
    channel, conn = _channel(transport, window=3000)
    paused = []
    channel.stopWriting = lambda: paused.append(True)
    write_channel_data(channel, b"a" * 2000 + b"b" * 1000 + b"c" * 500)
    assert [len(s[2]) for s in transport.sent] == [3000]
    assert channel.remoteWindowLeft == 0
    assert channel.buf == b"c" * 500 and paused == [True]
    write_channel_data(channel, b"d")  # queued behind, in order
    assert channel.buf == b"c" * 500 + b"d" and len(transport.sent) == 1


def test_channel_data_falls_back_to_conchs_write() -> None:
    from edgeaccess.ssh.transport import write_channel_data

    class Plain:
        pass

    channel, conn = _channel(Plain(), window=10_000)
    write_channel_data(channel, b"y" * 2500)
    assert conn.packets == [b"y" * 1000, b"y" * 1000, b"y" * 500]
