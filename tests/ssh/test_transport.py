"""edgeaccess.ssh.transport in memory: our client and server transports over
iosim, every cipher/MAC pair, a known-format check of the AES-GCM packets,
tampering, rekeying and the server-sig-algs extension."""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.conch.ssh import factory, keys, service
from twisted.internet import defer
from twisted.test import iosim

from edgeaccess.ssh import transport as edge_transport
from edgeaccess.ssh.transport import (
    USER_AUTH_PUBLIC_KEY_ALGORITHMS,
    EdgeClientTransport,
    EdgeServerTransport,
)

MSG_TEST = 200  # local-extension message number (RFC 4250 4.1.2)


class _EchoServerService(service.SSHService):
    # Conch's factory only offers ssh-userauth before authentication.
    name = b"ssh-userauth"

    def packetReceived(self, messageNum, packet):  # noqa: N802,N803
        self.transport.sendPacket(messageNum, packet[::-1])


class _RecordingClientService(service.SSHService):
    # Conch's factory only offers ssh-userauth before authentication.
    name = b"ssh-userauth"

    def __init__(self):
        self.received = []

    def packetReceived(self, messageNum, packet):  # noqa: N802,N803
        self.received.append((messageNum, packet))


class _Factory(factory.SSHFactory):
    protocol = EdgeServerTransport
    services = {b"ssh-userauth": _EchoServerService}

    def __init__(self):
        key = keys.Key(ed25519.Ed25519PrivateKey.generate())
        self.publicKeys = {b"ssh-ed25519": key.public()}
        self.privateKeys = {b"ssh-ed25519": key}
        self.primes = None

    def getPrimes(self):  # noqa: N802
        return None


class _Client(EdgeClientTransport):
    def __init__(self, ciphers, macs):
        self.supportedCiphers = ciphers
        self.supportedMACs = macs
        self.echo = _RecordingClientService()
        self.ext_info = []
        self.disconnects = []

    def verifyHostKey(self, hostKey, fingerprint):  # noqa: N802,N803
        return defer.succeed(True)

    def connectionSecure(self):  # noqa: N802
        self.requestService(self.echo)

    def ssh_EXT_INFO(self, packet):  # noqa: N802
        self.ext_info.append(packet)
        super().ssh_EXT_INFO(packet)

    def receiveError(self, reasonCode, description):  # noqa: N802,N803
        self.disconnects.append((reasonCode, description))


def _connect(cipher: bytes, mac: bytes):
    server_factory = _Factory()
    client = _Client([cipher], [mac])
    client_protocol, server, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client
    )
    pump.flush()
    assert client.echo.transport is client, "the echo service did not start"
    return client, server, pump


PAIRS = [
    (cipher, mac)
    for cipher in edge_transport.SUPPORTED_CIPHERS
    for mac in edge_transport.SUPPORTED_MACS
    if "gcm" not in cipher.decode() or mac == b"hmac-sha2-256"
]


@pytest.mark.parametrize(("cipher", "mac"), PAIRS)
def test_packets_of_all_sizes_round_trip(cipher, mac):
    client, server, pump = _connect(cipher, mac)
    assert server.currentEncryptions.outCipType == cipher
    assert server.currentEncryptions.outMACType == mac
    payloads = [b"", b"x", os.urandom(15), os.urandom(16), os.urandom(32768 + 9)]
    payloads += [os.urandom(n) for n in (1, 100, 4095, 65536, 200_000)]
    for payload in payloads:
        client.sendPacket(MSG_TEST, payload)
    pump.flush()
    assert client.echo.received == [(MSG_TEST, p[::-1]) for p in payloads]


def test_gcm_packet_matches_openssh_format():
    """Length in clear and authenticated, nonce = fixed(4) || counter(8)."""
    key, iv = os.urandom(16), os.urandom(12)
    sealer = edge_transport._GcmSealer(key, iv)
    payload = b"hello, world"
    first = b"".join(sealer.seal(0, MSG_TEST, (payload,)))
    second = b"".join(sealer.seal(1, MSG_TEST, (payload,)))
    aead = AESGCM(key)
    counter = int.from_bytes(iv[4:], "big")
    for index, wire in enumerate((first, second)):
        (length,) = struct.unpack(">L", wire[:4])
        assert length % 16 == 0 and len(wire) == 4 + length + 16
        nonce = iv[:4] + (counter + index).to_bytes(8, "big")
        body = aead.decrypt(nonce, wire[4:], wire[:4])
        padding = body[0]
        assert padding >= 4
        assert body[1 : len(body) - padding] == bytes((MSG_TEST,)) + payload
    assert first[4:] != second[4:], "the nonce must change per packet"


