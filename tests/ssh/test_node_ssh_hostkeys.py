"""Host certificate keys for Conch factories (edgeaccess.ssh.hostkeys)."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone

import pytest
from twisted.conch.ssh import keys

from edgeaccess.pki.keys import generate_private_key
from edgeaccess.pki.sshca import issue_host_certificate, issue_user_certificate
from edgeaccess.ssh.hostkeys import HostCertificateKey, host_keys

NOW = datetime(2026, 3, 1, tzinfo=timezone.utc)
CERT_ALG = b"ssh-ed25519-cert-v01@openssh.com"


def _host_cert(ca, key):
    return issue_host_certificate(
        ca, key.public_key(), host_id="uuid", principals=["node1"], now=NOW,
        ttl=timedelta(days=1),
    )


def test_certificate_key_sends_the_certificate_and_signs_with_the_host_key():
    ca, key = generate_private_key(), generate_private_key()
    cert = _host_cert(ca, key)
    cert_key = HostCertificateKey(key, cert)
    assert cert_key.blob() == base64.b64decode(cert.public_bytes().split()[1])
    assert cert_key.supportedSignatureAlgorithms() == [CERT_ALG]
    signature = cert_key.sign(b"exchange hash", signatureType=CERT_ALG)
    plain = keys.Key(key).public()
    assert plain.verify(signature, b"exchange hash")
    assert not plain.verify(signature, b"another hash")


def test_certificate_of_another_key_is_rejected():
    ca = generate_private_key()
    cert = _host_cert(ca, generate_private_key())
    with pytest.raises(ValueError, match="not for this host key"):
        HostCertificateKey(generate_private_key(), cert)


def test_user_certificate_is_not_a_host_certificate():
    ca, key = generate_private_key(), generate_private_key()
    cert = issue_user_certificate(
        ca, key.public_key(), username="u", principals=["root"], roles=[],
        cluster="c", now=NOW, ttl=timedelta(hours=1),
    )
    with pytest.raises(ValueError, match="not a host certificate"):
        HostCertificateKey(key, cert)


def test_factory_keys_offer_the_certificate_first_then_the_plain_key():
    ca, key = generate_private_key(), generate_private_key()
    public, private = host_keys(key, _host_cert(ca, key))
    assert list(private) == [CERT_ALG, b"ssh-ed25519"]
    assert list(public) == [CERT_ALG, b"ssh-ed25519"]
    assert public[b"ssh-ed25519"].blob() == keys.Key(key).public().blob()
    public, private = host_keys(key)
    assert list(private) == [b"ssh-ed25519"]
