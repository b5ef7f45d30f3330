"""Reading along a SPDY/3.1 exec stream (kubectl's fallback): which stream is which, and its data.

The proxy never changes these bytes; :class:`SpdyReader` parses one direction
of the upgraded connection: ``SYN_STREAM`` frames (the client names each
stream's ``streamtype`` in a header block compressed with zlib and the
SPDY/3 dictionary, one compression context per direction) and ``DATA``
frames, handed on as ``on_data(streamtype, bytes)``. Anything it cannot read
makes it stop reading (the splice goes on).
"""

from __future__ import annotations

import struct
import zlib
from typing import Callable

from twisted.logger import Logger

_log = Logger()

# The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00,
# section 2.6.10.1): length-prefixed words, then a run of plain text.
_WORDS = (
    "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset",
    "accept-encoding", "accept-language", "accept-ranges", "age", "allow", "authorization",
    "cache-control", "connection", "content-base", "content-encoding", "content-language",
    "content-length", "content-location", "content-md5", "content-range", "content-type",
    "date", "etag", "expect", "expires", "from", "host", "if-match", "if-modified-since",
    "if-none-match", "if-range", "if-unmodified-since", "last-modified", "location",
    "max-forwards", "pragma", "proxy-authenticate", "proxy-authorization", "range", "referer",
    "retry-after", "server", "te", "trailer", "transfer-encoding", "upgrade", "user-agent",
    "vary", "via", "warning", "www-authenticate", "method", "get", "status", "200 OK",
    "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin",
)
_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417"
    "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently"
    "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error"
    "501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct "
    "Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,"
    "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,"
    "publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY = b"".join(struct.pack(">I", len(w)) + w.encode() for w in _WORDS) + _TAIL.encode()

SYN_STREAM = 1
#: Largest frame read along (kubectl's are far smaller); a larger one stops the reading.
MAX_FRAME = 1024 * 1024
#: Largest decompressed header block.
MAX_HEADERS = 64 * 1024


def parse_header_block(data: bytes) -> dict[str, str]:
    """``{name: value}`` of an uncompressed SPDY/3 header block."""
    (count,) = struct.unpack_from(">I", data, 0)
    offset, headers = 4, {}
    for _ in range(min(count, 256)):
        (n,) = struct.unpack_from(">I", data, offset)
        name = data[offset + 4:offset + 4 + n]
        offset += 4 + n
        (n,) = struct.unpack_from(">I", data, offset)
        headers[name.decode("latin-1").lower()] = \
            data[offset + 4:offset + 4 + n].decode("latin-1")
        offset += 4 + n
    return headers


class SpdyReader:
    """One direction of a SPDY/3.1 session.

    :param streams: ``{stream id: streamtype}``, shared by both directions'
        readers (the client names streams, the server answers on them).
    :param on_data: called with ``(streamtype, data)`` for each DATA frame.
    """

    def __init__(self, streams: dict[int, str], on_data: Callable[[str, bytes], None]) -> None:
        self.streams = streams
        self._on_data = on_data
        self._buffer = b""
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)
        self.broken = False

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        self._buffer += data
        try:
            while len(self._buffer) >= 8:
                length = int.from_bytes(self._buffer[5:8], "big")
                if length > MAX_FRAME:
                    raise ValueError("frame too large")
                if len(self._buffer) < 8 + length:
                    return
                frame, self._buffer = self._buffer[:8 + length], self._buffer[8 + length:]
                self._frame(frame)
        except (ValueError, struct.error, zlib.error) as e:
            _log.info("kube session tap: unreadable SPDY stream ({reason}); not read further",
                      reason=e)
            self.broken = True
            self._buffer = b""

    def _frame(self, frame: bytes) -> None:
        payload = frame[8:]
        if frame[0] & 0x80:
            if struct.unpack_from(">H", frame, 2)[0] != SYN_STREAM:
                return
            (stream_id,) = struct.unpack_from(">I", payload, 0)
            block = self._inflate.decompress(payload[10:], MAX_HEADERS)
            self.streams[stream_id & 0x7FFFFFFF] = \
                parse_header_block(block).get("streamtype", "")
            return
        (stream_id,) = struct.unpack_from(">I", frame, 0)
        kind = self.streams.get(stream_id & 0x7FFFFFFF)
        if kind and payload:
            self._on_data(kind, payload)
