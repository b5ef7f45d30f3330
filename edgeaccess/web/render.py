"""What every page of the web UI shares: templates, security headers, CSRF and Origin checks.

- Templates are Jinja2 with autoescaping on for every file: node labels,
  user names, audit details are text, whatever they contain.
- Every answer carries a strict Content Security Policy (scripts only from
  our own static files; ``style-src 'unsafe-inline'`` because xterm.js
  positions its rows with inline styles), ``nosniff``, no framing, no
  referrer to other sites, and pages are never cached.
- State changes are POST forms carrying the session's CSRF token, and a
  browser's ``Origin`` (always sent with POST and WebSocket upgrades) must
  be this very host; a missing ``Origin`` is allowed for forms (the token
  still guards them) and refused for WebSocket upgrades.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import jinja2

from edgeaccess import errors

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; font-src 'self'; connect-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
#: The recording player compiles its terminal emulator from WebAssembly
#: (asciinema-player 3.x): that page alone also allows WebAssembly
#: compilation ('wasm-unsafe-eval' allows no JavaScript eval).
PLAYER_CSP = CSP.replace("script-src 'self'", "script-src 'self' 'wasm-unsafe-eval'")

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    autoescape=True,  # every template, whatever its name
    trim_blocks=True, lstrip_blocks=True,
)


def _when(value) -> str:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value or "")


_HIDDEN_DETAILS = {"id", "event", "time", "cluster", "user", "node", "success"}


def _details(event: dict) -> str:
    shown = {k: v for k, v in sorted(event.items()) if k not in _HIDDEN_DETAILS}
    return ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                     for k, v in shown.items())[:600]


_ENV.filters["when"] = _when
_ENV.filters["details"] = _details


def security_headers(request, *, csp: str = CSP, cache: bool = False) -> None:
    request.setHeader(b"content-security-policy", csp.encode())
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"x-frame-options", b"DENY")
    request.setHeader(b"referrer-policy", b"same-origin")
    request.setHeader(b"strict-transport-security", b"max-age=31536000")
    if not cache:
        request.setHeader(b"cache-control", b"no-store")


def render(request, template: str, *, code: int = 200, csp: str = CSP, **context) -> bytes:
    """A page: ``template`` rendered with ``context``, with the security headers."""
    request.setResponseCode(code)
    security_headers(request, csp=csp)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    context.setdefault("session", None)
    context.setdefault("flash", None)
    context.setdefault("title", "edgeaccess")
    return _ENV.get_template(template).render(**context).encode("utf-8")


def redirect(request, location: str, code: int = 303) -> bytes:
    """A redirect to a path of this site (never elsewhere)."""
    if not location.startswith("/") or location.startswith("//"):
        location = "/"
    request.setResponseCode(code)
    security_headers(request)
    request.setHeader(b"location", location.encode("utf-8"))
    return b""


def form_value(request, name: str, *, limit: int = 4096) -> str:
    """A POST form field (``""`` when absent); BadRequest when too long."""
    values = request.args.get(name.encode())
    if not values:
        return ""
    value = values[0].decode("utf-8", "replace")
    if len(value) > limit:
        raise errors.BadRequest(f"{name} is too long")
    return value


def query_value(request, name: str, *, limit: int = 256) -> str:
    return form_value(request, name, limit=limit)


def own_origin(request) -> str:
    host = (request.getHeader(b"host") or b"").decode("ascii", "replace")
    return f"https://{host}"


def check_origin(request, *, required: bool) -> None:
    """Refuse a request whose ``Origin`` is not this site.

    :raises errors.AccessDenied: another origin (or none, when ``required``).
    """
    origin = request.getHeader(b"origin")
    if origin is None:
        if required:
            raise errors.AccessDenied("cross-origin request refused (no Origin)")
        return
    if origin.decode("ascii", "replace").rstrip("/").lower() != own_origin(request).lower():
        raise errors.AccessDenied("cross-origin request refused")


def check_csrf(request, session) -> None:
    """A state change: same origin and the session's CSRF token.

    :raises errors.AccessDenied: either is wrong.
    """
    check_origin(request, required=False)
    if not session.csrf_ok(form_value(request, "csrf", limit=200)):
        raise errors.AccessDenied("the form is stale or forged (CSRF token mismatch)")
