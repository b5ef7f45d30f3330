"""X.509 identity certificates and the CA pin."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeaccess.httpclient import pin_of_pem
from edgeaccess.pki import keys, x509ca

NOW = datetime(2027, 1, 15, 8, 0, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def ca():
    return x509ca.create_ca("example", NOW)


def test_identity_round_trips_through_a_certificate(ca):
    ca_key, ca_cert = ca
    key = keys.generate_private_key()
    identity = x509ca.Identity(kind="user", name="alice", cluster="example",
                               roles=("access", "dev"), logins=("root",),
                               traits={"logins": ["root"], "teams": ["web"]})
    cert = x509ca.issue_identity_certificate(ca_key, ca_cert, key.public_key(), identity,
                                             now=NOW, ttl=timedelta(hours=12))
    parsed = x509ca.load_certificate_pem(x509ca.certificate_pem(cert))
    parsed.verify_directly_issued_by(ca_cert)
    assert x509ca.identity_from_certificate(parsed) == identity
    assert x509ca.identity_from_certificate(parsed).traits == identity.traits
    assert parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert parsed.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "example"
    assert parsed.subject.get_attributes_for_oid(
        NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "user"
    assert parsed.not_valid_before_utc == NOW - timedelta(minutes=1)
    assert parsed.not_valid_after_utc == NOW + timedelta(hours=12)
    usage = parsed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.CLIENT_AUTH}  # a user never serves TLS
    assert parsed.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_node_identity_keeps_its_uuid_and_is_client_only(ca):
    ca_key, ca_cert = ca
    identity = x509ca.Identity(kind="node", name="web1", cluster="example",
                               uuid="6f1c3c5e-8a51-4d6e-9a8e-1b2c3d4e5f60")
    cert = x509ca.issue_identity_certificate(
        ca_key, ca_cert, keys.generate_private_key().public_key(), identity, now=NOW,
        ttl=timedelta(hours=1))
    assert x509ca.identity_from_certificate(cert).uuid == identity.uuid
    assert x509ca.extended_key_usages(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert x509ca.is_client_certificate(cert)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    with pytest.raises(ValueError, match="names no hosts"):
        x509ca.issue_identity_certificate(
            ca_key, ca_cert, keys.generate_private_key().public_key(), identity, now=NOW,
            ttl=timedelta(hours=1), dns_names=["web1.example"])


def test_proxy_identity_is_server_only_and_names_its_addresses(ca):
    ca_key, ca_cert = ca
    identity = x509ca.Identity(kind="proxy", name="proxy.example", cluster="example")
    cert = x509ca.issue_identity_certificate(
        ca_key, ca_cert, keys.generate_private_key().public_key(), identity, now=NOW,
        ttl=timedelta(hours=1), dns_names=["proxy.example"], ip_addresses=["127.0.0.1"])
    assert x509ca.extended_key_usages(cert) == {ExtendedKeyUsageOID.SERVER_AUTH}
    assert not x509ca.is_client_certificate(cert)  # never a caller
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["proxy.example"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    expect = x509ca.ExpectedServer(cluster="example", host="proxy.example")
    assert x509ca.check_server_certificate(cert, expect) == identity
    assert x509ca.check_server_certificate(
        cert, x509ca.ExpectedServer(cluster="example", host="127.0.0.1")) == identity
    assert x509ca.ca_cluster_name(ca_cert) == "example"


@pytest.mark.parametrize("kind, cluster, host, usages, message", [
    ("user", "example", "proxy.example", "both", "a user certificate"),
    ("node", "example", "proxy.example", "both", "a node certificate"),
    ("admin", "example", "proxy.example", "both", "an admin certificate"),
    ("cluster", "example", "proxy.example", "both", "a cluster certificate"),
    ("proxy", "other", "proxy.example", "server", "not one of cluster example"),
    ("proxy", "example", "evil.example", "server", "does not name evil.example"),
    ("proxy", "example", "127.0.0.2", "server", "does not name 127.0.0.2"),
    ("proxy", "example", "proxy.example", "client", "not for servers"),
])
def test_a_server_certificate_must_be_the_expected_proxy(ca, kind, cluster, host, usages,
                                                         message):
    from cryptography.x509.oid import ExtendedKeyUsageOID as EKU

    from tests.pkitools import issue_legacy_certificate

    ca_key, ca_cert = ca
    identity = x509ca.Identity(kind=kind, name="x", cluster=cluster)
    _, cert = issue_legacy_certificate({"ca": ca_cert, "ca_key": ca_key}, identity,
                                       dns=("proxy.example",), ips=("127.0.0.1",), now=NOW)
    if usages != "both":
        # Re-sign with one usage only (same identity and names).
        builder = x509.CertificateBuilder().subject_name(cert.subject).issuer_name(
            cert.issuer).public_key(cert.public_key()).serial_number(cert.serial_number
        ).not_valid_before(cert.not_valid_before_utc).not_valid_after(cert.not_valid_after_utc)
        for ext in cert.extensions:
            if isinstance(ext.value, x509.ExtendedKeyUsage):
                ext = x509.Extension(ext.oid, ext.critical, x509.ExtendedKeyUsage(
                    [EKU.SERVER_AUTH if usages == "server" else EKU.CLIENT_AUTH]))
            builder = builder.add_extension(ext.value, ext.critical)
        cert = builder.sign(ca_key, None)
    expect = x509ca.ExpectedServer(cluster="example", host=host)
    with pytest.raises(x509ca.ServerMismatch, match=message.replace(".", r"\.")):
        x509ca.check_server_certificate(cert, expect)


def test_certificate_never_outlives_its_ca(ca):
    ca_key, ca_cert = ca
    cert = x509ca.issue_identity_certificate(
        ca_key, ca_cert, keys.generate_private_key().public_key(),
        x509ca.Identity(kind="proxy", name="p", cluster="example"),
        now=NOW, ttl=timedelta(days=100000))
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc


def test_ca_certificate_is_a_ca_for_ten_years(ca):
    _, ca_cert = ca
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca_cert.not_valid_after_utc - ca_cert.not_valid_before_utc == \
        x509ca.CA_TTL + timedelta(minutes=1)
    ca_cert.verify_directly_issued_by(ca_cert)


def test_certificate_without_identity_is_refused(ca):
    _, ca_cert = ca
    with pytest.raises(ValueError, match="no edgeaccess identity"):
        x509ca.identity_from_certificate(ca_cert)


def test_malformed_identity_extension_is_refused(ca):
    ca_key, ca_cert = ca
    cert = (x509.CertificateBuilder()
            .subject_name(ca_cert.subject).issuer_name(ca_cert.subject)
            .public_key(keys.generate_private_key().public_key())
            .serial_number(1).not_valid_before(NOW).not_valid_after(NOW + timedelta(hours=1))
            .add_extension(x509.UnrecognizedExtension(
                x509ca.IDENTITY_OID, json.dumps({"kind": "wizard"}).encode()), critical=False)
            .sign(ca_key, None))
    with pytest.raises(ValueError, match="malformed"):
        x509ca.identity_from_certificate(cert)


def test_unknown_identity_kind_is_refused():
    with pytest.raises(ValueError):
        x509ca.Identity(kind="wizard", name="x", cluster="example")


def test_ca_pin_is_sha256_of_the_subject_public_key_info(ca):
    _, ca_cert = ca
    pin = x509ca.ca_pin(ca_cert)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", pin)
    assert pin_of_pem(x509ca.certificate_pem(ca_cert)) == pin
    assert x509ca.ca_pin(x509ca.create_ca("example", NOW)[1]) != pin


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_ca_pin_agrees_with_openssl(ca, tmp_path):
    _, ca_cert = ca
    pem = tmp_path / "ca.pem"
    pem.write_bytes(x509ca.certificate_pem(ca_cert))
    spki_pem = subprocess.run(["openssl", "x509", "-in", str(pem), "-noout", "-pubkey"],
                              capture_output=True, check=True, timeout=30).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=spki_pem,
                         capture_output=True, check=True, timeout=30).stdout
    assert x509ca.ca_pin(ca_cert) == "sha256:" + hashlib.sha256(der).hexdigest()


def test_ca_pin_does_not_change_when_the_ca_is_reissued_with_the_same_key(ca):
    ca_key, ca_cert = ca
    _, reissued = x509ca.create_ca("example", NOW + timedelta(days=1), key=ca_key)
    assert x509ca.ca_pin(reissued) == x509ca.ca_pin(ca_cert)
    assert x509ca.fingerprint(reissued) != x509ca.fingerprint(ca_cert)
