"""The exec tap's WebSocket frame reader (edgeaccess.kube.sessions.FrameReader):
payload per channel whatever the framing, masking and splitting; unwanted channels skipped."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeaccess.kube.sessions import FrameReader


def _frame(opcode: int, payload: bytes, mask: bytes | None, fin: bool = True) -> bytes:
    length = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([bit | length])
    elif length < 65536:
        head += bytes([bit | 126]) + length.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + length.to_bytes(8, "big")
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        head += mask
    return head + payload


_messages = st.lists(st.tuples(
    st.integers(0, 4),  # channel
    st.lists(st.binary(max_size=300), min_size=1, max_size=3),  # fragments
    st.booleans(),  # masked
    st.booleans(),  # a ping before it
), max_size=8)


@settings(max_examples=150, deadline=None)
@given(_messages, st.integers(1, 97), st.sampled_from([None, {3}, {1, 3}]))
def test_each_wanted_channel_gets_its_payload_whatever_the_pieces(messages, step, wanted):
    wire = b""
    expected: dict[int, bytes] = {}
    for channel, fragments, masked, ping in messages:
        if ping:
            wire += _frame(0x9, b"ping", os.urandom(4) if masked else None)
        first = bytes([channel]) + fragments[0]
        parts = [first] + fragments[1:]
        for i, part in enumerate(parts):
            opcode = 0x2 if i == 0 else 0x0
            wire += _frame(opcode, part, os.urandom(4) if masked else None,
                           fin=i == len(parts) - 1)
        if wanted is None or channel in wanted:
            expected[channel] = expected.get(channel, b"") + b"".join(fragments)
    got: dict[int, bytes] = {}

    def on_data(channel, data):
        got[channel] = got.get(channel, b"") + data

    reader = FrameReader(on_data, None if wanted is None else wanted.__contains__)
    for i in range(0, len(wire), step):
        reader.feed(wire[i:i + step])
    assert not reader.broken
    assert {k: v for k, v in got.items() if v} == {k: v for k, v in expected.items() if v}


def test_large_frames_with_long_lengths():
    payload = os.urandom(70_000)
    wire = _frame(0x2, b"\x01" + payload, None) + _frame(0x2, b"\x03{}", b"abcd")
    got = []
    reader = FrameReader(lambda c, d: got.append((c, d)), lambda c: c == 3)
    reader.feed(wire[:5])
    reader.feed(wire[5:])
    assert got == [(3, b"{}")]
