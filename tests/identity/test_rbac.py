"""Access decisions of AccessChecker, as tables."""

from __future__ import annotations

from datetime import timedelta

import pytest
import yaml

from edgeaccess.errors import AccessDenied
from edgeaccess.identity.presets import PRESET_ROLES
from edgeaccess.identity.rbac import AccessChecker, expand_template, match_labels
from edgeaccess.identity.roles import DEFAULT_MAX_SESSION_TTL, Role, parse_role


def role(name: str, spec: str = "{}") -> Role:
    """A role from the YAML of its spec."""
    return parse_role(
        {"kind": "role", "version": "v1", "metadata": {"name": name}, "spec": yaml.safe_load(spec)}
    )


DEV = role("dev", """
allow:
  logins: ['{{internal.logins}}', ubuntu]
  node_labels: {env: [dev, staging]}
deny:
  logins: [root]
""")
PROD_READONLY = role("prod", """
allow:
  logins: [viewer]
  node_labels: {env: prod, tier: '*'}
""")
EVERYWHERE_ROOT = role("root-everywhere", """
allow:
  logins: [root, admin]
  node_labels: {'*': '*'}
""")
NO_PROD = role("no-prod", """
deny:
  node_labels: {env: prod}
""")
TEMPLATED_LABELS = role("team", """
allow:
  logins: ['{{external.unix}}']
  node_labels: {team: ['{{external.teams}}', shared]}
""")
DENY_BY_TRAIT = role("deny-trait", """
deny:
  node_labels: {env: ['{{external.blocked_envs}}']}
""")

ALICE = {"logins": ["alice", "deploy"], "unix": ["al"], "teams": ["web", "db"]}


@pytest.mark.parametrize(
    "roles, traits, expected",
    [
        ([DEV], ALICE, ["alice", "deploy", "ubuntu"]),
        ([DEV], {}, ["ubuntu"]),  # missing trait expands to nothing
        ([DEV], {"logins": ["root", "bob"]}, ["bob", "ubuntu"]),  # deny removes root
        ([DEV, EVERYWHERE_ROOT], {}, ["ubuntu", "admin"]),  # DEV denies root everywhere
        ([EVERYWHERE_ROOT], {}, ["root", "admin"]),
        ([DEV, PROD_READONLY], {"logins": ["ubuntu"]}, ["ubuntu", "viewer"]),  # no duplicates
        ([TEMPLATED_LABELS], ALICE, ["al"]),
        ([DEV], {"logins": ["", "two words", "ok\n", "fine"]}, ["fine", "ubuntu"]),  # unsafe dropped
        ([], ALICE, []),
        ([NO_PROD], ALICE, []),
    ],
)
def test_allowed_logins(roles, traits, expected):
    assert AccessChecker(roles, traits).allowed_logins() == expected


@pytest.mark.parametrize(
    "value, traits, expected",
    [
        ("ubuntu", {}, ["ubuntu"]),
        ("{{internal.logins}}", {"logins": ["a", "b", "a"]}, ["a", "b"]),
        ("{{internal.kubernetes_groups}}", {"kubernetes_groups": ["dev"]}, ["dev"]),
        ("{{external.groups}}", {"groups": ["x"]}, ["x"]),
        ("{{external.groups}}", {"logins": ["x"]}, []),
        ("pre-{{external.team}}-suf", {"team": ["web", "db"]}, ["pre-web-suf", "pre-db-suf"]),
        ("{{external.team}}", {"team": "web"}, ["web"]),  # a lone string is one value
    ],
)
def test_template_expansion(value, traits, expected):
    assert expand_template(value, traits) == expected


