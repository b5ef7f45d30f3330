"""Reading along kubectl's SPDY/3.1 exec streams (edgeaccess.kube.spdy)."""

from __future__ import annotations

import struct
import zlib

from edgeaccess.kube.spdy import DICTIONARY, SpdyReader


def header_block(headers: dict) -> bytes:
    out = struct.pack(">I", len(headers))
    for name, value in headers.items():
        out += struct.pack(">I", len(name)) + name.encode()
        out += struct.pack(">I", len(value)) + value.encode()
    return out


def syn_stream(deflate, stream_id: int, streamtype: str) -> bytes:
    block = deflate.compress(header_block({"streamtype": streamtype})) + \
        deflate.flush(zlib.Z_SYNC_FLUSH)
    payload = struct.pack(">IIBB", stream_id, 0, 0, 0) + block
    return struct.pack(">HHI", 0x8003, 1, len(payload)) + payload


def data(stream_id: int, payload: bytes, fin: bool = False) -> bytes:
    return struct.pack(">II", stream_id, (int(fin) << 24) | len(payload)) + payload


def test_streams_are_named_by_the_client_and_data_is_handed_on_by_name():
    assert len(DICTIONARY) == 1423
    deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, zdict=DICTIONARY)
    streams: dict[int, str] = {}
    seen_client, seen_server = [], []
    client = SpdyReader(streams, lambda kind, d: seen_client.append((kind, d)))
    server = SpdyReader(streams, lambda kind, d: seen_server.append((kind, d)))
    wire = syn_stream(deflate, 1, "error") + syn_stream(deflate, 3, "stdout") + \
        syn_stream(deflate, 5, "resize") + data(5, b'{"Width":100,"Height":30}')
    for i in range(len(wire)):  # split anywhere
        client.feed(wire[i:i + 1])
    assert streams == {1: "error", 3: "stdout", 5: "resize"}
    assert seen_client == [("resize", b'{"Width":100,"Height":30}')]
    server.feed(data(3, b"output") + data(1, b'{"status":"Success"}', fin=True))
    assert seen_server == [("stdout", b"output"), ("error", b'{"status":"Success"}')]


def test_garbage_stops_the_reading_without_raising():
    reader = SpdyReader({}, lambda kind, d: None)
    reader.feed(struct.pack(">HHI", 0x8003, 1, 12) + b"\x00" * 10 + b"zz")
    assert reader.broken
    reader.feed(b"anything")  # ignored
