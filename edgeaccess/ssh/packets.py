"""The SSH packet layer of :mod:`edgeaccess.ssh.transport`: sealing and
opening binary packets with AES-GCM (RFC 5647 as OpenSSH does it) or
AES-CTR with HMAC-SHA2 (encrypt-and-MAC or encrypt-then-MAC), one packet
at a time or many into a reused buffer.
"""

from __future__ import annotations

import hmac as _stdlib_hmac
import os
import struct
from typing import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


_GCM_KEY_SIZES = {b"aes128-gcm@openssh.com": 16, b"aes256-gcm@openssh.com": 32}
_CTR_KEY_SIZES = {b"aes128-ctr": 16, b"aes192-ctr": 24, b"aes256-ctr": 32}
# name -> (hash algorithm, encrypt-then-MAC?)
_MACS = {
    b"hmac-sha2-256": (hashes.SHA256, False),
    b"hmac-sha2-512": (hashes.SHA512, False),
    b"hmac-sha2-256-etm@openssh.com": (hashes.SHA256, True),
    b"hmac-sha2-512-etm@openssh.com": (hashes.SHA512, True),
}
_BLOCK = 16  # AES block size; every cipher here pads to it
_GCM_TAG = 16
# OpenSSH's PACKET_MAX_SIZE (packet.c): larger lengths are a protocol error.
MAX_PACKET_LENGTH = 256 * 1024
_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_pack_length = struct.Struct(">L").pack
_unpack_length = struct.Struct(">L").unpack_from
_unpack_two_lengths = struct.Struct(">2L").unpack_from
_pack_header = struct.Struct(">LBB").pack
# Random padding is drawn from a pool refilled this many bytes at a time
# (one os.urandom call per ~200 packets instead of one per packet).
_PADDING_POOL = 4096
# Slot buffers kept per sealer (packet layouts: stdout, stderr, other sizes).
_MAX_SLOT_BUFFERS = 4


class _BadPacket(Exception):
    """An incoming packet is malformed (bad length or padding)."""


class _BadMAC(Exception):
    """An incoming packet failed authentication."""


def _padding_length(covered: int) -> int:
    """Padding so that ``covered + padding`` is a multiple of the block, >= 4."""
    padding = _BLOCK - covered % _BLOCK
    return padding + _BLOCK if padding < 4 else padding


def _check_length(length: int, covered_extra: int) -> None:
    if length > MAX_PACKET_LENGTH or length < 8:
        raise _BadPacket(f"bad packet length {length}")
    if (length + covered_extra) % _BLOCK:
        raise _BadPacket(f"bad packet length {length} (not a block multiple)")


