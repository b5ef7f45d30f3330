"""Registers every stored resource kind with :mod:`edgeaccess.identity.resources`.

Import this module once at startup (the auth service and ``edgectl`` do)
so that ``parse_resource`` knows roles, LDAP connectors and trusted clusters.

It also builds the login method of a stored ``ldap_connector``
(:func:`login_method_factory`), as a :class:`ConnectorLogin` that remembers
the document it was built from (so a replaced connector is noticed) and
serialises the logins of one user (so the lock-out count cannot be raced).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock

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

# Dropped when folding a login name: accents and other combining marks,
# invisible format characters, controls and separators.
_DROPPED_CATEGORIES = frozenset({"Mn", "Mc", "Me", "Cf", "Cc", "Zs", "Zl", "Zp"})


def login_name_key(username: str) -> str:
    """A fixed-size key naming every spelling a directory may take for one user.

    Directories compare ``uid`` with caseIgnoreMatch and RFC 4518 string
    preparation: OpenLDAP finds ``uid=alice`` for ``ALICE``, `` alice``,
    ``alice\\u00a0``, full-width ``Ａｌｉｃｅ`` or ``alİce``.  A lock-out kept per
    exact spelling could be walked around by changing it, so the spelling is
    folded hard (compatibility forms, case, marks, spaces and invisible
    characters removed).  Folding too much only makes two names share one
    lock-out count; folding too little would be a bypass.
    """
    text = unicodedata.normalize("NFKD", username.casefold())
    kept = "".join(
        ch for ch in text
        if unicodedata.category(ch) not in _DROPPED_CATEGORIES and not ch.isspace()
    )
    folded = unicodedata.normalize("NFKC", kept).casefold()
    return hashlib.sha256(folded.encode("utf-8")).hexdigest()[:32]


def canonical_login_name(username: str, traits: Mapping[str, Iterable[str]]) -> str:
    """The name a user logged in by an external directory is known by.

    The directory's own spelling when one of the user's trait values (say
    ``uid`` mapped to ``logins``) folds to the same key as ``username``;
    otherwise ``username`` in NFKC form, stripped and lower-cased.
    """
    key = login_name_key(username)
    for values in traits.values():
        for value in values:
            if isinstance(value, str) and value and login_name_key(value) == key:
                return value
    return unicodedata.normalize("NFKC", username).strip().lower()


class ConnectorLogin:
    """The login method of one stored connector document.

    :param doc: the stored (unredacted) connector document it was built from.
    :param method: an object with ``authenticate(username, password) ->
        Deferred[ExternalIdentity]`` (an :class:`~edgeaccess.identity.ldap.LDAPLoginMethod`).
    """

    def __init__(self, doc: dict, method: Any) -> None:
        self.doc = doc
        self.method = method
        self._locks: dict[str, DeferredLock] = {}

    def authenticate(self, username: str, password: str) -> Deferred:
        """Delegate to the login method."""
        return self.method.authenticate(username, password)

    @asynccontextmanager
    async def one_at_a_time(self, key: str):
        """Run the body alone among the logins of ``key`` (in this process)."""
        lock = self._locks.setdefault(key, DeferredLock())
        await lock.acquire()
        try:
            yield
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._locks.pop(key, None)


from edgeaccess.cluster.trusted import (  # noqa: E402
    TrustedCluster,
    parse_trusted_cluster,
    trusted_cluster_to_dict,
)

resources.register_kind(
    "trusted_cluster", parse_trusted_cluster, trusted_cluster_to_dict, cls=TrustedCluster
)


def login_method_factory(reactor) -> Callable[[dict], ConnectorLogin]:
    """A function building a login method from a stored connector document."""

    def build(doc: dict) -> ConnectorLogin:
        from edgeaccess.identity.ldap import LDAPLoginMethod

        return ConnectorLogin(doc, LDAPLoginMethod(parse_ldap_connector(doc), reactor))

    return build
