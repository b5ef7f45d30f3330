"""The web terminal's SSH client: Conch, a user certificate, a checked host certificate.

The proxy opens an SSH connection to the node, over the route the router
gives (TCP, the node's reverse tunnel, or a leaf cluster's tunnel), as the
web session's user: a fresh key, certified for the session's remaining life
by the cluster's user CA. The node then checks that certificate, applies
roles and locks, audits and records the session exactly as for OpenSSH.

The client checks the node before sending anything: the host key must be
an OpenSSH host certificate signed by the host CA of the node's cluster
(ours, or the leaf's that the trust exchange gave us), valid now, naming
the node (``NAME.CLUSTER``) among its principals.
"""

from __future__ import annotations

import base64
import struct
from datetime import datetime, timezone
from typing import Any, Callable

from cryptography.hazmat.primitives.serialization import ssh as crypto_ssh
from twisted.conch.ssh import channel, common, connection, keys, session, userauth
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from edgeaccess import errors, internals
from edgeaccess.ssh.transport import EdgeClientTransport

_log = Logger()

HOST_CERT_ALGORITHM = b"ssh-ed25519-cert-v01@openssh.com"
USER_CERT_ALGORITHM = b"ssh-ed25519-cert-v01@openssh.com"
TERM = b"xterm-256color"
#: Window offered to the node for terminal output (output beyond it waits
#: until the browser's connection has taken what came before).
WINDOW_SIZE = 1024 * 1024


class HostCertificateRefused(errors.AccessDenied):
    """the node's host certificate is not trusted"""


def check_host_certificate(blob: bytes, *, ca_keys: list[str], principal: str,
                           now: datetime) -> keys.Key:
    """The key that signs for host certificate ``blob``, once checked.

    :param ca_keys: OpenSSH public lines of the host CAs trusted for this node.
    :param principal: a name the certificate must carry (``NAME.CLUSTER``).
    :raises HostCertificateRefused: anything wrong with it.
    """
    try:
        cert = crypto_ssh.load_ssh_public_identity(
            HOST_CERT_ALGORITHM + b" " + base64.b64encode(blob))
    except (ValueError, TypeError) as e:
        raise HostCertificateRefused(f"not a host certificate: {e}")
    if not isinstance(cert, crypto_ssh.SSHCertificate):
        raise HostCertificateRefused("the node presented a plain key, not a certificate")
    if cert.type != crypto_ssh.SSHCertificateType.HOST:
        raise HostCertificateRefused("the node presented a user certificate")
    signer = keys.Key(cert.signature_key()).public().toString("OPENSSH")
    trusted = {b" ".join(line.encode("ascii").split()[:2]) for line in ca_keys}
    if b" ".join(signer.split()[:2]) not in trusted:
        raise HostCertificateRefused("the host certificate is signed by an unknown CA")
    try:
        cert.verify_cert_signature()
    except Exception:
        raise HostCertificateRefused("the host certificate's signature is invalid")
    stamp = int(now.timestamp())
    if not cert.valid_after <= stamp < cert.valid_before:
        raise HostCertificateRefused("the host certificate is not valid now")
    principals = {p.decode("utf-8", "replace").lower() for p in cert.valid_principals}
    if principal.lower() not in principals:
        raise HostCertificateRefused(f"the host certificate is not for {principal}")
    return keys.Key(cert.public_key())


class TerminalSink:
    """What the SSH side tells the browser side (the web socket)."""

    def output(self, data: bytes) -> None: ...
    def exited(self, status: int | None, signal: str | None) -> None: ...
    def closed(self, reason: str) -> None: ...


