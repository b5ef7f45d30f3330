"""Reading YAML resource documents and dispatching them by kind."""

from __future__ import annotations

import subprocess
import sys

import attrs
import pytest

from edgeaccess.errors import BadResource
from edgeaccess.identity import resources
from edgeaccess.identity.resources import (
    dump_documents,
    parse_documents,
    parse_resource,
    parse_resources,
    register_kind,
    registered_kinds,
    resource_kind,
    resource_name,
    resource_to_dict,
    validate_resource_name,
)
from edgeaccess.identity.roles import Role

TWO_ROLES = """\
kind: role
version: v1
metadata: {name: dev}
spec:
  allow: {logins: [ubuntu], node_labels: {env: dev}}
---
kind: role
version: v1
metadata:
  name: ops
spec: {}
---
"""


@attrs.frozen
class Widget:
    name: str
    size: int


def _parse_widget(doc: dict) -> Widget:
    return Widget(name=doc["metadata"]["name"], size=doc["spec"]["size"])


def _widget_to_dict(widget: Widget) -> dict:
    return {"kind": "widget", "version": "v1", "metadata": {"name": widget.name},
            "spec": {"size": widget.size}}


@pytest.fixture
def widget_kind():
    """Register a kind for the duration of a test, as another module would."""
    register_kind("widget", _parse_widget, _widget_to_dict, cls=Widget)
    yield
    del resources._KINDS["widget"]


def test_several_documents_are_read_and_empty_ones_skipped():
    docs = parse_documents(TWO_ROLES)
    assert [d["metadata"]["name"] for d in docs] == ["dev", "ops"]


def test_documents_parse_into_roles_and_back():
    dev, ops = parse_resources(TWO_ROLES)
    assert isinstance(dev, Role) and dev.allow.logins == ("ubuntu",)
    assert resource_name(ops) == "ops" and resource_kind(ops) == "role"
    assert parse_resources(dump_documents([resource_to_dict(dev), resource_to_dict(ops)])) == [
        dev, ops,
    ]


