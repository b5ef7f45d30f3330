"""HTTP/1.1 on the wire, for the relays that pass messages on: heads parsed, bodies streamed.

The Kubernetes proxy and agent and the app proxy relay HTTP/1.1 without
terminating it: a :class:`MessageReader` finds where each message's head and
body end in one direction of a connection, hands the parsed :class:`Head`
(and its raw bytes, for a hop that passes the head on unchanged) to its
handler, then the body's bytes exactly as they came (chunk framing
included, so the far side reads the same framing), then the end of the
message. Nothing here buffers a body; only heads are rewritten.

Requests are read strictly (RFC 9112): one ``Transfer-Encoding: chunked``
or one ``Content-Length``, never both, no conflicting lengths (request
smuggling), no obsolete line folding, no bare CR or LF, token header names,
a bounded head and header count. Anything else raises :class:`BadMessage`
with the status to answer.

The handler answers each head with its framing (:func:`request_framing`,
:func:`response_framing` or its own decision), because only it knows the
request a response answers. It may :meth:`MessageReader.hold` the stream at
the end of a message (a relay answering one request at a time) and
:meth:`~MessageReader.switch_to_raw` after an upgrade.
"""

from __future__ import annotations

import re
from typing import Callable, Protocol

from twisted.internet.protocol import Protocol as Protocol_

#: Largest message head (request or status line and every header).
MAX_HEAD = 64 * 1024
#: Most header fields in one head.
MAX_HEADERS = 128
#: Longest chunk-size line (with extensions) or trailer line.
MAX_CHUNK_LINE = 4096

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
#: Control characters other than HTAB, CR and LF (those are checked by counting).
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
#: Header lines that pass every check of :func:`parse_head` (each after a
#: CRLF: a token name, a colon, a value without CR, LF or other controls):
#: one match instead of a check per line; anything else takes the line by
#: line path, which names what is wrong.
_GOOD_FIELDS = re.compile(rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*)*")
_START_LINE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
_HEAD_END = b"\r\n\r\n"

#: Reason phrases of the statuses the relays answer themselves.
REASON_PHRASES = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 413: "Payload Too Large",
    421: "Misdirected Request", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout", 505: "HTTP Version Not Supported"}

#: Framing kinds a head can announce.
NO_BODY = "none"
LENGTH = "length"
CHUNKED = "chunked"
UNTIL_CLOSE = "close"


