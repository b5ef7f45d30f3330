"""The node's own access decision (RoleAuthorizer): roles cached from the
cluster, applied to this node's labels, on every SSH connection.

Table-driven: each case is a certificate identity, a login, the node's
labels and the cached role documents; the expected answer is either the
permissions granted or a piece of the refusal message.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from twisted.internet.testing import MemoryReactorClock

from edgeaccess import errors
from edgeaccess.node.authorizer import RoleAuthorizer
from edgeaccess.pki.sshca import UserIdentity
from edgeaccess.ssh.interfaces import IAuthorizer, SessionPermissions

CLUSTER = "home"
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def role(name: str, allow: dict, deny: dict | None = None, options: dict | None = None) -> dict:
    """A role document as the auth service sends it to nodes."""
    spec: dict = {"allow": allow}
    if deny is not None:
        spec["deny"] = deny
    if options is not None:
        spec["options"] = options
    return {"kind": "role", "version": "v1", "metadata": {"name": name}, "spec": spec}


def identity(*roles: str, cluster: str = CLUSTER, logins=("root",), traits=None,
             port_forwarding: bool = False, agent_forwarding: bool = False,
             signing_ca: str = "") -> UserIdentity:
    """What a verified user certificate says about its holder."""
    return UserIdentity(
        username="alice", principals=tuple(logins), roles=tuple(roles), cluster=cluster,
        traits=dict(traits or {}), valid_after=NOW - timedelta(minutes=1),
        valid_before=NOW + timedelta(hours=8), serial=1, permit_pty=True,
        permit_port_forwarding=port_forwarding, permit_agent_forwarding=agent_forwarding,
        critical_options={}, signing_ca=signing_ca)


DEV_ROOT = role("dev", {"logins": ["root"], "node_labels": {"env": ["dev"]}})
EVERYWHERE = role("everywhere", {"logins": ["root", "ubuntu"], "node_labels": {"*": "*"}})
NO_ROOT = role("no-root", {"logins": ["ubuntu"]}, deny={"logins": ["root"]})
NO_PROD = role("no-prod", {}, deny={"node_labels": {"env": ["prod"]}})
TEMPLATED = role("templated", {"logins": ["{{internal.logins}}"], "node_labels": {"*": "*"}})
FORWARD_ON = role("fwd-on", {"logins": ["root"], "node_labels": {"*": "*"}},
                  options={"port_forwarding": True, "forward_agent": True})
FORWARD_OFF = role("fwd-off", {"logins": ["root"], "node_labels": {"*": "*"}},
                   options={"port_forwarding": False})
SPLIT_LOGIN = role("login-only", {"logins": ["ubuntu"], "node_labels": {"env": ["staging"]}})
SPLIT_NODE = role("node-only", {"logins": ["deploy"], "node_labels": {"env": ["dev"]}})

ALL_ROLES = {r["metadata"]["name"]: r for r in (
    DEV_ROOT, EVERYWHERE, NO_ROOT, NO_PROD, TEMPLATED, FORWARD_ON, FORWARD_OFF, SPLIT_LOGIN,
    SPLIT_NODE)}


def clock_at(when: datetime) -> MemoryReactorClock:
    clock = MemoryReactorClock()
    clock.advance(when.timestamp())
    return clock


def decide(who: UserIdentity, login: str, labels: dict, documents=None, at: datetime = NOW):
    """The authorizer's synchronous answer: permissions, or the AccessDenied raised."""
    cache = ALL_ROLES if documents is None else documents
    authorizer = RoleAuthorizer(CLUSTER, lambda: cache, lambda: labels, clock_at(at))
    outcome: list = []
    authorizer.authorize(who, login, "192.0.2.7").addBoth(outcome.append)
    assert len(outcome) == 1, "the decision must be synchronous"
    result = outcome[0]
    if hasattr(result, "value"):  # a Failure
        assert isinstance(result.value, errors.AccessDenied), result
        return result.value
    return result


def test_role_authorizer_provides_the_interface():
    authorizer = RoleAuthorizer(CLUSTER, dict, dict, MemoryReactorClock())
    assert IAuthorizer.providedBy(authorizer)


ALLOWED = [
    pytest.param(identity("dev"), "root", {"env": "dev"}, id="label-and-login-match"),
    pytest.param(identity("everywhere"), "ubuntu", {"env": "prod", "team": "x"},
                 id="wildcard-node-labels"),
    pytest.param(identity("dev", "no-such-role"), "root", {"env": "dev"},
                 id="unknown-role-ignored-when-another-allows"),
    pytest.param(identity("templated", traits={"logins": ["alice", "deploy"]}), "deploy",
                 {"env": "dev"}, id="internal-logins-trait-from-certificate"),
    pytest.param(identity("everywhere", "no-prod"), "root", {"env": "dev"},
                 id="deny-of-other-labels-does-not-apply"),
]


