"""Faster SSH transports for Conch: AES-GCM, encrypt-then-MAC, cheaper MACs.

Conch (Twisted 26.10) offers only AES-CTR/CBC with encrypt-and-MAC HMACs and
builds a new ``hmac.HMAC`` object for every packet.  :class:`EdgeServerTransport`
and :class:`EdgeClientTransport` are drop-in replacements for
``SSHServerTransport`` / ``SSHClientTransport`` (set ``factory.protocol``) that
add, after key exchange:

* ``aes128-gcm@openssh.com`` and ``aes256-gcm@openssh.com`` as OpenSSH implements
  RFC 5647: the 4-byte packet length travels in clear but is authenticated as
  associated data; the 12-byte nonce is the 4-byte fixed field of the derived IV
  followed by an 8-byte invocation counter incremented once per packet; the
  16-byte tag replaces the MAC (the negotiated MAC is ignored);
* ``hmac-sha2-256-etm@openssh.com`` / ``hmac-sha2-512-etm@openssh.com``
  (encrypt-then-MAC, what OpenSSH's client prefers);
* MACs computed from a prepared HMAC object that is ``copy()``-ed per packet.

Only the packet layer (``sendPacket``/``getPacket``) is replaced once keys are
in place; key exchange, rekeying and the service layer stay Conch's.  Before the
first ``NEWKEYS`` the stock code path handles the unencrypted packets.  This
leans on Conch's private key set-up and key exchange state (the
``conch-transport`` reach of :mod:`edgeaccess.internals`); where they are not
the shape this was written for, the transport keeps Conch's packet layer and
offers only the ciphers and MACs Conch implements.

The server also fixes Conch's ``server-sig-algs`` extension, which advertises
the *host-key* algorithms: OpenSSH then refuses RSA user certificates ("no
mutual signature algorithm").  It sends
:data:`USER_AUTH_PUBLIC_KEY_ALGORITHMS` instead.
"""

from __future__ import annotations

import os
from typing import Sequence

from twisted.conch.ssh.connection import (
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_WINDOW_ADJUST,
    SSHConnection,
)
from twisted.conch.ssh.transport import (
    DISCONNECT_MAC_ERROR,
    DISCONNECT_PROTOCOL_ERROR,
    SSHCiphers,
    SSHClientTransport,
    SSHServerTransport,
)
from twisted.logger import Logger

from edgeaccess import internals
from edgeaccess.ssh.packets import (  # the packet layer
    _BLOCK,
    _BadMAC,
    _BadPacket,
    _CTR_KEY_SIZES,
    _CtrOpener,
    _CtrSealer,
    _GCM_KEY_SIZES,
    _GCM_TAG,
    _GcmOpener,
    _GcmSealer,
    _MASK32,
    _pack_length,
    _unpack_two_lengths,
)

_log = Logger()

#: Ciphers in order of preference (used when we are the client; a server picks
#: the client's first choice among these).
SUPPORTED_CIPHERS: list[bytes] = [
    b"aes128-gcm@openssh.com",
    b"aes256-gcm@openssh.com",
    b"aes128-ctr",
    b"aes192-ctr",
    b"aes256-ctr",
]

#: MACs in order of preference.  Ignored when an AEAD cipher is negotiated.
SUPPORTED_MACS: list[bytes] = [
    b"hmac-sha2-256-etm@openssh.com",
    b"hmac-sha2-512-etm@openssh.com",
    b"hmac-sha2-256",
    b"hmac-sha2-512",
]

def strong_key_exchanges(offered: Sequence[bytes]) -> list[bytes]:
    """``offered`` without the key exchanges ssh-audit rates "fail": the NIST
    curves (``ecdh-sha2-nistp*``) and every SHA-1 exchange hash
    (``diffie-hellman-group14-sha1``, ``diffie-hellman-group-exchange-sha1``...).
    OpenSSH (since 6.5) prefers curve25519, which stays; see docs/security.md."""
    return [
        name for name in offered
        if not name.startswith(b"ecdh-sha2-nistp") and not name.endswith(b"-sha1")
    ]


#: Signature algorithms accepted for user authentication, sent to clients as
#: ``server-sig-algs`` (RFC 8308).  Plain keys and their certificate forms.
USER_AUTH_PUBLIC_KEY_ALGORITHMS: list[bytes] = [
    b"ssh-ed25519",
    b"ssh-ed25519-cert-v01@openssh.com",
    b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521",
    b"ecdsa-sha2-nistp256-cert-v01@openssh.com",
    b"ecdsa-sha2-nistp384-cert-v01@openssh.com",
    b"ecdsa-sha2-nistp521-cert-v01@openssh.com",
    b"rsa-sha2-512",
    b"rsa-sha2-256",
    b"rsa-sha2-512-cert-v01@openssh.com",
    b"rsa-sha2-256-cert-v01@openssh.com",
]

