"""Contracts of the SSH layer: who may log in, and who hears about it.

``IAuthorizer`` is asked once per authenticated SSH connection, after the
certificate has been verified: it answers with the ``SessionPermissions``
of that connection or refuses with :class:`edgeaccess.errors.AccessDenied`.
``ISessionObserver`` receives the security-relevant events of the SSH
server (audit events and session recordings build on it).

In-memory twins of both live here too: ``StaticAuthorizer`` (a table of
allowed logins, for tests and for single-user setups) and
``NullSessionObserver``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import Interface, implementer

from edgeaccess.errors import AccessDenied

if TYPE_CHECKING:
    from edgeaccess.pki.sshca import UserIdentity


@attrs.frozen
class SessionPermissions:
    """What one authenticated SSH connection may do.

    :ivar port_forwarding: ``direct-tcpip`` channels are allowed.
    :ivar forward_agent: agent forwarding is allowed (the node does not
        implement it yet and refuses it regardless).
    :ivar record_session: interactive sessions must be recorded.
    :ivar roles: the roles the decision was made with (for audit).
    :ivar session_ttl: the connection is closed after this long, or never
        when ``None`` (e.g. the certificate's remaining lifetime).
    """

    port_forwarding: bool = False
    forward_agent: bool = False
    record_session: bool = True
    roles: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    session_ttl: timedelta | None = None


@attrs.frozen
class SessionInfo:
    """What an observer is told about one session channel.

    :ivar session_id: unique id of the session channel.
    :ivar username: the user named by the certificate (its key id).
    :ivar login: the Unix login the session runs as.
    :ivar peer_address: the client's IP address as seen by this server.
    :ivar node_name: the name of this node.
    :ivar roles: the roles of the authorization decision.
    """

    session_id: str
    username: str
    login: str
    peer_address: str
    node_name: str
    roles: tuple[str, ...] = ()


class IAuthorizer(Interface):
    """Decides whether a verified certificate holder may use a login here."""

    def authorize(
        identity: UserIdentity, login: str, peer_address: str
    ) -> Deferred[SessionPermissions]:
        """
        Fire with the permissions of the connection, or fail with
        :class:`edgeaccess.errors.AccessDenied` whose message says why.

        :param identity: the identity read from a certificate that has
            already been verified (trusted CA, validity, principal).
        :param login: the Unix login requested.
        :param peer_address: the client's IP address.
        """


class ISessionObserver(Interface):
    """Hears the security-relevant events of an SSH server.

    Every method is called synchronously and must not raise or block; an
    implementation that needs I/O queues the event. ``session_started`` and
    ``exec_started`` may return a Deferred: the session's program (or
    subsystem) starts only once it fires, and is refused if it fails (the
    audit spool uses this so that nothing runs before its events are durable).
    """

    def auth_refused(
        username: str | None, login: str, peer_address: str, reason: str
    ) -> None:
        """An authentication attempt was refused (``username`` is ``None``
        when no certificate could be read)."""

    def session_started(session: SessionInfo, kind: str) -> None:
        """A session channel started ``kind``: ``shell``, ``exec`` or a
        subsystem name such as ``sftp``."""

    def exec_started(session: SessionInfo, command: str) -> None:
        """A command is run in the session (also for ``scp``)."""

    def session_ended(
        session: SessionInfo, exit_status: int | None, exit_signal: str | None,
        reason: str | None = None,
    ) -> None:
        """A session channel closed; the exit status or signal of its
        process when known, and why the connection was lost when it says
        (e.g. ``tunnel outage exceeded 60s``; passed only when known)."""

    def port_forward(
        session: SessionInfo, host: str, port: int, allowed: bool
    ) -> None:
        """A ``direct-tcpip`` channel was requested to ``host:port``."""


@implementer(ISessionObserver)
class NullSessionObserver:
    """An observer that ignores every event."""

    def auth_refused(self, username, login, peer_address, reason) -> None:
        pass

    def session_started(self, session, kind) -> None:
        pass

    def exec_started(self, session, command) -> None:
        pass

    def session_ended(self, session, exit_status, exit_signal, reason=None) -> None:
        pass

    def port_forward(self, session, host, port, allowed) -> None:
        pass


@implementer(IAuthorizer)
class StaticAuthorizer:
    """An authorizer from a table: ``{(username, login): SessionPermissions}``.

    A username of ``"*"`` matches every user. Anything not in the table is
    refused with :class:`AccessDenied`.
    """

    def __init__(self, grants: dict[tuple[str, str], SessionPermissions]) -> None:
        self._grants = dict(grants)

    def authorize(
        self, identity: UserIdentity, login: str, peer_address: str
    ) -> Deferred[SessionPermissions]:
        """See :meth:`IAuthorizer.authorize`."""
        for key in ((identity.username, login), ("*", login)):
            if key in self._grants:
                return succeed(self._grants[key])
        return fail(
            AccessDenied(f"user {identity.username} may not log in as {login}")
        )