def test_gcm_counter_wraps_at_64_bits():
    iv = b"\0\0\0\1" + b"\xff" * 8
    sealer = edge_transport._GcmSealer(b"k" * 16, iv)
    opener = edge_transport._GcmOpener(b"k" * 16, iv)
    for _ in range(2):
        wire = b"".join(sealer.seal(0, MSG_TEST, (b"data",)))
        assert opener.packet_size(wire) == len(wire)
        assert opener.open(0, memoryview(wire)) == bytes((MSG_TEST,)) + b"data"


@pytest.mark.parametrize(
    ("cipher", "mac"),
    [
        (b"aes128-gcm@openssh.com", b"hmac-sha2-256"),
        (b"aes128-ctr", b"hmac-sha2-256"),
        (b"aes128-ctr", b"hmac-sha2-256-etm@openssh.com"),
    ],
)
def test_tampered_packet_is_refused_with_mac_error(cipher, mac):
    client, server, pump = _connect(cipher, mac)
    real_write = client.transport.write

    def flip_last_byte(data):
        real_write(data[:-1] + bytes((data[-1] ^ 1,)))

    client.transport.writeSequence = lambda parts: flip_last_byte(b"".join(parts))
    client.sendPacket(MSG_TEST, b"payload")
    pump.flush()
    assert client.disconnects and client.disconnects[0][0] == 5  # DISCONNECT_MAC_ERROR
    assert client.echo.received == []


def test_oversized_length_is_a_protocol_error():
    client, server, pump = _connect(b"aes128-gcm@openssh.com", b"hmac-sha2-256")
    client.transport.write(struct.pack(">L", 16 * 1024 * 1024) + b"\0" * 32)
    pump.flush()
    assert client.disconnects[0][0] == 2  # DISCONNECT_PROTOCOL_ERROR


@pytest.mark.parametrize("cipher", [b"aes128-gcm@openssh.com", b"aes256-ctr"])
def test_rekey_keeps_the_stream_working(cipher):
    client, server, pump = _connect(cipher, b"hmac-sha2-512-etm@openssh.com")
    client.sendPacket(MSG_TEST, b"before")
    first_keys = server.currentEncryptions
    client.sendKexInit()
    client.sendPacket(MSG_TEST, b"during")  # queued until the new keys
    pump.flush()
    client.sendPacket(MSG_TEST, b"after")
    pump.flush()
    assert server.currentEncryptions is not first_keys
    assert [p for _, p in client.echo.received] == [b"erofeb", b"gnirud", b"retfa"]


def test_server_sig_algs_lists_user_auth_algorithms():
    client, server, pump = _connect(b"aes128-ctr", b"hmac-sha2-256")
    assert client.peerExtensions[b"server-sig-algs"] == b",".join(
        USER_AUTH_PUBLIC_KEY_ALGORITHMS
    )
    for name in (b"ssh-ed25519", b"rsa-sha2-256", b"rsa-sha2-512-cert-v01@openssh.com"):
        assert name in client.peerExtensions[b"server-sig-algs"].split(b",")
    # Conch would have sent the host-key algorithms (here only ssh-ed25519).
    assert len(client.ext_info) == 1


def test_server_prefers_client_order_and_offers_gcm_first():
    client, server, pump = _connect(b"aes256-gcm@openssh.com", b"hmac-sha2-512")
    assert server.currentEncryptions.inCipType == b"aes256-gcm@openssh.com"
    assert EdgeServerTransport.supportedCiphers[0] == b"aes128-gcm@openssh.com"
    assert b"aes128-cbc" not in EdgeServerTransport.supportedCiphers


def test_the_server_turns_nagle_off_on_its_tcp_connection():
    from twisted.internet.testing import StringTransport

    class TCP(StringTransport):
        no_delay = None

        def setTcpNoDelay(self, enabled):  # noqa: N802
            self.no_delay = enabled

    server = _Factory().buildProtocol(None)
    tcp = TCP()
    server.makeConnection(tcp)
    assert tcp.no_delay is True
    assert tcp.value().startswith(b"SSH-2.0-")  # the version line still goes first