@pytest.mark.parametrize(
    "selector, labels, expected",
    [
        ({}, {"env": "dev"}, False),  # an empty selector matches nothing
        ({"*": ["*"]}, {}, True),
        ({"*": ["*"]}, {"env": "prod"}, True),
        ({"env": ["dev"]}, {"env": "dev", "x": "y"}, True),
        ({"env": ["dev", "staging"]}, {"env": "staging"}, True),
        ({"env": ["dev"]}, {"env": "prod"}, False),
        ({"env": ["dev"]}, {}, False),
        ({"env": ["*"]}, {"env": "anything"}, True),
        ({"env": ["*"]}, {"team": "web"}, False),  # '*' value still needs the key
        ({"env": ["dev"], "team": ["web"]}, {"env": "dev"}, False),  # every key must match
        ({"env": ["dev"], "team": ["web"]}, {"env": "dev", "team": "web"}, True),
        ({"env": []}, {"env": "dev"}, False),  # a template that expanded to nothing
    ],
)
def test_label_matching(selector, labels, expected):
    assert match_labels(selector, labels) is expected


@pytest.mark.parametrize(
    "roles, traits, login, labels, error",
    [
        ([DEV], ALICE, "alice", {"env": "dev"}, None),
        ([DEV], ALICE, "ubuntu", {"env": "staging", "x": "y"}, None),
        ([DEV], ALICE, "bob", {"env": "dev"}, "login 'bob' is not allowed by any role"),
        ([DEV], ALICE, "alice", {"env": "prod"},
         "no role allows access to a node with env=prod"),
        ([DEV], ALICE, "alice", {}, "no role allows access to a node with no labels"),
        ([DEV], {"logins": ["root"]}, "root", {"env": "dev"},
         "login 'root' is denied by role 'dev'"),
        # deny wins over another role's allow
        ([EVERYWHERE_ROOT, DEV], {}, "root", {"env": "dev"},
         "login 'root' is denied by role 'dev'"),
        ([EVERYWHERE_ROOT], {}, "root", {"anything": "at-all"}, None),
        ([EVERYWHERE_ROOT, NO_PROD], {}, "admin", {"env": "prod"},
         "access to a node with env=prod is denied by role 'no-prod'"),
        ([EVERYWHERE_ROOT, NO_PROD], {}, "admin", {"env": "dev"}, None),
        # the login and the node must be allowed by the same role
        ([DEV, PROD_READONLY], ALICE, "alice", {"env": "prod", "tier": "db"},
         "no role allows login 'alice' on a node with env=prod, tier=db"),
        ([DEV, PROD_READONLY], ALICE, "viewer", {"env": "prod", "tier": "db"}, None),
        ([DEV, PROD_READONLY], ALICE, "viewer", {"env": "prod"},  # tier key required
         "no role allows access to a node with env=prod"),
        # templates in label values
        ([TEMPLATED_LABELS], ALICE, "al", {"team": "db"}, None),
        ([TEMPLATED_LABELS], ALICE, "al", {"team": "shared"}, None),
        ([TEMPLATED_LABELS], ALICE, "al", {"team": "ops"},
         "no role allows access to a node with team=ops"),
        ([TEMPLATED_LABELS], {"unix": ["al"]}, "al", {"team": "web"},
         "no role allows access to a node with team=web"),
        # a deny that depends on a trait applies only with that trait
        ([EVERYWHERE_ROOT, DENY_BY_TRAIT], {"blocked_envs": ["prod"]}, "admin", {"env": "prod"},
         "is denied by role 'deny-trait'"),
        ([EVERYWHERE_ROOT, DENY_BY_TRAIT], {}, "admin", {"env": "prod"}, None),
        ([], ALICE, "alice", {"env": "dev"}, "login 'alice' is not allowed by any role"),
    ],
)
def test_login_to_node(roles, traits, login, labels, error):
    checker = AccessChecker(roles, traits)
    if error is None:
        checker.check_login_to_node(login, labels)
    else:
        with pytest.raises(AccessDenied) as caught:
            checker.check_login_to_node(login, labels)
        assert error in str(caught.value)


