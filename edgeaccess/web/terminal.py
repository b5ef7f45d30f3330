"""The web terminal: a browser's WebSocket bridged to an SSH session on a node.

``GET /web/ws/ssh/LOGIN@NODE.CLUSTER`` is upgraded only for a valid web
session and a same-origin ``Origin`` (checked by the web app before the
upgrade). The proxy then connects to the node through the router, as the
session's user with a certificate of its own (:mod:`edgeaccess.web.sshclient`),
so the node decides, audits and records as for any SSH session.

Messages, browser to proxy: JSON text ``{"type": "input", "data": "..."}``
(keystrokes and pastes, at most 64 KiB) and ``{"type": "resize", "cols": C,
"rows": R}`` (an SSH ``window-change``). Proxy to browser: binary messages
are terminal output; text messages are JSON ``{"type": "exit", "status":
N}`` and ``{"type": "closed", "reason": "..."}`` before the close.

The terminal ends with the shell, with the web session (logout, expiry,
password change, lock: :meth:`WebSessionStore.on_end`), or when the browser
goes. Output is held at one SSH window while the browser's connection is
backed up (the WebSocket's transport pauses the SSH channel).
"""

from __future__ import annotations

import base64
import json
import re
from datetime import timedelta

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.conch.ssh import keys as conch_keys
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from edgeaccess import errors
from edgeaccess.auth.users import NO_LOGIN_PRINCIPAL
from edgeaccess.pki import keys
from edgeaccess.web.sessions import WebSession, WebSessionStore
from edgeaccess.web.sshclient import SSHTerminal, check_host_certificate, now_utc

_log = Logger()

LOGIN_PATTERN = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\$?")
HOST_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}")
MAX_INPUT = 64 * 1024
MAX_MESSAGE = 128 * 1024
#: Longest certificate a terminal gets (further bounded by the session).
MAX_CERT_TTL = timedelta(hours=12)


def parse_target(target: str) -> tuple[str, str]:
    """``LOGIN@HOST`` -> ``(login, host)``; BadRequest when malformed."""
    login, sep, host = target.partition("@")
    if not sep or not LOGIN_PATTERN.fullmatch(login) or not HOST_PATTERN.fullmatch(host):
        raise errors.BadRequest("the terminal address must be LOGIN@NODE.CLUSTER")
    return login, host


class TerminalOpener:
    """Opens SSH sessions for web terminals.

    :param auth: the auth service (its CA signs the session certificates).
    :param router: the proxy's :class:`~edgeaccess.proxy.router.Router`.
    :param clusters: :class:`~edgeaccess.cluster.root.RootClusters` (the
        leaves' host CAs), or ``None``.
    """

    def __init__(self, auth, router, clusters, clock) -> None:
        self.auth = auth
        self.router = router
        self.clusters = clusters
        self.clock = clock

    async def host_cas(self, cluster: str) -> list[str]:
        if cluster == self.auth.cluster_name:
            return [self.auth.authority.host_ca_public_line]
        if self.clusters is not None:
            for leaf in await self.clusters.remote_clusters():
                if leaf["name"] == cluster:
                    return list(leaf.get("ssh_host_ca") or [])
        return []

    async def certificate(self, session: WebSession, checker) -> tuple[conch_keys.Key, bytes]:
        """A new key and a user certificate for it, valid while the session is."""
        now = now_utc(self.clock)
        ttl = min(session.expires - now, MAX_CERT_TTL)
        if ttl <= timedelta(0):
            raise errors.AuthenticationFailed("the web session has expired")
        key = keys.generate_private_key()
        cert = self.auth.authority.sign_user(
            key.public_key(), username=session.user,
            principals=checker.allowed_logins() or [NO_LOGIN_PRINCIPAL],
            roles=list(session.roles), cluster=self.auth.cluster_name,
            traits=session.traits, now=now, ttl=ttl,
            permit_port_forwarding=False, permit_agent_forwarding=False)
        blob = base64.b64decode(cert.public_bytes().split()[1])
        return conch_keys.Key(key), blob

    async def open(self, session: WebSession, checker, login: str, host: str, sink, *,
                   source: str | None, cols: int, rows: int) -> SSHTerminal:
        key, blob = await self.certificate(session, checker)
        endpoint = self.router.route_host(host, "ssh", source=source)

        async def host_check(host_blob: bytes):
            # The router has resolved the node by now: its name and cluster.
            cas = await self.host_cas(endpoint.cluster)
            return check_host_certificate(host_blob, ca_keys=cas,
                                          principal=f"{endpoint.name}.{endpoint.cluster}",
                                          now=now_utc(self.clock))

        terminal = SSHTerminal(sink, login=login, key=key, certificate_blob=blob,
                               host_check=lambda b: defer.Deferred.fromCoroutine(host_check(b)),
                               cols=cols, rows=rows)
        await endpoint.connect(terminal.factory())
        await terminal.ready
        return terminal


@implementer(IPushProducer)
class _OutputProducer:
    def __init__(self, protocol: "TerminalWebSocket") -> None:
        self.protocol = protocol

    def pauseProducing(self) -> None:  # noqa: N802
        if self.protocol.ssh is not None:
            self.protocol.ssh.pause()

    def resumeProducing(self) -> None:  # noqa: N802
        if self.protocol.ssh is not None:
            self.protocol.ssh.resume()

    def stopProducing(self) -> None:  # noqa: N802
        pass


