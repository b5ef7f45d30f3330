"""Batched sealing (``seal_chunks``) must produce packets the opener reads
back exactly: every cipher/MAC pair, several sizes and chunkings, and
interleaved with single-packet seals (sequence numbers stay in step)."""

from __future__ import annotations

import fcntl
import os
import struct

import pytest
from twisted.conch.ssh.channel import SSHChannel

from edgeaccess.ssh import transport as t


def _pairs():
    yield "gcm", t._GcmSealer(b"k" * 16, b"i" * 12), t._GcmOpener(b"k" * 16, b"i" * 12)
    for mac in (b"hmac-sha2-256", b"hmac-sha2-256-etm@openssh.com", b"hmac-sha2-512"):
        yield (mac.decode(), t._CtrSealer(b"k" * 16, b"i" * 16, mac, b"m" * 64),
               t._CtrOpener(b"k" * 16, b"i" * 16, mac, b"m" * 64))


@pytest.mark.parametrize(
    "name,sealer,opener", list(_pairs()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_batched_packets_open_back_to_the_data(name, sealer, opener):
    seq = 5
    cases = ((65536, 32768, b"\0\0\0\x09"), (1, 32768, b"abcd"), (100000, 32768, b"abcdefgh"),
             (70000, 1000, b"pfx!"), (32768, 32768, b"\0\0\0\1"))
    for size, step, prefix in cases:
        data = os.urandom(size)
        wire = bytes(sealer.seal_chunks(seq, 94, prefix, memoryview(data), step))
        got = b""
        packets = 0
        while wire:
            length = opener.packet_size(wire)
            payload = opener.open(seq, memoryview(wire)[:length])
            wire = wire[length:]
            assert payload[0] == 94 and payload[1:1 + len(prefix)] == prefix
            (chunk,) = struct.unpack(">L", payload[1 + len(prefix):5 + len(prefix)])
            assert chunk == len(payload) - 5 - len(prefix) <= step
            got += payload[5 + len(prefix):]
            seq += 1
            packets += 1
        assert got == data
        assert packets == -(-size // step)
        single = b"".join(sealer.seal(seq, 2, (b"hello",)))
        assert opener.open(seq, memoryview(single)[:opener.packet_size(single)]) == b"\x02hello"
        seq += 1


# -- read_data_packets: the child's output read straight into packet slots ----

_CIPHERS = [
    (b"aes128-gcm@openssh.com", b"hmac-sha2-256"),
    (b"aes128-ctr", b"hmac-sha2-256"),
    (b"aes128-ctr", b"hmac-sha2-256-etm@openssh.com"),
    (b"aes256-ctr", b"hmac-sha2-512"),
]


def _keyed_transport(cipher: bytes, mac: bytes):
    """An EdgeServerTransport past key exchange, writing to a StringTransport,
    and an opener for what it sends."""
    from twisted.internet.testing import StringTransport

    transport = t.EdgeServerTransport()
    ciphers = t.EdgeCiphers(cipher, cipher, mac, mac)
    ciphers.setKeys(b"o" * 16, b"K" * 32, b"i" * 16, b"k" * 32, b"M" * 64, b"m" * 64)
    transport.currentEncryptions = ciphers
    transport.outgoingPacketSequence = 7
    transport.transport = StringTransport()
    reader = t.EdgeCiphers(cipher, cipher, mac, mac)
    reader.setKeys(b"i" * 16, b"k" * 32, b"o" * 16, b"K" * 32, b"m" * 64, b"M" * 64)
    return transport, reader.opener


def _open_all(opener, wire: bytes, seq: int) -> list[bytes]:
    payloads = []
    while wire:
        size = opener.packet_size(wire)
        payloads.append(opener.open(seq, memoryview(wire)[:size]))
        wire = wire[size:]
        seq += 1
    return payloads


def _channel_data(payloads: list[bytes], prefix: bytes, step: int) -> bytes:
    data = b""
    for payload in payloads:
        assert payload[1 : 1 + len(prefix)] == prefix
        (size,) = struct.unpack(">L", payload[1 + len(prefix) : 5 + len(prefix)])
        assert size == len(payload) - 5 - len(prefix) <= step
        data += payload[5 + len(prefix) :]
    return data


@pytest.fixture
def pipe():
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1024 * 1024)  # Linux
    yield read_end, write_end
    for fd in (read_end, write_end):
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.mark.parametrize("cipher,mac", _CIPHERS, ids=lambda v: v.decode())
@pytest.mark.parametrize(
    "available,limit,step,piece",
    [
        (200_000, 150_000, 32768, 65536),  # limit ends inside a piece
        (70_000, 262_144, 32768, 65536),  # the second read comes up short
        (65_536, 65_536, 32768, 65536),  # exactly one piece
        (50_000, 262_144, 1000, 4096),  # odd packet size, pieces straddle slots
        (10, 262_144, 32768, 65536),  # one tiny packet
    ],
)
def test_read_data_packets_sends_what_it_read(pipe, cipher, mac, available, limit, step, piece):
    read_end, write_end = pipe
    data = os.urandom(available)
    os.write(write_end, data)
    transport, opener = _keyed_transport(cipher, mac)
    prefix = b"\0\0\0\x05\0\0\0\x01"
    sent = transport.read_data_packets(read_end, 95, prefix, limit, step, piece)
    expected = data[: min(available, limit)]
    assert sent == len(expected)
    payloads = _open_all(opener, transport.transport.value(), 7)
    assert {p[0] for p in payloads} == {95}
    assert _channel_data(payloads, prefix, step) == expected
    assert transport.outgoingPacketSequence == 7 + len(payloads) == 7 + -(-sent // step)
    # The sequence numbers stay in step with packets sent another way.
    transport.transport.clear()
    transport.sendPacket(2, b"after")
    assert _open_all(opener, transport.transport.value(), 7 + len(payloads)) == [b"\x02after"]


def test_read_data_packets_reports_end_of_file_and_empty_pipe(pipe):
    read_end, write_end = pipe
    transport, _ = _keyed_transport(*_CIPHERS[1])
    with pytest.raises(BlockingIOError):
        transport.read_data_packets(read_end, 94, b"\0\0\0\1", 65536, 32768, 65536)
    os.close(write_end)
    assert transport.read_data_packets(read_end, 94, b"\0\0\0\1", 65536, 32768, 65536) == 0
    assert transport.transport.value() == b""
    assert transport.outgoingPacketSequence == 7


def test_read_data_packets_leaves_the_data_alone_during_key_exchange(pipe):
    read_end, write_end = pipe
    os.write(write_end, b"x" * 1000)
    transport, _ = _keyed_transport(*_CIPHERS[0])
    transport._keyExchangeState = transport._KEY_EXCHANGE_REQUESTED
    assert transport.read_data_packets(read_end, 94, b"\0\0\0\1", 65536, 32768, 65536) is None
    assert os.read(read_end, 2000) == b"x" * 1000


def test_successive_batches_reuse_the_buffer_and_stay_decodable(pipe):
    read_end, write_end = pipe
    transport, opener = _keyed_transport(*_CIPHERS[1])
    sent = b""
    for size in (100_000, 3, 262_144, 40_000):
        chunk = os.urandom(size)
        os.write(write_end, chunk)
        read = 0
        while read < size:  # batches of at most 128 KiB
            read += transport.read_data_packets(read_end, 94, b"\0\0\0\1", 131072, 32768, 65536)
        sent += chunk
    with pytest.raises(BlockingIOError):
        transport.read_data_packets(read_end, 94, b"\0\0\0\1", 65536, 32768, 65536)
    payloads = _open_all(opener, transport.transport.value(), 7)
    assert _channel_data(payloads, b"\0\0\0\1", 32768) == sent


# -- dataReceived: CHANNEL_WINDOW_ADJUST straight to the channel --------------


class _Channel(SSHChannel):
    def __init__(self) -> None:
        super().__init__(remoteWindow=0, remoteMaxPacket=32768)
        self.received: list[bytes] = []
        self.started = 0

    def startWriting(self) -> None:  # noqa: N802
        self.started += 1

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received.append(data)


def _client_packets(reader_sealer, messages, seq: int = 0) -> bytes:
    return b"".join(
        b"".join(reader_sealer.seal(seq + n, kind, (body,)))
        for n, (kind, body) in enumerate(messages)
    )


class _LoggingConnection:
    """A connection whose ssh_CHANNEL_WINDOW_ADJUST is its own."""

    def __init__(self) -> None:
        self.adjusts: list[bytes] = []

    def ssh_CHANNEL_WINDOW_ADJUST(self, packet: bytes) -> None:  # noqa: N802
        self.adjusts.append(packet)

    def packetReceived(self, number: int, packet: bytes) -> None:  # noqa: N802
        getattr(self, "ssh_CHANNEL_WINDOW_ADJUST")(packet)


@pytest.mark.parametrize("cipher,mac", _CIPHERS[:3], ids=lambda v: v.decode())
def test_window_adjust_reaches_the_channel_among_other_messages(cipher, mac):
    from twisted.conch.ssh import connection

    transport, _ = _keyed_transport(cipher, mac)
    transport.gotVersion = True
    conn = connection.SSHConnection()
    conn.transport = transport
    transport.service = conn
    channel = _Channel()
    channel.areWriting = False
    conn.channels[3] = channel
    conn.localToRemoteChannel[3] = 9
    conn.channelsToRemoteChannel[channel] = 9
    client = t.EdgeCiphers(cipher, cipher, mac, mac)
    client.setKeys(b"i" * 16, b"k" * 32, b"o" * 16, b"K" * 32, b"m" * 64, b"M" * 64)
    wire = _client_packets(
        client.sealer,
        [
            (connection.MSG_CHANNEL_WINDOW_ADJUST, struct.pack(">2L", 3, 1000)),
            (connection.MSG_CHANNEL_DATA, struct.pack(">2L", 3, 2) + b"hi"),
            (connection.MSG_CHANNEL_WINDOW_ADJUST, struct.pack(">2L", 3, 24)),
        ],
    )
    transport.dataReceived(wire[:5])  # split anywhere
    transport.dataReceived(wire[5:])
    assert channel.remoteWindowLeft == 1024
    assert channel.started == 1  # the first adjust started the writer
    assert channel.received == [b"hi"]
    assert transport.buf == b""
    assert transport.incomingPacketSequence == 3


def test_an_overridden_window_adjust_handler_is_still_called():
    transport, _ = _keyed_transport(*_CIPHERS[0])
    transport.gotVersion = True
    service = _LoggingConnection()
    transport.service = service
    client = t.EdgeCiphers(_CIPHERS[0][0], _CIPHERS[0][0], _CIPHERS[0][1], _CIPHERS[0][1])
    client.setKeys(b"i" * 16, b"k" * 32, b"o" * 16, b"K" * 32, b"m" * 64, b"M" * 64)
    body = struct.pack(">2L", 0, 5)
    transport.dataReceived(_client_packets(client.sealer, [(93, body)]))
    assert service.adjusts == [body]


def test_channel_data_respects_the_window_and_regrants_it():
    from twisted.conch.ssh import connection

    cipher, mac = _CIPHERS[1]
    transport, opener = _keyed_transport(cipher, mac)
    transport.gotVersion = True
    conn = connection.SSHConnection()
    conn.transport = transport
    transport.service = conn
    channel = _Channel()
    channel.localWindowSize = channel.localWindowLeft = 100_000
    conn.channels[3] = channel
    conn.localToRemoteChannel[3] = 9
    conn.channelsToRemoteChannel[channel] = 9
    client = t.EdgeCiphers(cipher, cipher, mac, mac)
    client.setKeys(b"i" * 16, b"k" * 32, b"o" * 16, b"K" * 32, b"m" * 64, b"M" * 64)
    chunks = [os.urandom(30_000) for _ in range(2)]
    messages = [
        (connection.MSG_CHANNEL_DATA, struct.pack(">2L", 3, len(chunk)) + chunk)
        for chunk in chunks
    ]
    transport.dataReceived(_client_packets(client.sealer, messages))
    assert channel.received == chunks
    # 40,000 left < half of 100,000: the window is topped up again.
    assert channel.localWindowLeft == 100_000
    (adjust,) = _open_all(opener, transport.transport.value(), 7)
    assert adjust == bytes([connection.MSG_CHANNEL_WINDOW_ADJUST]) + struct.pack(">2L", 9, 60_000)
    # More than the window: Conch's answer, the channel is closed.
    transport.transport.clear()
    too_much = struct.pack(">2L", 3, 100_001) + bytes(100_001)
    channel.localMaxPacket = 1 << 20
    transport.dataReceived(_client_packets(client.sealer, [(94, too_much)], seq=2))
    assert len(channel.received) == 2
    assert channel.localClosed
    (close,) = _open_all(opener, transport.transport.value(), 8)
    assert close == bytes([connection.MSG_CHANNEL_CLOSE]) + struct.pack(">L", 9)