@pytest.mark.parametrize(
    "roles, labels, expected",
    [
        ([DEV], {"env": "dev"}, True),
        ([DEV], {"env": "prod"}, False),
        ([DEV, NO_PROD], {"env": "dev"}, True),
        ([EVERYWHERE_ROOT, NO_PROD], {"env": "prod"}, False),
        ([EVERYWHERE_ROOT, NO_PROD], {}, True),
        ([NO_PROD], {"env": "dev"}, False),  # deny-only role allows nothing
        ([], {}, False),
    ],
)
def test_node_visibility(roles, labels, expected):
    assert AccessChecker(roles, ALICE).can_access_node(labels) is expected


KUBE_DEV = role("kube-dev", """
allow:
  kubernetes_labels: {env: dev}
  kubernetes_groups: [viewers, '{{internal.kubernetes_groups}}']
""")
KUBE_ALL = role("kube-all", """
allow:
  kubernetes_labels: {'*': '*'}
  kubernetes_groups: [system:masters]
""")
KUBE_DENY = role("kube-deny", """
deny:
  kubernetes_labels: {env: prod}
  kubernetes_groups: [system:masters]
""")


@pytest.mark.parametrize(
    "roles, labels, expected_access, expected_groups",
    [
        ([KUBE_DEV], {"env": "dev"}, True, ["viewers", "devs"]),
        ([KUBE_DEV], {"env": "prod"}, False, []),
        ([KUBE_DEV, KUBE_ALL], {"env": "dev"}, True, ["viewers", "devs", "system:masters"]),
        ([KUBE_DEV, KUBE_ALL], {"env": "qa"}, True, ["system:masters"]),
        ([KUBE_DEV, KUBE_ALL, KUBE_DENY], {"env": "dev"}, True, ["viewers", "devs"]),
        ([KUBE_ALL, KUBE_DENY], {"env": "prod"}, False, []),
        ([DEV], {"env": "dev"}, False, []),
    ],
)
def test_kubernetes_access_and_groups(roles, labels, expected_access, expected_groups):
    checker = AccessChecker(roles, {"kubernetes_groups": ["devs"]})
    assert checker.can_access_kube(labels) is expected_access
    assert checker.kubernetes_groups(labels) == expected_groups


def test_kubernetes_groups_without_cluster_are_the_union_minus_denied():
    checker = AccessChecker([KUBE_DEV, KUBE_ALL, KUBE_DENY], {"kubernetes_groups": ["devs"]})
    assert checker.kubernetes_groups() == ["viewers", "devs"]


APPS_WEB = role("apps-web", "allow: {app_labels: {team: [web, '{{external.teams}}']}}")
APPS_DENY_INTERNAL = role("apps-deny", "deny: {app_labels: {internal: 'true'}}")


@pytest.mark.parametrize(
    "roles, labels, expected",
    [
        ([APPS_WEB], {"team": "web"}, True),
        ([APPS_WEB], {"team": "db"}, True),  # from the teams trait
        ([APPS_WEB], {"team": "ops"}, False),
        ([APPS_WEB, APPS_DENY_INTERNAL], {"team": "web", "internal": "true"}, False),
        ([APPS_WEB, APPS_DENY_INTERNAL], {"team": "web", "internal": "false"}, True),
        ([PRESET_ROLES["access"]], {"anything": "x"}, True),
        ([DEV], {"team": "web"}, False),
    ],
)
def test_app_access(roles, labels, expected):
    assert AccessChecker(roles, ALICE).can_access_app(labels) is expected


def ttl(name: str, value: str) -> Role:
    return role(name, f"options: {{max_session_ttl: {value}}}")


@pytest.mark.parametrize(
    "roles, expected",
    [
        ([ttl("a", "8h")], timedelta(hours=8)),
        ([ttl("a", "8h"), ttl("b", "30m")], timedelta(minutes=30)),  # shortest wins
        ([ttl("a", "8h"), DEV], timedelta(hours=8)),
        ([ttl("a", "40h"), DEV], DEFAULT_MAX_SESSION_TTL),  # unset counts as 30h
        ([DEV], timedelta(hours=30)),
        ([], timedelta(0)),
    ],
)
def test_max_session_ttl(roles, expected):
    assert AccessChecker(roles, {}).max_session_ttl() == expected