class _SessionChannel(channel.SSHChannel):
    """The ``session`` channel: a PTY of the browser's size and a shell."""

    name = b"session"

    def __init__(self, bridge: "SSHTerminal", cols: int, rows: int) -> None:
        self._paused = False
        self._window = WINDOW_SIZE
        super().__init__(localWindow=WINDOW_SIZE, localMaxPacket=32768)
        self.bridge = bridge
        self._size = (cols, rows)

    # Conch reopens the window on every data packet once half is used; it
    # reads ``localWindowSize`` only there: 0 while the browser's side has
    # paused us holds the node's output at one window.
    @property
    def localWindowSize(self) -> int:  # noqa: N802
        return 0 if self._paused else self._window

    @localWindowSize.setter
    def localWindowSize(self, value: int) -> None:  # noqa: N802
        self._window = value

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        if self.conn is not None and not self.closing and self.localWindowLeft < self._window // 2:
            self.conn.adjustWindow(self, self._window - self.localWindowLeft)

    def channelOpen(self, specificData: bytes) -> None:  # noqa: N802
        cols, rows = self._size
        self.conn.sendRequest(self, b"pty-req",
                              session.packRequest_pty_req(TERM, (rows, cols, 0, 0), b""))
        d = self.conn.sendRequest(self, b"shell", b"", wantReply=True)
        d.addCallbacks(lambda _: self.bridge._opened(self),
                       lambda f: self.bridge._failed("the node refused the shell"))

    def openFailed(self, reason) -> None:  # noqa: N802
        self.bridge._failed(f"the node refused the session: {reason}")

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.bridge.sink.output(data)

    def extReceived(self, dataType: int, data: bytes) -> None:  # noqa: N802
        self.bridge.sink.output(data)

    def request_exit_status(self, data: bytes) -> int:
        (status,) = struct.unpack(">L", data[:4])
        self.bridge._exit(status, None)
        return 1

    def request_exit_signal(self, data: bytes) -> int:
        name, _ = common.getNS(data)
        self.bridge._exit(None, name.decode("ascii", "replace"))
        return 1

    def closed(self) -> None:
        self.bridge._channel_closed()

    def resize(self, cols: int, rows: int) -> None:
        self._size = (cols, rows)
        self.conn.sendRequest(self, b"window-change", struct.pack(">4L", cols, rows, 0, 0))


class _Connection(connection.SSHConnection):
    def __init__(self, bridge: "SSHTerminal") -> None:
        super().__init__()
        self.bridge = bridge

    def serviceStarted(self) -> None:  # noqa: N802
        super().serviceStarted()
        self.bridge._authenticated(self)


class _UserAuth(userauth.SSHUserAuthClient):
    """Public key authentication with the certificate, signed in the first request."""

    preferredOrder = [b"publickey"]

    def __init__(self, login: bytes, instance, key: keys.Key, certificate_blob: bytes,
                 bridge: "SSHTerminal") -> None:
        super().__init__(login, instance)
        self._key = key
        self._blob = certificate_blob
        self._tried = False
        self.bridge = bridge

    def auth_publickey(self) -> bool:  # noqa: N802
        if self._tried:
            return False
        self._tried = True
        request = (common.NS(self.transport.sessionID) + bytes([userauth.MSG_USERAUTH_REQUEST])
                   + common.NS(self.user) + common.NS(self.instance.name)
                   + common.NS(b"publickey") + b"\x01" + common.NS(USER_CERT_ALGORITHM)
                   + common.NS(self._blob))
        signature = self._key.sign(request)
        self.askForAuth(b"publickey", b"\x01" + common.NS(USER_CERT_ALGORITHM)
                        + common.NS(self._blob) + common.NS(signature))
        return True

    def ssh_USERAUTH_BANNER(self, packet: bytes) -> None:  # noqa: N802
        message, _ = common.getNS(packet)
        self.bridge.banner = message.decode("utf-8", "replace")[:500]

    def ssh_USERAUTH_FAILURE(self, packet: bytes):  # noqa: N802
        if self._tried:  # (not the first "none" probe)
            self.bridge.refused = True
        return super().ssh_USERAUTH_FAILURE(packet)


class _Transport(internals.HostCertificateClientMixin, EdgeClientTransport):
    supportedPublicKeys = [HOST_CERT_ALGORITHM]
    supportedKeyExchanges = [b"curve25519-sha256", b"curve25519-sha256@libssh.org"]

    def __init__(self, bridge: "SSHTerminal") -> None:
        self.bridge = bridge

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes):  # noqa: N802,N803
        return self.bridge._check_host(hostKey)

    def connectionSecure(self) -> None:  # noqa: N802
        self.requestService(self.bridge._userauth())

    def receiveError(self, reasonCode: int, description: bytes) -> None:  # noqa: N802,N803
        self.bridge.disconnect_reason = description.decode("utf-8", "replace")[:300]

    def connectionLost(self, reason=None) -> None:  # noqa: N802
        super().connectionLost(reason)
        self.bridge._transport_lost()


