"""The proxy side of app access, on the web port.

:class:`WebPortFactory` sits in front of the web UI's ``Site``: once the TLS
handshake is done, a connection whose server name (SNI) is
``NAME.<public host>`` is an app connection (:class:`AppProxyProtocol`);
any other goes to the web UI and API unchanged.

An app connection is authorised once, when it starts (the app certificate's
session, the app, the user's roles), then every request is checked again
(``Host`` must be the app's host, the session must still be valid and the
roles must still allow the app), rewritten (client copies of
``Edge-Jwt-Assertion`` and ``X-Forwarded-*`` dropped; ``Host``,
``X-Forwarded-For/-Host/-Proto`` and a fresh ``Edge-Jwt-Assertion`` set) and
forwarded on one channel to the app's node, which keeps one keep-alive
connection to the app for it. Bodies stream both ways with backpressure and
are never buffered whole; after a ``101 Switching Protocols`` the connection
is spliced byte for byte (WebSocket). Responses get their ``Location``
rewritten when it points at the app's own URI.

Errors are HTML pages with a clear status: unknown app 404, no or wrong
certificate 401/403, forged ``Host`` 421, head too large 431, the app
unreachable 502, no answer 504; each also gets one log line.
"""

from __future__ import annotations

import html
import json
from collections import deque
from typing import Any, Callable
from urllib.parse import urlsplit

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import (
    IProtocolFactory,
    IProtocolNegotiationFactory,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeaccess import errors, httpwire
from edgeaccess.apps.jwt import HEADER as JWT_HEADER
from edgeaccess.proxy.splice import tune_transport

_log = Logger()

#: A request head must be complete this long after the connection is idle
#: between requests (slow-loris); the app must start answering within this.
HEAD_TIMEOUT = 30.0
RESPONSE_TIMEOUT = 60.0
#: An idle keep-alive connection (no byte either way) is closed after this.
IDLE_TIMEOUT = 300.0
#: Longest leaf-relay preamble (a forwarded identity, one JSON line).
MAX_PREAMBLE = 16 * 1024


@attrs.frozen
class AppTimeouts:
    """How long an app connection waits (seconds; ``twistd edgeproxy --app-timeouts``).

    :ivar head: for a request head, and for the next piece of a request body
        the client stopped sending (slow clients: 408);
    :ivar response: for the app's answer once a request is complete (504);
    :ivar idle: a keep-alive connection with no byte either way is closed.
    """

    head: float = HEAD_TIMEOUT
    response: float = RESPONSE_TIMEOUT
    idle: float = IDLE_TIMEOUT

    @classmethod
    def parse(cls, text: str | None) -> AppTimeouts:
        """``head=30s,response=1m,idle=5m`` (any of them; the rest keep their defaults)."""
        from edgeaccess.httpapi import parse_duration

        values = {}
        for part in filter(None, (p.strip() for p in (text or "").split(","))):
            name, sep, value = part.partition("=")
            if not sep or name not in ("head", "response", "idle") or name in values:
                raise errors.BadRequest(f"invalid app timeout {part[:40]!r} (use e.g. "
                                        "head=30s,response=60s,idle=5m)")
            seconds = parse_duration(value.strip()).total_seconds()
            if seconds < 1:
                raise errors.BadRequest(f"app timeout {name} must be at least 1s")
            values[name] = seconds
        return cls(**values)

_DROPPED_PREFIXES = (b"x-forwarded-",)
_DROPPED = frozenset({b"edge-jwt-assertion", b"forwarded", b"x-real-ip"})


def _dropped_or_host(name: bytes) -> bool:
    return name == b"host" or name in _DROPPED or name.startswith(_DROPPED_PREFIXES)


def error_page(status: int, message: str) -> bytes:
    """A complete ``Connection: close`` response with an HTML page saying ``message``."""
    reason = httpwire.REASON_PHRASES.get(status, "Error")
    body = (f"<!doctype html><html><head><meta charset=utf-8><title>{status} {reason}"
            f"</title></head><body><h1>{status} {reason}</h1><p>{html.escape(message)}</p>"
            "<p><small>edgeaccess app proxy</small></p></body></html>\n").encode("utf-8")
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/html; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\ncache-control: no-store\r\n"
            "x-content-type-options: nosniff\r\nconnection: close\r\n\r\n").encode() + body


