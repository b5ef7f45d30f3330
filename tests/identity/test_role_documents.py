"""Parsing, validating and writing back ``kind: role`` documents."""

from __future__ import annotations

from datetime import timedelta

import pytest
import yaml

from edgeaccess.errors import BadRequest, BadResource
from edgeaccess.identity.roles import (
    Role,
    RoleConditions,
    RoleOptions,
    Rule,
    format_duration,
    parse_duration,
    parse_role,
    parse_template,
    role_to_dict,
)

SPEC_EXAMPLE = """
kind: role
version: v1
metadata: {name: dev}
spec:
  options: {max_session_ttl: 8h, port_forwarding: false, forward_agent: false, record_session: true}
  allow:
    logins: ['{{internal.logins}}', ubuntu]
    node_labels: {env: [dev, staging]}        # '*': '*' = every node
    kubernetes_groups: [viewers]
    kubernetes_labels: {'*': '*'}
    app_labels: {team: web}
  deny:
    logins: [root]
"""


def doc(spec: object = None, name: object = "dev", **header: object) -> dict:
    document = {"kind": "role", "version": "v1", "metadata": {"name": name}, "spec": spec or {}}
    document.update(header)
    return document


def test_spec_example_parses_into_role():
    role = parse_role(yaml.safe_load(SPEC_EXAMPLE))
    assert role == Role(
        name="dev",
        options=RoleOptions(
            max_session_ttl=timedelta(hours=8),
            port_forwarding=False,
            forward_agent=False,
            record_session=True,
        ),
        allow=RoleConditions(
            logins=["{{internal.logins}}", "ubuntu"],
            node_labels={"env": ["dev", "staging"]},
            kubernetes_groups=["viewers"],
            kubernetes_labels={"*": ["*"]},
            app_labels={"team": ["web"]},
        ),
        deny=RoleConditions(logins=["root"]),
    )


def test_spec_example_round_trips_to_the_same_yaml_form():
    original = yaml.safe_load(SPEC_EXAMPLE)
    written = role_to_dict(parse_role(original))
    assert written == original


def test_rules_and_description_round_trip():
    role = parse_role(
        doc(
            {
                "allow": {"rules": [{"resources": ["role", "user"], "verbs": ["list", "read"]}]},
                "deny": {"rules": [{"resources": ["*"], "verbs": ["delete"]}]},
            },
            **{"metadata": {"name": "ops", "description": "operators"}},
        )
    )
    assert role.allow.rules == (Rule(("role", "user"), ("list", "read")),)
    assert role.deny.rules == (Rule(("*",), ("delete",)),)
    assert role.description == "operators"
    assert parse_role(role_to_dict(role)) == role


def test_role_without_spec_sections_allows_nothing():
    role = parse_role(doc({}))
    assert role.allow == RoleConditions() and role.deny == RoleConditions()
    assert role.options == RoleOptions()
    assert parse_role(role_to_dict(role)) == role


def test_role_written_in_code_with_lists_is_normalized():
    role = Role(name="x", allow=RoleConditions(logins=["a"], node_labels={"env": "dev"}))
    assert role.allow.logins == ("a",)
    assert role.allow.node_labels == {"env": ("dev",)}
    assert role_to_dict(role)["spec"]["allow"] == {"logins": ["a"], "node_labels": {"env": "dev"}}


