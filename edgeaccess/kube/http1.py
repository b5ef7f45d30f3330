"""HTTP/1.1 framing for the Kubernetes proxy and agent: heads parsed, bodies passed on.

Both hops relay kubectl's requests without re-encoding them: a
:class:`MessageReader` finds where each message's head and body end in one
direction of a connection (``Content-Length``, ``chunked``, read-until-close,
and the cases without a body), hands the parsed head to its sink and the
body bytes exactly as they came (chunk framing included). Only heads are
rewritten. Limits on the head (size, header count) and strict framing rules
(no ``Content-Length`` with ``Transfer-Encoding``, no conflicting lengths,
no obsolete line folding) keep a request from being read two ways by the
two hops (request smuggling).
"""

from __future__ import annotations

import json
import re
from typing import Callable, Protocol

#: Longest request or response head (start line + headers).
MAX_HEAD = 64 * 1024
#: Most header fields in one head.
MAX_HEADERS = 128
#: Longest chunk-size line (``1a2b;ext=1``).
MAX_CHUNK_LINE = 1024

_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HEAD_END = b"\r\n\r\n"


class HTTPError(Exception):
    """Malformed or refused HTTP: the connection cannot go on.

    :ivar status: the HTTP status to answer with (when an answer is still possible).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Head:
    """A parsed request or response head.

    :ivar start: ``(method, target, version)`` for a request, ``(version,
        code, reason)`` for a response (bytes).
    :ivar headers: ``[(name, value)]`` as received (bytes, names not folded).
    """

    __slots__ = ("start", "headers", "is_request")

    def __init__(self, start: tuple[bytes, bytes, bytes], headers: list[tuple[bytes, bytes]],
                 is_request: bool) -> None:
        self.start = start
        self.headers = headers
        self.is_request = is_request

    @property
    def method(self) -> bytes:
        return self.start[0]

    @property
    def target(self) -> bytes:
        return self.start[1]

    @property
    def code(self) -> int:
        return int(self.start[1])

    def get(self, name: bytes) -> bytes | None:
        """The value of the first header ``name`` (case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def get_all(self, name: bytes) -> list[bytes]:
        name = name.lower()
        return [value for key, value in self.headers if key.lower() == name]

    def tokens(self, name: bytes) -> set[bytes]:
        """The comma-separated tokens of every ``name`` header, lowercased."""
        found = set()
        for value in self.get_all(name):
            found.update(t.strip().lower() for t in value.split(b",") if t.strip())
        return found

    def serialize(self) -> bytes:
        lines = [b" ".join(self.start)]
        lines += [key + b": " + value for key, value in self.headers]
        return b"\r\n".join(lines) + _HEAD_END

    @property
    def wants_upgrade(self) -> bool:
        return self.is_request and b"upgrade" in self.tokens(b"connection") and \
            self.get(b"upgrade") is not None


def parse_head(raw: bytes, is_request: bool) -> Head:
    """Parse a head (without the final blank line).

    :raises HTTPError: on anything that is not strict HTTP/1.1.
    """
    try:
        text_lines = raw.split(b"\r\n")
        first = text_lines[0]
        parts = first.split(b" ", 2)
        if is_request:
            if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1] or \
                    parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") or b" " in parts[1]:
                raise HTTPError(400, "malformed request line")
        else:
            if len(parts) == 2:
                parts.append(b"")
            if len(parts) != 3 or not parts[0].startswith(b"HTTP/1.") or \
                    len(parts[1]) != 3 or not parts[1].isdigit():
                raise HTTPError(502, "malformed status line")
        headers = []
        for line in text_lines[1:]:
            if not line:
                raise HTTPError(400, "empty header line")
            if line[:1] in (b" ", b"\t"):
                raise HTTPError(400, "obsolete header line folding")
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.match(name):
                raise HTTPError(400, "malformed header line")
            value = value.strip(b" \t")
            if any(c < 32 and c != 9 or c == 127 for c in value):
                raise HTTPError(400, "control character in a header value")
            headers.append((name, value))
        if len(headers) > MAX_HEADERS:
            raise HTTPError(431, "too many header fields")
        return Head((parts[0], parts[1], parts[2]), headers, is_request)
    except HTTPError:
        raise
    except Exception:
        raise HTTPError(400, "malformed head") from None