class _Slots:
    """
    Packets of one run laid out back to back in a reusable buffer: packet
    ``k`` starts at ``k * stride`` and its chunk of channel data at
    ``k * stride + head``, so the data can be read (``os.readv``) or copied
    straight into place and then sealed where it lies (the ciphers run in
    place).  Every packet but the last carries a full ``step`` of data, so the
    sealed packets are contiguous.
    """

    def __init__(self, head: int, step: int, stride: int) -> None:
        self.head = head
        self.step = step
        self.stride = stride
        self.buf = memoryview(bytearray(0))
        self._reads_key: tuple[int, int] | None = None
        self._reads: list[tuple[list[memoryview], int]] = []

    def ensure(self, size: int) -> None:
        """Make room for ``size`` bytes of data (at most 19 bytes of padding last)."""
        need = -(-size // self.step) * self.stride + 2 * _BLOCK
        if len(self.buf) < need:
            self.buf = memoryview(bytearray(need))
            self._reads_key = None

    def reads(self, limit: int, piece: int) -> list[tuple[list[memoryview], int]]:
        """``(buffers, size)`` for successive reads of at most ``piece`` bytes
        that put up to ``limit`` bytes of data into the packets' data slots."""
        self.ensure(limit)
        if self._reads_key != (limit, piece):
            buf, head, step, stride = self.buf, self.head, self.step, self.stride
            reads = []
            for offset in range(0, limit, piece):
                end = min(offset + piece, limit)
                buffers = []
                position = offset
                while position < end:
                    packet, within = divmod(position, step)
                    size = min(step - within, end - position)
                    start = packet * stride + head + within
                    buffers.append(buf[start : start + size])
                    position += size
                reads.append((buffers, end - offset))
            self._reads, self._reads_key = reads, (limit, piece)
        return self._reads

    def place(self, data: memoryview) -> None:
        """Copy ``data`` into the data slots."""
        self.ensure(len(data))
        buf, head, step, stride = self.buf, self.head, self.step, self.stride
        at = head
        for offset in range(0, len(data), step):
            chunk = data[offset : offset + step]
            buf[at : at + len(chunk)] = chunk
            at += stride


class _BulkSealer:
    """
    Seals a run of data packets (``type, prefix, uint32 length, chunk``)
    whose chunks already lie in the data slots of a :class:`_Slots` buffer,
    in place: the data is read (or copied once) into the buffer, the header,
    padding and MAC are written around it and the cipher encrypts it where it
    is.
    """

    def _init_bulk(self, trailer: int, covers_length: bool) -> None:
        self._trailer = trailer  # MAC or tag bytes after each packet
        # Whether the block alignment covers the 4-byte packet length
        # (encrypt-and-MAC) or not (AEAD, encrypt-then-MAC).
        self._covers_length = covers_length
        # (head, step) -> buffer: stdout and stderr packets differ in head.
        self._slots: dict[tuple[int, int], _Slots] = {}
        self._headers: dict[int, object] = {}
        self._pool = b""
        self._pool_at = 0

    def _padding_bytes(self, count: int) -> bytes:
        at = self._pool_at
        if at + count > len(self._pool):
            self._pool = os.urandom(_PADDING_POOL)
            at = 0
        self._pool_at = at + count
        return self._pool[at : at + count]

    def _padding_for(self, head: int, chunk: int) -> int:
        return _padding_length(head + chunk if self._covers_length else head - 4 + chunk)

    def slots(self, prefix_size: int, step: int) -> _Slots:
        """The slot buffer for packets with a ``prefix_size``-byte prefix and
        chunks of at most ``step`` bytes (a few layouts are kept)."""
        head = 10 + prefix_size
        slots = self._slots.get((head, step))
        if slots is None:
            if len(self._slots) >= _MAX_SLOT_BUFFERS:
                self._slots.clear()
            stride = head + step + self._padding_for(head, step) + self._trailer
            slots = self._slots[head, step] = _Slots(head, step, stride)
        return slots

    def _header(self, prefix_size: int):
        """``pack_into(buf, at, packet length, padding, type, prefix, chunk length)``."""
        pack_into = self._headers.get(prefix_size)
        if pack_into is None:
            pack_into = self._headers[prefix_size] = struct.Struct(f">LBB{prefix_size}sL").pack_into
        return pack_into

    def seal_chunks(
        self, seqnum: int, message_type: int, prefix: bytes, data: memoryview, step: int
    ) -> memoryview:
        """Packets ``type, prefix, uint32 len, chunk`` for each ``step`` of ``data``."""
        self.slots(len(prefix), step).place(data)
        return self.seal_slots(seqnum, message_type, prefix, len(data), step)

    def seal_slots(
        self, seqnum: int, message_type: int, prefix: bytes, size: int, step: int
    ) -> memoryview:  # pragma: no cover - overridden
        """Seal the ``size`` bytes of data in ``slots(len(prefix), step)``."""
        raise NotImplementedError


class _GcmSealer(_BulkSealer):
    """Outgoing AES-GCM packets (RFC 5647 as in OpenSSH)."""

    def __init__(self, key: bytes, iv: bytes) -> None:
        self._init_bulk(_GCM_TAG, covers_length=False)
        self._aead = AESGCM(key)
        self._fixed = iv[:4]
        self._counter = int.from_bytes(iv[4:12], "big")

    def seal(self, seqnum: int, message_type: int, parts: Sequence[bytes]) -> Sequence[bytes]:
        size = sum(map(len, parts))
        padding = _padding_length(2 + size)
        length = _pack_length(2 + size + padding)
        nonce = self._fixed + self._counter.to_bytes(8, "big")
        self._counter = (self._counter + 1) & _MASK64
        body = b"".join((bytes((padding, message_type)), *parts, os.urandom(padding)))
        return (length, self._aead.encrypt(nonce, body, length))

    def seal_slots(
        self, seqnum: int, message_type: int, prefix: bytes, size: int, step: int
    ) -> memoryview:
        """Seal the ``size`` bytes of data in ``slots(len(prefix), step)``."""
        slots = self.slots(len(prefix), step)
        buf, head, stride = slots.buf, slots.head, slots.stride
        header = self._header(len(prefix))
        encrypt_into = self._aead.encrypt_into
        fixed = self._fixed
        counter = self._counter
        at = end = 0
        for offset in range(0, size, step):
            chunk = min(step, size - offset)
            padding = _padding_length(head - 4 + chunk)
            length = head + chunk + padding
            header(buf, at, length - 4, padding, message_type, prefix, chunk)
            buf[at + head + chunk : at + length] = self._padding_bytes(padding)
            end = at + length + _GCM_TAG
            encrypt_into(
                fixed + counter.to_bytes(8, "big"),
                buf[at + 4 : at + length],
                buf[at : at + 4],
                buf[at + 4 : end],
            )
            counter = (counter + 1) & _MASK64
            at += stride
        self._counter = counter
        return buf[:end]


class _GcmOpener:
    """Incoming AES-GCM packets."""

    def __init__(self, key: bytes, iv: bytes) -> None:
        self._aead = AESGCM(key)
        self._fixed = iv[:4]
        self._counter = int.from_bytes(iv[4:12], "big")

    def packet_size(self, buf: bytes) -> int | None:
        if len(buf) < 4:
            return None
        (length,) = _unpack_length(buf)
        _check_length(length, 0)
        return 4 + length + _GCM_TAG

    def open(self, seqnum: int, wire: memoryview) -> bytes:
        nonce = self._fixed + self._counter.to_bytes(8, "big")
        try:
            body = self._aead.decrypt(nonce, wire[4:], wire[:4])
        except InvalidTag:
            raise _BadMAC() from None
        self._counter = (self._counter + 1) & _MASK64
        return _strip_padding(body, 0)


def _strip_padding(body, start: int):
    """``body[start]`` is the padding length; return the payload after it."""
    padding = body[start]
    end = len(body) - padding
    if end <= start + 1:
        raise _BadPacket("bad padding length")
    return body[start + 1 : end]


class _HmacMixin:
    """A prepared HMAC (keyed once per key exchange), copied per packet."""

    def _init_mac(self, mac_name: bytes, mac_key: bytes) -> None:
        hash_class, self.etm = _MACS[mac_name]
        algorithm = hash_class()
        self.mac_size = algorithm.digest_size
        # RFC 4253 7.2: the MAC key is the first digest-size bytes.
        self._mac = crypto_hmac.HMAC(mac_key[: self.mac_size], algorithm)

    def _mac_of(self, seqnum: int, *parts: bytes | memoryview) -> bytes:
        mac = self._mac.copy()
        mac.update(_pack_length(seqnum))
        for part in parts:
            mac.update(part)
        return mac.finalize()


class _CtrSealer(_HmacMixin, _BulkSealer):
    """Outgoing AES-CTR packets with HMAC (encrypt-and-MAC or encrypt-then-MAC)."""

    def __init__(self, key: bytes, iv: bytes, mac_name: bytes, mac_key: bytes) -> None:
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(iv[:16])).encryptor()
        self._init_mac(mac_name, mac_key)
        self._init_bulk(self.mac_size, covers_length=not self.etm)

    def seal_slots(
        self, seqnum: int, message_type: int, prefix: bytes, size: int, step: int
    ) -> memoryview:
        """Seal the ``size`` bytes of data in ``slots(len(prefix), step)``."""
        slots = self.slots(len(prefix), step)
        buf, head, stride = slots.buf, slots.head, slots.stride
        header = self._header(len(prefix))
        update_into = self._encryptor.update_into
        prepared = self._mac
        etm = self.etm
        extra = 0 if etm else 4
        mac_size = self.mac_size
        at = end = 0
        for offset in range(0, size, step):
            chunk = min(step, size - offset)
            padding = _padding_length(head - 4 + extra + chunk)
            length = head + chunk + padding
            header(buf, at, length - 4, padding, message_type, prefix, chunk)
            buf[at + head + chunk : at + length] = self._padding_bytes(padding)
            packet = buf[at : at + length]
            mac = prepared.copy()
            mac.update(_pack_length(seqnum))
            if etm:
                body = packet[4:]
                update_into(body, body)
                mac.update(packet)
            else:
                mac.update(packet)
                update_into(packet, packet)
            end = at + length + mac_size
            buf[at + length : end] = mac.finalize()
            seqnum = (seqnum + 1) & _MASK32
            at += stride
        return buf[:end]

    def seal(self, seqnum: int, message_type: int, parts: Sequence[bytes]) -> Sequence[bytes]:
        size = sum(map(len, parts))
        if self.etm:
            padding = _padding_length(2 + size)
            length = _pack_length(2 + size + padding)
            body = b"".join((bytes((padding, message_type)), *parts, os.urandom(padding)))
            encrypted = self._encryptor.update(body)
            return (length, encrypted, self._mac_of(seqnum, length, encrypted))
        padding = _padding_length(6 + size)
        packet = b"".join(
            (_pack_header(2 + size + padding, padding, message_type), *parts, os.urandom(padding))
        )
        return (self._encryptor.update(packet), self._mac_of(seqnum, packet))


