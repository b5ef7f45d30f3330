"""Access decisions from a user's roles and traits. Pure: no I/O, no clock.

The rules, as in Teleport:

- Nothing is allowed unless a role allows it; a matching ``deny`` in any role wins over
  every ``allow``.
- A login to a node is allowed only by a role that allows *both* the login and the node's
  labels; allowing the login in one role and the node in another is not enough.
- Templates (``{{internal.logins}}``, ``{{internal.NAME}}``, ``{{external.NAME}}``) in
  logins, Kubernetes groups and label values expand to each value of the user's trait of that
  name (both namespaces read the same ``traits`` mapping); a missing trait expands to
  nothing. Trait values that are empty or hold whitespace or control characters are dropped.
- Label selectors ``{key: [values]}`` match a resource's labels when every key is present
  with one of the values; a value ``*`` matches any value of the key, and ``{'*': '*'}``
  matches everything. An empty selector matches nothing. A selector key whose values all
  expanded to nothing matches nothing (so a ``deny`` that depends on a missing trait does
  not apply).

Options are merged across roles:

- ``max_session_ttl``: the shortest wins; a role without one counts as 30 hours.
- ``port_forwarding`` and ``forward_agent``: allowed only if at least one role sets the
  option to ``true`` and no role sets it to ``false`` (roles that say nothing do not count).
- ``record_session``: recorded unless every role explicitly sets ``false`` (unset means
  ``true``), i.e. one role that requires recording is enough.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta

from twisted.logger import Logger

from edgeaccess.errors import AccessDenied
from edgeaccess.identity.roles import (
    DEFAULT_MAX_SESSION_TTL,
    WILDCARD,
    Role,
    RoleConditions,
    is_safe_value,
    parse_template,
)

_log = Logger()

Traits = Mapping[str, Sequence[str]]
Labels = Mapping[str, Sequence[str]]


def expand_template(value: str, traits: Traits) -> list[str]:
    """Expand one login, group or label value for a user with ``traits``.

    A literal value expands to itself; a template to ``prefix + v + suffix`` for each safe
    value ``v`` of its trait, in order, without duplicates; a missing trait to nothing.
    """
    try:
        template = parse_template(value)
    except ValueError:
        return []  # roles are validated when parsed; a bad template grants nothing
    if template is None:
        return [value]
    trait_values = traits.get(template.name, ())
    if isinstance(trait_values, str):
        trait_values = (trait_values,)
    expanded: list[str] = []
    for trait_value in trait_values:
        if not isinstance(trait_value, str) or not is_safe_value(trait_value):
            continue
        candidate = template.prefix + trait_value + template.suffix
        if candidate not in expanded:
            expanded.append(candidate)
    return expanded


def _expand_all(values: Iterable[str], traits: Traits) -> tuple[str, ...]:
    out: list[str] = []
    for value in values:
        for expanded in expand_template(value, traits):
            if expanded not in out:
                out.append(expanded)
    return tuple(out)


def _expand_labels(labels: Labels, traits: Traits) -> dict[str, tuple[str, ...]]:
    return {key: _expand_all(values, traits) for key, values in labels.items()}


def _expand_conditions(conditions: RoleConditions, traits: Traits) -> RoleConditions:
    return RoleConditions(
        logins=_expand_all(conditions.logins, traits),
        node_labels=_expand_labels(conditions.node_labels, traits),
        kubernetes_groups=_expand_all(conditions.kubernetes_groups, traits),
        kubernetes_users=_expand_all(conditions.kubernetes_users, traits),
        kubernetes_labels=_expand_labels(conditions.kubernetes_labels, traits),
        app_labels=_expand_labels(conditions.app_labels, traits),
        rules=conditions.rules,
    )


def match_labels(selector: Labels, labels: Mapping[str, str]) -> bool:
    """True if the (expanded) ``selector`` matches a resource's ``labels``."""
    if not selector:
        return False
    if tuple(selector.get(WILDCARD, ())) == (WILDCARD,):
        return True
    for key, values in selector.items():
        if key not in labels:
            return False
        if WILDCARD not in values and labels[key] not in values:
            return False
    return True


def describe_labels(labels: Mapping[str, str]) -> str:
    """``env=prod, team=web`` (sorted), for messages."""
    if not labels:
        return "no labels"
    return ", ".join(f"{key}={labels[key]}" for key in sorted(labels))