@pytest.mark.parametrize("who, login, labels", ALLOWED)
def test_allowed_logins(who, login, labels):
    permissions = decide(who, login, labels)
    assert isinstance(permissions, SessionPermissions), permissions
    assert permissions.roles == who.roles


REFUSED = [
    pytest.param(identity("everywhere", cluster="elsewhere"), "root", {"env": "dev"},
                 "certificate of cluster 'elsewhere' is not accepted here",
                 id="certificate-of-another-cluster"),
    pytest.param(identity("ghost", "phantom"), "root", {"env": "dev"},
                 "none of the roles ['ghost', 'phantom'] exist here", id="unknown-roles"),
    pytest.param(identity(), "root", {"env": "dev"}, "none of the roles [] exist here",
                 id="no-roles-at-all"),
    pytest.param(identity("dev"), "root", {"env": "prod"},
                 "no role allows access to a node with env=prod", id="label-mismatch"),
    pytest.param(identity("dev"), "root", {}, "no role allows access to a node with no labels",
                 id="node-without-labels"),
    pytest.param(identity("dev"), "ubuntu", {"env": "dev"},
                 "login 'ubuntu' is not allowed by any role", id="login-not-allowed"),
    pytest.param(identity("everywhere", "no-root"), "root", {"env": "dev"},
                 "login 'root' is denied by role 'no-root'", id="deny-login-wins"),
    pytest.param(identity("everywhere", "no-prod"), "root", {"env": "prod"},
                 "access to a node with env=prod is denied by role 'no-prod'",
                 id="deny-labels-win"),
    pytest.param(identity("login-only", "node-only"), "ubuntu", {"env": "dev"},
                 "no role allows login 'ubuntu' on a node with env=dev",
                 id="login-and-node-from-different-roles"),
    pytest.param(identity("templated", traits={"logins": ["alice"]}), "root", {"env": "dev"},
                 "login 'root' is not allowed by any role", id="trait-does-not-hold-login"),
    pytest.param(identity("templated"), "alice", {"env": "dev"},
                 "login 'alice' is not allowed by any role", id="missing-trait-grants-nothing"),
    pytest.param(identity("templated", traits={"logins": ["bad login"]}), "bad login",
                 {"env": "dev"}, "is not allowed by any role", id="unsafe-trait-value-dropped"),
]


@pytest.mark.parametrize("who, login, labels, reason", REFUSED)
def test_refused_logins(who, login, labels, reason):
    refusal = decide(who, login, labels)
    assert isinstance(refusal, errors.AccessDenied), refusal
    assert reason in str(refusal)


FORWARDING = [
    # (roles, certificate extension, expected port_forwarding)
    pytest.param(("fwd-on",), True, True, id="role-and-extension"),
    pytest.param(("fwd-on",), False, False, id="role-without-extension"),
    pytest.param(("everywhere",), True, False, id="extension-without-role-option"),
    pytest.param(("fwd-off",), True, False, id="role-forbids"),
    pytest.param(("fwd-on", "fwd-off"), True, False, id="false-in-any-role-wins"),
]


@pytest.mark.parametrize("roles, extension, expected", FORWARDING)
def test_port_forwarding_needs_the_certificate_extension_and_the_role(roles, extension,
                                                                     expected):
    who = identity(*roles, port_forwarding=extension, agent_forwarding=extension)
    permissions = decide(who, "root", {"env": "dev"})
    assert permissions.port_forwarding is expected


def test_agent_forwarding_needs_the_certificate_extension_and_the_role():
    assert decide(identity("fwd-on", agent_forwarding=True), "root", {}).forward_agent
    assert not decide(identity("fwd-on", agent_forwarding=False), "root", {}).forward_agent
    assert not decide(identity("everywhere", agent_forwarding=True), "root", {}).forward_agent


def test_record_session_follows_the_roles():
    quiet = role("quiet", {"logins": ["root"], "node_labels": {"*": "*"}},
                 options={"record_session": False})
    assert decide(identity("quiet"), "root", {}, {"quiet": quiet}).record_session is False
    assert decide(identity("everywhere"), "root", {}).record_session is True


def test_the_connection_lives_until_the_certificate_expires():
    """The certificate was valid for 8 hours from NOW; the SSH server closes the
    connection when it expires (SessionPermissions.session_ttl)."""
    assert decide(identity("dev"), "root", {"env": "dev"}).session_ttl == timedelta(hours=8)
    later = NOW + timedelta(hours=7, minutes=30)
    assert decide(identity("dev"), "root", {"env": "dev"}, at=later).session_ttl == \
        timedelta(minutes=30)


def test_an_expired_certificate_is_refused_even_if_the_roles_allow():
    refusal = decide(identity("dev"), "root", {"env": "dev"}, at=NOW + timedelta(hours=8))
    assert "certificate has expired" in str(refusal)


