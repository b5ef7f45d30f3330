"""Test certificates: a cluster CA and identity certificates issued by it."""

from __future__ import annotations

import ipaddress
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

from edgeaccess.pki.keys import generate_private_key
from edgeaccess.pki.x509ca import Identity, create_ca, issue_identity_certificate


def issue_identities(
    specs: Iterable[tuple],
    *,
    cluster: str = "root",
    now: datetime | None = None,
    ttl: timedelta = timedelta(hours=1),
) -> dict[str, Any]:
    """A CA for ``cluster`` and one certificate per spec.

    Each spec is ``(label, Identity, dns_names)`` or ``(label, Identity,
    dns_names, ip_addresses)``. Returns ``{"ca": cert, "ca_key": key,
    label: (key, cert), ...}``.
    """
    now = now or datetime.now(timezone.utc)
    ca_key, ca_cert = create_ca(cluster, now)
    out: dict[str, Any] = {"ca": ca_cert, "ca_key": ca_key}
    for spec in specs:
        label, identity, dns = spec[:3]
        ips = spec[3] if len(spec) > 3 else ()
        key = generate_private_key()
        cert = issue_identity_certificate(
            ca_key, ca_cert, key.public_key(), identity, now=now, ttl=ttl, dns_names=dns,
            ip_addresses=[ipaddress.ip_address(ip) for ip in ips])
        out[label] = (key, cert)
    return out


__all__ = ["Identity", "issue_identities"]
