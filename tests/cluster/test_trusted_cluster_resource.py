"""The ``trusted_cluster`` resource (validation of the YAML an administrator
writes on the leaf) and ``map_roles`` (root roles -> leaf roles)."""

from __future__ import annotations

import copy

import pytest

from edgeaccess import errors
from edgeaccess.cluster.trusted import (
    RoleMapping,
    map_roles,
    parse_role_map,
    parse_trusted_cluster,
    trusted_cluster_to_dict,
)

PIN = "sha256:" + "ab" * 32
TOKEN = "0123456789abcdefABCDEF0123456789"


def document(**spec_changes) -> dict:
    doc = {
        "kind": "trusted_cluster",
        "version": "v1",
        "metadata": {"name": "root"},
        "spec": {
            "enabled": True,
            "token": TOKEN,
            "ca_pin": PIN,
            "web_proxy_addr": "root.example.com:3080",
            "tunnel_addr": "root.example.com:3024",
            "role_map": [{"remote": "access", "local": ["access"]}],
        },
    }
    for key, value in spec_changes.items():
        if value is _REMOVE:
            del doc["spec"][key]
        else:
            doc["spec"][key] = value
    return doc


_REMOVE = object()


def test_a_valid_document_parses_and_round_trips():
    tc = parse_trusted_cluster(document(ca_pin=PIN.upper().replace("SHA256", "sha256")))
    assert tc.name == "root" and tc.enabled is True
    assert tc.ca_pin == PIN  # normalised to lower case
    assert tc.role_map == (RoleMapping("access", ("access",)),)
    again = parse_trusted_cluster(trusted_cluster_to_dict(tc))
    assert again == tc


def test_enabled_defaults_to_true_and_false_is_kept():
    assert parse_trusted_cluster(document(enabled=_REMOVE)).enabled is True
    assert parse_trusted_cluster(document(enabled=False)).enabled is False


def test_a_single_local_role_may_be_written_as_a_string():
    tc = parse_trusted_cluster(document(role_map=[{"remote": "*", "local": "viewer"}]))
    assert tc.role_map == (RoleMapping("*", ("viewer",)),)


def test_bracketed_ipv6_addresses_are_accepted():
    tc = parse_trusted_cluster(document(web_proxy_addr="[::1]:3080"))
    assert tc.web_proxy_addr == "[::1]:3080"


INVALID = [
    pytest.param({"enabled": "yes"}, "spec.enabled: must be true or false", id="enabled-string"),
    pytest.param({"token": _REMOVE}, "spec.token", id="token-missing"),
    pytest.param({"token": "short"}, "spec.token", id="token-too-short"),
    pytest.param({"token": "abc def ghi jkl"}, "spec.token", id="token-with-spaces"),
    pytest.param({"token": 12345678}, "spec.token", id="token-not-a-string"),
    pytest.param({"ca_pin": _REMOVE}, "spec.ca_pin", id="pin-missing"),
    pytest.param({"ca_pin": "sha256:abc"}, "spec.ca_pin", id="pin-too-short"),
    pytest.param({"ca_pin": "md5:" + "ab" * 32}, "spec.ca_pin", id="pin-wrong-hash"),
    pytest.param({"ca_pin": "sha256:" + "zz" * 32}, "spec.ca_pin", id="pin-not-hex"),
    pytest.param({"web_proxy_addr": "root.example.com"}, "spec.web_proxy_addr",
                 id="web-without-port"),
    pytest.param({"web_proxy_addr": "root:99999"}, "spec.web_proxy_addr", id="web-port-range"),
    pytest.param({"web_proxy_addr": "root:0"}, "spec.web_proxy_addr", id="web-port-zero"),
    pytest.param({"tunnel_addr": "https://root:3024"}, "spec.tunnel_addr", id="tunnel-url"),
    pytest.param({"tunnel_addr": ":3024"}, "spec.tunnel_addr", id="tunnel-no-host"),
    pytest.param({"tunnel_addr": _REMOVE}, "spec.tunnel_addr", id="tunnel-missing"),
    pytest.param({"role_map": _REMOVE}, "spec.role_map", id="role-map-missing"),
    pytest.param({"role_map": []}, "spec.role_map", id="role-map-empty"),
    pytest.param({"role_map": {"remote": "a", "local": ["b"]}}, "spec.role_map",
                 id="role-map-not-a-list"),
    pytest.param({"role_map": [{"remote": "a"}]}, "spec.role_map[0].local",
                 id="mapping-without-local"),
    pytest.param({"role_map": [{"remote": "a", "local": []}]}, "spec.role_map[0].local",
                 id="mapping-to-empty-list"),
    pytest.param({"role_map": [{"remote": "a", "local": ["b"], "extra": 1}]},
                 "spec.role_map[0]", id="mapping-unknown-key"),
    pytest.param({"role_map": [{"remote": "a", "local": ["b"]}, {"remote": "bad name",
                                                                  "local": ["b"]}]},
                 "spec.role_map[1].remote", id="remote-not-a-name"),
    pytest.param({"role_map": [{"remote": "a", "local": ["../etc"]}]},
                 "spec.role_map[0].local", id="local-not-a-name"),
    pytest.param({"role_map": ["access"]}, "spec.role_map[0]", id="mapping-not-a-mapping"),
    pytest.param({"rolemap": []}, "unknown field(s) rolemap", id="misspelt-field"),
]


