"""The preset roles: access, editor, auditor."""

from __future__ import annotations

import pytest

from edgeaccess.errors import AccessDenied
from edgeaccess.identity.presets import PRESET_ROLES
from edgeaccess.identity.rbac import AccessChecker
from edgeaccess.identity.roles import RULE_RESOURCES, RULE_VERBS, parse_role, role_to_dict

USER_TRAITS = {"logins": ["alice", "ubuntu"], "kubernetes_groups": ["devs"]}


def checker(name: str) -> AccessChecker:
    return AccessChecker([PRESET_ROLES[name]], USER_TRAITS)


def test_presets_are_the_three_of_the_spec():
    assert sorted(PRESET_ROLES) == ["access", "auditor", "editor"]


@pytest.mark.parametrize("name", sorted(PRESET_ROLES))
def test_presets_round_trip_like_any_role(name):
    assert parse_role(role_to_dict(PRESET_ROLES[name])) == PRESET_ROLES[name]


def test_access_uses_the_users_own_logins_on_every_node():
    access = checker("access")
    assert access.allowed_logins() == ["alice", "ubuntu"]
    access.check_login_to_node("alice", {})
    access.check_login_to_node("ubuntu", {"env": "prod"})
    with pytest.raises(AccessDenied):
        access.check_login_to_node("root", {})
    assert AccessChecker([PRESET_ROLES["access"]], {}).allowed_logins() == []


def test_access_reaches_every_app_and_kube_cluster_as_the_users_groups():
    access = checker("access")
    assert access.can_access_app({"team": "web"})
    assert access.can_access_kube({})
    assert access.kubernetes_groups({"env": "prod"}) == ["devs"]


def test_access_records_sessions_and_allows_forwarding():
    access = checker("access")
    assert access.record_session()
    assert access.port_forwarding() and access.forward_agent()


def test_access_has_no_administrative_rights():
    access = checker("access")
    assert not any(access.can(r, v) for r in RULE_RESOURCES for v in RULE_VERBS)


@pytest.mark.parametrize("resource", RULE_RESOURCES)
@pytest.mark.parametrize("verb", RULE_VERBS)
def test_editor_manages_exactly_its_resources(resource, verb):
    managed = {"user", "role", "token", "connector", "trusted_cluster", "lock"}
    assert checker("editor").can(resource, verb) is (resource in managed)


@pytest.mark.parametrize("resource", RULE_RESOURCES)
@pytest.mark.parametrize("verb", RULE_VERBS)
def test_auditor_only_reads_events_and_sessions(resource, verb):
    expected = resource in {"event", "session"} and verb in {"list", "read"}
    assert checker("auditor").can(resource, verb) is expected


@pytest.mark.parametrize("name", ["editor", "auditor"])
def test_editor_and_auditor_have_no_node_app_or_kube_access(name):
    role = checker(name)
    assert role.allowed_logins() == []
    assert not role.can_access_node({})
    assert not role.can_access_app({})
    assert not role.can_access_kube({})
    assert role.kubernetes_groups() == []
