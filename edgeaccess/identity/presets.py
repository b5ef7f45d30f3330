"""The roles every cluster has from its first start: ``access``, ``editor``, ``auditor``.

They are written as documents and go through :func:`~edgeaccess.identity.roles.parse_role`,
so they obey exactly the rules administrators' roles obey.

- ``access``: the user's own logins (``{{internal.logins}}``) on every node, every app and
  every Kubernetes cluster (as the user's ``{{internal.kubernetes_groups}}``); sessions are
  recorded; port and agent forwarding are allowed (as Teleport's preset does, since those
  options need an explicit ``true``, see :mod:`edgeaccess.identity.rbac`).
- ``editor``: manages users, roles, join tokens, connectors, trusted clusters and locks; no
  node, app or Kubernetes access.
- ``auditor``: reads the audit log and session recordings; nothing else.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from edgeaccess.identity.roles import Role, parse_role

_log = Logger()

_ALL_VERBS = ["list", "read", "create", "update", "delete"]


def _role(name: str, description: str, spec: dict[str, Any]) -> Role:
    return parse_role(
        {
            "kind": "role",
            "version": "v1",
            "metadata": {"name": name, "description": description},
            "spec": spec,
        }
    )


ACCESS_ROLE = _role(
    "access",
    "Access to every node, app and Kubernetes cluster with the user's own logins",
    {
        "options": {"port_forwarding": True, "forward_agent": True, "record_session": True},
        "allow": {
            "logins": ["{{internal.logins}}"],
            "node_labels": {"*": "*"},
            "app_labels": {"*": "*"},
            "kubernetes_labels": {"*": "*"},
            "kubernetes_groups": ["{{internal.kubernetes_groups}}"],
        },
    },
)

EDITOR_ROLE = _role(
    "editor",
    "Manages users, roles, tokens, connectors, trusted clusters and locks",
    {
        "allow": {
            "rules": [
                {
                    "resources": ["user", "role", "token", "connector", "trusted_cluster", "lock"],
                    "verbs": _ALL_VERBS,
                }
            ]
        }
    },
)

AUDITOR_ROLE = _role(
    "auditor",
    "Reads the audit log and session recordings",
    {"allow": {"rules": [{"resources": ["event", "session"], "verbs": ["list", "read"]}]}},
)

#: The preset roles by name.
PRESET_ROLES: dict[str, Role] = {
    role.name: role for role in (ACCESS_ROLE, EDITOR_ROLE, AUDITOR_ROLE)
}