class BadMessage(Exception):
    """A malformed or refused message: ``status`` is what to answer (4xx/5xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Head:
    """A request line or status line and the header fields, in wire order.

    For a request ``start`` is ``(method, target, version)``; for a response
    ``(version, status, reason)``. Header names keep their case; lookups
    ignore it.
    """

    __slots__ = ("start", "headers")

    def __init__(self, start: tuple[bytes, bytes, bytes],
                 headers: list[tuple[bytes, bytes]]) -> None:
        self.start = start
        self.headers = headers

    def get(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        size = len(name)
        for key, value in self.headers:
            if len(key) == size and key.lower() == name:
                return value
        return None

    def get_all(self, name: bytes) -> list[bytes]:
        name = name.lower()
        size = len(name)
        return [value for key, value in self.headers
                if len(key) == size and key.lower() == name]

    def tokens(self, name: bytes) -> set[bytes]:
        """The comma-separated tokens of every ``name`` header, lowercased."""
        found = set()
        for value in self.get_all(name):
            found.update(t.strip().lower() for t in value.split(b",") if t.strip())
        return found

    def remove(self, name: bytes) -> None:
        name = name.lower()
        self.headers = [(k, v) for k, v in self.headers if k.lower() != name]

    def remove_if(self, predicate: Callable[[bytes], bool]) -> None:
        """Drop every header whose lowercased name ``predicate`` accepts."""
        self.headers = [(k, v) for k, v in self.headers if not predicate(k.lower())]

    def set(self, name: bytes, value: bytes) -> None:
        """Replace every ``name`` header by one with ``value``."""
        self.remove(name)
        self.headers.append((name, value))

    def serialize(self) -> bytes:
        lines = [b" ".join(self.start)]
        lines += [k + b": " + v for k, v in self.headers]
        return b"\r\n".join(lines) + _HEAD_END

    # requests
    @property
    def method(self) -> bytes:
        return self.start[0]

    @property
    def target(self) -> bytes:
        return self.start[1]

    @property
    def wants_upgrade(self) -> bool:
        """A request asking to switch protocols (``Connection: upgrade`` and ``Upgrade``)."""
        return b"upgrade" in self.tokens(b"connection") and self.get(b"upgrade") is not None

    # responses
    @property
    def status(self) -> int:
        return int(self.start[1])


def parse_head(raw: bytes, request: bool = True) -> Head:
    """Parse a head (without its final empty line).

    :raises BadMessage: 400 for anything malformed (505 for another HTTP
        version; a relay answers 502 for a bad response).
    """
    start_line, crlf, fields = raw.partition(b"\r\n")
    if _GOOD_FIELDS.fullmatch(raw, len(start_line)) and not _START_LINE_BAD.search(start_line):
        # Every header line is well formed (the common case): only the start
        # line and the count are left to check.
        return Head(_start(start_line, request), _fields(fields) if crlf else [])
    return _parse_head_by_line(raw, request)


def _parse_head_by_line(raw: bytes, request: bool) -> Head:
    """:func:`parse_head` checking line by line (what it does with a head whose
    header lines are not all well formed: this one names the fault)."""
    lines = raw.split(b"\r\n")
    if raw.count(b"\n") != len(lines) - 1 or raw.count(b"\r") != len(lines) - 1:
        raise BadMessage(400, "bare CR or LF in the head")
    if _CONTROL.search(raw):
        raise BadMessage(400, "control character in the head")
    start = _start(lines[0], request)
    if len(lines) > MAX_HEADERS + 1:
        raise BadMessage(431, "too many header fields")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            if not line:
                raise BadMessage(400, "empty header line")
            if line[:1] in (b" ", b"\t"):
                raise BadMessage(400, "obsolete header line folding")
            raise BadMessage(400, "malformed header field")
        headers.append((name, value.strip(b" \t")))
    return Head(start, headers)


def _start(start_line: bytes, request: bool) -> tuple[bytes, bytes, bytes]:
    if request:
        parts = start_line.split(b" ")
        if len(parts) != 3:
            raise BadMessage(400, "malformed request line")
        method, target, version = parts
        if not _TOKEN.fullmatch(method) or not _TARGET.fullmatch(target):
            raise BadMessage(400, "malformed request line")
        if version not in _VERSIONS:
            raise BadMessage(505, "only HTTP/1.0 and HTTP/1.1 are served")
        return (method, target, version)
    version, _, rest = start_line.partition(b" ")
    status, _, reason = rest.partition(b" ")
    if version not in _VERSIONS or len(status) != 3 or not status.isdigit():
        raise BadMessage(400, "malformed status line")
    return (version, status, reason)


def _fields(fields: bytes) -> list[tuple[bytes, bytes]]:
    # Lines already checked by _GOOD_FIELDS.
    lines = fields.split(b"\r\n")
    if len(lines) > MAX_HEADERS:
        raise BadMessage(431, "too many header fields")
    headers = []
    for line in lines:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip(b" \t")))
    return headers


def _content_length(head: Head) -> int | None:
    values = head.get_all(b"content-length")
    if not values:
        return None
    found = {v.strip() for value in values for v in value.split(b",")}
    if len(found) != 1:
        raise BadMessage(400, "conflicting Content-Length")
    (text,) = found
    if not text.isdigit() or len(text) > 18:
        raise BadMessage(400, "malformed Content-Length")
    return int(text)


def request_framing(head: Head) -> tuple[str, int]:
    """How a request's body is delimited: ``(kind, length)``."""
    codings = head.get_all(b"transfer-encoding")
    if codings:
        if head.get_all(b"content-length"):
            raise BadMessage(400, "both Transfer-Encoding and Content-Length")
        if head.start[2] == b"HTTP/1.0":
            raise BadMessage(400, "Transfer-Encoding in an HTTP/1.0 request")
        if [c.strip().lower() for v in codings for c in v.split(b",")] != [b"chunked"]:
            raise BadMessage(501, "only the chunked transfer coding is supported")
        return CHUNKED, 0
    length = _content_length(head)
    if length:
        return LENGTH, length
    return NO_BODY, 0


