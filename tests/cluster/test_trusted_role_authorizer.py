"""A leaf node's access decision for users of a trusted root cluster
(RoleAuthorizer with ``trusted_clusters``), on real certificates.

Each certificate is signed with a real SSH CA key and read back with
``user_identity_from_certificate``, so the CA-to-cluster binding is
checked on the key that actually signed it: a certificate claiming the leaf
but signed by the root CA is refused, and so is the other way round.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from twisted.internet.testing import MemoryReactorClock

from edgeaccess import errors
from edgeaccess.node.authorizer import RoleAuthorizer
from edgeaccess.pki import keys
from edgeaccess.pki.sshca import issue_user_certificate, user_identity_from_certificate
from edgeaccess.ssh.interfaces import SessionPermissions

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
ROOT_CA = keys.generate_private_key()
LEAF_CA = keys.generate_private_key()
OTHER_CA = keys.generate_private_key()
USER_KEY = keys.generate_private_key()


def ca_line(key) -> str:
    return keys.public_key_openssh(key.public_key()).decode() + " user CA"


def role(name: str, allow: dict) -> dict:
    return {"kind": "role", "version": "v1", "metadata": {"name": name},
            "spec": {"allow": allow}}


LEAF_ROLES = {r["metadata"]["name"]: r for r in (
    role("access", {"logins": ["{{internal.logins}}"], "node_labels": {"*": "*"}}),
    role("prod-only", {"logins": ["root"], "node_labels": {"env": ["prod"]}}),
    role("editor", {}),  # exists here, grants no node access
)}

ROLE_MAP = [{"remote": "access", "local": ["access"]},
            {"remote": "restricted", "local": ["prod-only"]},
            {"remote": "ghostly", "local": ["no-such-leaf-role"]}]


def certificate(*roles: str, cluster: str, ca=ROOT_CA, user: str = "alice",
                logins=("root",), ttl=timedelta(hours=1)):
    cert = issue_user_certificate(
        ca, USER_KEY.public_key(), username=user, principals=list(logins), roles=list(roles),
        cluster=cluster, now=NOW, ttl=ttl, traits={"logins": list(logins)})
    return user_identity_from_certificate(cert)


class Node:
    """A node of ``cluster`` with what its auth service last told it."""

    def __init__(self, cluster: str = "leaf", labels=None, trusted=None) -> None:
        self.labels = {"env": "leaf"} if labels is None else labels
        self.trusted = [{"name": "root", "ssh_user_ca": [ca_line(ROOT_CA)],
                         "role_map": ROLE_MAP}] if trusted is None else trusted
        own_ca = LEAF_CA if cluster == "leaf" else ROOT_CA
        clock = MemoryReactorClock()
        clock.advance(NOW.timestamp())
        self.authorizer = RoleAuthorizer(
            cluster, lambda: LEAF_ROLES, lambda: self.labels, clock,
            user_cas=lambda: [ca_line(own_ca)], trusted_clusters=lambda: self.trusted)

    def decide(self, identity, login: str = "root"):
        outcome: list = []
        self.authorizer.authorize(identity, login, "127.0.0.1").addBoth(outcome.append)
        assert len(outcome) == 1
        result = outcome[0]
        if isinstance(result, SessionPermissions):
            return result
        assert isinstance(result.value, errors.AccessDenied), result
        return str(result.value)


def test_a_root_user_gets_the_leaf_roles_the_role_map_gives():
    permissions = Node().decide(certificate("access", cluster="root"))
    assert isinstance(permissions, SessionPermissions), permissions
    assert permissions.session_ttl == timedelta(hours=1)


def test_a_mapped_role_applies_its_own_node_labels():
    carol = certificate("restricted", cluster="root", user="carol")
    assert isinstance(Node(labels={"env": "prod"}).decide(carol), SessionPermissions)
    refused = Node(labels={"env": "leaf"}).decide(carol)
    assert refused == "no role allows access to a node with env=leaf"


def test_the_leaf_role_templates_use_the_root_users_traits():
    node = Node()
    assert isinstance(node.decide(certificate("access", cluster="root",
                                              logins=("deploy",)), "deploy"),
                      SessionPermissions)
    assert "login 'root' is not allowed" in node.decide(
        certificate("access", cluster="root", logins=("deploy",)), "root")


REFUSED = [
    pytest.param(certificate("unmapped", cluster="root"),
                 "roles ['unmapped'] of cluster root map to no role in cluster leaf",
                 id="root-role-mapped-to-nothing"),
    pytest.param(certificate(cluster="root"),
                 "roles [] of cluster root map to no role in cluster leaf",
                 id="root-user-without-roles"),
    pytest.param(certificate("prod-only", "editor", cluster="root"),
                 "roles ['prod-only', 'editor'] of cluster root map to no role in cluster leaf",
                 id="leaf-role-names-held-at-the-root-do-not-cross-unmapped"),
    pytest.param(certificate("ghostly", cluster="root"),
                 "none of the roles ['no-such-leaf-role'] exist here",
                 id="mapped-to-a-role-the-leaf-does-not-have"),
    pytest.param(certificate("access", cluster="leaf", ca=ROOT_CA),
                 "certificate claims cluster 'leaf' but is not signed by its user CA",
                 id="claims-the-leaf-but-signed-by-the-root-ca"),
    pytest.param(certificate("access", cluster="root", ca=LEAF_CA),
                 "certificate claims cluster 'root' but is not signed by its user CA",
                 id="claims-the-root-but-signed-by-the-leaf-ca"),
    pytest.param(certificate("access", cluster="root", ca=OTHER_CA),
                 "certificate claims cluster 'root' but is not signed by its user CA",
                 id="claims-the-root-signed-by-a-stranger"),
    pytest.param(certificate("access", cluster="other", ca=ROOT_CA),
                 "certificate of cluster 'other' is not accepted here",
                 id="a-cluster-the-leaf-does-not-trust"),
]


@pytest.mark.parametrize("identity, reason", REFUSED)
def test_refused_at_the_leaf_node(identity, reason):
    assert Node().decide(identity) == reason


def test_the_leafs_own_users_keep_their_own_roles():
    lea = certificate("access", cluster="leaf", ca=LEAF_CA, user="lea")
    assert isinstance(Node().decide(lea), SessionPermissions)
    # Their roles are not sent through the role map: prod-only is theirs as is.
    prod = certificate("prod-only", cluster="leaf", ca=LEAF_CA, user="lea")
    assert isinstance(Node(labels={"env": "prod"}).decide(prod), SessionPermissions)


def test_once_the_trust_is_gone_root_certificates_are_refused():
    node = Node()
    alice = certificate("access", cluster="root")
    assert isinstance(node.decide(alice), SessionPermissions)
    node.trusted = []  # the next heartbeat brought no trusted root
    assert node.decide(alice) == "certificate of cluster 'root' is not accepted here"


def test_a_root_node_refuses_leaf_signed_certificates():
    """The trust is one way: root nodes know no leaf CA."""
    root_node = Node(cluster="root", trusted=[])
    lea = certificate("access", cluster="leaf", ca=LEAF_CA, user="lea")
    assert root_node.decide(lea) == "certificate of cluster 'leaf' is not accepted here"
    forged = certificate("access", cluster="root", ca=LEAF_CA, user="lea")
    assert root_node.decide(forged) == ("certificate claims cluster 'root' but is not "
                                        "signed by its user CA")
    alice = certificate("access", cluster="root")
    assert isinstance(root_node.decide(alice), SessionPermissions)