def status_for(error: BaseException) -> int:
    if isinstance(error, errors.NodeOffline | errors.ClusterOffline):
        return 502
    if isinstance(error, errors.EdgeError):
        return error.http_status
    return 502


#: The browser's app cookie (host-only: ``__Host-``) and the launch state cookie.
APP_COOKIE = "__Host-edge-app"
STATE_COOKIE = "__Host-edge-app-state"
#: The app host's own path where a launch ends (never forwarded to the app).
LAUNCH_PATH = b"/__edge/launch"


@attrs.define
class BrowserLaunch:
    """A browser connection's app cookie check and where to launch from.

    :ivar session_for: ``(cookie token | None) -> app session record | None``.
    :ivar launcher: the proxy's launch URL for this app (on the web UI's host).
    """

    session_for: Callable[[str | None], dict | None]
    launcher: str


class RetryOnNewConnection(Exception):
    """Raised by ``BrowserLaunch.session_for``: this request carries another app
    session than the one the connection is bound to; the browser is sent to
    make it again on a new connection (a 307 to the same path, then close)."""


class _Respond(Exception):
    """A request the proxy answers itself (``response``: a whole response)."""

    def __init__(self, response: bytes) -> None:
        self.response = response


def _cookies(head: httpwire.Head) -> dict[str, str]:
    found: dict[str, str] = {}
    for value in head.get_all(b"cookie"):
        for part in value.decode("latin-1").split(";"):
            name, sep, text = part.strip().partition("=")
            if sep and name not in found:
                found[name] = text
    return found


def _strip_edge_cookies(head: httpwire.Head) -> None:
    kept = []
    for value in head.get_all(b"cookie"):
        kept += [p.strip() for p in value.decode("latin-1").split(";")
                 if p.strip() and not p.strip().startswith("__Host-edge-")]
    head.remove(b"cookie")
    if kept:
        head.headers.append((b"Cookie", "; ".join(kept).encode("latin-1")))


def _redirect(location: str, cookies: list[str], status: str = "302 Found") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Location: {location}", "Content-Length: 0",
             "Cache-Control: no-store", "Connection: close"]
    lines += [f"Set-Cookie: {c}" for c in cookies]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _safe_path(path: str) -> str:
    """A local path to return to (no scheme, no other host): else ``/``."""
    if not path.startswith("/") or path.startswith("//") or path.startswith("/\\") or \
            any(ord(c) < 33 for c in path) or len(path) > 2048:
        return "/"
    return path


@attrs.define
class AppAccess:
    """What an authorised app connection needs.

    :ivar check: ``check() -> EdgeError | None``, run for every request.
    :ivar relay_preamble: when set, the connection is relayed raw to a leaf
        cluster's proxy after this line (the leaf proxy does the HTTP work).
    """

    app: str
    user: str
    endpoint: Any
    expected_hosts: frozenset[str] = frozenset()
    public_origin: str = ""
    app_uri: str = ""
    upstream_host: bytes = b""
    client_ip: str = ""
    assertion: Callable[[], bytes] | None = None
    check: Callable[[], BaseException | None] = lambda: None
    relay_preamble: bytes | None = None
    on_close: list = attrs.Factory(list)
    #: set for a browser (no client certificate): sessions by cookie, launches
    browser: BrowserLaunch | None = None
    #: ``(method, target, status) -> None`` when requests are audited
    #: (``edgeaccess.apps.requestaudit``), else None
    audit_request: Callable[[bytes, bytes, int], None] | None = None


def app_origin(uri: str) -> str:
    """``scheme://host[:port]`` of an app URI, lowercased (for Location rewrites)."""
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc}".lower()


class _Upstream(Protocol):
    """The proxy's end of the channel to the app (or to a leaf's proxy)."""

    def __init__(self, owner: AppProxyProtocol) -> None:
        self.owner = owner

    def dataReceived(self, data: bytes) -> None:
        self.owner.upstream_data(data)

    def connectionLost(self, reason: Failure) -> None:
        self.owner.upstream_lost(reason)


