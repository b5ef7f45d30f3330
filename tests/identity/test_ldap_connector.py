"""The ldap_connector resource: parsing, validation, serialisation."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from edgeaccess.errors import BadResource
from edgeaccess.identity.connectors import (
    REDACTED,
    GroupRoleMapping,
    LDAPConnector,
    ldap_connector_to_dict,
    parse_ldap_connector,
)

SPEC_EXAMPLE = """
kind: ldap_connector
version: v1
metadata: {name: corp}
spec:
  url: ldap://ldap.example.com:389          # ldaps://... or start_tls: true
  ca_file: /etc/edge/ldap-ca.pem            # optional
  bind_dn: cn=edge,ou=services,dc=example,dc=com
  bind_password_file: /etc/edge/ldap.pass   # or bind_password
  user_search: {base_dn: 'ou=people,dc=example,dc=com', filter: '(uid={username})'}
  group_search: {base_dn: 'ou=groups,dc=example,dc=com', filter: '(member={user_dn})', name_attribute: cn}
  attributes_to_traits: {logins: [uid]}     # traits usable as {{external.logins}}
  groups_to_roles:
    - {group: ops, roles: [access]}
"""


def example() -> dict[str, Any]:
    """The SPEC.md example, as decoded YAML."""
    return yaml.safe_load(SPEC_EXAMPLE)


def test_spec_example_parses_into_a_connector() -> None:
    connector = parse_ldap_connector(example())

    assert connector.name == "corp"
    assert connector.url == "ldap://ldap.example.com:389"
    assert (connector.host, connector.port, connector.use_ssl) == ("ldap.example.com", 389, False)
    assert connector.start_tls is False
    assert connector.ca_file == "/etc/edge/ldap-ca.pem"
    assert connector.bind_dn == "cn=edge,ou=services,dc=example,dc=com"
    assert connector.bind_password_file == "/etc/edge/ldap.pass"
    assert connector.bind_password is None
    assert connector.user_search.base_dn == "ou=people,dc=example,dc=com"
    assert connector.user_search.filter == "(uid={username})"
    assert connector.group_search.filter == "(member={user_dn})"
    assert connector.group_search.name_attribute == "cn"
    assert dict(connector.attributes_to_traits) == {"logins": ("uid",)}
    assert connector.groups_to_roles == (GroupRoleMapping(group="ops", roles=("access",)),)
    assert connector.timeout == 10.0


def test_optional_fields_get_defaults() -> None:
    doc = example()
    del doc["spec"]["ca_file"], doc["spec"]["attributes_to_traits"]
    del doc["spec"]["group_search"]["name_attribute"]
    doc["spec"]["url"] = "ldaps://ldap.example.com"

    connector = parse_ldap_connector(doc)

    assert connector.ca_file is None
    assert connector.group_search.name_attribute == "cn"
    assert dict(connector.attributes_to_traits) == {}
    assert (connector.port, connector.use_ssl) == (636, True)


def test_default_port_of_plain_ldap_is_389() -> None:
    doc = example()
    doc["spec"]["url"] = "ldap://ldap.example.com"
    assert parse_ldap_connector(doc).port == 389


def test_serialised_connector_parses_back_to_the_same_connector() -> None:
    doc = example()
    doc["spec"].update(start_tls=True, timeout=2.5)
    doc["spec"]["attributes_to_traits"] = {"logins": ["uid", "mail"], "teams": ["ou"]}
    doc["spec"]["groups_to_roles"].append({"group": "devs", "roles": ["dev", "access"]})
    connector = parse_ldap_connector(doc)

    again = parse_ldap_connector(ldap_connector_to_dict(connector, redact=False))

    assert again == connector


def test_bind_password_is_redacted_for_display_by_default() -> None:
    doc = example()
    del doc["spec"]["bind_password_file"]
    doc["spec"]["bind_password"] = "s3cret-bind"
    connector = parse_ldap_connector(doc)

    shown = ldap_connector_to_dict(connector)
    stored = ldap_connector_to_dict(connector, redact=False)

    assert shown["spec"]["bind_password"] == REDACTED
    assert "s3cret-bind" not in repr(shown)
    assert "s3cret-bind" not in repr(connector)
    assert stored["spec"]["bind_password"] == "s3cret-bind"
    assert parse_ldap_connector(stored) == connector


def test_connector_document_is_not_modified_by_parsing() -> None:
    doc = example()
    before = copy.deepcopy(doc)
    parse_ldap_connector(doc)
    assert doc == before


def _set(path: str, value: Any) -> Any:
    """A mutation setting (or, with value DELETE, removing) a dotted path."""

    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = doc
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if value is DELETE:
            del target[last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return mutate


DELETE = object()


def _both_passwords(doc: dict[str, Any]) -> None:
    doc["spec"]["bind_password"] = "s3cret-bind"


INVALID = [
    ("kind", _set("kind", "role"), "kind"),
    ("version", _set("version", "v2"), "version"),
    ("no_metadata", _set("metadata", DELETE), "metadata"),
    ("no_name", _set("metadata.name", DELETE), "metadata.name"),
    ("bad_name", _set("metadata.name", "Corp Directory"), "metadata.name"),
    ("reserved_name", _set("metadata.name", "local"), "metadata.name"),
    ("unknown_top_field", _set("status", {}), "status"),
    ("no_spec", _set("spec", DELETE), "spec"),
    ("unknown_spec_field", _set("spec.bind_passwd", "x"), "spec.bind_passwd"),
    ("no_url", _set("spec.url", DELETE), "spec.url"),
    ("http_url", _set("spec.url", "http://ldap.example.com"), "spec.url"),
    ("url_without_host", _set("spec.url", "ldap://:389"), "spec.url"),
    ("url_with_path", _set("spec.url", "ldap://ldap.example.com/dc=example"), "spec.url"),
    ("url_bad_port", _set("spec.url", "ldap://ldap.example.com:99999"), "spec.url"),
    ("start_tls_not_bool", _set("spec.start_tls", "yes"), "spec.start_tls"),
    ("start_tls_with_ldaps", lambda d: d["spec"].update(
        url="ldaps://ldap.example.com", start_tls=True), "spec.start_tls"),
    ("ca_file_not_string", _set("spec.ca_file", 42), "spec.ca_file"),
    ("no_bind_dn", _set("spec.bind_dn", DELETE), "spec.bind_dn"),
    ("bad_bind_dn", _set("spec.bind_dn", "edge-service"), "spec.bind_dn"),
    ("no_password", _set("spec.bind_password_file", DELETE), "bind_password"),
    ("both_passwords", _both_passwords, "spec.bind_password"),
    ("no_user_search", _set("spec.user_search", DELETE), "spec.user_search"),
    ("user_search_not_mapping", _set("spec.user_search", "uid"), "spec.user_search"),
    ("bad_user_base", _set("spec.user_search.base_dn", "people"), "spec.user_search.base_dn"),
    ("user_filter_without_username", _set("spec.user_search.filter", "(uid=alice)"),
     "spec.user_search.filter"),
    ("user_filter_unbalanced", _set("spec.user_search.filter", "(uid={username}"),
     "spec.user_search.filter"),
    ("no_group_search", _set("spec.group_search", DELETE), "spec.group_search"),
    ("group_filter_without_placeholder", _set("spec.group_search.filter", "(cn=ops)"),
     "spec.group_search.filter"),
    ("bad_name_attribute", _set("spec.group_search.name_attribute", "c n"),
     "spec.group_search.name_attribute"),
    ("traits_not_mapping", _set("spec.attributes_to_traits", ["uid"]),
     "spec.attributes_to_traits"),
    ("trait_attributes_not_list", _set("spec.attributes_to_traits.logins", "uid"),
     "spec.attributes_to_traits.logins"),
    ("trait_bad_attribute", _set("spec.attributes_to_traits.logins", ["uid", "(uid)"]),
     "spec.attributes_to_traits.logins[1]"),
    ("no_groups_to_roles", _set("spec.groups_to_roles", DELETE), "spec.groups_to_roles"),
    ("empty_groups_to_roles", _set("spec.groups_to_roles", []), "spec.groups_to_roles"),
    ("mapping_without_group", _set("spec.groups_to_roles.0", {"roles": ["access"]}),
     "spec.groups_to_roles[0].group"),
    ("mapping_without_roles", _set("spec.groups_to_roles.0", {"group": "ops"}),
     "spec.groups_to_roles[0].roles"),
    ("mapping_role_not_string", _set("spec.groups_to_roles.0", {"group": "ops", "roles": [1]}),
     "spec.groups_to_roles[0].roles[0]"),
    ("negative_timeout", _set("spec.timeout", -1), "spec.timeout"),
    ("string_timeout", _set("spec.timeout", "10s"), "spec.timeout"),
    ("bool_timeout", _set("spec.timeout", True), "spec.timeout"),
]


@pytest.mark.parametrize(
    "mutate, field", [(m, f) for _, m, f in INVALID], ids=[i for i, _, _ in INVALID]
)
def test_invalid_connector_is_refused_naming_the_field(mutate: Any, field: str) -> None:
    doc = example()
    mutate(doc)

    with pytest.raises(BadResource) as raised:
        parse_ldap_connector(doc)

    assert field in str(raised.value)
    assert "s3cret-bind" not in str(raised.value)


def test_document_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(BadResource):
        parse_ldap_connector(["kind", "ldap_connector"])  # type: ignore[arg-type]


def test_connector_is_hashable_and_compares_by_value() -> None:
    one, two = parse_ldap_connector(example()), parse_ldap_connector(example())
    assert one == two and hash(one) == hash(two)
    assert isinstance(one, LDAPConnector)