def response_framing(head: Head, request_method: bytes | None) -> tuple[str, int]:
    """How a response's body is delimited, given the method it answers.

    A ``101`` has no body here: what follows it is the upgraded stream
    (the handler switches the reader to raw).
    """
    status = head.status
    if request_method == b"HEAD" or 100 <= status < 200 or status in (204, 304):
        return NO_BODY, 0
    codings = head.get_all(b"transfer-encoding")
    if codings:
        if head.get_all(b"content-length"):
            # RFC 9112 6.3: "ought to be handled as an error" (response splitting).
            raise BadMessage(502, "both Transfer-Encoding and Content-Length")
        last = [c.strip().lower() for v in codings for c in v.split(b",")][-1]
        return (CHUNKED, 0) if last == b"chunked" else (UNTIL_CLOSE, 0)
    length = _content_length(head)
    if length is not None:
        return (LENGTH, length) if length else (NO_BODY, 0)
    return UNTIL_CLOSE, 0


class MessageHandler(Protocol):
    def message_head(self, head: Head, raw: bytes) -> tuple[str, int]:
        """A head was read (``raw``: its bytes, final empty line included);
        answer its framing (:func:`request_framing`...)."""

    def message_body(self, data: bytes) -> None:
        """Body bytes as on the wire (chunked framing included)."""

    def message_end(self) -> None:
        """The message's body (if any) is complete."""

    def raw(self, data: bytes) -> None:
        """Bytes after :meth:`MessageReader.switch_to_raw` (an upgraded stream)."""


class InterimHandler(Protocol):
    def interim(self, head: Head, raw: bytes) -> None:
        """A ``1xx`` response other than ``101`` (the final answer follows)."""


# reader states
_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _UNTIL_CLOSE, _RAW, _HELD = range(9)


