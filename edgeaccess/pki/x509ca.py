"""The cluster's X.509 certificate authority and the identities it certifies.

Every TLS peer in a cluster (user, node, proxy, admin, leaf cluster)
holds a certificate from this CA. The identity is encoded in the
certificate itself, so a service reads who it talks to from the TLS
handshake and never from a message:

- Subject CN = the identity's name, O = the cluster name, OU = the kind;
- an extension with our private OID holding the whole identity as JSON.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from datetime import datetime, timedelta

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeaccess.pki.keys import generate_private_key

#: Private OID arc for the identity extension (1.3.6.1.4.1 is IANA's
#: enterprise arc; 59999 is unassigned, used here as a private number).
IDENTITY_OID = x509.ObjectIdentifier("1.3.6.1.4.1.59999.1.1")

#: ``app``: a user's certificate for one app session (``uuid`` = the session id),
#: accepted only on that app's host by the app proxy.
KINDS = ("user", "node", "proxy", "admin", "cluster", "app")

CA_TTL = timedelta(days=3650)


@attrs.frozen
class Identity:
    """Who holds a certificate."""

    kind: str
    name: str
    cluster: str
    roles: tuple[str, ...] = ()
    logins: tuple[str, ...] = ()
    uuid: str | None = None
    traits: dict = attrs.field(factory=dict, hash=False)

    def __attrs_post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown identity kind {self.kind!r}")

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "name": self.name,
            "cluster": self.cluster,
            "roles": list(self.roles),
            "logins": list(self.logins),
            "uuid": self.uuid,
            "traits": self.traits,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Identity":
        return cls(
            kind=data["kind"],
            name=data["name"],
            cluster=data["cluster"],
            roles=tuple(data.get("roles") or ()),
            logins=tuple(data.get("logins") or ()),
            uuid=data.get("uuid"),
            traits=dict(data.get("traits") or {}),
        )


def create_ca(cluster_name: str, now: datetime, key=None):
    """A new self-signed CA for ``cluster_name``: ``(private_key, certificate)``."""
    key = key or generate_private_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster_name} edgeaccess CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_name),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + CA_TTL)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, None)
    )
    return key, cert


def issue_identity_certificate(
    ca_key,
    ca_cert: x509.Certificate,
    public_key,
    identity: Identity,
    *,
    now: datetime,
    ttl: timedelta,
    dns_names=(),
    ip_addresses=(),
) -> x509.Certificate:
    """Sign a client+server certificate for ``identity``."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, identity.name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.cluster),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.kind),
        ]
    )
    payload = json.dumps(identity.to_dict(), sort_keys=True).encode("utf-8")
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(min(now + ttl, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(x509.UnrecognizedExtension(IDENTITY_OID, payload), critical=False)
    )
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, None)


def identity_from_certificate(cert: x509.Certificate) -> Identity:
    """The identity a certificate carries. Does not verify the certificate:
    the TLS handshake against the cluster CA does that."""
    try:
        ext = cert.extensions.get_extension_for_oid(IDENTITY_OID)
    except x509.ExtensionNotFound:
        raise ValueError("certificate carries no edgeaccess identity")
    try:
        return Identity.from_dict(json.loads(ext.value.value))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"certificate identity is malformed: {e}")


def ca_pin(ca_cert: x509.Certificate) -> str:
    """``sha256:`` + hex SHA-256 of the CA's SubjectPublicKeyInfo."""
    spki = ca_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_certificate_pem(data: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(data)


def load_certificates_pem(data: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(data)


def fingerprint(cert: x509.Certificate) -> str:
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()