class TerminalWebSocket(WebSocketServerProtocol):
    """One browser tab's terminal."""

    factory: "TerminalFactory"

    def __init__(self) -> None:
        super().__init__()
        self.ssh: SSHTerminal | None = None
        self._unsubscribe = None
        self._closing = False
        self._early: list[tuple[str, object]] = []
        self._size = (80, 24)

    def onOpen(self) -> None:  # noqa: N802
        f = self.factory
        self._unsubscribe = f.sessions.on_end(f.session.id, self._session_ended)
        transport = self.transport
        try:
            transport.unregisterProducer()
        except Exception:
            pass
        try:
            transport.registerProducer(_OutputProducer(self), True)
        except Exception:
            _log.debug("no backpressure for this web terminal's transport")
        d = defer.Deferred.fromCoroutine(self._open())
        d.addErrback(self._open_failed)

    async def _open(self) -> None:
        f = self.factory
        # Wait for the browser's first size (sent on open) for a moment.
        for _ in range(20):
            if self._early or self._closing:
                break
            await _sleep(f.clock, 0.025)
        if self._closing:
            return
        cols, rows = self._size
        self.ssh = await f.opener.open(f.session, f.checker, f.login, f.host, self,
                                       source=f.source, cols=cols, rows=rows)
        _log.info("web terminal of {user} to {login}@{host} open", user=f.session.user,
                  login=f.login, host=f.host)
        # What came while the session opened: keystrokes, a later size.
        for kind, value in self._early:
            if kind == "input":
                self.ssh.write(value)
        self._early = []
        if self._size != (cols, rows):
            self.ssh.resize(*self._size)
        if self._closing:
            self.ssh.close()

    def _open_failed(self, failure) -> None:
        error = failure.value
        if isinstance(error, errors.EdgeError):
            reason = str(error)
        else:
            _log.failure("web terminal to {host} failed", failure, host=self.factory.host)
            reason = "the connection to the node failed"
        _log.info("web terminal of {user} to {login}@{host} refused: {reason}",
                  user=self.factory.session.user, login=self.factory.login,
                  host=self.factory.host, reason=reason)
        self.closed(reason)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802,N803
        if isBinary or len(payload) > MAX_MESSAGE:
            return self._protocol_error("unexpected message")
        try:
            message = json.loads(payload)
        except ValueError:
            return self._protocol_error("messages must be JSON")
        if not isinstance(message, dict):
            return self._protocol_error("messages must be JSON objects")
        kind = message.get("type")
        if kind == "input":
            data = message.get("data")
            if not isinstance(data, str) or len(data) > MAX_INPUT:
                return self._protocol_error("input must be text of at most 64 KiB")
            raw = data.encode("utf-8", "surrogateescape")
            if self.ssh is None:
                self._early.append(("input", raw))
            else:
                self.ssh.write(raw)
        elif kind == "resize":
            cols, rows = message.get("cols"), message.get("rows")
            if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1000
                       for v in (cols, rows)):
                return self._protocol_error("resize needs cols and rows from 1 to 1000")
            self._size = (cols, rows)
            if self.ssh is None:
                self._early.append(("resize", (cols, rows)))
            else:
                self.ssh.resize(cols, rows)
        else:
            return self._protocol_error("unknown message type")
        return None

    def _protocol_error(self, reason: str) -> None:
        _log.info("web terminal closed: {reason}", reason=reason)
        self.closed(reason)

    def onClose(self, wasClean, code, reason) -> None:  # noqa: N802,N803
        self._closing = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self.ssh is not None:
            self.ssh.close()

    def _session_ended(self, reason: str) -> None:
        self._unsubscribe = None
        self.closed(f"web session ended: {reason}")
        if self.ssh is not None:
            self.ssh.close()

    # -- TerminalSink ------------------------------------------------------

    def output(self, data: bytes) -> None:
        if not self._closing:
            self.sendMessage(data, isBinary=True)

    def exited(self, status, signal) -> None:
        if not self._closing:
            self.sendMessage(json.dumps({"type": "exit", "status": status,
                                         "signal": signal}).encode())

    def closed(self, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self.sendMessage(json.dumps({"type": "closed", "reason": reason}).encode())
        self.sendClose(1000)


class TerminalFactory(WebSocketServerFactory):
    """The factory of one upgrade: everything its protocol needs, checked."""

    protocol = TerminalWebSocket

    def __init__(self, *, opener: TerminalOpener, sessions: WebSessionStore,
                 session: WebSession, checker, login: str, host: str,
                 source: str | None, clock) -> None:
        super().__init__()
        self.opener = opener
        self.sessions = sessions
        self.session = session
        self.checker = checker
        self.login = login
        self.host = host
        self.source = source
        self.clock = clock
        self.setProtocolOptions(maxMessagePayloadSize=MAX_MESSAGE,
                                maxFramePayloadSize=MAX_MESSAGE,
                                autoPingInterval=30, autoPingTimeout=60)


def _sleep(clock, seconds: float) -> defer.Deferred:
    from twisted.internet import task

    return task.deferLater(clock, seconds, lambda: None)