_CONNECTION_WINDOW_ADJUST = SSHConnection.ssh_CHANNEL_WINDOW_ADJUST
_CONNECTION_CHANNEL_DATA = SSHConnection.ssh_CHANNEL_DATA


class EdgeCiphers(SSHCiphers):
    """
    Negotiated algorithms and keys for both directions.

    Keeps :class:`SSHCiphers`' attributes (``outCipType``, ``encBlockSize``, ...)
    so Conch code that inspects them still works, and adds ``sealer`` (outgoing)
    and ``opener`` (incoming) packet codecs used by :class:`_FastPacketMixin`.
    """

    def setKeys(  # noqa: N802 (Conch's name)
        self,
        outIV: bytes,  # noqa: N803
        outKey: bytes,  # noqa: N803
        inIV: bytes,  # noqa: N803
        inKey: bytes,  # noqa: N803
        outInteg: bytes,  # noqa: N803
        inInteg: bytes,  # noqa: N803
    ) -> None:
        """Build the packet codecs from the keys derived by key exchange."""
        self.sealer = _make_codec(
            _GcmSealer, _CtrSealer, self.outCipType, self.outMACType, outIV, outKey, outInteg
        )
        self.opener = _make_codec(
            _GcmOpener, _CtrOpener, self.inCipType, self.inMACType, inIV, inKey, inInteg
        )
        self.encBlockSize = _BLOCK
        self.decBlockSize = _BLOCK
        self.verifyDigestSize = getattr(self.opener, "mac_size", _GCM_TAG)

    @classmethod
    def from_negotiated(cls, negotiated: SSHCiphers) -> EdgeCiphers:
        """The same negotiated algorithm names, with our codecs."""
        return cls(
            negotiated.outCipType,
            negotiated.inCipType,
            negotiated.outMACType,
            negotiated.inMACType,
        )


def _make_codec(gcm, ctr, cipher: bytes, mac: bytes, iv: bytes, key: bytes, integ: bytes):
    if cipher in _GCM_KEY_SIZES:
        return gcm(key[: _GCM_KEY_SIZES[cipher]], iv)
    return ctr(key[: _CTR_KEY_SIZES[cipher]], iv, mac, integ)


def _write_wire(transport, wire: memoryview) -> None:
    """
    Write ``wire`` (a view of a buffer the caller reuses) to ``transport``.

    On a plain TCP connection whose write buffer is empty, the bytes go to
    the socket at once (no copy into Twisted's buffer, no join before the
    send, no writer registration); whatever the socket does not take, and
    everything on other transports, is copied into the transport's buffer.
    """
    if internals.tcp_send_now_possible(transport):
        sent = internals.send_if_idle(transport, wire)
        if sent == len(wire):
            return
        wire = wire[sent:]
    transport.write(bytes(wire))


def write_channel_data(channel, data: bytes) -> None:
    """``channel.write(data)`` (an ``SSHChannel``), with every packet that
    fits the peer's window sealed into one buffer and written at once
    (:meth:`_FastPacketMixin.send_data_packets`) instead of one
    ``sendPacket`` per packet; the rest is left to ``SSHChannel.write``,
    which buffers it until the window opens and pauses the producer."""
    conn = channel.conn
    send = getattr(conn.transport, "send_data_packets", None)
    window = channel.remoteWindowLeft
    if send is None or channel.buf or channel.localClosed or window <= 0 or not data:
        channel.write(data)
        return
    head = data if len(data) <= window else memoryview(data)[:window]
    send(MSG_CHANNEL_DATA, _pack_length(conn.channelsToRemoteChannel[channel]), head,
         channel.remoteMaxPacket)
    channel.remoteWindowLeft -= len(head)
    if len(head) < len(data):
        channel.write(data[window:])


def _channel_data(conn: SSHConnection, packet: bytes) -> None:
    """``conn.ssh_CHANNEL_DATA(packet[1:])`` with one copy of the data."""
    local_channel, length = _unpack_two_lengths(packet, 1)
    channel = conn.channels[local_channel]
    if length > channel.localWindowLeft or length > channel.localMaxPacket:
        conn.ssh_CHANNEL_DATA(packet[1:])  # logs "too much data" and closes
        return
    data = packet[9 : 9 + length]
    channel.localWindowLeft -= length
    if channel.localWindowLeft < channel.localWindowSize // 2:
        conn.adjustWindow(channel, channel.localWindowSize - channel.localWindowLeft)
    channel.dataReceived(data)


