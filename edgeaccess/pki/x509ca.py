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

#: Kinds that serve TLS (the proxy's web port, auth API and tunnel port).
#: Their certificates are server-only (EKU serverAuth), so a proxy's
#: certificate cannot be presented as a caller's.
SERVER_KINDS = ("proxy",)

#: Kinds that only ever call (EKU clientAuth): a user's, node's, admin's or
#: leaf cluster's certificate cannot pose as a server.
CLIENT_KINDS = ("user", "node", "admin", "cluster")

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


def create_web_ca(ca_cert: x509.Certificate, now: datetime, key=None):
    """The web CA of the cluster whose X.509 CA is ``ca_cert``:
    ``(private_key, self-signed certificate)``.

    Browsers verify no Ed25519 signature, so the web port's certificate is
    signed by this ECDSA P-256 CA instead, the one certificate operators
    install in browsers. It bears the cluster CA's subject: its link (see
    :func:`link_web_ca`) is then *self-issued*, which the cluster CA's path
    length 0 allows (RFC 5280, 4.2.1.9), so every client that trusts the
    cluster CA verifies the web port too.
    """
    from cryptography.hazmat.primitives.asymmetric import ec

    key = key or ec.generate_private_key(ec.SECP256R1())
    return key, _web_ca_builder(ca_cert, key.public_key(), now - timedelta(minutes=1),
                                now + CA_TTL, x509.random_serial_number()).sign(
        key, hashes.SHA256())


def link_web_ca(ca_key, ca_cert: x509.Certificate, web_ca_cert: x509.Certificate):
    """The web CA's key certified by the cluster CA: the intermediate the
    web port sends after its own certificate, for clients that trust the
    cluster CA (``edge``, nodes, leaf proxies, curl with the cluster CA).

    Derived, not stored: the same validity as the web CA and a serial
    computed from it, and Ed25519 signs deterministically, so every proxy
    of a cluster derives the same certificate.
    """
    serial = int.from_bytes(hashlib.sha256(b"edgeaccess web CA link\0" + web_ca_cert.public_bytes(
        serialization.Encoding.DER)).digest()[:16], "big") >> 1
    builder = _web_ca_builder(ca_cert, web_ca_cert.public_key(),
                              web_ca_cert.not_valid_before_utc,
                              min(web_ca_cert.not_valid_after_utc, ca_cert.not_valid_after_utc),
                              serial)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    return builder.sign(ca_key, signature_hash(ca_key))


def _web_ca_builder(ca_cert, public_key, not_before, not_after, serial):
    return (
        x509.CertificateBuilder()
        .subject_name(ca_cert.subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


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
    """Sign a certificate for ``identity``.

    Server kinds (:data:`SERVER_KINDS`) get EKU serverAuth and the names
    and addresses they are dialled at (``dns_names``, ``ip_addresses``) in
    the SAN; every other kind gets EKU clientAuth and no SAN.
    """
    server = identity.kind in SERVER_KINDS
    if not server and (dns_names or ip_addresses):
        raise ValueError(f"a {identity.kind} certificate names no hosts")
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
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
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
    return builder.sign(ca_key, signature_hash(ca_key))


def signature_hash(key):
    """The hash a CA key signs with: none for Ed25519 (it hashes itself),
    SHA-256 for the web CA's ECDSA P-256 key."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return hashes.SHA256() if isinstance(key, ec.EllipticCurvePrivateKey) else None


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


def extended_key_usages(cert: x509.Certificate) -> frozenset:
    """The certificate's EKU purposes (empty: the extension is absent)."""
    try:
        return frozenset(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return frozenset()


def is_client_certificate(cert: x509.Certificate) -> bool:
    """Whether ``cert`` may authenticate a caller: EKU clientAuth, and not a
    server kind (certificates issued before the split carried both usages)."""
    if ExtendedKeyUsageOID.CLIENT_AUTH not in extended_key_usages(cert):
        return False
    try:
        return identity_from_certificate(cert).kind not in SERVER_KINDS
    except ValueError:
        return False


@attrs.frozen
class ExpectedServer:
    """Who a client means to talk to: a server of one of ``kinds`` of
    ``cluster``, at ``host`` (the name or address it dialled)."""

    cluster: str
    host: str
    kinds: tuple[str, ...] = SERVER_KINDS


def check_server_certificate(cert: x509.Certificate, expected: ExpectedServer) -> Identity:
    """Check that a server certificate, already verified against the cluster
    CA, is the server the client dialled; return its identity.

    Every client of the cluster calls this (the blocking one after its
    handshake, the Twisted one from the handshake's verify callback):
    EKU serverAuth, the identity's kind and cluster, and the dialled host
    against the SAN (an IP address against IP SANs, a name against DNS
    SANs). Raises :class:`ServerMismatch` saying what is wrong.
    """
    from service_identity import CertificateError, VerificationError
    from service_identity.cryptography import (
        verify_certificate_hostname, verify_certificate_ip_address)

    try:
        identity = identity_from_certificate(cert)
    except ValueError as e:
        raise ServerMismatch(f"its certificate is not a cluster identity ({e})")
    article = "an" if identity.kind[0] in "aeio" else "a"
    what = f"{article} {identity.kind} certificate ({identity.name} of cluster {identity.cluster})"
    if identity.kind not in expected.kinds:
        raise ServerMismatch(f"it presented {what}, not a {' or '.join(expected.kinds)}'s")
    if identity.cluster != expected.cluster:
        raise ServerMismatch(f"it presented {what}, not one of cluster {expected.cluster}")
    if ExtendedKeyUsageOID.SERVER_AUTH not in extended_key_usages(cert):
        raise ServerMismatch(f"it presented {what} that is not for servers")
    host = expected.host.strip("[]")
    try:
        if _is_ip(host):
            verify_certificate_ip_address(cert, host)
        else:
            verify_certificate_hostname(cert, host)
    except (CertificateError, VerificationError):
        raise ServerMismatch(f"its certificate does not name {host}")
    return identity


class ServerMismatch(ValueError):
    """A server certificate is not the one the client expected."""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def ca_cluster_name(ca_cert: x509.Certificate) -> str:
    """The cluster a CA certificate belongs to (its subject's O)."""
    names = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if not names:
        raise ValueError("the CA certificate names no cluster")
    return str(names[0].value)


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
