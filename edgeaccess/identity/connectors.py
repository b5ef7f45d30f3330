"""LDAP connector resources (``kind: ldap_connector``, see SPEC.md).

A connector tells the auth service how to log users in against a corporate
directory: where it is, how to reach it safely, which service account
searches it, and how its groups and attributes become edgeaccess roles and
traits.  This module only parses, validates and serialises the resource;
:mod:`edgeaccess.identity.ldap` uses it.  No I/O happens here: the bind
password file is read by the login method at login time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
from ldap3.core.exceptions import LDAPException
from ldap3.operation.search import parse_filter
from ldap3.utils.dn import parse_dn

from edgeaccess.errors import BadResource

KIND = "ldap_connector"
VERSION = "v1"
REDACTED = "********"
DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 300.0

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# An attribute description (RFC 4512): a name or a numeric OID, with options.
_ATTRIBUTE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*|[0-9]+(\.[0-9]+)+)(;[A-Za-z0-9-]+)*$")
_TRAIT = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,62}$")
# Names that `edge login --auth` gives another meaning.
_RESERVED_NAMES = frozenset({"local"})

_TOP_KEYS = frozenset({"kind", "version", "metadata", "spec"})
_SPEC_KEYS = frozenset(
    {
        "url",
        "start_tls",
        "ca_file",
        "bind_dn",
        "bind_password_file",
        "bind_password",
        "user_search",
        "group_search",
        "attributes_to_traits",
        "groups_to_roles",
        "timeout",
    }
)


def _redacted_repr(value: str | None) -> str:
    return "None" if value is None else repr(REDACTED)


@attrs.frozen
class UserSearch:
    """Where and how the service account finds a user's entry.

    :ivar filter: an LDAP filter containing ``{username}``, replaced by the
        escaped login name.
    """

    base_dn: str
    filter: str


@attrs.frozen
class GroupSearch:
    """Where and how the service account finds a user's groups.

    :ivar filter: an LDAP filter containing ``{user_dn}`` and/or
        ``{username}``, each replaced by its escaped value.
    :ivar name_attribute: the group attribute whose values are group names.
    """

    base_dn: str
    filter: str
    name_attribute: str = "cn"


@attrs.frozen
class GroupRoleMapping:
    """Members of directory group ``group`` get the edgeaccess ``roles``."""

    group: str
    roles: tuple[str, ...]


@attrs.frozen
class LDAPConnector:
    """A validated ``ldap_connector`` resource.

    Build it with :func:`parse_ldap_connector`.  ``repr`` never shows the
    bind password.

    :ivar url: ``ldap://HOST[:PORT]`` or ``ldaps://HOST[:PORT]``.
    :ivar attributes_to_traits: trait name -> directory attributes whose
        values make up the trait.
    :ivar timeout: seconds allowed for connecting and for each answer.
    """

    name: str
    url: str
    bind_dn: str
    user_search: UserSearch
    group_search: GroupSearch
    groups_to_roles: tuple[GroupRoleMapping, ...]
    start_tls: bool = False
    ca_file: str | None = None
    bind_password_file: str | None = None
    bind_password: str | None = attrs.field(default=None, repr=_redacted_repr)
    attributes_to_traits: Mapping[str, tuple[str, ...]] = attrs.field(
        factory=dict, hash=False
    )
    timeout: float = DEFAULT_TIMEOUT

    @property
    def use_ssl(self) -> bool:
        """True for ``ldaps://`` (TLS from the first byte)."""
        return urlsplit(self.url).scheme.lower() == "ldaps"

    @property
    def host(self) -> str:
        """The directory's host name or address."""
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        """The directory's port (389 for ldap://, 636 for ldaps:// unless given)."""
        port = urlsplit(self.url).port
        if port is not None:
            return port
        return 636 if self.use_ssl else 389


def _fail(field: str, problem: str) -> BadResource:
    return BadResource(f"ldap_connector {field}: {problem}")


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if value is None:
        raise _fail(field, "is required")
    if not isinstance(value, Mapping):
        raise _fail(field, "must be a mapping")
    for key in value:
        if not isinstance(key, str):
            raise _fail(field, f"keys must be strings, not {key!r}")
    return value


def _string(value: Any, field: str) -> str:
    if value is None:
        raise _fail(field, "is required")
    if not isinstance(value, str) or not value.strip():
        raise _fail(field, "must be a non-empty string")
    if "\x00" in value:
        raise _fail(field, "must not contain NUL characters")
    return value