class MessageReader:
    """Feeds a stream of messages to a handler.

    :param request: parse requests (else responses).
    :param handler: a :class:`MessageHandler`; a response reader's handler
        also gets ``interim(head, raw)`` for ``1xx`` answers other than
        ``101`` (100 Continue: the final response follows), when it has
        that method (else they go to ``message_head`` as bodiless messages).
    :param max_head: the largest head (431 beyond).

    After a head the body is passed on in pieces as it arrives.
    :meth:`hold` stops parsing at the end of the current message (bytes
    received meanwhile are kept, at most ``4 * max_head``) until
    :meth:`release` (parse on) or :meth:`switch_to_raw` (every further byte
    goes to ``handler.raw``: an upgraded connection).
    """

    def __init__(self, *, request: bool, handler, max_head: int = MAX_HEAD) -> None:
        self._request = request
        self._handler = handler
        self._interim = getattr(handler, "interim", None) if not request else None
        self._max_head = max_head
        self._state = _HEAD
        self._buffer = b""
        self._remaining = 0
        self._hold_after_message = False
        self.in_message = False

    @property
    def raw(self) -> bool:
        """Switched to raw (an upgraded stream)."""
        return self._state == _RAW

    @property
    def idle(self) -> bool:
        """Between messages (held or not), with nothing buffered."""
        return self._state in (_HEAD, _HELD) and not self._buffer

    @property
    def until_close(self) -> bool:
        """Reading a body that ends when the connection does."""
        return self._state == _UNTIL_CLOSE

    def feed(self, data: bytes) -> None:
        """Parse ``data``; raises :class:`BadMessage` on a malformed message."""
        state = self._state
        if state == _RAW:
            self._handler.raw(data)
            return
        if state == _HELD:
            self._buffer += data
            if len(self._buffer) > 4 * self._max_head:
                raise BadMessage(400, "too much pipelined data")
            return
        if state in (_BODY, _CHUNK_DATA) and not self._buffer and len(data) <= self._remaining:
            # The common case of a bulk transfer: the whole piece is body.
            self._remaining -= len(data)
            self._handler.message_body(data)
            if self._remaining == 0:
                self._after_body_piece()
                if self._state != _HELD and self._buffer:
                    self._run()
            return
        if state == _UNTIL_CLOSE:
            self._handler.message_body(data)
            return
        self._buffer = self._buffer + data if self._buffer else data
        self._run()

    def _after_body_piece(self) -> None:
        if self._state == _BODY:
            self._end_message()
        else:
            self._state = _CHUNK_CRLF

    def _run(self) -> None:
        while self._buffer:
            state = self._state
            if state == _HEAD:
                if not self._read_head():
                    return
            elif state in (_BODY, _CHUNK_DATA):
                piece = self._buffer[: self._remaining]
                self._buffer = self._buffer[len(piece):]
                self._remaining -= len(piece)
                self._handler.message_body(piece)
                if self._remaining == 0:
                    self._after_body_piece()
            elif state == _CHUNK_SIZE:
                line = self._line()
                if line is None:
                    return
                size_text = line.split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(size_text):
                    raise BadMessage(400, "malformed chunk size")
                self._handler.message_body(line + b"\r\n")
                self._remaining = int(size_text, 16)
                self._state = _CHUNK_DATA if self._remaining else _TRAILER
            elif state == _CHUNK_CRLF:
                if len(self._buffer) < 2:
                    return
                if self._buffer[:2] != b"\r\n":
                    raise BadMessage(400, "malformed chunk")
                self._buffer = self._buffer[2:]
                self._handler.message_body(b"\r\n")
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                line = self._line()
                if line is None:
                    return
                self._handler.message_body(line + b"\r\n")
                if not line:
                    self._end_message()
            elif state == _UNTIL_CLOSE:
                data, self._buffer = self._buffer, b""
                self._handler.message_body(data)
            elif state == _RAW:
                data, self._buffer = self._buffer, b""
                self._handler.raw(data)
            else:  # _HELD
                if len(self._buffer) > 4 * self._max_head:
                    raise BadMessage(400, "too much pipelined data")
                return

    def _line(self) -> bytes | None:
        end = self._buffer.find(b"\r\n", 0, MAX_CHUNK_LINE + 2)
        if end == -1:
            if len(self._buffer) > MAX_CHUNK_LINE:
                raise BadMessage(400, "chunk line too long")
            return None
        line, self._buffer = self._buffer[:end], self._buffer[end + 2:]
        return line

    def _read_head(self) -> bool:
        buffer = self._buffer
        if self._request and buffer[:1] in (b"\r", b"\n"):
            # RFC 9112 2.2: ignore empty lines before a request line.
            buffer = buffer.lstrip(b"\r\n")
            self._buffer = buffer
            if not buffer:
                return False
        end = buffer.find(_HEAD_END)
        if end == -1:
            if len(buffer) > self._max_head:
                raise BadMessage(431, "request head too large" if self._request
                                 else "response head too large")
            return False
        if end > self._max_head:
            raise BadMessage(431, "message head too large")
        raw = buffer[:end + 4]
        self._buffer = buffer[end + 4:]
        head = parse_head(raw[:end], self._request)
        if self._interim is not None:
            status = head.status
            if 100 <= status < 200 and status != 101:
                self._interim(head, raw)
                return True
        self.in_message = True
        kind, length = self._handler.message_head(head, raw)
        if self._state == _RAW:
            # The handler switched to raw (an accepted upgrade): no end of message.
            self.in_message = False
        elif kind == NO_BODY:
            self._end_message()
        elif kind == LENGTH:
            self._state, self._remaining = _BODY, length
        elif kind == CHUNKED:
            self._state = _CHUNK_SIZE
        else:
            self._state = _UNTIL_CLOSE
        return True

    def _end_message(self) -> None:
        self.in_message = False
        if self._hold_after_message:
            self._hold_after_message = False
            self._state = _HELD
        else:
            self._state = _HEAD
        self._handler.message_end()

    def hold(self) -> None:
        """Stop parsing once the current message ends (at once between messages)."""
        if self.in_message:
            self._hold_after_message = True
        elif self._state == _HEAD:
            self._state = _HELD

    def release(self) -> None:
        """Parse on after :meth:`hold`."""
        self._hold_after_message = False
        if self._state == _HELD:
            self._state = _HEAD
            if self._buffer:
                self._run()

    def switch_to_raw(self) -> None:
        """Every further byte (and those kept while held) goes to ``handler.raw``."""
        self._state = _RAW
        self._hold_after_message = False
        if self._buffer:
            data, self._buffer = self._buffer, b""
            self._handler.raw(data)

    def eof(self) -> bool:
        """The stream ended: True if that ended a close-delimited body (cleanly)."""
        if self._state == _UNTIL_CLOSE:
            self._state = _HEAD
            self.in_message = False
            self._handler.message_end()
            return True
        return False


