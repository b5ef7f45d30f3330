"""SessionProcessProtocol over the real EdgeServerTransport: the child's
stdout and stderr are read straight into sealed packets (read_data_packets),
within the client's window, in order with EOF/exit-status/close; a replaced
outReceived (session recording) still sees every byte."""

from __future__ import annotations

import hashlib
import struct

import pytest
import pytest_twisted
from twisted.conch.ssh import connection
from twisted.conch.ssh.session import SSHSession
from twisted.internet import defer, reactor
from twisted.internet.testing import StringTransport

from edgeaccess.ssh import transport as t
from edgeaccess.ssh.process import SessionProcessProtocol

_SEQ_OUT = "seq 1 400000"  # ~2.7 MB on stdout
_SEQ_ERR = "seq 1 30000 >&2"  # ~170 KB on stderr


def _expected(command: str) -> bytes:
    last = int(command.split()[2])
    return b"".join(b"%d\n" % n for n in range(1, last + 1))


class _Wire:
    """The keyed transport under a real SSHConnection, and what the client
    would decode from its output."""

    def __init__(self, cipher: bytes, mac: bytes, remote_window: int) -> None:
        self.transport = t.EdgeServerTransport()
        ciphers = t.EdgeCiphers(cipher, cipher, mac, mac)
        ciphers.setKeys(b"o" * 16, b"K" * 32, b"i" * 16, b"k" * 32, b"M" * 64, b"m" * 64)
        self.transport.currentEncryptions = ciphers
        self.transport.transport = StringTransport()
        reader = t.EdgeCiphers(cipher, cipher, mac, mac)
        reader.setKeys(b"i" * 16, b"k" * 32, b"o" * 16, b"K" * 32, b"m" * 64, b"M" * 64)
        self._opener = reader.opener
        self._seq = 0
        self._buf = b""
        self.messages: list[tuple[int, bytes]] = []
        self.conn = connection.SSHConnection()
        self.conn.transport = self.transport
        self.session = SSHSession(remoteWindow=remote_window, remoteMaxPacket=32768, conn=self.conn)
        self.conn.channels[0] = self.session
        self.conn.channelsToRemoteChannel[self.session] = 9
        self.session.id = 0
        self.direct_bytes = 0
        read = self.transport.read_data_packets

        def counting(*args):
            sent = read(*args)
            self.direct_bytes += sent or 0
            return sent

        self.transport.read_data_packets = counting

    def decode(self) -> None:
        self._buf += self.transport.transport.value()
        self.transport.transport.clear()
        while self._buf:
            size = self._opener.packet_size(self._buf)
            payload = self._opener.open(self._seq, memoryview(self._buf)[:size])
            self._buf = self._buf[size:]
            self._seq += 1
            self.messages.append((payload[0], payload[1:]))

    def stream(self, message_type: int) -> bytes:
        self.decode()
        skip = 8 if message_type == connection.MSG_CHANNEL_DATA else 12
        out = []
        for kind, body in self.messages:
            if kind == message_type:
                assert body[:4] == b"\0\0\0\x09"
                (size,) = struct.unpack(">L", body[skip - 4 : skip])
                assert size == len(body) - skip <= 32768
                out.append(body[skip:])
        return b"".join(out)

    def kinds(self) -> list[int]:
        self.decode()
        return [kind for kind, _ in self.messages]


def _spawn(session, command: str, protocol=None):
    protocol = protocol or SessionProcessProtocol(session)
    ended = defer.Deferred()
    original = protocol.processEnded

    def process_ended(reason=None):
        original(reason)
        ended.callback(None)

    protocol.processEnded = process_ended
    reactor.spawnProcess(protocol, "/bin/sh", ["sh", "-c", command], env={})
    session.client = protocol
    return protocol, ended


def _turn() -> defer.Deferred:
    d = defer.Deferred()
    reactor.callLater(0.005, d.callback, None)
    return d


