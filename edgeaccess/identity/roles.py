"""Roles as administrators write them (``kind: role``), parsed and validated.

A role grants (``allow``) and forbids (``deny``) logins, nodes, Kubernetes clusters, apps and
administrative actions, and sets session options::

    kind: role
    version: v1
    metadata: {name: dev}
    spec:
      options: {max_session_ttl: 8h, port_forwarding: false, record_session: true}
      allow:
        logins: ['{{internal.logins}}', ubuntu]
        node_labels: {env: [dev, staging]}      # '*': '*' = every node
        rules: [{resources: [role], verbs: [list, read]}]
      deny:
        logins: [root]

Logins, Kubernetes groups and label values may contain one template,
``{{internal.NAME}}`` or ``{{external.NAME}}``, with a literal prefix and suffix; it is
expanded per user by :mod:`edgeaccess.identity.rbac`. The decisions themselves live there:
this module only reads, checks and writes the documents.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

import attrs
from twisted.logger import Logger

from edgeaccess.errors import BadRequest, BadResource
from edgeaccess.identity.resources import check_header, register_kind, short_repr

_log = Logger()

WILDCARD = "*"

#: Resources that ``rules`` can grant verbs on.
RULE_RESOURCES = (
    "user", "role", "token", "node", "connector", "trusted_cluster", "lock", "event", "session",
)
#: Verbs that ``rules`` can grant.
RULE_VERBS = ("list", "read", "create", "update", "delete")

ROLE_VERSIONS = ("v1",)

_TEMPLATE = re.compile(
    r"\{\{\s*(?P<namespace>internal|external)\.(?P<name>[A-Za-z0-9_][A-Za-z0-9_.-]*)\s*\}\}"
)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|m|s)")
_DURATION_UNITS = {"h": 3600, "m": 60, "s": 1}
#: The longest duration a role may say (timedelta itself stops at 999,999,999 days).
_MAX_DURATION_SECONDS = 3650 * 86400


# --- durations ------------------------------------------------------------------------


def parse_duration(text: object) -> timedelta:
    """Parse a duration written like Go's (and Teleport's): ``8h``, ``30m``, ``1h30m``, ``90s``.

    :raises BadRequest: if ``text`` is not such a positive duration.
    """
    if isinstance(text, timedelta):
        value = text
    else:
        if not isinstance(text, str) or not text:
            raise BadRequest(f"invalid duration {short_repr(text)}: use a number and a unit, like "
                             "'8h', '30m' or '1h30m'")
        position, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != position:
                break
            seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            position = match.end()
        if position != len(text):
            raise BadRequest(f"invalid duration {short_repr(text)}: use a number and a unit, like "
                             "'8h', '30m' or '1h30m'")
        if not seconds <= _MAX_DURATION_SECONDS:  # also NaN and the infinity of '9' * 400
            raise BadRequest(f"invalid duration {short_repr(text)}: longer than 10 years")
        value = timedelta(seconds=seconds)
    if value <= timedelta(0):
        raise BadRequest(f"invalid duration {short_repr(text)}: must be more than zero")
    return value


def format_duration(value: timedelta) -> str:
    """Write a duration as :func:`parse_duration` reads it (``timedelta(hours=8)``: ``8h``)."""
    total = value.total_seconds()
    hours, rest = divmod(int(total), 3600)
    minutes, seconds = divmod(rest, 60)
    fraction = total - int(total)
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if fraction:
        parts.append(f"{seconds + fraction:g}s")
    elif seconds or not parts:
        parts.append(f"{seconds}s")
    return "".join(parts)


# --- templates ------------------------------------------------------------------------


@attrs.frozen
class Template:
    """A value with one trait reference: ``prefix{{namespace.name}}suffix``."""

    namespace: str
    name: str
    prefix: str = ""
    suffix: str = ""


def parse_template(value: str) -> Template | None:
    """Return the template in ``value``, or ``None`` for a literal value.

    :raises ValueError: if ``value`` holds braces that are not exactly one valid template.
    """
    matches = list(_TEMPLATE.finditer(value))
    if not matches:
        if "{{" in value or "}}" in value:
            raise ValueError("expected {{internal.NAME}} or {{external.NAME}}")
        return None
    if len(matches) > 1:
        raise ValueError("only one template per value is supported")
    match = matches[0]
    prefix, suffix = value[: match.start()], value[match.end():]
    if "{{" in prefix + suffix or "}}" in prefix + suffix:
        raise ValueError("expected {{internal.NAME}} or {{external.NAME}}")
    return Template(match.group("namespace"), match.group("name"), prefix, suffix)


def is_safe_value(value: str) -> bool:
    """True for a non-empty value without whitespace or control characters.

    Literal logins and Kubernetes groups must be safe; expanded trait values that are not
    are dropped (a trait comes from an identity provider, not from the administrator).
    """
    return bool(value) and not any(
        ch.isspace() or unicodedata.category(ch).startswith("C") for ch in value
    )


# --- model ----------------------------------------------------------------------------


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _labels(value: Mapping[str, Iterable[str] | str]) -> dict[str, tuple[str, ...]]:
    return {key: _strings(values) for key, values in value.items()}


def _rules(value: Iterable[Rule]) -> tuple[Rule, ...]:
    return tuple(value)


@attrs.frozen
class Rule:
    """Administrative permission: ``verbs`` on ``resources`` (``*`` means all)."""

    resources: tuple[str, ...] = attrs.field(converter=_strings)
    verbs: tuple[str, ...] = attrs.field(converter=_strings)

    def matches(self, resource: str, verb: str) -> bool:
        """True if this rule covers ``verb`` on ``resource``."""
        return (resource in self.resources or WILDCARD in self.resources) and (
            verb in self.verbs or WILDCARD in self.verbs
        )


@attrs.frozen
class RoleConditions:
    """What one side (``allow`` or ``deny``) of a role lists. Empty means nothing."""

    logins: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    node_labels: dict[str, tuple[str, ...]] = attrs.field(factory=dict, converter=_labels)
    kubernetes_groups: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    kubernetes_users: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    kubernetes_labels: dict[str, tuple[str, ...]] = attrs.field(factory=dict, converter=_labels)
    app_labels: dict[str, tuple[str, ...]] = attrs.field(factory=dict, converter=_labels)
    rules: tuple[Rule, ...] = attrs.field(default=(), converter=_rules)


@attrs.frozen
class RoleOptions:
    """Session options; ``None`` means the role does not say (see rbac for merging).

    An unset ``max_session_ttl`` counts as :data:`DEFAULT_MAX_SESSION_TTL` (30 hours, as in
    Teleport) when roles are combined; it is kept ``None`` here so that a role reads back
    exactly as written.
    """

    max_session_ttl: timedelta | None = None
    port_forwarding: bool | None = None
    forward_agent: bool | None = None
    record_session: bool | None = None


#: The session TTL of a role that sets no ``max_session_ttl``.
DEFAULT_MAX_SESSION_TTL = timedelta(hours=30)


@attrs.frozen
class Role:
    """A named set of allow and deny conditions and session options."""

    name: str
    options: RoleOptions = attrs.field(factory=RoleOptions)
    allow: RoleConditions = attrs.field(factory=RoleConditions)
    deny: RoleConditions = attrs.field(factory=RoleConditions)
    description: str = ""


# --- parsing --------------------------------------------------------------------------

_OPTION_FIELDS = ("max_session_ttl", "port_forwarding", "forward_agent", "record_session")
_CONDITION_FIELDS = (
    "logins", "node_labels", "kubernetes_groups", "kubernetes_users", "kubernetes_labels",
    "app_labels", "rules",
)


class _Fields:
    """Error reporting for one role document: every message starts with ``role NAME:``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def fail(self, path: str, problem: str) -> BadResource:
        return BadResource(f"role {self.name}: {path} {problem}")

    def mapping(self, value: object, path: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(path, "must be a mapping")
        for key in value:
            if key not in allowed:
                raise self.fail(
                    f"{path}.{str(key)[:60]}", f"is not a known field (expected one of: {', '.join(allowed)})"
                )
        return value

    def value(self, value: object, path: str) -> str:
        """A login, group or label value: a string, maybe with one template."""
        if not isinstance(value, str) or not value:
            raise self.fail(path, "must be a non-empty string")
        try:
            template = parse_template(value)
        except ValueError as error:
            raise self.fail(path, f"has an invalid template {short_repr(value)}: {error}") from None
        if template is None and not is_safe_value(value):
            raise self.fail(
                path, f"must not contain spaces or control characters: {short_repr(value)}"
            )
        return value

    def string_list(self, value: object, path: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(path, "must be a list of strings")
        if WILDCARD in value:
            # As in Teleport: '*' is a label matcher, never a login or a group.
            raise self.fail(path, "must not contain '*' (list the values, or use a template)")
        return tuple(self.value(v, f"{path}[{i}]") for i, v in enumerate(value))

    def labels(self, value: object, path: str) -> dict[str, tuple[str, ...]]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(path, "must be a mapping of label names to a value or a list of values")
        labels: dict[str, tuple[str, ...]] = {}
        for key, values in value.items():
            if not isinstance(key, str) or not key or not is_safe_value(key) or "{{" in key:
                raise self.fail(path, f"has an invalid label name {short_repr(key)}")
            where = f"{path}.{key}"
            if isinstance(values, str):
                values = [values]
            if not isinstance(values, list) or not values or not all(
                isinstance(v, str) for v in values
            ):
                raise self.fail(
                    where, "must be a string or a non-empty list of strings (quote numbers)"
                )
            if key == WILDCARD and list(values) != [WILDCARD]:
                raise self.fail(where, "must be '*': the '*' label only matches with '*'")
            labels[key] = tuple(self.value(v, f"{where}[{i}]") for i, v in enumerate(values))
        return labels

    def rules(self, value: object, path: str) -> tuple[Rule, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(path, "must be a list of {resources: [...], verbs: [...]}")
        rules = []
        for index, item in enumerate(value):
            where = f"{path}[{index}]"
            item = self.mapping(item, where, ("resources", "verbs"))
            resources = self._choices(item.get("resources"), f"{where}.resources", RULE_RESOURCES)
            verbs = self._choices(item.get("verbs"), f"{where}.verbs", RULE_VERBS)
            rules.append(Rule(resources=resources, verbs=verbs))
        return tuple(rules)

    def _choices(self, value: object, path: str, known: tuple[str, ...]) -> tuple[str, ...]:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self.fail(path, "must be a non-empty list of strings")
        for item in value:
            if item != WILDCARD and item not in known:
                raise self.fail(
                    path, f"has unknown value {short_repr(item)} (known: {', '.join(known)}, *)"
                )
        return tuple(value)

    def boolean(self, value: object, path: str) -> bool | None:
        if value is None or isinstance(value, bool):
            return value
        raise self.fail(path, "must be true or false")

    def duration(self, value: object, path: str) -> timedelta | None:
        if value is None:
            return None
        try:
            return parse_duration(value)
        except BadRequest as error:
            raise self.fail(path, f"is an {error.message}") from None


def _parse_conditions(fields: _Fields, value: object, path: str) -> RoleConditions:
    spec = fields.mapping(value, path, _CONDITION_FIELDS)
    return RoleConditions(
        logins=fields.string_list(spec.get("logins"), f"{path}.logins"),
        node_labels=fields.labels(spec.get("node_labels"), f"{path}.node_labels"),
        kubernetes_groups=fields.string_list(
            spec.get("kubernetes_groups"), f"{path}.kubernetes_groups"
        ),
        kubernetes_users=fields.string_list(
            spec.get("kubernetes_users"), f"{path}.kubernetes_users"
        ),
        kubernetes_labels=fields.labels(spec.get("kubernetes_labels"), f"{path}.kubernetes_labels"),
        app_labels=fields.labels(spec.get("app_labels"), f"{path}.app_labels"),
        rules=fields.rules(spec.get("rules"), f"{path}.rules"),
    )


def parse_role(doc: Mapping[str, Any]) -> Role:
    """Parse and validate a ``kind: role`` document.

    Unknown fields are errors (a misspelt ``deny`` must not silently deny nothing).

    :raises BadResource: naming the role and the field, e.g.
        ``role dev: spec.allow.logins must be a list of strings``.
    """
    name = check_header(doc, kind="role", versions=ROLE_VERSIONS)
    fields = _Fields(name)
    for key in doc:
        if key not in ("kind", "version", "metadata", "spec"):
            raise fields.fail(
                str(key)[:60], "is not a known field (expected kind, version, metadata, spec)"
            )
    metadata = fields.mapping(doc["metadata"], "metadata", ("name", "description"))
    description = metadata.get("description", "")
    if not isinstance(description, str):
        raise fields.fail("metadata.description", "must be a string")
    spec = fields.mapping(doc.get("spec"), "spec", ("options", "allow", "deny"))
    options_doc = fields.mapping(spec.get("options"), "spec.options", _OPTION_FIELDS)
    options = RoleOptions(
        max_session_ttl=fields.duration(
            options_doc.get("max_session_ttl"), "spec.options.max_session_ttl"
        ),
        port_forwarding=fields.boolean(
            options_doc.get("port_forwarding"), "spec.options.port_forwarding"
        ),
        forward_agent=fields.boolean(
            options_doc.get("forward_agent"), "spec.options.forward_agent"
        ),
        record_session=fields.boolean(
            options_doc.get("record_session"), "spec.options.record_session"
        ),
    )
    return Role(
        name=name,
        options=options,
        allow=_parse_conditions(fields, spec.get("allow"), "spec.allow"),
        deny=_parse_conditions(fields, spec.get("deny"), "spec.deny"),
        description=description,
    )


# --- serializing ----------------------------------------------------------------------


def _labels_to_dict(labels: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    # A single value is written as a plain string, so {'*': '*'} reads back as written.
    return {key: values[0] if len(values) == 1 else list(values) for key, values in labels.items()}


def _conditions_to_dict(conditions: RoleConditions) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if conditions.logins:
        out["logins"] = list(conditions.logins)
    if conditions.node_labels:
        out["node_labels"] = _labels_to_dict(conditions.node_labels)
    if conditions.kubernetes_groups:
        out["kubernetes_groups"] = list(conditions.kubernetes_groups)
    if conditions.kubernetes_users:
        out["kubernetes_users"] = list(conditions.kubernetes_users)
    if conditions.kubernetes_labels:
        out["kubernetes_labels"] = _labels_to_dict(conditions.kubernetes_labels)
    if conditions.app_labels:
        out["app_labels"] = _labels_to_dict(conditions.app_labels)
    if conditions.rules:
        out["rules"] = [
            {"resources": list(rule.resources), "verbs": list(rule.verbs)}
            for rule in conditions.rules
        ]
    return out


def role_to_dict(role: Role) -> dict[str, Any]:
    """The YAML form of ``role``: ``parse_role(role_to_dict(role)) == role``."""
    metadata: dict[str, Any] = {"name": role.name}
    if role.description:
        metadata["description"] = role.description
    options: dict[str, Any] = {}
    if role.options.max_session_ttl is not None:
        options["max_session_ttl"] = format_duration(role.options.max_session_ttl)
    for option in ("port_forwarding", "forward_agent", "record_session"):
        value = getattr(role.options, option)
        if value is not None:
            options[option] = value
    spec: dict[str, Any] = {}
    if options:
        spec["options"] = options
    spec["allow"] = _conditions_to_dict(role.allow)
    spec["deny"] = _conditions_to_dict(role.deny)
    return {"kind": "role", "version": "v1", "metadata": metadata, "spec": spec}


register_kind("role", parse_role, role_to_dict, cls=Role)