class _CtrOpener(_HmacMixin):
    """Incoming AES-CTR packets with HMAC."""

    def __init__(self, key: bytes, iv: bytes, mac_name: bytes, mac_key: bytes) -> None:
        self._decryptor = Cipher(algorithms.AES(key), modes.CTR(iv[:16])).decryptor()
        self._init_mac(mac_name, mac_key)
        # Encrypt-and-MAC: the first block, decrypted to learn the length.
        self._first: bytes | None = None
        self._scratch = memoryview(bytearray(0))

    def packet_size(self, buf: bytes) -> int | None:
        if self.etm:
            if len(buf) < 4:
                return None
            (length,) = _unpack_length(buf)
            _check_length(length, 0)
            return 4 + length + self.mac_size
        if self._first is None:
            if len(buf) < _BLOCK:
                return None
            self._first = self._decryptor.update(buf[:_BLOCK])
        (length,) = _unpack_length(self._first)
        _check_length(length, 4)
        return 4 + length + self.mac_size

    def open(self, seqnum: int, wire: memoryview) -> bytes:
        end = len(wire) - self.mac_size
        received_mac = wire[end:]
        if self.etm:
            expected = self._mac_of(seqnum, wire[:end])
            if not _stdlib_hmac.compare_digest(expected, received_mac):
                raise _BadMAC()
            return _strip_padding(self._decryptor.update(wire[4:end]), 0)
        assert self._first is not None
        # Decrypt into a reused buffer after the first block: the payload is
        # then copied once (into the bytes returned), not three times.
        if len(self._scratch) < end:
            self._scratch = memoryview(bytearray(end))
        packet = self._scratch[:end]
        packet[:_BLOCK] = self._first
        self._first = None
        self._decryptor.update_into(wire[_BLOCK:end], packet[_BLOCK:])
        expected = self._mac_of(seqnum, packet)
        if not _stdlib_hmac.compare_digest(expected, received_mac):
            raise _BadMAC()
        return bytes(_strip_padding(packet, 4))
