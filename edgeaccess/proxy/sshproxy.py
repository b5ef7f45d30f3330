"""The proxy's SSH entry point (port 3023): ``ssh -J`` / ProxyJump.

The proxy authenticates the user's certificate (issued by one of the
cluster's user CAs), then only opens ``direct-tcpip`` channels to nodes: the
router turns the requested ``NAME[.CLUSTER]`` into an endpoint and the
channel splices bytes to it. The inner SSH session, from the OpenSSH client
to the node, is never decrypted here; the node decides access.

No shell, exec or subsystem: a session channel is refused with a message
telling the user to jump through the proxy instead.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import attrs
from twisted.conch.avatar import ConchUser
from twisted.conch.error import ConchError
from twisted.conch.ssh.connection import (
    OPEN_ADMINISTRATIVELY_PROHIBITED,
    OPEN_UNKNOWN_CHANNEL_TYPE,
)
from twisted.conch.ssh.factory import SSHFactory
from twisted.cred.portal import Portal
from twisted.conch.ssh.transport import DISCONNECT_BY_APPLICATION
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeaccess.errors import AccessDenied
from edgeaccess.pki.sshca import UserIdentity
from edgeaccess.proxy.interfaces import IRouter
from edgeaccess.ssh.certauth import (
    CertificateRealm,
    CertificateUserAuthServer,
    SSHCertificateChecker,
    VerifiedCertificate,
    parse_certificate_blob,
)
from edgeaccess.ssh.forwarding import (
    ForwardingSSHConnection,
    open_direct_tcpip,
    open_failure,
    parse_direct_tcpip,
)
from edgeaccess.ssh.hostkeys import host_keys
from edgeaccess.ssh.interfaces import IAuthorizer, SessionPermissions
from edgeaccess.ssh.transport import EdgeServerTransport
from edgeaccess.tunnel.protocol import format_source

_log = Logger()

#: What a client asking the proxy for a shell or a command is told.
NO_SESSION_MESSAGE = (
    "this is the edgeaccess proxy: it only forwards connections to nodes "
    "(use ssh -J or ProxyJump)"
)


class ProxyCertificateChecker(SSHCertificateChecker):
    """Checks user certificates at the proxy hop.

    The login at the jump hop means nothing (OpenSSH's ProxyJump logs in
    with the user's own login or the target's): the proxy gives no shell,
    and the node checks the real login. So a valid certificate is accepted
    whatever login is asked for; the certificate's own checks (trusted CA,
    type, validity, critical options, session signature) all still apply.
    """

    def _check(self, credentials) -> VerifiedCertificate:
        cert = parse_certificate_blob(credentials.algorithm, credentials.blob)
        principals = [p.decode("utf-8", "replace") for p in cert.valid_principals]
        if credentials.username not in principals and principals:
            # Check the certificate as if its first login had been asked for.
            credentials = _with_username(credentials, principals[0])
        return super()._check(credentials)


def _with_username(credentials, username: str):
    return attrs.evolve(credentials, username=username)


@implementer(IAuthorizer)
class AllowAllAuthorizer:
    """The proxy decides nothing about nodes: every verified holder may jump."""

    def authorize(
        self, identity: UserIdentity, login: str, peer_address: str
    ) -> Deferred[SessionPermissions]:
        """Grant forwarding through the proxy (the node still decides)."""
        return succeed(SessionPermissions(port_forwarding=True, roles=identity.roles))


@implementer(IAuthorizer)
class LockAuthorizer:
    """Refuses users that a lock in force targets (the node checks again).

    :param check: ``(identity) -> None``, raising ``AccessDenied`` with the
        lock's message for a locked user.
    """

    def __init__(self, check: Callable[[UserIdentity], None]) -> None:
        self._check = check

    def authorize(
        self, identity: UserIdentity, login: str, peer_address: str
    ) -> Deferred[SessionPermissions]:
        try:
            self._check(identity)
        except AccessDenied as error:
            return fail(error)
        return succeed(SessionPermissions(port_forwarding=True, roles=identity.roles))


class ProxyAvatar(ConchUser):
    """A user connected to the proxy: may only open ``direct-tcpip`` channels.

    :param target_check: ``(host, user) -> None`` raising ``AccessDenied``
        for a target the proxy refuses (a locked node).
    """

    def __init__(
        self,
        verified: VerifiedCertificate,
        permissions: SessionPermissions,
        router: IRouter,
        target_check: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__()
        self.verified = verified
        self.permissions = permissions
        self.username = verified.identity.username
        self._router = router
        self._target_check = target_check
        #: The registration with the proxy's live sessions (locks end it).
        self.live_session = None

    def terminate(self, message: str) -> None:
        """End the user's connection to the proxy, saying why."""
        transport = getattr(getattr(self, "conn", None), "transport", None)
        if transport is not None:
            transport.sendDisconnect(
                DISCONNECT_BY_APPLICATION, f"edgeaccess: {message}".encode("utf-8", "replace"))

    def lookupChannel(self, channelType, windowSize, maxPacket, data):
        """Route ``direct-tcpip`` to a node; refuse everything else."""
        if channelType == b"session":
            raise ConchError(NO_SESSION_MESSAGE, OPEN_ADMINISTRATIVELY_PROHIBITED)
        if channelType != b"direct-tcpip":
            raise ConchError("unknown channel type", OPEN_UNKNOWN_CHANNEL_TYPE)
        (host, port), _origin = parse_direct_tcpip(data)
        peer = self.verified.peer_address

        def log(outcome: str, route_kind: str | None) -> None:
            _log.info(
                "route user={user} peer={peer} target={target}:{port} "
                "route={route} outcome={outcome}",
                user=self.username,
                peer=peer,
                target=host,
                port=port,
                route=route_kind or "-",
                outcome=outcome,
            )

        routed: list[Any] = []  # the endpoint, once the router answered

        def connect():
            if self._target_check is not None:
                self._target_check(host, self.username)
            # The client's port is ignored: the router knows the node's.
            # The user's address goes along to a tunnelled node (its audit
            # events, its certificate source-address checks).
            source = self._client_source()
            if source is None:
                endpoint = self._router.route_host(host, "ssh")
            else:
                endpoint = self._router.route_host(host, "ssh", source=source)
            routed.append(endpoint)
            return open_direct_tcpip(
                endpoint,
                remote_window=windowSize,
                remote_max_packet=maxPacket,
                avatar=self,
                target_description=host,
            )

        def route_kind() -> str | None:
            return getattr(routed[0], "route_kind", None) if routed else None

        def opened(channel):
            log("ok", route_kind())
            return channel

        def failed(reason: Failure):
            error = open_failure(reason, host)
            log(f"refused: {error.args[0]}", route_kind())
            return Failure(error)

        return maybeDeferred(connect).addCallbacks(opened, failed)

    def _client_source(self) -> str | None:
        """The SSH client's address as ``"ip:port"`` (None if it is no IP)."""
        transport = getattr(getattr(self, "conn", None), "transport", None)
        peer = getattr(getattr(transport, "transport", None), "getPeer", None)
        if peer is not None:
            address = peer()
            host, port = getattr(address, "host", None), getattr(address, "port", None)
            if isinstance(host, str) and isinstance(port, int):
                return format_source(host, port)
        return format_source(self.verified.peer_address, 0)

    def gotGlobalRequest(self, requestType, data):
        """No remote port forwarding through the proxy."""
        return 0

    def logout(self) -> None:
        """Channels close with the connection; the session registration goes."""
        if self.live_session is not None:
            self.live_session.unregister()