@pytest.mark.parametrize("changes, message", INVALID)
def test_invalid_documents_are_refused_naming_the_field(changes, message):
    doc = document(**changes)
    with pytest.raises(errors.BadResource) as raised:
        parse_trusted_cluster(doc)
    text = str(raised.value)
    assert message in text
    assert "\n" not in text
    assert TOKEN not in text  # a bad resource never echoes the secret


def test_header_errors_are_refused():
    for broken, message in [
        ({"kind": "role"}, "expected kind"),
        ({"metadata": {"name": "a/b"}}, "invalid name"),
        ({"metadata": {}}, "metadata.name"),
        ({"spec": "nope"}, "spec"),
    ]:
        doc = copy.deepcopy(document())
        doc.update(broken)
        with pytest.raises(errors.BadResource, match=message):
            parse_trusted_cluster(doc)


MAPPINGS = (RoleMapping("access", ("access",)), RoleMapping("admin", ("access", "editor")),
            RoleMapping("restricted", ("prod-only",)))


@pytest.mark.parametrize("remote, expected", [
    pytest.param(["access"], ["access"], id="one-to-one"),
    pytest.param(["admin"], ["access", "editor"], id="one-to-many"),
    pytest.param(["access", "admin"], ["access", "editor"], id="duplicates-merged-in-order"),
    pytest.param(["restricted"], ["prod-only"], id="restricted"),
    pytest.param(["unmapped"], [], id="unmapped-role-gets-nothing"),
    pytest.param([], [], id="no-roles-get-nothing"),
    pytest.param(["prod-only"], [], id="a-leaf-role-name-does-not-cross-unmapped"),
])
def test_map_roles(remote, expected):
    assert map_roles(MAPPINGS, remote) == expected


def test_map_roles_accepts_the_stored_dict_form_and_a_wildcard():
    stored = [{"remote": "*", "local": ["viewer"]}, {"remote": "admin", "local": ["editor"]}]
    assert map_roles(stored, ["anything"]) == ["viewer"]
    assert map_roles(stored, ["admin"]) == ["viewer", "editor"]
    assert map_roles(stored, []) == []  # '*' matches roles held, and there are none


def test_parse_role_map_matches_map_roles_input():
    parsed = parse_role_map([{"remote": "admin", "local": ["access", "editor"]}])
    assert map_roles(parsed, ["admin"]) == ["access", "editor"]