def test_bytes_input_is_accepted():
    assert len(parse_documents(TWO_ROLES.encode())) == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("kind: role\nversion: v1\nmetadata: {name: [dev}\n",
         "invalid YAML at line 3, column 22"),
        ("kind: role\n  version: v1\n", "invalid YAML at line 2"),
        ("kind: role\nkind: role\nversion: v1\nmetadata: {name: a}\n",
         "invalid YAML at line 2, column 1: found duplicate key 'kind'"),
        ("", "no resource found"),
        ("---\n---\n", "no resource found"),
        ("- kind: role\n", "document 1 (line 1): a resource must be a mapping"),
        ("just text", "document 1 (line 1): a resource must be a mapping"),
        (TWO_ROLES + "version: v1\nmetadata: {name: x}\n",
         "document 3 (line 13): missing 'kind' (known: role"),
        ("kind: rolee\nversion: v1\nmetadata: {name: x}\n",
         "unknown resource kind 'rolee' (known: role"),
        ("kind: role\nmetadata: {name: x}\n", "role: missing 'version'"),
        ("kind: role\nversion: 1\nmetadata: {name: x}\n", "role: 'version' must be a string"),
        ("kind: role\nversion: v1\n", "role: missing 'metadata'"),
        ("kind: role\nversion: v1\nmetadata: {}\n", "role: metadata.name is required"),
        ("kind: role\nversion: v1\nmetadata: {name: 42}\n", "role: metadata.name is required"),
        ("kind: role\nversion: v1\nmetadata: {name: ../etc}\n", "role: invalid name '../etc'"),
        ("kind: role\nversion: v1\nmetadata: {name: a}\nspce: {}\n",
         "role a: unknown top-level field 'spce'"),
        (b"kind: role\xff\n", "input is not UTF-8"),
        ("x" * (resources.MAX_DOCUMENT_BYTES + 1), "input too large"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(text, message):
    with pytest.raises(BadResource) as caught:
        parse_documents(text)
    assert message in str(caught.value)


def test_errors_in_a_spec_name_the_document():
    text = TWO_ROLES + "kind: role\nversion: v1\nmetadata: {name: bad}\nspec: {allow: {logins: x}}\n"
    with pytest.raises(BadResource) as caught:
        parse_resources(text)
    assert str(caught.value) == (
        "document 3: role bad: spec.allow.logins must be a list of strings"
    )


def test_registered_kinds_are_dispatched_and_listed(widget_kind):
    widget = parse_resource(
        {"kind": "widget", "version": "v1", "metadata": {"name": "w"}, "spec": {"size": 3}}
    )
    assert widget == Widget("w", 3)
    assert resource_kind(widget) == "widget"
    assert resource_name(widget) == "w"
    assert resource_to_dict(widget)["spec"] == {"size": 3}
    assert registered_kinds()[0] == "role" and "widget" in registered_kinds()
    with pytest.raises(BadResource) as caught:
        parse_documents("kind: gadget\nversion: v1\nmetadata: {name: g}\n")
    assert "unknown resource kind 'gadget' (known: role, " in str(caught.value)
    assert "widget)" in str(caught.value)


def test_unregistered_object_has_no_kind():
    with pytest.raises(TypeError):
        resource_to_dict(object())


@pytest.mark.parametrize(
    "name, valid",
    [
        ("dev", True),
        ("a", True),
        ("web-01.prod_x", True),
        ("0abc", True),
        ("a" * 63, True),
        ("a" * 64, False),
        ("", False),
        ("-dev", False),
        (".hidden", False),
        ("dev/x", False),
        ("dev\n", False),
        ("dév", False),
        ("has space", False),
    ],
)
def test_resource_names(name, valid):
    if valid:
        assert validate_resource_name(name) == name
    else:
        with pytest.raises(BadResource):
            validate_resource_name(name)


@pytest.mark.parametrize(
    "first", ["edgeaccess.identity.resources", "edgeaccess.identity.roles", "edgeaccess.identity.rbac"]
)
def test_role_kind_is_known_whichever_module_is_imported_first(first):
    code = (
        f"import {first}\n"
        "from edgeaccess.identity.resources import registered_kinds\n"
        "assert 'role' in registered_kinds(), registered_kinds()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_unknown_kind_is_reported_before_other_header_problems():
    with pytest.raises(BadResource) as caught:
        parse_documents("kind: rolee\nmetadata: {}\n")
    assert str(caught.value).startswith(
        "document 1 (line 1): unknown resource kind 'rolee' (known: role"
    )


def test_parse_resource_refuses_unknown_kind():
    with pytest.raises(BadResource) as caught:
        parse_resource({"kind": "gadget", "version": "v1", "metadata": {"name": "g"}})
    assert "unknown resource kind 'gadget'" in str(caught.value)


def test_yaml_merge_keys_work_and_nested_duplicates_are_refused():
    merged = parse_resources(
        "kind: role\nversion: v1\nmetadata: {name: a}\nspec:\n"
        "  allow: &base {logins: [x], node_labels: {env: dev}}\n"
        "  deny:\n    <<: *base\n    logins: [y]\n"
    )[0]
    assert merged.deny.logins == ("y",) and merged.deny.node_labels == {"env": ("dev",)}
    with pytest.raises(BadResource) as caught:
        parse_documents(
            "kind: role\nversion: v1\nmetadata: {name: a}\nspec:\n"
            "  deny: {logins: [root]}\n  allow: {}\n  deny: {}\n"
        )
    assert "line 7, column 3: found duplicate key 'deny'" in str(caught.value)


def test_huge_values_are_cut_in_messages():
    with pytest.raises(BadResource) as caught:
        parse_documents("kind: " + "k" * 5000 + "\nversion: v1\nmetadata: {name: a}\n")
    assert len(str(caught.value)) < 200