class ProxySSHFactory(SSHFactory):
    """The proxy's SSH server factory (see :func:`make_proxy_ssh_factory`)."""

    protocol = EdgeServerTransport
    services = {
        b"ssh-userauth": CertificateUserAuthServer,
        b"ssh-connection": ForwardingSSHConnection,
    }

    def __init__(self, public_keys: dict, private_keys: dict, portal: Portal, clock) -> None:
        self.publicKeys = public_keys
        self.privateKeys = private_keys
        self.portal = portal
        self.clock = clock

    def getPrimes(self):
        """No moduli file: fixed groups and curve25519 only."""
        return None


def make_proxy_ssh_factory(
    host_key,
    host_certificate,
    trusted_user_ca_keys: Callable[[], Iterable] | Iterable,
    router: IRouter,
    clock: IReactorTime,
    *,
    authorizer: IAuthorizer | None = None,
    portal: Portal | None = None,
    sessions=None,
    target_check: Callable[[str, str], None] | None = None,
) -> ProxySSHFactory:
    """Build the proxy's SSH server factory.

    :param host_key: the proxy's host private key (cryptography or Conch).
    :param host_certificate: its SSH host certificate (principals: the public
        address's host and the cluster name), or ``None`` for a bare key.
    :param trusted_user_ca_keys: the cluster's user CA public keys, or a
        callable returning the current ones (CA rotation).
    :param router: resolves ``NAME[.CLUSTER]`` to an endpoint
        (``IRouter.route_host``).
    :param clock: validity checks, login timeout.
    :param authorizer: may refuse users at the proxy (e.g. locks); default
        lets every verified certificate holder jump.
    :param portal: replaces the certificate portal entirely (tests).
    :param sessions: :class:`~edgeaccess.controlplane.sessions.LiveSessions`
        every connection registers with (a lock ends it).
    :param target_check: refuses targets (a locked node) before routing.
    """
    public_keys, private_keys = host_keys(host_key, host_certificate)
    if portal is None:
        trusted = (
            trusted_user_ca_keys
            if callable(trusted_user_ca_keys)
            else (lambda keys=tuple(trusted_user_ca_keys): keys)
        )
        def avatar(verified, permissions):
            user = ProxyAvatar(verified, permissions, router, target_check)
            if sessions is not None:
                user.live_session = sessions.register(
                    user=verified.identity.username, cluster=verified.identity.cluster,
                    kind="proxy-ssh", terminate=user.terminate)
            return user

        realm = CertificateRealm(authorizer or AllowAllAuthorizer(), avatar)
        portal = Portal(realm, [ProxyCertificateChecker(trusted, clock)])
    return ProxySSHFactory(public_keys, private_keys, portal, clock)