def _optional_string(doc: Mapping[str, Any], key: str, field: str) -> str | None:
    if doc.get(key) is None:
        return None
    return _string(doc[key], field)


def _no_unknown_keys(doc: Mapping[str, Any], known: frozenset[str], field: str) -> None:
    unknown = sorted(set(doc) - known)
    if unknown:
        raise _fail(f"{field}.{unknown[0]}" if field else unknown[0], "unknown field")


def _dn(value: Any, field: str) -> str:
    text = _string(value, field)
    try:
        parse_dn(text)
    except LDAPException as e:
        raise _fail(field, f"not a valid DN ({e})") from None
    return text


def _filter(value: Any, field: str, placeholders: tuple[str, ...]) -> str:
    text = _string(value, field).strip()
    present = [p for p in placeholders if "{" + p + "}" in text]
    if not present:
        wanted = " or ".join("{" + p + "}" for p in placeholders)
        raise _fail(field, f"must contain {wanted}")
    sample = text
    for placeholder in placeholders:
        sample = sample.replace("{" + placeholder + "}", "x")
    try:
        parse_filter(sample, None, False, True, None, False)
    except (LDAPException, IndexError, ValueError) as e:
        raise _fail(field, f"not a valid LDAP filter ({e})") from None
    return text


def _attribute(value: Any, field: str) -> str:
    text = _string(value, field)
    if not _ATTRIBUTE.match(text):
        raise _fail(field, f"not a valid attribute name: {text!r}")
    return text


