"""What the Klein apps share: JSON bodies, error mapping, the caller's identity,
and the HTTP channel and site every HTTPS port serves them with.

A client's mistake (unknown path, wrong method, oversized request line,
headers or body, malformed JSON) gets a 4xx answer in the project's JSON
error shape ``{"error": {"code", "message"}}`` and at most one info line in
the log; only a fault of ours is a 500 with a traceback in the log.
"""

from __future__ import annotations

import json
from datetime import timedelta
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Site
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import MethodNotAllowed as _RouteMethodNotAllowed

from edgeaccess import errors, internals
from edgeaccess.tls import peer_identity

_log = Logger()

#: The largest JSON body a route reads (a recording chunk is 128 KiB of base64).
MAX_BODY = 256 * 1024
#: The request line (method, path and query, version): nginx's default buffer.
MAX_REQUEST_LINE = 8 * 1024
#: All header lines of one request together (Twisted's default is 16 KiB).
MAX_HEADER_BYTES = 64 * 1024
#: What chunked transfer coding may add to a body before it counts as too large.
_CHUNK_FRAMING_SLACK = 16 * 1024


def read_json(request) -> dict:
    """The request's JSON object body; BadRequest (PayloadTooLarge) on anything else."""
    body = request.content.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise errors.PayloadTooLarge(f"request body larger than {MAX_BODY} bytes")
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise errors.BadRequest("request body is not valid JSON")
    except RecursionError:  # json's scanner recurses per nesting level
        raise errors.BadRequest("request body is nested too deeply")
    if not isinstance(data, dict):
        raise errors.BadRequest("request body must be a JSON object")
    return data


def field(data: dict, name: str, kind=str, *, required: bool = True, default=None):
    """``data[name]`` checked to be a ``kind``."""
    if name not in data or data[name] is None:
        if required:
            raise errors.BadRequest(f"missing field {name!r}")
        return default
    value = data[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise errors.BadRequest(f"field {name!r} has the wrong type")
    return value


def json_response(request, value, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(value, sort_keys=True).encode("utf-8") + b"\n"


def error_body(error: errors.EdgeError) -> bytes:
    """The JSON error shape of ``error``."""
    return json.dumps({"error": {"code": error.code, "message": str(error)}},
                      sort_keys=True).encode("utf-8") + b"\n"


def error_response(request, failure) -> bytes:
    """Map an exception to an HTTP status and ``{"error": {code, message}}``.

    For ``@app.handle_errors(Exception)`` of every Klein app: our errors keep
    their status, Klein's routing outcomes (no route, wrong method) become
    404 and 405 (with ``Allow``), anything else is a 500 logged with its
    traceback.
    """
    error = failure.value
    if isinstance(error, HTTPException):
        error = _routing_error(request, error)
        if error is None:
            return b""
    if isinstance(error, errors.EdgeError):
        status, code, message = error.http_status, error.code, str(error)
    else:
        _log.failure("unexpected error serving {path}", failure, path=request.path)
        status, code, message = 500, "internal", "internal error (see the server log)"
    return json_response(request, {"error": {"code": code, "message": message}}, status)


def _shown(text: bytes, limit: int = 200) -> str:
    """Client-supplied bytes fit for a message and a log line."""
    shown = text[:limit].decode("utf-8", "replace")
    return shown + "..." if len(text) > limit else shown


def _routing_error(request, error: HTTPException) -> errors.EdgeError | None:
    """The EdgeError for a werkzeug routing outcome; None for a redirect,
    which is applied to ``request`` as is (a path with doubled slashes)."""
    status = error.code or 500
    method = _shown(request.method or b"", 16)
    path = _shown(request.path or b"")
    if status < 400:
        request.setResponseCode(status)
        for name, value in error.get_response().headers.items():
            if name.lower() == "location":
                request.setHeader(b"location", value.encode("utf-8"))
        return None
    if isinstance(error, _RouteMethodNotAllowed):
        allowed = sorted(error.valid_methods or ())
        request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
        edge: errors.EdgeError = errors.MethodNotAllowed(
            f"{method} is not allowed on {path} (allowed: {', '.join(allowed)})")
    elif status == 404:
        edge = errors.NotFound(f"no such path: {path}")
    else:
        edge = errors.BadRequest(error.description or "the request is malformed")
        edge.http_status = status
    _log.info("{status} for {method} {path} from {peer}", status=edge.http_status,
              method=method, path=path, peer=remote_addr(request))
    return edge


def caller(request):
    """The verified TLS identity of the caller, or AuthenticationFailed."""
    identity = peer_identity(request.transport)
    if identity is None:
        raise errors.AuthenticationFailed("a client certificate from this cluster is required")
    return identity


def remote_addr(request) -> str:
    peer = request.getClientAddress()
    return getattr(peer, "host", "") or ""


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: The longest duration accepted (token and certificate TTLs are far shorter).
MAX_DURATION = timedelta(days=3650)


def parse_duration(text: str) -> timedelta:
    """``"30m"``, ``"8h"``, ``"1h30m"``, ``"45s"``, ``"7d"``."""
    import re

    if (not isinstance(text, str) or len(text) > 32
            or not re.fullmatch(r"(\d+[smhd])+", text.strip())):
        raise errors.BadRequest(f"invalid duration {text[:40]!r} (use e.g. 30m, 8h, 1h30m)"
                                if isinstance(text, str) else "invalid duration")
    total = sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)([smhd])", text))
    if total > MAX_DURATION.total_seconds():
        raise errors.BadRequest(f"duration {text!r} is longer than {MAX_DURATION.days} days")
    return timedelta(seconds=total)


# --- the HTTP channel and site of every HTTPS port ---------------------------

_REASONS = {400: b"Bad Request", 413: b"Content Too Large", 414: b"URI Too Long",
            431: b"Request Header Fields Too Large"}


class EdgeHTTPChannel(HTTPChannel):
    """Twisted's HTTP/1.1 channel, answering oversized requests.

    Twisted drops the connection without a word when a line passes
    ``MAX_LENGTH`` (a 20 kB query string) and answers a bare 400 when the
    headers pass ``totalHeadersSize``; a client then cannot tell what went
    wrong. This channel answers 414 for a request line over
    :data:`MAX_REQUEST_LINE`, 431 for headers over :data:`MAX_HEADER_BYTES`
    and 413 for a body over the site's :meth:`EdgeSite.body_limit`, each in
    the JSON error shape, then closes the connection. Only public hooks of
    ``HTTPChannel`` and ``LineReceiver`` are overridden.
    """

    max_request_line = MAX_REQUEST_LINE
    max_header_bytes = MAX_HEADER_BYTES
    # Twisted's own limits stay above ours, so ours answer first.
    MAX_LENGTH = MAX_HEADER_BYTES + 1
    totalHeadersSize = MAX_REQUEST_LINE + MAX_HEADER_BYTES + 1024

    _lines = 0
    _header_bytes = 0
    _body_bytes = 0
    _body_limit: int | None = None
    _refused = False

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if self._lines == 0:
            if line and len(line) > self.max_request_line:
                self._refuse(errors.URITooLong(
                    f"request line longer than {self.max_request_line} bytes"))
                return
            if line:
                self._lines = 1
        else:
            self._header_bytes += len(line)
            if self._header_bytes > self.max_header_bytes:
                self._refuse(self._headers_too_large())
                return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._lines == 0:
            self._refuse(errors.URITooLong(
                f"request line longer than {self.max_request_line} bytes"))
        else:
            self._refuse(self._headers_too_large())

    def _headers_too_large(self) -> errors.EdgeError:
        return errors.HeadersTooLarge(
            f"request headers larger than {self.max_header_bytes} bytes")

    def allHeadersReceived(self) -> None:
        site = getattr(self, "site", None)
        limit = site.body_limit(self.requests[-1]) if isinstance(site, EdgeSite) else None
        if limit is not None and self.length is not None and self.length > limit:
            self._refuse(errors.PayloadTooLarge(f"request body larger than {limit} bytes"))
            return
        # A chunked body (no length) is counted as it arrives.
        self._body_limit = limit if self.length is None else None
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._body_limit is not None:
            self._body_bytes += len(data)
            if self._body_bytes > self._body_limit + _CHUNK_FRAMING_SLACK:
                self._refuse(errors.PayloadTooLarge(
                    f"request body larger than {self._body_limit} bytes"))
                return
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self._lines = self._header_bytes = self._body_bytes = 0
        self._body_limit = None
        super().allContentReceived()

    def _refuse(self, error: errors.EdgeError) -> None:
        """Answer ``error`` in the JSON shape and close the connection (once)."""
        if self._refused:
            return
        self._refused = True
        peer = getattr(self.transport.getPeer(), "host", "")
        _log.info("refused a request from {peer}: {status} {reason}", peer=peer,
                  status=error.http_status, reason=str(error))
        body = error_body(error)
        reason = _REASONS.get(error.http_status, b"Bad Request")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\ncache-control: no-store\r\nconnection: close\r\n\r\n"
            % (error.http_status, reason, len(body)) + body)
        self.loseConnection()