@implementer(IPushProducer)
class _UserSide:
    """The user's connection as the producer the app's side pauses (its buffer
    is full): it notes that the app is the one holding a request body back,
    which is then no stalled client (see ``_check_timeouts``)."""

    def __init__(self, owner: AppProxyProtocol) -> None:
        self.owner = owner

    def pauseProducing(self) -> None:
        self.owner.held_by_app = True
        self.owner.transport.pauseProducing()

    def resumeProducing(self) -> None:
        owner = self.owner
        owner.held_by_app = False
        owner._client_activity = owner.clock.seconds()
        owner.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.owner.transport.stopProducing()


class _RequestSide:
    def __init__(self, owner: AppProxyProtocol) -> None:
        self.owner = owner

    def message_head(self, head: httpwire.Head, raw: bytes):
        return self.owner.request_head(head)

    def message_body(self, data: bytes) -> None:
        self.owner.upstream_write(data)

    def message_end(self) -> None:
        self.owner.request_end()

    def raw(self, data: bytes) -> None:
        self.owner.upstream_write(data)


class _ResponseSide:
    def __init__(self, owner: AppProxyProtocol) -> None:
        self.owner = owner

    def message_head(self, head: httpwire.Head, raw: bytes):
        return self.owner.response_head(head, raw)

    def interim(self, head: httpwire.Head, raw: bytes) -> None:
        self.owner.response_interim(raw)

    def message_body(self, data: bytes) -> None:
        self.owner.client_write(data)

    def message_end(self) -> None:
        self.owner.client_write(b"")
        self.owner.response_end()

    def raw(self, data: bytes) -> None:
        self.owner.client_write(data)