class _FastPacketMixin:
    """Packet layer replacing Conch's once :class:`EdgeCiphers` are current."""

    supportedCiphers = SUPPORTED_CIPHERS
    supportedMACs = SUPPORTED_MACS
    # zlib over an encrypted link leaks content lengths (CRIME-style) and
    # costs CPU; like OpenSSH's default, offer no compression.
    supportedCompressions = [b"none"]

    def connectionMade(self) -> None:  # noqa: N802
        if not internals.conch_keys_replaceable():
            # Conch's own packet layer: offer only what it implements.
            self.supportedCiphers = [
                c for c in self.supportedCiphers if c in SSHCiphers.cipherMap]
            self.supportedMACs = [m for m in self.supportedMACs if m in SSHCiphers.macMap]
        super().connectionMade()  # type: ignore[misc]

    def _keySetup(self, sharedSecret: bytes, exchangeHash: bytes) -> None:  # noqa: N802,N803
        # Conch's (private) key set-up, with our ciphers in place of its own.
        if internals.conch_keys_replaceable():
            self.nextEncryptions = EdgeCiphers.from_negotiated(self.nextEncryptions)
        super()._keySetup(sharedSecret, exchangeHash)  # type: ignore[misc]

    def sendPacket(self, messageType: int, payload: bytes) -> None:  # noqa: N802,N803
        """Send one packet, queueing it while a key exchange forbids it."""
        self.send_packet_parts(messageType, (payload,))

    def send_packet_parts(self, message_type: int, parts: Sequence[bytes]) -> None:
        """
        Send one packet whose payload is the concatenation of ``parts``
        (bytes or memoryviews), without first joining them: the bulk data path
        (:mod:`edgeaccess.ssh.process`) saves two copies per packet this way.
        """
        ciphers = self.currentEncryptions
        if not isinstance(ciphers, EdgeCiphers) or not internals.conch_may_send(
            self, message_type
        ):
            payload = parts[0] if len(parts) == 1 else b"".join(parts)
            return super().sendPacket(message_type, bytes(payload))  # type: ignore[misc]
        self.transport.writeSequence(
            ciphers.sealer.seal(self.outgoingPacketSequence, message_type, parts)
        )
        self.outgoingPacketSequence = (self.outgoingPacketSequence + 1) & _MASK32

    def send_data_packets(
        self, message_type: int, prefix: bytes, data: bytes | memoryview, max_chunk: int
    ) -> None:
        """
        Send ``data`` as consecutive packets whose payloads are ``prefix``,
        a uint32 chunk length and a chunk of at most ``max_chunk`` bytes
        (``CHANNEL_DATA``: prefix = recipient channel; ``CHANNEL_EXTENDED_DATA``:
        recipient channel + data type).  All the packets are sealed into one
        buffer and written with one call, straight to the socket when
        Twisted's write buffer is empty.
        """
        ciphers = self.currentEncryptions
        if not isinstance(ciphers, EdgeCiphers) or not internals.conch_may_send(
            self, message_type
        ):
            with memoryview(data) as view:
                for offset in range(0, len(view), max_chunk):
                    chunk = view[offset : offset + max_chunk]
                    self.send_packet_parts(message_type, (prefix, _pack_length(len(chunk)), chunk))
            return
        with memoryview(data) as view:
            wire = ciphers.sealer.seal_chunks(
                self.outgoingPacketSequence, message_type, prefix, view, max_chunk
            )
            packets = -(-len(view) // max_chunk)
        self.outgoingPacketSequence = (self.outgoingPacketSequence + packets) & _MASK32
        _write_wire(self.transport, wire)

    def read_data_packets(
        self, fd: int, message_type: int, prefix: bytes, limit: int, max_chunk: int, piece: int
    ) -> int | None:
        """
        Read up to ``limit`` bytes from ``fd`` and send them as the packets
        :meth:`send_data_packets` would, without a copy in user space: the
        reads (``os.readv``, at most ``piece`` bytes each, until one comes up
        short) land in the data slots of the sealer's buffer, which is then
        sealed in place and written.

        Return the number of bytes sent (0: end of file), or None when the
        packets cannot be sent now (no keys yet, or a key exchange is under
        way; nothing was read).  An error of the first read (``BlockingIOError``
        when there is nothing to read) propagates; one of a later read ends
        the batch and comes back on the next call.
        """
        ciphers = self.currentEncryptions
        if not isinstance(ciphers, EdgeCiphers) or not internals.conch_key_exchange_idle(self):
            return None
        sealer = ciphers.sealer
        size = 0
        readv = os.readv
        for buffers, want in sealer.slots(len(prefix), max_chunk).reads(limit, piece):
            try:
                got = readv(fd, buffers)
            except OSError:
                if size:
                    break
                raise
            size += got
            if got < want:
                break
        if size:
            wire = sealer.seal_slots(
                self.outgoingPacketSequence, message_type, prefix, size, max_chunk
            )
            packets = -(-size // max_chunk)
            self.outgoingPacketSequence = (self.outgoingPacketSequence + packets) & _MASK32
            _write_wire(self.transport, wire)
        return size

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """
        Conch's loop over the received packets, with the two bulk channel
        messages handled in place when the service is Conch's
        ``SSHConnection`` (not overridden): ``CHANNEL_WINDOW_ADJUST`` (one per
        ~100 KiB that OpenSSH's client reads, ~10,000 per GiB downloaded) goes
        straight to the channel's ``addWindowBytes``, and ``CHANNEL_DATA``
        (uploads) is checked against the window as
        ``SSHConnection.ssh_CHANNEL_DATA`` does, but its data is copied once
        instead of three times.
        """
        if not self.gotVersion:
            return super().dataReceived(data)  # type: ignore[misc]
        self.buf = self.buf + data
        packet = self.getPacket()
        while packet:
            kind = packet[0]
            if (kind == MSG_CHANNEL_DATA or kind == MSG_CHANNEL_WINDOW_ADJUST) and len(
                packet
            ) >= 9:
                service = self.service
                if kind == MSG_CHANNEL_DATA:
                    handler = getattr(type(service), "ssh_CHANNEL_DATA", None)
                    if handler is _CONNECTION_CHANNEL_DATA:
                        _channel_data(service, packet)
                        packet = self.getPacket()
                        continue
                else:
                    handler = getattr(type(service), "ssh_CHANNEL_WINDOW_ADJUST", None)
                    if handler is _CONNECTION_WINDOW_ADJUST:
                        local_channel, added = _unpack_two_lengths(packet, 1)
                        service.channels[local_channel].addWindowBytes(added)
                        packet = self.getPacket()
                        continue
            self.dispatchMessage(kind, packet[1:])
            packet = self.getPacket()

    def getPacket(self) -> bytes | None:  # noqa: N802
        """Return the next authenticated payload from ``self.buf``, or None."""
        ciphers = self.currentEncryptions
        if not isinstance(ciphers, EdgeCiphers):
            return super().getPacket()  # type: ignore[misc]
        buf = self.buf
        opener = ciphers.opener
        try:
            size = opener.packet_size(buf)
            if size is None or len(buf) < size:
                return None
            payload = opener.open(self.incomingPacketSequence, memoryview(buf)[:size])
        except _BadMAC:
            _log.warn("bad MAC from {peer}", peer=self.transport.getPeer())
            self.sendDisconnect(DISCONNECT_MAC_ERROR, b"bad MAC")
            return None
        except _BadPacket as error:
            _log.warn("bad packet from {peer}: {error}", peer=self.transport.getPeer(), error=error)
            self.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, str(error).encode("ascii"))
            return None
        self.buf = buf[size:]
        self.incomingPacketSequence = (self.incomingPacketSequence + 1) & _MASK32
        return payload


class EdgeServerTransport(_FastPacketMixin, SSHServerTransport):
    """
    Conch's server transport with AES-GCM, ETM MACs, cheaper HMAC and a
    correct ``server-sig-algs``.  Use as ``factory.protocol``.
    """

    #: Sent as ``server-sig-algs``; a subclass may narrow it.
    userAuthPublicKeyAlgorithms: list[bytes] = USER_AUTH_PUBLIC_KEY_ALGORITHMS
    supportedKeyExchanges = strong_key_exchanges(SSHServerTransport.supportedKeyExchanges)

    def connectionMade(self) -> None:  # noqa: N802
        # Writes are whole sealed batches already; Nagle would only hold a
        # small one (a handshake reply, a relayed packet) until the peer's
        # delayed ACK: ~40 ms more for ssh through the proxy's jump.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass
        super().connectionMade()

    def sendExtInfo(self, extensions: list[tuple[bytes, bytes]]) -> None:  # noqa: N802
        """Send EXT_INFO, with user-auth algorithms as ``server-sig-algs``."""
        fixed = [
            (name, b",".join(self.userAuthPublicKeyAlgorithms))
            if name == b"server-sig-algs"
            else (name, value)
            for name, value in extensions
        ]
        super().sendExtInfo(fixed)


class EdgeClientTransport(_FastPacketMixin, SSHClientTransport):
    """Conch's client transport with the same packet layer (tests, tools)."""

    supportedKeyExchanges = strong_key_exchanges(SSHClientTransport.supportedKeyExchanges)
