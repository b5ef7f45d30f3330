"""The node's own access decision: roles cached from the cluster, applied
to the node's labels on every SSH connection. The proxy is never trusted
to have checked."""

from __future__ import annotations

from datetime import timedelta

from twisted.internet.defer import fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from edgeaccess import errors
from edgeaccess.cluster.trusted import map_roles
from edgeaccess.identity import rbac, roles
from edgeaccess.ssh.interfaces import IAuthorizer, SessionPermissions

_log = Logger()


@implementer(IAuthorizer)
class RoleAuthorizer:
    """Decides with the roles the node last fetched from the auth service.

    :param cluster_name: certificates must name this cluster.
    :param role_documents: callable returning the cached role documents
        (``{name: document}``); a role change applies at the next fetch,
        without new certificates.
    :param labels: callable returning this node's labels.
    :param clock: ``IReactorTime``; a connection is closed when the
        certificate it was opened with expires (``session_ttl``).
    :param lock_check: hook for locks: called with the identity; raises
        ``AccessDenied`` when the user is locked.
    """

    def __init__(self, cluster_name: str, role_documents, labels, clock,
                 lock_check=None, user_cas=None, trusted_clusters=None) -> None:
        """
        :param user_cas: callable returning this cluster's user CA lines; when
            given, a certificate claiming this cluster must be signed by one.
        :param trusted_clusters: callable returning ``[{name, ssh_user_ca,
            role_map}]`` for root clusters this (leaf) cluster trusts.
        """
        self.cluster_name = cluster_name
        self._role_documents = role_documents
        self._labels = labels
        self._clock = clock
        self._lock_check = lock_check
        self._user_cas = user_cas
        self._trusted = trusted_clusters or (lambda: [])

    def authorize(self, identity, login: str, peer_address: str):
        try:
            return succeed(self._decide(identity, login))
        except errors.AccessDenied as e:
            _log.warn("access denied to {user} as {login} from {peer}: {reason}",
                      user=identity.username, login=login, peer=peer_address, reason=e)
            return fail(e)

    def _local_roles(self, identity) -> list[str]:
        """The role names of this cluster that apply to ``identity``.

        The certificate's CA must belong to the cluster it claims (a root's
        CA cannot vouch for a local user, nor the other way round); users of
        a trusted root get the roles its role map gives them here.
        """
        signing_ca = " ".join(identity.signing_ca.split()[:2])
        if identity.cluster == self.cluster_name:
            if self._user_cas is not None:
                own = {" ".join(l.split()[:2]) for l in self._user_cas()}
                if signing_ca not in own:
                    raise errors.AccessDenied(
                        f"certificate claims cluster {identity.cluster!r} but is not "
                        f"signed by its user CA")
            return list(identity.roles)
        for trusted in self._trusted():
            if trusted.get("name") != identity.cluster:
                continue
            cas = {" ".join(l.split()[:2]) for l in trusted.get("ssh_user_ca", [])}
            if signing_ca not in cas:
                raise errors.AccessDenied(
                    f"certificate claims cluster {identity.cluster!r} but is not "
                    f"signed by its user CA")
            mapped = map_roles(trusted.get("role_map", []), identity.roles)
            if not mapped:
                raise errors.AccessDenied(
                    f"roles {list(identity.roles)} of cluster {identity.cluster} map to "
                    f"no role in cluster {self.cluster_name}")
            return mapped
        raise errors.AccessDenied(
            f"certificate of cluster {identity.cluster!r} is not accepted here")

    def _decide(self, identity, login: str) -> SessionPermissions:
        role_names = self._local_roles(identity)
        if self._lock_check is not None:
            self._lock_check(identity)
        documents = self._role_documents()
        found = []
        for name in role_names:
            doc = documents.get(name)
            if doc is None:
                continue
            try:
                found.append(roles.parse_role(doc))
            except errors.EdgeError:
                _log.warn("cached role {role} is invalid; ignored", role=name)
        if not found:
            raise errors.AccessDenied(f"none of the roles {role_names} exist here")
        checker = rbac.AccessChecker(found, identity.traits)
        checker.check_login_to_node(login, self._labels())
        remaining = identity.valid_before.timestamp() - self._clock.seconds()
        if remaining <= 0:
            raise errors.AccessDenied("certificate has expired")
        return SessionPermissions(
            port_forwarding=checker.port_forwarding() and identity.permit_port_forwarding,
            forward_agent=checker.forward_agent() and identity.permit_agent_forwarding,
            record_session=checker.record_session(),
            # The local roles: for a user of a trusted root, the mapped ones.
            roles=tuple(role_names),
            session_ttl=timedelta(seconds=remaining),
        )
