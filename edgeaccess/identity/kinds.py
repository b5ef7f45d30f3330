"""Registers every stored resource kind with :mod:`edgeaccess.identity.resources`.

Import this module once at startup (the auth service and ``edgectl`` do)
so that ``parse_resource`` knows roles, LDAP connectors and trusted clusters.
"""

from __future__ import annotations

from edgeaccess.identity import resources, roles  # noqa: F401  (registers "role")
from edgeaccess.identity.connectors import (
    LDAPConnector,
    ldap_connector_to_dict,
    parse_ldap_connector,
)

# Stored unredacted: the auth service needs the bind password; what admins
# are shown is redacted by the auth service.
resources.register_kind(
    "ldap_connector",
    parse_ldap_connector,
    lambda connector: ldap_connector_to_dict(connector, redact=False),
    cls=LDAPConnector,
)


def login_method_factory(reactor):
    """A function building a login method from a stored connector document."""

    def build(doc: dict):
        from edgeaccess.identity.ldap import LDAPLoginMethod

        return LDAPLoginMethod(parse_ldap_connector(doc), reactor)

    return build