def test_a_role_change_in_the_cache_applies_without_a_new_certificate():
    cache = {"dev": DEV_ROOT}
    labels = {"env": "dev"}
    authorizer = RoleAuthorizer(CLUSTER, lambda: cache, lambda: labels, clock_at(NOW))
    who = identity("dev")

    def outcome():
        results: list = []
        authorizer.authorize(who, "root", "192.0.2.7").addBoth(results.append)
        return results[0]

    assert isinstance(outcome(), SessionPermissions)
    cache["dev"] = role("dev", {"logins": ["root"], "node_labels": {"env": ["staging"]}})
    refused = outcome()
    assert "no role allows access to a node with env=dev" in str(refused.value)
    del cache["dev"]
    assert "none of the roles ['dev'] exist here" in str(outcome().value)
    cache["dev"] = DEV_ROOT
    assert isinstance(outcome(), SessionPermissions)


def test_a_label_change_of_the_node_applies_to_the_next_connection():
    labels = {"env": "dev"}
    authorizer = RoleAuthorizer(CLUSTER, lambda: {"dev": DEV_ROOT}, lambda: labels,
                                clock_at(NOW))
    first: list = []
    authorizer.authorize(identity("dev"), "root", "192.0.2.7").addBoth(first.append)
    labels["env"] = "prod"
    second: list = []
    authorizer.authorize(identity("dev"), "root", "192.0.2.7").addBoth(second.append)
    assert isinstance(first[0], SessionPermissions)
    assert second[0].check(errors.AccessDenied)


def test_an_invalid_cached_role_is_ignored_not_fatal():
    broken = {"kind": "role", "version": "v1", "metadata": {"name": "broken"},
              "spec": {"allow": {"logins": "{{nope"}}}
    refusal = decide(identity("broken"), "root", {"env": "dev"}, {"broken": broken})
    assert "none of the roles ['broken'] exist here" in str(refusal)
    allowed = decide(identity("broken", "dev"), "root", {"env": "dev"},
                     {"broken": broken, "dev": DEV_ROOT})
    assert allowed.roles == ("broken", "dev")


def test_the_lock_hook_is_asked_after_the_cluster_check():
    asked: list = []

    def locked(who):
        asked.append(who.username)
        raise errors.AccessDenied(f"user {who.username} is locked")

    authorizer = RoleAuthorizer(CLUSTER, lambda: ALL_ROLES, lambda: {"env": "dev"},
                                clock_at(NOW), lock_check=locked)
    results: list = []
    authorizer.authorize(identity("dev"), "root", "192.0.2.7").addBoth(results.append)
    assert "user alice is locked" in str(results[0].value)
    assert asked == ["alice"]
    authorizer.authorize(identity("dev", cluster="other"), "root", "x").addBoth(results.append)
    assert "cluster 'other'" in str(results[1].value)
    assert asked == ["alice"]


# --- users of this cluster and of a trusted root cluster --------------------------------

OWN_CA = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOwnCA own-ca"
ROOT_CA = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHJvb3Q root-ca"
TRUSTED = [{"name": "root", "ssh_user_ca": [ROOT_CA],
            "role_map": [{"remote": "admin", "local": ["dev", "fwd-on"]}]}]

FEDERATED = [
    pytest.param(identity("dev", signing_ca=OWN_CA), ("dev",), None, id="own-user-own-ca"),
    pytest.param(identity("dev", signing_ca=ROOT_CA), None,
                 "certificate claims cluster 'home' but is not signed by its user CA",
                 id="own-cluster-claimed-with-the-roots-ca"),
    pytest.param(identity("admin", cluster="root", signing_ca=ROOT_CA), ("dev", "fwd-on"),
                 None, id="root-user-gets-mapped-local-roles"),
    pytest.param(identity("admin", cluster="root", signing_ca=OWN_CA), None,
                 "certificate claims cluster 'root' but is not signed by its user CA",
                 id="root-cluster-claimed-with-our-ca"),
    pytest.param(identity("viewer", cluster="root", signing_ca=ROOT_CA), None,
                 "roles ['viewer'] of cluster root map to no role in cluster home",
                 id="root-role-without-mapping"),
    pytest.param(identity("admin", cluster="elsewhere", signing_ca=ROOT_CA), None,
                 "certificate of cluster 'elsewhere' is not accepted here",
                 id="untrusted-cluster"),
]


@pytest.mark.parametrize("who, roles, reason", FEDERATED)
def test_the_ca_must_belong_to_the_claimed_cluster_and_root_roles_are_mapped(who, roles,
                                                                           reason):
    authorizer = RoleAuthorizer(CLUSTER, lambda: ALL_ROLES, lambda: {"env": "dev"},
                                clock_at(NOW), user_cas=lambda: [OWN_CA + " comment"],
                                trusted_clusters=lambda: TRUSTED)
    results: list = []
    authorizer.authorize(who, "root", "192.0.2.7").addBoth(results.append)
    if reason is None:
        assert isinstance(results[0], SessionPermissions), results[0]
        assert results[0].roles == roles  # what the decision was made with (audit)
    else:
        assert results[0].check(errors.AccessDenied)
        assert reason in str(results[0].value)
