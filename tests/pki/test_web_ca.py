"""The web CA: an ECDSA P-256 CA that browsers can verify, linked to the
cluster's Ed25519 X.509 CA so that every client trusting that CA verifies
the web port as before."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import crypto
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from edgeaccess import tls
from edgeaccess.pki import x509ca
from edgeaccess.pki.authority import CertificateAuthority
from tests.test_tls_options import Recorder

NOW = datetime(2027, 1, 15, 8, 0, 0, tzinfo=timezone.utc)
PROXY = x509ca.Identity(kind="proxy", name="proxy.test", cluster="example")


@pytest.fixture(scope="module")
def authority(tmp_path_factory):
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca") / "ca",
                                               "example", NOW)


def web_certificate(authority):
    key = ec.generate_private_key(ec.SECP256R1())
    cert, chain = authority.sign_web(key.public_key(), PROXY, now=NOW, ttl=timedelta(days=30),
                                     dns_names=["proxy.test", "*.proxy.test"],
                                     ip_addresses=["127.0.0.1"])
    return key, cert, chain


def verifies(cert, chain, anchors) -> bool:
    """OpenSSL's verdict, as every client here (Python's ssl, pyOpenSSL, curl) reaches it."""
    store = crypto.X509Store()
    for anchor in anchors:
        store.add_cert(crypto.X509.from_cryptography(anchor))
    store.set_time(NOW + timedelta(hours=1))
    context = crypto.X509StoreContext(store, crypto.X509.from_cryptography(cert),
                                      chain=[crypto.X509.from_cryptography(c) for c in chain])
    try:
        context.verify_certificate()
        return True
    except crypto.X509StoreContextError:
        return False


def test_the_web_ca_is_ecdsa_p256_and_bears_the_cluster_ca_subject(authority):
    web_ca = authority.web_ca_cert
    assert isinstance(web_ca.public_key(), ec.EllipticCurvePublicKey)
    assert web_ca.public_key().curve.name == "secp256r1"
    assert web_ca.subject == web_ca.issuer == authority.tls_ca_cert.subject
    assert "web_ca" in authority.fingerprints()
    assert authority.fingerprints()["web_ca"] != authority.fingerprints()["tls_ca"]


def test_the_web_certificate_is_ecdsa_signed_for_browsers(authority):
    _, cert, chain = web_certificate(authority)
    assert cert.signature_algorithm_oid == x509ca.x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256
    assert chain == [authority.web_ca_link]
    # A browser trusts the web CA alone and never needs the Ed25519 link.
    assert verifies(cert, [], [authority.web_ca_cert])
    assert x509ca.check_server_certificate(
        cert, x509ca.ExpectedServer(cluster="example", host="app.proxy.test")) == PROXY


def test_clients_trusting_the_cluster_ca_verify_the_web_port_through_the_link(authority):
    _, cert, chain = web_certificate(authority)
    assert verifies(cert, chain, [authority.tls_ca_cert])
    # Without the link the cluster CA alone does not reach the web certificate.
    assert not verifies(cert, [], [authority.tls_ca_cert])


def test_another_clusters_cas_verify_nothing(authority, tmp_path):
    other = CertificateAuthority.load_or_create(tmp_path / "other", "example", NOW)
    _, cert, chain = web_certificate(authority)
    assert not verifies(cert, chain, [other.tls_ca_cert])
    assert not verifies(cert, chain, [other.web_ca_cert])
    # A link made by another cluster's CA for our web CA does not verify either.
    forged = x509ca.link_web_ca(other.tls_ca_key, other.tls_ca_cert, authority.web_ca_cert)
    assert not verifies(cert, [forged], [authority.tls_ca_cert])


def test_the_web_ca_is_kept_and_its_link_derived_alike(authority, tmp_path):
    directory = tmp_path / "ca"
    first = CertificateAuthority.load_or_create(directory, "example", NOW)
    again = CertificateAuthority.load_or_create(directory, "example", NOW + timedelta(days=3))
    assert again.web_ca_cert == first.web_ca_cert
    assert again.web_ca_link.public_bytes(x509ca.serialization.Encoding.DER) == \
        first.web_ca_link.public_bytes(x509ca.serialization.Encoding.DER)


def test_a_data_dir_from_before_the_web_ca_gets_one_at_its_next_start(tmp_path):
    directory = tmp_path / "ca"
    first = CertificateAuthority.load_or_create(directory, "example", NOW)
    (directory / "web_ca.crt").unlink()
    (directory / "web_ca.key").unlink()
    again = CertificateAuthority.load_or_create(directory, "example", NOW)
    assert again.pin == first.pin
    assert again.web_ca_cert is not None and again.web_ca_cert != first.web_ca_cert
    assert (directory / "web_ca.crt").exists()


def test_a_cluster_client_handshakes_with_the_web_port_through_the_link(tmp_path):
    """The web port's TLS options, as the proxy builds them, against the
    client options every cluster client uses (one CA, no web CA needed)."""
    now = datetime.now(timezone.utc)  # OpenSSL checks validity at the real time here
    authority = CertificateAuthority.load_or_create(tmp_path / "ca", "example", now)
    key = ec.generate_private_key(ec.SECP256R1())
    cert, chain = authority.sign_web(key.public_key(), PROXY, now=now, ttl=timedelta(days=1),
                                     dns_names=["proxy.test"])
    cases = (([authority.tls_ca_cert], chain, b"hello"),
             ([authority.web_ca_cert], chain, b"hello"),
             ([authority.tls_ca_cert], [], b""))  # no link sent: the cluster CA cannot verify
    for anchors, sent_chain, expected in cases:
        server_options = tls.server_options(key, cert, [authority.tls_ca_cert], chain=sent_chain,
                                            client_certificates="optional")
        client_options = tls.client_options("proxy.test", anchors, cluster="example")
        clock = MemoryReactorClock()
        server_app, client_app = Recorder(), Recorder()
        server = TLSMemoryBIOFactory(server_options, False,
                                     Factory.forProtocol(lambda: server_app),
                                     clock=clock).buildProtocol(None)
        client = TLSMemoryBIOFactory(client_options, True,
                                     Factory.forProtocol(lambda: client_app),
                                     clock=clock).buildProtocol(None)
        _, _, pump = iosim.connectedServerAndClient(lambda: server, lambda: client)
        client.write(b"hello")
        for _ in range(3):
            clock.advance(0)
            pump.flush()
        assert server_app.received == expected