@pytest.mark.parametrize(
    "cipher,mac",
    [
        (b"aes128-ctr", b"hmac-sha2-256"),
        (b"aes128-gcm@openssh.com", b"hmac-sha2-256"),
        (b"aes128-ctr", b"hmac-sha2-256-etm@openssh.com"),
    ],
    ids=["ctr", "gcm", "etm"],
)
@pytest_twisted.inlineCallbacks
def test_child_output_is_read_straight_into_packets(cipher, mac):
    wire = _Wire(cipher, mac, remote_window=64 * 1024 * 1024)
    _, ended = _spawn(wire.session, f"{_SEQ_OUT}; {_SEQ_ERR}; exit 3")
    yield ended
    stdout = wire.stream(connection.MSG_CHANNEL_DATA)
    stderr = wire.stream(connection.MSG_CHANNEL_EXTENDED_DATA)
    assert hashlib.sha256(stdout).digest() == hashlib.sha256(_expected(_SEQ_OUT)).digest()
    assert stderr == _expected(_SEQ_ERR)
    assert wire.direct_bytes == len(stdout) + len(stderr)
    kinds = wire.kinds()
    assert kinds[-3:] == [
        connection.MSG_CHANNEL_EOF,
        connection.MSG_CHANNEL_REQUEST,
        connection.MSG_CHANNEL_CLOSE,
    ]
    request = wire.messages[-2][1]
    assert request[8:19] == b"exit-status" and request[-4:] == b"\0\0\0\x03"
    assert wire.session.remoteWindowLeft == 64 * 1024 * 1024 - len(stdout) - len(stderr)


@pytest_twisted.inlineCallbacks
def test_direct_reads_stop_at_the_window_and_resume_when_it_reopens():
    wire = _Wire(b"aes128-ctr", b"hmac-sha2-256", remote_window=100_000)
    protocol, ended = _spawn(wire.session, "head -c 5000000 /dev/zero")
    deadline = reactor.seconds() + 10
    while len(wire.stream(connection.MSG_CHANNEL_DATA)) < 100_000:
        assert reactor.seconds() < deadline
        yield _turn()
    for _ in range(20):  # the child keeps writing; we must not keep reading
        yield _turn()
    assert len(wire.stream(connection.MSG_CHANNEL_DATA)) == 100_000
    assert wire.session.remoteWindowLeft == 0
    assert protocol._reading_paused and not protocol._pending
    assert not ended.called

    def open_window():
        if not ended.called:
            wire.conn.ssh_CHANNEL_WINDOW_ADJUST(struct.pack(">2L", 0, 1024 * 1024))
            reactor.callLater(0.001, open_window)

    open_window()
    yield ended
    assert wire.stream(connection.MSG_CHANNEL_DATA) == bytes(5_000_000)
    assert wire.kinds()[-1] == connection.MSG_CHANNEL_CLOSE


@pytest_twisted.inlineCallbacks
def test_a_replaced_out_received_sees_every_byte():
    wire = _Wire(b"aes128-gcm@openssh.com", b"hmac-sha2-256", remote_window=64 * 1024 * 1024)
    protocol = SessionProcessProtocol(wire.session)
    teed: list[bytes] = []
    deliver = protocol.outReceived

    def tee(data: bytes) -> None:  # what session recording installs
        teed.append(data)
        deliver(data)

    protocol.outReceived = tee
    _, ended = _spawn(wire.session, f"{_SEQ_OUT}; {_SEQ_ERR}", protocol)
    yield ended
    assert b"".join(teed) == wire.stream(connection.MSG_CHANNEL_DATA) == _expected(_SEQ_OUT)
    # stderr is not teed, so it still takes the direct path.
    assert wire.direct_bytes == len(_expected(_SEQ_ERR))
    assert wire.stream(connection.MSG_CHANNEL_EXTENDED_DATA) == _expected(_SEQ_ERR)