class AppProxyProtocol(Protocol):
    """One user connection to an app.

    :param authorize: ``authorize(protocol, preamble) -> Deferred[AppAccess]``
        (errors are EdgeErrors shown to the user); ``preamble`` is the first
        line received when ``needs_preamble`` (a leaf relay), else None.
    :param clock: ``IReactorTime`` for the timeouts.
    """

    def __init__(self, authorize, clock, *, needs_preamble: bool = False,
                 description: str = "", timeouts: AppTimeouts | None = None) -> None:
        self._authorize = authorize
        self.clock = clock
        self.timeouts = timeouts or _DEFAULT_TIMEOUTS
        self.needs_preamble = needs_preamble
        self.description = description
        self.access: AppAccess | None = None
        self.upstream = None
        self._pending: list[bytes] = []
        self._preamble = b""
        self._upstream_pending: list[bytes] | None = None
        self._connecting = False
        self._methods: deque = deque()
        #: request targets awaiting their status, when requests are audited
        self._targets: deque | None = None
        self._upgrade_requested = False
        self._raw = False
        self._closing = False
        self._error: bytes | None = None
        self._sent_response_head = False
        self._head_out: bytes | None = None
        self._last_activity = 0.0
        #: when the user's side last sent a byte (a stalled request body)
        self._client_activity = 0.0
        #: the app's side paused reading from the user (its buffer is full)
        self.held_by_app = False
        self._timer = None
        self._waiting_since: float | None = None
        self.requests = 0
        self.client_reader = httpwire.MessageReader(request=True, handler=_RequestSide(self))
        self.upstream_reader = httpwire.MessageReader(request=False, handler=_ResponseSide(self))

    # --- start --------------------------------------------------------------

    def connectionMade(self) -> None:
        tune_transport(self.transport, self.clock)
        self._last_activity = self._client_activity = self.clock.seconds()
        self._timer = self.clock.callLater(self.timeouts.head, self._check_timeouts)
        if not self.needs_preamble:
            self._start_authorize(None)

    def _start_authorize(self, preamble: bytes | None) -> None:
        self.transport.pauseProducing()
        d = defer.maybeDeferred(self._authorize, self, preamble)
        d.addCallbacks(self._authorized, self._refused)

    def _authorized(self, access: AppAccess) -> None:
        if self._closing:
            for hook in access.on_close:
                hook(self)
            return
        self.access = access
        pending, self._pending = self._pending, []
        if access.relay_preamble is not None:
            self._raw = True
            self._connect_upstream()
            self.upstream_write(access.relay_preamble)
        else:
            self.transport.resumeProducing()
        for data in pending:
            self._client_data(data)

    def _refused(self, failure: Failure) -> None:
        error = failure.value
        status = status_for(error)
        message = str(error) if isinstance(error, errors.EdgeError) else \
            "the app proxy failed (see its log)"
        if not isinstance(error, errors.EdgeError):
            _log.failure("app connection {what} failed", failure, what=self.description)
        else:
            _log.info("app connection refused ({status}) {what}: {why}", status=status,
                      what=self.description, why=message)
        self.transport.resumeProducing()
        self._send_error(status, message)

    # --- the user's side ----------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._last_activity = self._client_activity = self.clock.seconds()
        if self.needs_preamble and self.access is None and not self._closing:
            if self._preamble is not None and not self._pending:
                self._preamble += data
                line, sep, rest = self._preamble.partition(b"\n")
                if not sep:
                    if len(self._preamble) > MAX_PREAMBLE:
                        self._send_error(400, "malformed relay preamble")
                    return
                self._preamble = None
                if rest:
                    self._pending.append(rest)
                self._start_authorize(line)
                return
        if self.access is None:
            self._pending.append(data)
            return
        self._client_data(data)

    def _client_data(self, data: bytes) -> None:
        if self._closing:
            return
        if self._raw:
            self.upstream_write(data)
            return
        try:
            self.client_reader.feed(data)
        except httpwire.BadMessage as e:
            _log.info("app {app}: bad request from {client}: {why}", app=self.access.app,
                      client=self.access.client_ip, why=e.message)
            self._fail(e.status, e.message)
        except errors.EdgeError as e:
            _log.info("app {app}: request refused for {user}: {why}", app=self.access.app,
                      user=self.access.user, why=e)
            self._fail(status_for(e), str(e))
        except _Respond as answer:
            self._answer(answer.response)

    def request_head(self, head: httpwire.Head):
        access = self.access
        host = (head.get(b"host") or b"").decode("latin-1").lower()
        if host not in access.expected_hosts:
            self._audit_refusal(head, 421)
            raise httpwire.BadMessage(421, f"this connection is for {access.app}; "
                                      f"the request names host {host[:100]!r}")
        if head.method == b"CONNECT":
            self._audit_refusal(head, 405)
            raise httpwire.BadMessage(405, "CONNECT is not served")
        if access.browser is not None:
            try:
                self._browser_request(head, access.browser)
            except errors.EdgeError as e:
                self._audit_refusal(head, status_for(e))
                raise
        refused = access.check()
        if refused is not None:
            self._audit_refusal(head, status_for(refused))
            raise refused
        framing = httpwire.request_framing(head)
        upgrade = b"upgrade" in head.tokens(b"connection") and head.get(b"upgrade")
        head.remove_if(_dropped_or_host)  # (one pass: the Host is replaced)
        # (no upstream_host: a leaf's proxy is next, it checks the Host itself)
        head.headers.append((b"Host", access.upstream_host or host.encode("latin-1")))
        head.headers.append((b"X-Forwarded-For", access.client_ip.encode("ascii")))
        head.headers.append((b"X-Forwarded-Host", host.encode("latin-1")))
        head.headers.append((b"X-Forwarded-Proto", b"https"))
        if access.assertion is not None:
            head.headers.append((JWT_HEADER, access.assertion()))
        self._methods.append(head.method)
        if access.audit_request is not None:
            if self._targets is None:
                self._targets = deque()
            self._targets.append(head.target)
        self.requests += 1
        if upgrade:
            self._upgrade_requested = True
            self.client_reader.hold()
        if self.upstream is None and not self._connecting:
            self._connect_upstream()
        self.upstream_write(head.serialize())
        return framing

    def request_end(self) -> None:
        # The app has all of the request: its answer is due from now (a long
        # upload is not the app being slow).
        if self._waiting_since is None and self._methods:
            now = self._waiting_since = self.clock.seconds()
            timer = self._timer
            if timer is not None and timer.getTime() > now + self.timeouts.response + 0.5:
                timer.reset(self.timeouts.response + 0.5)  # a short --app-timeouts

    def _audit_unanswered(self, status: int) -> None:
        """The requests the app never answered (the proxy answers ``status``)."""
        if self._targets:
            for method, target in zip(list(self._methods), self._targets):
                self.access.audit_request(method, target, status)
            self._targets.clear()

    def _audit_refusal(self, head: httpwire.Head, status: int) -> None:
        """A request the proxy refused itself, when requests are audited."""
        audit = self.access.audit_request
        if audit is not None:
            audit(head.method, head.target, status)

    # --- browsers: the app cookie and the launch ---------------------------------

    def _browser_request(self, head: httpwire.Head, browser: BrowserLaunch) -> None:
        """Let a request with a valid app cookie through; answer launches."""
        from urllib.parse import parse_qs, quote, urlencode

        cookies = _cookies(head)
        path, _, query = head.target.partition(b"?")
        if path == LAUNCH_PATH:
            import hmac

            params = parse_qs(query.decode("latin-1"))
            state = (params.get("state") or [""])[0]
            token = (params.get("token") or [""])[0]
            if not state or not hmac.compare_digest(state, cookies.get(STATE_COOKIE, "")):
                raise errors.AccessDenied("this app launch did not start in this browser "
                                          "(state mismatch); open the app again")
            if browser.session_for(token) is None:
                raise errors.AccessDenied("this app launch has expired; open the app again")
            target = _safe_path((params.get("path") or ["/"])[0])
            raise _Respond(_redirect(target, [
                f"{APP_COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Lax",
                f"{STATE_COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"]))
        try:
            record = browser.session_for(cookies.get(APP_COOKIE))
        except RetryOnNewConnection:
            raise _Respond(_redirect(_safe_path(head.target.decode("latin-1")), [],
                                     status="307 Temporary Redirect")) from None
        if record is None:
            if head.method not in (b"GET", b"HEAD"):
                raise errors.AuthenticationFailed(
                    "open this app in the browser first (no valid app session)")
            import secrets

            state = secrets.token_urlsafe(16)
            query_text = urlencode({"state": state,
                                    "path": _safe_path(head.target.decode("latin-1"))},
                                   quote_via=quote)
            raise _Respond(_redirect(f"{browser.launcher}?{query_text}", [
                f"{STATE_COOKIE}={state}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=300"]))
        _strip_edge_cookies(head)

    # --- the app's side -----------------------------------------------------

    def _connect_upstream(self) -> None:
        self._connecting = True
        self._upstream_pending = []
        self.transport.pauseProducing()
        try:
            d = self.access.endpoint.connect(Factory.forProtocol(lambda: _Upstream(self)))
        except Exception as e:  # a route refused at once
            d = defer.fail(e)
        d.addCallbacks(self._upstream_connected, self._upstream_failed)

    def _upstream_connected(self, upstream: _Upstream) -> None:
        self._connecting = False
        if self._closing:
            upstream.transport.loseConnection()
            return
        self.upstream = upstream
        pending, self._upstream_pending = self._upstream_pending, None
        for data in pending:
            upstream.transport.write(data)
        # Each side's buffer pauses the other side's reading.
        upstream.transport.registerProducer(_UserSide(self), True)
        self.transport.registerProducer(upstream.transport, True)
        self.transport.resumeProducing()

    def _upstream_failed(self, failure: Failure) -> None:
        self._connecting = False
        error = failure.value
        self._audit_unanswered(status_for(error) if isinstance(error, errors.EdgeError)
                               else 502)
        _log.info("app {app} unreachable for {user}: {why}", app=self.access.app,
                  user=self.access.user, why=error)
        if isinstance(error, errors.NotFound):
            self._send_error(404, str(error))
        elif isinstance(error, errors.EdgeError) and not isinstance(
                error, errors.NodeOffline | errors.ClusterOffline):
            self._send_error(status_for(error), str(error))
        else:
            self._send_error(502, f"app {self.access.app} is unreachable: "
                                  f"{failure.getErrorMessage()}")

    def upstream_write(self, data: bytes) -> None:
        if self._upstream_pending is not None:
            self._upstream_pending.append(data)
        elif self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.write(data)

    def upstream_data(self, data: bytes) -> None:
        self._last_activity = self.clock.seconds()
        if self._closing:
            return
        if self._raw:
            self.client_write(data)
            return
        try:
            self.upstream_reader.feed(data)
            self.client_write(b"")  # a head whose body is still to come
        except httpwire.BadMessage as e:
            _log.warn("app {app} answered garbage: {why}", app=self.access.app, why=e.message)
            self._audit_unanswered(502)
            if self._sent_response_head:
                self._close()
            else:
                self._send_error(502, f"app {self.access.app} sent an invalid response "
                                      f"({e.message})")

    def response_interim(self, raw: bytes) -> None:
        """100 Continue and friends: passed on; the final response is still to come."""
        if not self._methods:
            raise httpwire.BadMessage(502, "a response nobody asked for")
        self.client_write(raw)

    def response_head(self, head: httpwire.Head, raw: bytes):
        status = head.status
        method = self._methods[0] if self._methods else None
        if method is None:
            raise httpwire.BadMessage(502, "a response nobody asked for")
        framing = httpwire.response_framing(head, method)
        self._waiting_since = None
        if self._targets and (status >= 200 or status == 101):
            self.access.audit_request(method, self._targets.popleft(), status)
        location = head.get(b"location")
        if location is not None and self.access.app_uri:
            text = location.decode("latin-1")
            origin = app_origin(self.access.app_uri)
            if text.lower().startswith(origin) and text[len(origin):len(origin) + 1] in ("", "/", "?", "#"):
                head.set(b"Location", (self.access.public_origin + text[len(origin):]
                                       ).encode("latin-1"))
                raw = head.serialize()
        self._sent_response_head = True
        # Sent with the first body bytes (one TLS record and TCP write, not two).
        self._head_out = raw
        if status == 101:
            if not self._upgrade_requested:
                raise httpwire.BadMessage(502, "101 without an upgrade request")
            self.client_write(b"")
            self._switch_to_raw()
        return framing

    def client_write(self, data: bytes) -> None:
        head = self._head_out
        if head is not None:
            self._head_out = None
            data = head + data
        if data:
            self.transport.write(data)

    def _switch_to_raw(self) -> None:
        self._raw = True
        self._methods.clear()
        if self._targets:
            self._targets.clear()
        _log.debug("app {app}: upgraded connection for {user}", app=self.access.app,
                   user=self.access.user)
        self.client_reader.switch_to_raw()
        self.upstream_reader.switch_to_raw()

    def response_end(self) -> None:
        if self._raw:
            return
        if self._methods:
            self._methods.popleft()
        self._sent_response_head = False
        if self._methods:
            self._waiting_since = self.clock.seconds()
        if self._upgrade_requested and not self._raw:
            # Refused upgrade: go on with HTTP.
            self._upgrade_requested = False
            self.client_reader.release()
        if self._error is not None and not self._methods:
            self._send_raw(self._error)

    def upstream_lost(self, reason: Failure) -> None:
        self.upstream = None
        if self._closing:
            return
        if not self._raw and self.upstream_reader.in_message and \
                not self.upstream_reader.eof():  # (eof: a close-delimited body ended)
            _log.info("app {app} closed the connection in the middle of a response to "
                      "{user}: the response is cut off", app=self.access.app,
                      user=self.access.user)
        if not self._raw and self._methods and not self._sent_response_head:
            _log.info("app {app} closed the connection without answering {user}",
                      app=self.access.app, user=self.access.user)
            self._audit_unanswered(502)
            self._send_error(502, f"app {self.access.app} closed the connection without "
                                  "answering")
            return
        self._close()

    # --- errors, timeouts, the end ----------------------------------------------

    def _fail(self, status: int, message: str) -> None:
        """Answer ``status`` once the responses already on their way are sent."""
        self._answer(error_page(status, message))

    def _answer(self, response: bytes) -> None:
        """Send ``response`` (then close) once the responses on their way are sent."""
        self.transport.pauseProducing()
        if self._methods:
            self._error = response
            self.client_reader.hold()
        else:
            self._send_raw(response)

    def _send_error(self, status: int, message: str) -> None:
        self._send_raw(error_page(status, message))

    def _send_raw(self, response: bytes) -> None:
        if self._closing:
            return
        if self._sent_response_head:
            self._close()
            return
        self.transport.write(response)
        self._close()

    def _close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.transport.loseConnection()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseConnection()

    def close_for(self, reason: str) -> None:
        """End this connection at once (the session ended, a lock)."""
        _log.info("closing an app connection to {app} of {user}: {why}",
                  app=getattr(self.access, "app", "?"), user=getattr(self.access, "user", "?"),
                  why=reason)
        self._close()

    def _check_timeouts(self) -> None:
        self._timer = None
        if self._closing:
            return
        timeouts = self.timeouts
        now = self.clock.seconds()
        if self._waiting_since is not None and not self._raw and \
                now - self._waiting_since >= timeouts.response:
            _log.info("app {app} did not answer within {t}s", app=self.access.app,
                      t=timeouts.response)
            self._audit_unanswered(504)
            self._send_error(504, f"app {self.access.app} did not answer in time")
            return
        if self.access is not None and not self._raw and self.client_reader.in_message \
                and not self.held_by_app and now - self._client_activity >= timeouts.head:
            _log.info("app {app}: the request body from {client} stalled for {t}s",
                      app=self.access.app, client=self.access.client_ip, t=timeouts.head)
            self._audit_unanswered(408)
            self._send_error(408, "the rest of the request body did not arrive in time")
            return
        idle = now - self._last_activity
        limit = timeouts.idle
        if self.access is None or (not self._methods and not self._raw
                                   and self.client_reader.in_message is False
                                   and self.requests == 0):
            limit = timeouts.head
        if idle >= limit:
            if self.access is None or self.requests == 0:
                _log.info("app connection {what}: no complete request within {t}s",
                          what=self.description, t=limit)
                self._send_error(408, "no complete request in time")
            else:
                self._close()
            return
        self._timer = self.clock.callLater(
            min(limit - idle, timeouts.response, timeouts.head) + 0.5, self._check_timeouts)

    def connectionLost(self, reason: Failure) -> None:
        self._closing = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseConnection()
        if self.access is not None:
            for hook in self.access.on_close:
                hook(self)


