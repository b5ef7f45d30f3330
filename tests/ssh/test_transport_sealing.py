"""Batched sealing (``seal_chunks``) must produce packets the opener reads
back exactly: every cipher/MAC pair, several sizes and chunkings, and
interleaved with single-packet seals (sequence numbers stay in step)."""

from __future__ import annotations

import os
import struct

import pytest

from edgeaccess.ssh import transport as t


def _pairs():
    yield "gcm", t._GcmSealer(b"k" * 16, b"i" * 12), t._GcmOpener(b"k" * 16, b"i" * 12)
    for mac in (b"hmac-sha2-256", b"hmac-sha2-256-etm@openssh.com", b"hmac-sha2-512"):
        yield (mac.decode(), t._CtrSealer(b"k" * 16, b"i" * 16, mac, b"m" * 64),
               t._CtrOpener(b"k" * 16, b"i" * 16, mac, b"m" * 64))


@pytest.mark.parametrize("name,sealer,opener", list(_pairs()), ids=lambda v: v if isinstance(v, str) else "")
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
