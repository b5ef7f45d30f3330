"""What the Klein apps share: JSON bodies, error mapping, the caller's identity."""

from __future__ import annotations

import json
from datetime import timedelta

from twisted.logger import Logger

from edgeaccess import errors
from edgeaccess.tls import peer_identity

_log = Logger()

MAX_BODY = 256 * 1024


def read_json(request) -> dict:
    """The request's JSON object body; BadRequest on anything else."""
    body = request.content.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise errors.BadRequest("request body too large")
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise errors.BadRequest("request body is not valid JSON")
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


def error_response(request, failure) -> bytes:
    """Map an exception to an HTTP status and ``{"error": {code, message}}``."""
    error = failure.value
    if isinstance(error, errors.EdgeError):
        status, code, message = error.http_status, error.code, str(error)
    else:
        _log.failure("unexpected error serving {path}", failure, path=request.path)
        status, code, message = 500, "internal", "internal error (see the server log)"
    return json_response(request, {"error": {"code": code, "message": message}}, status)


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


def parse_duration(text: str) -> timedelta:
    """``"30m"``, ``"8h"``, ``"1h30m"``, ``"45s"``, ``"7d"``."""
    import re

    if not isinstance(text, str) or not re.fullmatch(r"(\d+[smhd])+", text.strip()):
        raise errors.BadRequest(f"invalid duration {text!r} (use e.g. 30m, 8h, 1h30m)")
    total = sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)([smhd])", text))
    return timedelta(seconds=total)