class SSHTerminal:
    """One web terminal's SSH connection to a node.

    :param sink: receives output, the exit status and the end.
    :param login: the Unix login asked for.
    :param key: the Conch private key the certificate certifies.
    :param certificate_blob: the user certificate (wire form).
    :param host_check: ``(blob) -> keys.Key`` or a Deferred of one: checks
        the node's host certificate (see :func:`check_host_certificate`);
        raises or fails to refuse.
    :param cols rows: initial terminal size.
    """

    def __init__(self, sink: TerminalSink, *, login: str, key: keys.Key,
                 certificate_blob: bytes, host_check: Callable[[bytes], Any],
                 cols: int = 80, rows: int = 24) -> None:
        self.sink = sink
        self.login = login
        self.key = key
        self.certificate_blob = certificate_blob
        self.host_check = host_check
        self.cols, self.rows = cols, rows
        self.transport: _Transport | None = None
        self.channel: _SessionChannel | None = None
        self.ready: defer.Deferred = defer.Deferred()
        self.banner = ""
        self.refused = False
        self.disconnect_reason = ""
        self.host_refusal = ""
        self._ended = False

    def factory(self) -> Factory:
        return Factory.forProtocol(lambda: self._build())

    def _build(self) -> _Transport:
        if not internals.available("conch-host-cert"):
            raise errors.EdgeError("web terminals need Conch internals this Twisted lacks")
        self.transport = _Transport(self)
        return self.transport

    # -- from the protocol -------------------------------------------------

    def _check_host(self, blob: bytes) -> defer.Deferred:
        def refused(failure):
            self.host_refusal = (str(failure.value) if failure.check(errors.EdgeError)
                                 else "its host key could not be checked")
            return failure

        return defer.maybeDeferred(self.host_check, blob).addErrback(refused)

    def _userauth(self) -> _UserAuth:
        return _UserAuth(self.login.encode("utf-8"), _Connection(self), self.key,
                         self.certificate_blob, self)

    def _authenticated(self, conn: _Connection) -> None:
        self.channel = _SessionChannel(self, self.cols, self.rows)
        conn.openChannel(self.channel)

    def _opened(self, chan: _SessionChannel) -> None:
        if not self.ready.called:
            self.ready.callback(self)

    def _failed(self, reason: str) -> None:
        if not self.ready.called:
            self.ready.errback(errors.AccessDenied(reason))
        self.close()

    def _exit(self, status: int | None, signal: str | None) -> None:
        self.sink.exited(status, signal)

    def _channel_closed(self) -> None:
        self.channel = None
        self.close()

    def _transport_lost(self) -> None:
        if not self.ready.called:
            self.ready.errback(errors.AccessDenied(self.refusal()))
        self._end(self.refusal() if self.channel is None and not self._ended else "closed")

    def refusal(self) -> str:
        """Why the connection did not give a shell, in the user's words."""
        if self.host_refusal:
            return f"the node is not who it should be: {self.host_refusal}"
        if self.refused:
            text = "the node refused the login"
            if self.banner.strip():
                text += f": {self.banner.strip()}"
            return text
        if self.disconnect_reason:
            return f"the node closed the connection: {self.disconnect_reason}"
        return "the connection to the node was lost"

    def _end(self, reason: str) -> None:
        if self._ended:
            return
        self._ended = True
        self.sink.closed(reason)

    # -- from the browser --------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.channel is not None:
            self.channel.write(data)

    def resize(self, cols: int, rows: int) -> None:
        self.cols, self.rows = cols, rows
        if self.channel is not None:
            self.channel.resize(cols, rows)

    def pause(self) -> None:
        if self.channel is not None:
            self.channel.pause()

    def resume(self) -> None:
        if self.channel is not None:
            self.channel.resume()

    def close(self) -> None:
        if self.transport is not None and self.transport.transport is not None:
            self.transport.transport.loseConnection()
        self._end("closed")


def now_utc(clock) -> datetime:
    return datetime.fromtimestamp(clock.seconds(), timezone.utc)