def _url(value: Any) -> str:
    text = _string(value, "spec.url").strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise _fail("spec.url", f"not a valid URL ({e})") from None
    if parts.scheme.lower() not in ("ldap", "ldaps"):
        raise _fail("spec.url", "must start with ldap:// or ldaps://")
    if not parts.hostname:
        raise _fail("spec.url", "must name a host")
    if parts.username is not None or parts.password is not None:
        raise _fail("spec.url", "must not carry credentials (use bind_dn)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _fail("spec.url", "must be ldap[s]://HOST[:PORT] only")
    if port == 0:
        raise _fail("spec.url", "port must be between 1 and 65535")
    return text


def _timeout(value: Any) -> float:
    if value is None:
        return DEFAULT_TIMEOUT
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail("spec.timeout", "must be a number of seconds")
    if not 0 < value <= MAX_TIMEOUT:
        raise _fail("spec.timeout", f"must be more than 0 and at most {MAX_TIMEOUT:g}")
    return float(value)


def _traits(value: Any) -> dict[str, tuple[str, ...]]:
    if value is None:
        return {}
    traits = {}
    for trait, attributes in _mapping(value, "spec.attributes_to_traits").items():
        field = f"spec.attributes_to_traits.{trait}"
        if not _TRAIT.match(trait):
            raise _fail(field, "not a valid trait name")
        if not isinstance(attributes, list) or not attributes:
            raise _fail(field, "must be a non-empty list of attribute names")
        traits[trait] = tuple(_attribute(a, f"{field}[{i}]") for i, a in enumerate(attributes))
    return traits


def _groups_to_roles(value: Any) -> tuple[GroupRoleMapping, ...]:
    field = "spec.groups_to_roles"
    if not isinstance(value, list) or not value:
        raise _fail(field, "must be a non-empty list of {group, roles} mappings")
    mappings = []
    for index, item in enumerate(value):
        item_field = f"{field}[{index}]"
        item = _mapping(item, item_field)
        _no_unknown_keys(item, frozenset({"group", "roles"}), item_field)
        group = _string(item.get("group"), f"{item_field}.group")
        roles = item.get("roles")
        if not isinstance(roles, list) or not roles:
            raise _fail(f"{item_field}.roles", "must be a non-empty list of role names")
        mappings.append(
            GroupRoleMapping(
                group=group,
                roles=tuple(
                    _string(r, f"{item_field}.roles[{i}]") for i, r in enumerate(roles)
                ),
            )
        )
    return tuple(mappings)


def parse_ldap_connector(doc: dict[str, Any]) -> LDAPConnector:
    """Validate a decoded ``ldap_connector`` YAML document.

    :raises BadResource: naming the first invalid field.
    """
    top = _mapping(doc, "document")
    _no_unknown_keys(top, _TOP_KEYS, "")
    if top.get("kind") != KIND:
        raise _fail("kind", f"must be {KIND!r}")
    if top.get("version") != VERSION:
        raise _fail("version", f"must be {VERSION!r}")
    metadata = _mapping(top.get("metadata"), "metadata")
    name = _string(metadata.get("name"), "metadata.name")
    if not _NAME.match(name):
        raise _fail(
            "metadata.name", "must be 1-63 lower-case letters, digits, '.', '_' or '-'"
        )
    if name in _RESERVED_NAMES:
        raise _fail("metadata.name", f"{name!r} is reserved")

    spec = _mapping(top.get("spec"), "spec")
    _no_unknown_keys(spec, _SPEC_KEYS, "spec")
    url = _url(spec.get("url"))

    start_tls = spec.get("start_tls", False)
    if not isinstance(start_tls, bool):
        raise _fail("spec.start_tls", "must be true or false")
    if start_tls and urlsplit(url).scheme.lower() == "ldaps":
        raise _fail("spec.start_tls", "cannot be used with ldaps:// (already TLS)")

    password = _optional_string(spec, "bind_password", "spec.bind_password")
    password_file = _optional_string(spec, "bind_password_file", "spec.bind_password_file")
    if password is None and password_file is None:
        raise _fail("spec.bind_password_file", "bind_password_file or bind_password is required")
    if password is not None and password_file is not None:
        raise _fail("spec.bind_password", "give bind_password or bind_password_file, not both")

    user_doc = _mapping(spec.get("user_search"), "spec.user_search")
    _no_unknown_keys(user_doc, frozenset({"base_dn", "filter"}), "spec.user_search")
    user_search = UserSearch(
        base_dn=_dn(user_doc.get("base_dn"), "spec.user_search.base_dn"),
        filter=_filter(user_doc.get("filter"), "spec.user_search.filter", ("username",)),
    )

    group_doc = _mapping(spec.get("group_search"), "spec.group_search")
    _no_unknown_keys(
        group_doc, frozenset({"base_dn", "filter", "name_attribute"}), "spec.group_search"
    )
    group_search = GroupSearch(
        base_dn=_dn(group_doc.get("base_dn"), "spec.group_search.base_dn"),
        filter=_filter(
            group_doc.get("filter"), "spec.group_search.filter", ("user_dn", "username")
        ),
        name_attribute=_attribute(
            group_doc.get("name_attribute", "cn"), "spec.group_search.name_attribute"
        ),
    )

    return LDAPConnector(
        name=name,
        url=url,
        start_tls=start_tls,
        ca_file=_optional_string(spec, "ca_file", "spec.ca_file"),
        bind_dn=_dn(spec.get("bind_dn"), "spec.bind_dn"),
        bind_password=password,
        bind_password_file=password_file,
        user_search=user_search,
        group_search=group_search,
        attributes_to_traits=_traits(spec.get("attributes_to_traits")),
        groups_to_roles=_groups_to_roles(spec.get("groups_to_roles")),
        timeout=_timeout(spec.get("timeout")),
    )


def ldap_connector_to_dict(connector: LDAPConnector, redact: bool = True) -> dict[str, Any]:
    """Serialise a connector back to its YAML document form.

    :param redact: replace the bind password by ``"********"`` (the default:
        use ``redact=False`` only to store the resource, never to show it).
    """
    spec: dict[str, Any] = {"url": connector.url}
    if connector.start_tls:
        spec["start_tls"] = True
    if connector.ca_file is not None:
        spec["ca_file"] = connector.ca_file
    spec["bind_dn"] = connector.bind_dn
    if connector.bind_password_file is not None:
        spec["bind_password_file"] = connector.bind_password_file
    if connector.bind_password is not None:
        spec["bind_password"] = REDACTED if redact else connector.bind_password
    spec["user_search"] = {
        "base_dn": connector.user_search.base_dn,
        "filter": connector.user_search.filter,
    }
    spec["group_search"] = {
        "base_dn": connector.group_search.base_dn,
        "filter": connector.group_search.filter,
        "name_attribute": connector.group_search.name_attribute,
    }
    spec["attributes_to_traits"] = {
        trait: list(attributes) for trait, attributes in connector.attributes_to_traits.items()
    }
    spec["groups_to_roles"] = [
        {"group": m.group, "roles": list(m.roles)} for m in connector.groups_to_roles
    ]
    spec["timeout"] = connector.timeout
    return {
        "kind": KIND,
        "version": VERSION,
        "metadata": {"name": connector.name},
        "spec": spec,
    }