_DEFAULT_TIMEOUTS = AppTimeouts()


def parse_preamble(line: bytes) -> dict:
    """The leaf-relay preamble: one JSON object line."""
    try:
        data = json.loads(line)
    except ValueError:
        raise errors.BadRequest("malformed relay preamble") from None
    if not isinstance(data, dict):
        raise errors.BadRequest("malformed relay preamble")
    return data


class _Dispatch(Protocol):
    """Decides, after the TLS handshake, whether a web-port connection is an
    app connection (SNI ``NAME.<public host>``) or the web UI's."""

    def __init__(self, factory: WebPortFactory, addr) -> None:
        self.factory = factory
        self.addr = addr
        self.inner: Protocol | None = None
        self._idle = None

    def connectionMade(self) -> None:
        # A connection that never sends a byte is closed (the UI's and the
        # app proxy's own timeouts start with the first request).
        self._idle = self.factory.clock.callLater(self.factory.timeouts.head, self._silent)

    def _silent(self) -> None:
        self._idle = None
        if self.inner is None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.inner is None:
            if self._idle is not None and self._idle.active():
                self._idle.cancel()
            self._idle = None
            self.inner = self.factory.choose(self.transport, self.addr)
            if self.inner is None:
                self.transport.loseConnection()
                return
            self.inner.makeConnection(self.transport)
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        if self.inner is not None:
            self.inner.connectionLost(reason)