class MessageSink(Protocol):
    def message_head(self, head: Head, raw: bytes) -> None: ...
    def message_body(self, data: bytes) -> None: ...
    def message_end(self) -> None: ...


# Reader states.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _RAW, _HELD = \
    range(9)


class MessageReader:
    """Splits one direction of an HTTP/1.1 connection into messages.

    :param is_request: requests (client to server) or responses.
    :param sink: gets ``message_head(head, raw)``, ``message_body(bytes)``
        (the body's bytes as on the wire) and ``message_end()``.
    :param request_method: for a response reader, a callable giving the
        method of the request being answered (``HEAD`` has no body).

    After ``message_end`` of a request the reader holds further bytes
    until :meth:`release` (the relay answers one request at a time) or
    :meth:`switch_to_raw` (the upgrade was accepted: from then on
    ``message_body`` gets every byte).
    """

    def __init__(self, is_request: bool, sink: MessageSink,
                 request_method: Callable[[], bytes] | None = None,
                 max_head: int = MAX_HEAD) -> None:
        self.is_request = is_request
        self.sink = sink
        self._request_method = request_method or (lambda: b"GET")
        self._max_head = max_head
        self._state = _HEAD
        self._buffer = b""
        self._left = 0
        self.messages = 0

    @property
    def raw(self) -> bool:
        return self._state == _RAW

    @property
    def idle(self) -> bool:
        """Between messages, with nothing buffered."""
        return self._state in (_HEAD, _HELD) and not self._buffer

    @property
    def until_close(self) -> bool:
        return self._state == _UNTIL_CLOSE

    def feed(self, data: bytes) -> None:
        """Take bytes received; raises HTTPError on a framing error."""
        if self._state == _RAW:
            self.sink.message_body(data)
            return
        if self._state == _HELD:
            self._buffer += data
            if len(self._buffer) > 4 * self._max_head:
                raise HTTPError(400, "too much pipelined data")
            return
        self._buffer = self._buffer + data if self._buffer else data
        self._run()

    def release(self) -> None:
        """Go on with the next message (after a held request)."""
        if self._state == _HELD:
            self._state = _HEAD
            self._run()

    def switch_to_raw(self) -> None:
        """Every byte from now on (held ones first) is body: the connection was upgraded."""
        self._state = _RAW
        data, self._buffer = self._buffer, b""
        if data:
            self.sink.message_body(data)

    def finish(self) -> bool:
        """The connection was closed: True if that ends a read-until-close body."""
        if self._state == _UNTIL_CLOSE:
            self._state = _HEAD
            self.sink.message_end()
            return True
        return False

    def _end(self) -> None:
        self.messages += 1
        self._state = _HELD if self.is_request else _HEAD
        self.sink.message_end()

    def _run(self) -> None:
        while self._buffer and self._state not in (_HELD, _RAW):
            state = self._state
            buf = self._buffer
            if state == _HEAD:
                if buf[:2] == b"\r\n" and self.is_request:
                    self._buffer = buf[2:]  # tolerated blank line between requests
                    continue
                end = buf.find(_HEAD_END, 0, self._max_head + 4)
                if end < 0:
                    if len(buf) > self._max_head:
                        raise HTTPError(431, "the request head is too large")
                    return
                raw = buf[:end + 4]
                self._buffer = buf[end + 4:]
                head = parse_head(buf[:end], self.is_request)
                if not self.is_request and 100 <= head.code < 200 and head.code != 101:
                    self.sink.message_body(raw)  # interim (100 Continue): the answer follows
                    continue
                framing = self._framing(head)
                self.sink.message_head(head, raw)
                if framing == "none":
                    if not self.is_request and head.code == 101:
                        self._state = _RAW
                        rest, self._buffer = self._buffer, b""
                        if rest:
                            self.sink.message_body(rest)
                        return
                    self._end()
                elif framing == "chunked":
                    self._state = _CHUNK_SIZE
                elif framing == "close":
                    self._state = _UNTIL_CLOSE
                else:
                    self._left = framing
                    self._state = _LENGTH
                    if framing == 0:
                        self._end()
            elif state == _LENGTH:
                piece = buf[:self._left]
                self._buffer = buf[len(piece):]
                self._left -= len(piece)
                self.sink.message_body(piece)
                if self._left == 0:
                    self._end()
            elif state == _UNTIL_CLOSE:
                self._buffer = b""
                self.sink.message_body(buf)
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n", 0, MAX_CHUNK_LINE)
                if end < 0:
                    if len(buf) > MAX_CHUNK_LINE:
                        raise HTTPError(400, "chunk size line too long")
                    return
                size_text = buf[:end].split(b";", 1)[0].strip()
                if not size_text or len(size_text) > 16 or \
                        any(c not in b"0123456789abcdefABCDEF" for c in size_text):
                    raise HTTPError(400, "malformed chunk size")
                self._left = int(size_text, 16)
                self._buffer = buf[end + 2:]
                self.sink.message_body(buf[:end + 2])
                self._state = _CHUNK_DATA if self._left else _TRAILERS
            elif state == _CHUNK_DATA:
                piece = buf[:self._left]
                self._buffer = buf[len(piece):]
                self._left -= len(piece)
                self.sink.message_body(piece)
                if self._left == 0:
                    self._state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise HTTPError(400, "malformed chunk end")
                self._buffer = buf[2:]
                self.sink.message_body(b"\r\n")
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                end = buf.find(b"\r\n", 0, self._max_head)
                if end < 0:
                    if len(buf) > self._max_head:
                        raise HTTPError(400, "trailers too large")
                    return
                self._buffer = buf[end + 2:]
                self.sink.message_body(buf[:end + 2])
                if end == 0:
                    self._end()

    def _framing(self, head: Head):
        """``"none"``, ``"chunked"``, ``"close"`` or a byte count."""
        transfer = head.tokens(b"transfer-encoding")
        lengths = head.get_all(b"content-length")
        if transfer and lengths:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding")
        if not self.is_request:
            code = head.code
            if code == 101 or code in (204, 304) or self._request_method() == b"HEAD":
                return "none"
        if transfer:
            if transfer != {b"chunked"}:
                raise HTTPError(501, "unsupported transfer coding")
            return "chunked"
        if lengths:
            values = {v.strip() for value in lengths for v in value.split(b",")}
            if len(values) != 1:
                raise HTTPError(400, "conflicting Content-Length")
            value = values.pop()
            if not value.isdigit() or len(value) > 15:
                raise HTTPError(400, "malformed Content-Length")
            return int(value)
        return 0 if self.is_request else "close"


# --- Kubernetes Status answers -------------------------------------------------

_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
            405: "MethodNotAllowed", 413: "RequestEntityTooLarge", 429: "TooManyRequests",
            431: "BadRequest", 500: "InternalError", 501: "BadRequest",
            502: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}
_PHRASES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 413: "Payload Too Large", 429: "Too Many Requests",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout"}


def status_json(code: int, message: str) -> bytes:
    """A Kubernetes ``Status`` object (what kubectl prints as ``Error from server``)."""
    return json.dumps({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": _REASONS.get(code, "InternalError"), "code": code,
    }).encode()


def status_response(code: int, message: str, *, close: bool = False) -> bytes:
    """A complete HTTP/1.1 response carrying :func:`status_json`."""
    body = status_json(code, message)
    head = [f"HTTP/1.1 {code} {_PHRASES.get(code, 'Error')}",
            "Content-Type: application/json", f"Content-Length: {len(body)}",
            "Cache-Control: no-cache, private"]
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body