def opts(name: str, **options: bool) -> Role:
    return role(name, yaml.safe_dump({"options": options}))


@pytest.mark.parametrize(
    "roles, expected",
    [
        ([opts("a", port_forwarding=True)], True),
        ([opts("a")], False),  # nobody said yes
        ([opts("a", port_forwarding=True), opts("b")], True),  # unset does not veto
        ([opts("a", port_forwarding=True), opts("b", port_forwarding=False)], False),
        ([opts("a", port_forwarding=False)], False),
        ([], False),
    ],
)
def test_port_forwarding_merging(roles, expected):
    assert AccessChecker(roles, {}).port_forwarding() is expected


@pytest.mark.parametrize(
    "roles, expected",
    [
        ([opts("a", forward_agent=True)], True),
        ([opts("a", forward_agent=True, port_forwarding=False)], True),  # options independent
        ([opts("a", forward_agent=True), opts("b", forward_agent=False)], False),
        ([opts("a", port_forwarding=True)], False),
    ],
)
def test_forward_agent_merging(roles, expected):
    assert AccessChecker(roles, {}).forward_agent() is expected


@pytest.mark.parametrize(
    "roles, expected",
    [
        ([opts("a")], True),  # default is to record
        ([opts("a", record_session=False)], False),
        ([opts("a", record_session=False), opts("b", record_session=True)], True),
        ([opts("a", record_session=False), opts("b")], True),  # unset means record
        ([opts("a", record_session=False), opts("b", record_session=False)], False),
        ([], True),
    ],
)
def test_record_session_merging(roles, expected):
    assert AccessChecker(roles, {}).record_session() is expected


RULES_ADMIN = role("admin", """
allow:
  rules:
    - {resources: ['*'], verbs: ['*']}
""")
RULES_NO_DELETE_ROLES = role("no-delete", """
deny:
  rules:
    - {resources: [role], verbs: [delete, update]}
""")
RULES_READER = role("reader", """
allow:
  rules:
    - {resources: [user, role], verbs: [list, read]}
    - {resources: [lock], verbs: ['*']}
""")


@pytest.mark.parametrize(
    "roles, resource, verb, error",
    [
        ([RULES_ADMIN], "trusted_cluster", "delete", None),
        ([RULES_READER], "role", "read", None),
        ([RULES_READER], "user", "list", None),
        ([RULES_READER], "lock", "create", None),
        ([RULES_READER], "role", "create", "no role allows create on role"),
        ([RULES_READER], "token", "list", "no role allows list on token"),
        ([RULES_ADMIN, RULES_NO_DELETE_ROLES], "role", "delete",
         "delete on role is denied by role 'no-delete'"),
        ([RULES_ADMIN, RULES_NO_DELETE_ROLES], "role", "read", None),
        ([RULES_ADMIN, RULES_NO_DELETE_ROLES], "user", "delete", None),
        ([DEV], "event", "list", "no role allows list on event"),
        ([PRESET_ROLES["auditor"]], "session", "read", None),
        ([PRESET_ROLES["auditor"]], "event", "delete", "no role allows delete on event"),
        ([], "user", "list", "no role allows list on user"),
    ],
)
def test_administrative_rules(roles, resource, verb, error):
    checker = AccessChecker(roles, {})
    if error is None:
        checker.check_action(resource, verb)
        assert checker.can(resource, verb)
    else:
        with pytest.raises(AccessDenied) as caught:
            checker.check_action(resource, verb)
        assert error in str(caught.value)
        assert not checker.can(resource, verb)


def test_role_names_keep_their_order():
    assert AccessChecker([DEV, NO_PROD], {}).role_names == ["dev", "no-prod"]
