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


__all__ = ["Identity", "issue_identities", "issue_legacy_certificate"]


def issue_legacy_certificate(issued: dict, identity: Identity, *, dns=(), ips=(),
                             now: datetime | None = None, ttl: timedelta = timedelta(hours=1)):
    """``(key, cert)``: ``identity`` signed by ``issued``'s CA in the shape the
    CA gave every identity before server identities: EKU clientAuth *and*
    serverAuth, with the given SANs. Data dirs and logins from then still hold
    such certificates; clients must refuse them as servers by their kind."""
    import json

    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from edgeaccess.pki.x509ca import IDENTITY_OID

    now = now or datetime.now(timezone.utc)
    ca_key, ca_cert = issued["ca_key"], issued["ca"]
    key = generate_private_key()
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, identity.name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.cluster),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.kind),
    ])
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.UnrecognizedExtension(
            IDENTITY_OID, json.dumps(identity.to_dict(), sort_keys=True).encode()),
            critical=False)
    )
    sans = [x509.DNSName(n) for n in dns] + [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, None)
