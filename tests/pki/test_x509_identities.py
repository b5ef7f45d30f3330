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
    assert set(usage) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    assert parsed.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_node_identity_keeps_its_uuid_and_names(ca):
    ca_key, ca_cert = ca
    identity = x509ca.Identity(kind="node", name="web1", cluster="example",
                               uuid="6f1c3c5e-8a51-4d6e-9a8e-1b2c3d4e5f60")
    cert = x509ca.issue_identity_certificate(
        ca_key, ca_cert, keys.generate_private_key().public_key(), identity, now=NOW,
        ttl=timedelta(hours=1), dns_names=["web1.example"], ip_addresses=["127.0.0.1"])
    assert x509ca.identity_from_certificate(cert).uuid == identity.uuid
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["web1.example"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


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