def _answer_bad_request(channel: EdgeHTTPChannel) -> None:
    channel._refuse(errors.BadRequest("malformed HTTP request"))


# A malformed request line or header, or a broken chunk coding: Twisted's own
# check, our JSON answer (a reach into Twisted: edgeaccess/internals.py).
internals.answer_bad_requests(EdgeHTTPChannel, _answer_bad_request)


class ErrorResource(Resource):
    """Renders one EdgeError in the JSON shape."""

    isLeaf = True

    def __init__(self, error: errors.EdgeError) -> None:
        super().__init__()
        self._error = error

    def render(self, request) -> bytes:
        request.setResponseCode(self._error.http_status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return error_body(self._error)


class EdgeSite(Site):
    """The site of every HTTPS port: :class:`EdgeHTTPChannel`, a body limit,
    and a JSON 400 (not a logged traceback, as Klein gives) for a path or
    host name that is not UTF-8.

    :param max_body: the largest request body accepted (None: no limit).
    """

    protocol = EdgeHTTPChannel

    def __init__(self, resource, *, max_body: int | None = MAX_BODY, **kwargs) -> None:
        super().__init__(resource, **kwargs)
        self.max_body = max_body

    def body_limit(self, request) -> int | None:
        """The largest body ``request`` (its headers received) may send.
        Override for hosts that pass bodies through (app access)."""
        return self.max_body

    def getResourceFor(self, request):
        try:
            unquote_to_bytes(request.path).decode("utf-8")
            (request.requestHeaders.getRawHeaders(b"host") or [b""])[0].decode("utf-8")
        except UnicodeDecodeError:
            _log.info("refused a request from {peer}: path or host is not UTF-8",
                      peer=remote_addr(request))
            return ErrorResource(errors.BadRequest("the path and host must be UTF-8"))
        return super().getResourceFor(request)