@pytest.mark.parametrize(
    "document, message",
    [
        (doc({"allow": {"logins": "ubuntu"}}),
         "role dev: spec.allow.logins must be a list of strings"),
        (doc({"allow": {"logins": ["ubuntu", 3]}}),
         "role dev: spec.allow.logins must be a list of strings"),
        (doc({"allow": {"logins": ["*"]}}), "role dev: spec.allow.logins must not contain '*'"),
        (doc({"allow": {"logins": ["bad login"]}}),
         "role dev: spec.allow.logins[0] must not contain spaces"),
        (doc({"allow": {"logins": [""]}}),
         "role dev: spec.allow.logins[0] must be a non-empty string"),
        (doc({"allow": {"logins": ["{{internal.logins}"]}}),
         "role dev: spec.allow.logins[0] has an invalid template"),
        (doc({"allow": {"logins": ["{{secret.logins}}"]}}),
         "role dev: spec.allow.logins[0] has an invalid template"),
        (doc({"allow": {"logins": ["{{internal.a}}{{internal.b}}"]}}),
         "only one template per value"),
        (doc({"deny": {"kubernetes_groups": {"a": 1}}}),
         "role dev: spec.deny.kubernetes_groups must be a list of strings"),
        (doc({"allow": {"node_labels": ["env"]}}),
         "role dev: spec.allow.node_labels must be a mapping"),
        (doc({"allow": {"node_labels": {"env": 1}}}),
         "role dev: spec.allow.node_labels.env must be a string or a non-empty list"),
        (doc({"allow": {"node_labels": {"env": []}}}),
         "role dev: spec.allow.node_labels.env must be a string or a non-empty list"),
        (doc({"allow": {"node_labels": {"*": "prod"}}}),
         "role dev: spec.allow.node_labels.* must be '*'"),
        (doc({"allow": {"app_labels": {"": "x"}}}),
         "role dev: spec.allow.app_labels has an invalid label name ''"),
        (doc({"allow": {"node_label": {"env": "dev"}}}),
         "role dev: spec.allow.node_label is not a known field"),
        (doc({"alow": {}}), "role dev: spec.alow is not a known field"),
        (doc({"options": {"max_session_ttl": "8 hours"}}),
         "role dev: spec.options.max_session_ttl is an invalid duration '8 hours'"),
        (doc({"options": {"max_session_ttl": 3600}}),
         "role dev: spec.options.max_session_ttl is an invalid duration 3600"),
        (doc({"options": {"max_session_ttl": "0s"}}), "must be more than zero"),
        (doc({"options": {"port_forwarding": "yes please"}}),
         "role dev: spec.options.port_forwarding must be true or false"),
        (doc({"options": {"record": True}}), "role dev: spec.options.record is not a known field"),
        (doc({"allow": {"rules": [{"resources": ["nodes"], "verbs": ["list"]}]}}),
         "role dev: spec.allow.rules[0].resources has unknown value 'nodes'"),
        (doc({"allow": {"rules": [{"resources": ["node"], "verbs": ["exec"]}]}}),
         "role dev: spec.allow.rules[0].verbs has unknown value 'exec'"),
        (doc({"allow": {"rules": [{"resources": ["node"]}]}}),
         "role dev: spec.allow.rules[0].verbs must be a non-empty list of strings"),
        (doc({"allow": {"rules": {"resources": ["node"]}}}),
         "role dev: spec.allow.rules must be a list"),
        (doc("not a mapping"), "role dev: spec must be a mapping"),
        (doc(name="bad name"), "role: invalid name 'bad name'"),
        (doc(name=None), "role: metadata.name is required"),
        (doc(version="v2"), "role dev: unsupported version 'v2'"),
        (doc(kind="rolee"), "expected kind 'role', got 'rolee'"),
        (doc(extra=1), "role dev: extra is not a known field"),
        ({"kind": "role", "version": "v1", "metadata": {"name": "dev", "owner": "x"}},
         "role dev: metadata.owner is not a known field"),
    ],
)
def test_invalid_role_is_refused_naming_the_field(document, message):
    with pytest.raises(BadResource) as caught:
        parse_role(document)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8h", timedelta(hours=8)),
        ("30m", timedelta(minutes=30)),
        ("1h30m", timedelta(minutes=90)),
        ("90s", timedelta(seconds=90)),
        ("1.5h", timedelta(minutes=90)),
        ("2h0m5s", timedelta(hours=2, seconds=5)),
    ],
)
def test_duration_is_parsed(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "8", "h", "8d", "8h ", "-1h", "1h-30m", "0h", None, 8])
def test_bad_duration_is_refused(text):
    with pytest.raises(BadRequest):
        parse_duration(text)


@pytest.mark.parametrize(
    "value, text",
    [
        (timedelta(hours=8), "8h"),
        (timedelta(minutes=90), "1h30m"),
        (timedelta(hours=30), "30h"),
        (timedelta(seconds=45), "45s"),
        (timedelta(hours=1, seconds=1.5), "1h1.5s"),
    ],
)
def test_duration_is_written_back_readably(value, text):
    assert format_duration(value) == text
    assert parse_duration(text) == value


@pytest.mark.parametrize(
    "value, expected",
    [
        ("ubuntu", None),
        ("{{internal.logins}}", ("internal", "logins", "", "")),
        ("{{ external.unix_login }}", ("external", "unix_login", "", "")),
        ("adm-{{external.team}}-x", ("external", "team", "adm-", "-x")),
    ],
)
def test_template_is_recognized(value, expected):
    template = parse_template(value)
    if expected is None:
        assert template is None
    else:
        assert (template.namespace, template.name, template.prefix, template.suffix) == expected