class AnswerReader(Protocol_):
    """A relay's connection to the server that answers its requests.

    Reads the answers (a fresh :class:`MessageReader` per :meth:`attach`)
    and hands them to its owner, which implements ``request_method()``
    (the method being answered), ``answer_head(head, raw)``,
    ``answer_body(data)`` (body bytes and ``1xx`` interim answers as on the
    wire), ``answer_raw(data)`` (after a ``101``), ``answer_end()``,
    ``answer_flush()`` (the end of one read's worth), ``answer_garbage(error,
    head_sent)`` (the connection is being closed and detached) and
    ``answer_lost(clean_end)`` (``clean_end``: the close ended a body read
    until close). After a ``101`` every byte is passed on raw.
    """

    def __init__(self) -> None:
        self.owner = None
        self.reader: MessageReader | None = None
        self._head_sent = False

    def attach(self, owner) -> None:
        """Serve ``owner`` from now on (its requests are written to this transport)."""
        self.owner = owner
        self.reader = MessageReader(request=False, handler=self)
        self._head_sent = False

    def unasked(self, data: bytes) -> None:
        """Bytes with nothing asked: the connection is broken."""
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.owner is None or self.reader is None:
            self.unasked(data)
            return
        try:
            self.reader.feed(data)
        except BadMessage as e:
            owner, self.owner = self.owner, None
            self.transport.loseConnection()
            owner.answer_garbage(e, self._head_sent)
            return
        if self.owner is not None:
            self.owner.answer_flush()

    def interim(self, head: Head, raw: bytes) -> None:
        """100 Continue and friends: passed on, the answer follows."""
        self.owner.answer_body(raw)

    def message_head(self, head: Head, raw: bytes) -> tuple[str, int]:
        owner = self.owner
        framing = response_framing(head, owner.request_method())
        self._head_sent = True
        owner.answer_head(head, raw)
        if head.status == 101:
            # The stream is upgraded: every further byte is passed on as it is.
            self.reader.switch_to_raw()
        return framing

    def message_body(self, data: bytes) -> None:
        if self.owner is not None:
            self.owner.answer_body(data)

    def raw(self, data: bytes) -> None:
        if self.owner is not None:
            self.owner.answer_raw(data)

    def message_end(self) -> None:
        self._head_sent = False
        if self.owner is not None:
            self.owner.answer_end()

    def connectionLost(self, reason) -> None:
        clean = self.reader.eof() if self.reader is not None else False
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.answer_lost(clean)