def server_name(transport) -> str | None:
    """The TLS server name (SNI) the client asked for, lowercased, or None."""
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    try:
        name = get_handle().get_servername()
    except Exception:
        return None
    if not name:
        return None
    return name.decode("ascii", "replace").lower().rstrip(".")


@implementer(IProtocolFactory, IProtocolNegotiationFactory)
class WebPortFactory(Factory):
    """The web port's protocol factory (wrapped in TLS by the endpoint).

    :param site: the web UI's ``Site``.
    :param gateway: an :class:`~edgeaccess.apps.sessions.AppGateway`, whose
        ``app_name_for(server_name)`` says whether a name is an app host and
        ``authorize(protocol, preamble)`` authorises its connections.
    """

    def __init__(self, site, gateway, clock, timeouts: AppTimeouts | None = None) -> None:
        self.site = site
        self.gateway = gateway
        self.clock = clock
        self.timeouts = timeouts or _DEFAULT_TIMEOUTS

    def doStart(self) -> None:
        self.site.doStart()

    def doStop(self) -> None:
        self.site.doStop()

    def buildProtocol(self, addr):
        return _Dispatch(self, addr)

    def acceptableProtocols(self) -> list[bytes]:
        """ALPN: HTTP/1.1 only (Twisted refuses a handshake offering nothing in common)."""
        return [b"http/1.1"]

    def choose(self, transport, addr) -> Protocol | None:
        name = server_name(transport)
        if name is not None and self.gateway.app_name_for(name) is not None:
            return AppProxyProtocol(self.gateway.authorize, self.clock,
                                    description=f"to {name} from {getattr(addr, 'host', '?')}",
                                    timeouts=self.timeouts)
        return self.site.buildProtocol(addr)