class AccessChecker:
    """Answers what a user with ``roles`` and ``traits`` may do.

    Templates are expanded once, when the checker is built; build a new checker when the
    user's roles or traits change.
    """

    def __init__(self, roles: Iterable[Role], traits: Traits | None = None) -> None:
        self.roles: tuple[Role, ...] = tuple(roles)
        self.traits: dict[str, tuple[str, ...]] = {
            name: (values,) if isinstance(values, str) else tuple(values)
            for name, values in (traits or {}).items()
        }
        self._allow = [(r.name, _expand_conditions(r.allow, self.traits)) for r in self.roles]
        self._deny = [(r.name, _expand_conditions(r.deny, self.traits)) for r in self.roles]

    @property
    def role_names(self) -> list[str]:
        """Names of the roles, in the given order."""
        return [role.name for role in self.roles]

    # --- logins and nodes -------------------------------------------------------------

    def _denied_logins(self) -> set[str]:
        return {login for _name, deny in self._deny for login in deny.logins}

    def allowed_logins(self) -> list[str]:
        """Every login some role allows and no role denies (the SSH certificate principals)."""
        denied = self._denied_logins()
        logins: list[str] = []
        for _name, allow in self._allow:
            for login in allow.logins:
                if login not in denied and login not in logins:
                    logins.append(login)
        return logins

    def _node_denied_by(self, labels: Mapping[str, str]) -> str | None:
        for name, deny in self._deny:
            if match_labels(deny.node_labels, labels):
                return name
        return None

    def check_login_to_node(self, login: str, node_labels: Mapping[str, str]) -> None:
        """Allow ``login`` on a node with ``node_labels``, or raise AccessDenied saying why.

        :raises AccessDenied: the login or the node is denied by a role, the login is not
            allowed by any role, no role allows a node with these labels, or no single role
            allows both.
        """
        for name, deny in self._deny:
            if login in deny.logins:
                raise AccessDenied(f"login {login!r} is denied by role {name!r}")
        denied_by = self._node_denied_by(node_labels)
        if denied_by is not None:
            raise AccessDenied(
                f"access to a node with {describe_labels(node_labels)} is denied by role "
                f"{denied_by!r}"
            )
        login_allowed = node_allowed = False
        for _name, allow in self._allow:
            has_login = login in allow.logins
            has_node = match_labels(allow.node_labels, node_labels)
            if has_login and has_node:
                return
            login_allowed = login_allowed or has_login
            node_allowed = node_allowed or has_node
        if not login_allowed:
            raise AccessDenied(f"login {login!r} is not allowed by any role")
        if not node_allowed:
            raise AccessDenied(
                f"no role allows access to a node with {describe_labels(node_labels)}"
            )
        raise AccessDenied(
            f"no role allows login {login!r} on a node with {describe_labels(node_labels)}"
        )

    def can_access_node(self, node_labels: Mapping[str, str]) -> bool:
        """True if some role allows a node with these labels and none denies it (``edge ls``).

        Logins are not considered, as in Teleport's node listing.
        """
        if self._node_denied_by(node_labels) is not None:
            return False
        return any(match_labels(allow.node_labels, node_labels) for _n, allow in self._allow)

    # --- Kubernetes and apps ----------------------------------------------------------

    def can_access_kube(self, labels: Mapping[str, str]) -> bool:
        """True if some role allows a Kubernetes cluster with ``labels`` and none denies it."""
        if any(match_labels(deny.kubernetes_labels, labels) for _n, deny in self._deny):
            return False
        return any(match_labels(allow.kubernetes_labels, labels) for _n, allow in self._allow)

    def kubernetes_groups(self, kube_labels: Mapping[str, str] | None = None) -> list[str]:
        """Kubernetes groups to impersonate: allowed by some role, denied by none.

        :param kube_labels: if given, only roles that allow a cluster with these labels
            contribute their groups (and an empty list is returned if the cluster is denied).
        """
        return self._kubernetes_values("kubernetes_groups", kube_labels)

    def kubernetes_users(self, kube_labels: Mapping[str, str] | None = None) -> list[str]:
        """Kubernetes users to impersonate: allowed by some role, denied by none.

        :param kube_labels: as for :meth:`kubernetes_groups`.
        """
        return self._kubernetes_values("kubernetes_users", kube_labels)

    def _kubernetes_values(self, field: str, kube_labels: Mapping[str, str] | None) -> list[str]:
        if kube_labels is not None and not self.can_access_kube(kube_labels):
            return []
        denied = {value for _n, deny in self._deny for value in getattr(deny, field)}
        values: list[str] = []
        for _name, allow in self._allow:
            if kube_labels is not None and not match_labels(allow.kubernetes_labels, kube_labels):
                continue
            for value in getattr(allow, field):
                if value not in denied and value not in values:
                    values.append(value)
        return values

    def can_access_app(self, labels: Mapping[str, str]) -> bool:
        """True if some role allows an app with ``labels`` and none denies it."""
        if any(match_labels(deny.app_labels, labels) for _n, deny in self._deny):
            return False
        return any(match_labels(allow.app_labels, labels) for _n, allow in self._allow)

    # --- administrative rules ---------------------------------------------------------

    def check_action(self, resource: str, verb: str) -> None:
        """Allow ``verb`` on ``resource`` (``edgectl`` and API calls), or raise AccessDenied.

        :raises AccessDenied: a deny rule matches, or no allow rule does.
        """
        for name, deny in self._deny:
            if any(rule.matches(resource, verb) for rule in deny.rules):
                raise AccessDenied(f"{verb} on {resource} is denied by role {name!r}")
        for _name, allow in self._allow:
            if any(rule.matches(resource, verb) for rule in allow.rules):
                return
        raise AccessDenied(f"no role allows {verb} on {resource}")

    def can(self, resource: str, verb: str) -> bool:
        """:meth:`check_action` as a boolean."""
        try:
            self.check_action(resource, verb)
        except AccessDenied:
            return False
        return True

    # --- options ----------------------------------------------------------------------

    def max_session_ttl(self) -> timedelta:
        """The shortest ``max_session_ttl`` of the roles (30 hours for a role without one).

        With no roles at all, zero: nothing can be granted.
        """
        if not self.roles:
            return timedelta(0)
        return min(
            role.options.max_session_ttl or DEFAULT_MAX_SESSION_TTL for role in self.roles
        )

    def _permissive_option(self, option: str) -> bool:
        values = [getattr(role.options, option) for role in self.roles]
        return True in values and False not in values

    def port_forwarding(self) -> bool:
        """True if one role sets ``port_forwarding: true`` and none sets it ``false``."""
        return self._permissive_option("port_forwarding")

    def forward_agent(self) -> bool:
        """True if one role sets ``forward_agent: true`` and none sets it ``false``."""
        return self._permissive_option("forward_agent")

    def record_session(self) -> bool:
        """False only if every role explicitly sets ``record_session: false``."""
        if not self.roles:
            return True
        return any(role.options.record_session is not False for role in self.roles)
