"""Kubernetes ``Status`` answers: what kubectl prints as ``Error from server``."""

from __future__ import annotations

import json

from edgeaccess.httpwire import REASON_PHRASES

_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
            405: "MethodNotAllowed", 413: "RequestEntityTooLarge", 429: "TooManyRequests",
            431: "BadRequest", 500: "InternalError", 501: "BadRequest",
            502: "InternalError", 503: "ServiceUnavailable", 504: "Timeout",
            505: "BadRequest"}


def status_json(code: int, message: str) -> bytes:
    """A Kubernetes ``Status`` object."""
    return json.dumps({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": _REASONS.get(code, "InternalError"), "code": code,
    }).encode()


def status_response(code: int, message: str, *, close: bool = False) -> bytes:
    """A complete HTTP/1.1 response carrying :func:`status_json`."""
    body = status_json(code, message)
    head = [f"HTTP/1.1 {code} {REASON_PHRASES.get(code, 'Error')}",
            "Content-Type: application/json", f"Content-Length: {len(body)}",
            "Cache-Control: no-cache, private"]
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body
