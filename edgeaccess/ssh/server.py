"""The node's SSH server: a Conch ``SSHFactory`` wired for certificates.

:func:`make_node_ssh_factory` composes the pieces of this package: host
certificate keys (:mod:`~edgeaccess.ssh.hostkeys`), certificate userauth
and checker (:mod:`~edgeaccess.ssh.certauth`), the authorizer, and the
node avatar with its sessions (:mod:`~edgeaccess.ssh.session`,
:mod:`~edgeaccess.ssh.sftp`). Listen with
``TCP4ServerEndpoint(reactor, 3022).listen(factory)``.
"""

from __future__ import annotations

import uuid
from typing import Callable, Iterable

from cryptography.hazmat.primitives.serialization import ssh
from twisted.conch.ssh.factory import SSHFactory
from twisted.cred.portal import Portal
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from edgeaccess.ssh.certauth import (
    CertificateRealm,
    CertificateUserAuthServer,
    SSHCertificateChecker,
    VerifiedCertificate,
)
from edgeaccess.ssh.forwarding import ForwardingSSHConnection
from edgeaccess.ssh.hostkeys import host_keys
from edgeaccess.ssh.interfaces import (
    IAuthorizer,
    ISessionObserver,
    NullSessionObserver,
    SessionPermissions,
)
from edgeaccess.ssh.session import NodeUser, lookup_login
from edgeaccess.ssh.transport import EdgeServerTransport

_log = Logger()

class NodeSSHFactory(SSHFactory):
    """An ``SSHFactory`` whose keys, portal, clock and observer are given.

    :ivar clock: used for the login timeout and session TTLs.
    :ivar observer: told about refused logins (by the userauth service).
    """

    #: AES-GCM, and the user-auth algorithms as server-sig-algs (needed by
    #: OpenSSH for RSA user certificates; DESIGN.md).
    protocol = EdgeServerTransport
    services = {
        b"ssh-userauth": CertificateUserAuthServer,
        b"ssh-connection": ForwardingSSHConnection,
    }

    def __init__(
        self,
        *,
        public_keys: dict,
        private_keys: dict,
        portal: Portal,
        clock: IReactorTime,
        observer: ISessionObserver,
    ) -> None:
        self.publicKeys = public_keys
        self.privateKeys = private_keys
        self.portal = portal
        self.clock = clock
        self.observer = observer

    def getPrimes(self):
        """No moduli file: only fixed-group and curve key exchanges."""
        return None


def make_node_ssh_factory(
    host_key,
    host_certificate: ssh.SSHCertificate | None,
    trusted_user_ca_keys: Callable[[], Iterable],
    authorizer: IAuthorizer,
    node_name: str,
    clock: IReactorTime,
    env_allow: Iterable[str] = (),
    observer: ISessionObserver | None = None,
    reactor=None,
    new_session_id: Callable[[], str] | None = None,
    sessions=None,
    node_ids: Iterable[str] = (),
) -> NodeSSHFactory:
    """Build the node's SSH server factory.

    :param host_key: the node's private host key (cryptography or Conch).
    :param host_certificate: its host certificate, or ``None`` to offer the
        plain key only.
    :param trusted_user_ca_keys: called on each login for the current user
        CA public keys (cryptography keys or OpenSSH lines).
    :param authorizer: decides each (user, login) once the certificate is
        verified.
    :param node_name: this node's name (messages, audit).
    :param clock: time source for certificate validity and timeouts.
    :param env_allow: client environment variables accepted besides
        ``LANG``, ``LC_*`` and ``TERM``.
    :param observer: audit hook; a no-op by default.
    :param reactor: ``IReactorProcess``/``IReactorTCP`` for sessions and
        forwarding; defaults to ``clock``.
    :param new_session_id: makes session ids (random UUIDs by default).
    :param sessions: a :class:`~edgeaccess.controlplane.sessions.LiveSessions`
        each connection registers with, so that a lock ends it.
    :param node_ids: this node's other names for locks (its UUID).
    """
    observer = observer or NullSessionObserver()
    reactor = reactor if reactor is not None else clock
    env_allow = tuple(env_allow)
    new_session_id = new_session_id or (lambda: str(uuid.uuid4()))

    def avatar_factory(
        verified: VerifiedCertificate, permissions: SessionPermissions
    ) -> NodeUser:
        passwd = lookup_login(verified.login, node_name)
        _log.info(
            "SSH login of {user} as {login} from {peer} on {node}",
            user=verified.identity.username,
            login=verified.login,
            peer=verified.peer_address,
            node=node_name,
        )
        user = NodeUser(
            verified,
            permissions,
            passwd=passwd,
            node_name=node_name,
            reactor=reactor,
            env_allow=env_allow,
            observer=observer,
            new_session_id=new_session_id,
        )
        if sessions is not None:
            user.live_session = sessions.register(
                user=verified.identity.username, cluster=verified.identity.cluster,
                node=node_name, node_id=next(iter(node_ids), None), kind="ssh",
                terminate=user.terminate)
        return user

    portal = Portal(
        CertificateRealm(authorizer, avatar_factory),
        [SSHCertificateChecker(trusted_user_ca_keys, clock)],
    )
    public, private = host_keys(host_key, host_certificate)
    return NodeSSHFactory(
        public_keys=public,
        private_keys=private,
        portal=portal,
        clock=clock,
        observer=observer,
    )
