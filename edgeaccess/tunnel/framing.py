"""The tunnel's byte stream: AMP boxes, plus negotiated fast data frames.

Bulk data through AMP costs a box per frame: seven length-prefixed strings
parsed one by one, a command lookup, argument parsing and a Deferred. When
both ends announce :data:`FAST_DATA_CAPABILITY` in ``Hello``, ``Data`` and
``WindowAdjust`` travel instead as *fast frames* on the same TLS stream,
between boxes::

    kind (1 byte) | channel (4 bytes, big-endian) | value (4 bytes, big-endian) | payload

``kind`` 0x01 is data (``value`` is the payload length, at most
:data:`MAX_FAST_FRAME`); 0x02 is a window adjust (``value`` is the credit,
no payload). An AMP box always starts with a key length below 256 (the
first byte is 0x00), so a nonzero first byte at a box boundary is a fast
frame and never a box. Frames and boxes keep their order on the stream, and
the channel checks (known id, window, end of file) are the same as for the
``Data`` and ``WindowAdjust`` boxes.

:class:`FramedBoxReader` replaces ``Int16StringReceiver.dataReceived`` with
one parser for both: it also avoids Twisted's re-concatenation of the whole
unprocessed buffer on every read (a box or frame larger than one TLS record
used to be copied once per record).
"""

from __future__ import annotations

import struct

from edgeaccess.tunnel.protocol import FAST_DATA_CAPABILITY, ProtocolViolation

__all__ = ["FAST_DATA_CAPABILITY", "FramedBoxReader", "data_frame", "window_adjust_frame"]
#: Frame kinds (the first byte; an AMP box starts with 0x00).
FRAME_DATA = 0x01
FRAME_WINDOW_ADJUST = 0x02
#: The largest payload of one fast data frame.
MAX_FAST_FRAME = 256 * 1024

_HEADER = struct.Struct(">BII")
HEADER_SIZE = _HEADER.size
_pack = _HEADER.pack
_unpack_from = _HEADER.unpack_from


def data_frame(channel: int, payload: bytes | memoryview) -> bytes:
    """One fast data frame (header and payload in a single bytes object)."""
    return _pack(FRAME_DATA, channel, len(payload)) + payload


def window_adjust_frame(channel: int, credit: int) -> bytes:
    """One fast window-adjust frame."""
    return _pack(FRAME_WINDOW_ADJUST, channel, credit)


class FramedBoxReader:
    """Mixed into an ``amp.BinaryBoxProtocol``: parses boxes and fast frames.

    The host provides what ``Int16StringReceiver`` uses (``stringReceived``,
    ``lengthLimitExceeded``, ``MAX_LENGTH``, ``paused``, ``state``) and
    :meth:`fast_frame_received`. Fast frames are accepted only once
    :attr:`fast_frames_in` is set (after the capability was negotiated);
    before that a nonzero first byte is an overlong AMP key, as always.

    A data frame's payload is handed on as it arrives (a frame split over
    several reads arrives in several pieces): nothing is joined, and what
    one read brings of a payload goes on without waiting for the rest.
    """

    fast_frames_in = False
    _chunks: list[bytes] | None = None
    _pending = 0
    _needed = 0
    #: Payload bytes of the current data frame still to come, and its channel.
    _frame_left = 0
    _frame_channel = 0

    def fast_frame_received(self, kind: int, channel: int, value: int, payload: bytes) -> None:
        """A fast frame arrived: a window adjust (``value`` the credit, no
        payload), or a piece of a data frame's payload (``value`` its length;
        a frame with no payload comes as one empty piece)."""
        raise NotImplementedError

    def feed(self, data: bytes) -> None:
        """Parse ``data``; whatever is incomplete waits for more.

        Raises ProtocolViolation on a malformed fast frame (the caller
        closes the tunnel).
        """
        pos = 0
        if self._frame_left:
            pos = self._payload_piece(data, 0)
            if pos == len(data):
                return
        elif self._chunks is not None:
            # Joined only once enough has arrived for the item that waits
            # (a box, or a frame header: payloads are never joined).
            chunks = self._chunks
            chunks.append(data)
            self._pending += len(data)
            if self._pending < self._needed:
                return
            data = b"".join(chunks)
            self._chunks = None
        self._parse(data, pos)

    def _payload_piece(self, data: bytes, pos: int) -> int:
        """Hand on what ``data`` holds of the current frame's payload from ``pos``."""
        take = min(self._frame_left, len(data) - pos)
        piece = data if pos == 0 and take == len(data) else data[pos:pos + take]
        self._frame_left -= take
        self.fast_frame_received(FRAME_DATA, self._frame_channel, take, piece)
        return pos + take

    def _parse(self, data: bytes, pos: int) -> None:
        end = len(data)
        while not self.paused:
            left = end - pos
            if left < 2:
                needed = 2
                break
            first = data[pos]
            if first and self.fast_frames_in and self.state == "init":
                if left < HEADER_SIZE:
                    needed = HEADER_SIZE
                    break
                kind, channel, value = _unpack_from(data, pos)
                pos += HEADER_SIZE
                if kind == FRAME_DATA:
                    if value > MAX_FAST_FRAME:
                        raise ProtocolViolation(f"data frame of {value} bytes")
                    if value == 0:
                        self.fast_frame_received(kind, channel, 0, b"")
                        continue
                    self._frame_left = value
                    self._frame_channel = channel
                    if pos == end:
                        return  # the payload starts with the next read
                    pos = self._payload_piece(data, pos)
                elif kind == FRAME_WINDOW_ADJUST:
                    self.fast_frame_received(kind, channel, value, b"")
                else:
                    raise ProtocolViolation(f"unknown frame kind {kind}")
                continue
            length = (first << 8) | data[pos + 1]
            if length > self.MAX_LENGTH:
                self.lengthLimitExceeded(length)
                return
            stop = pos + 2 + length
            if stop > end:
                needed = 2 + length
                break
            string = data[pos + 2:stop]
            pos = stop
            self.stringReceived(string)
        else:
            return  # paused: the rest is dropped (the tunnel is closing)
        if pos < end:
            rest = data[pos:] if pos else data
            self._chunks = [rest]
            self._pending = end - pos
            self._needed = needed
