"""The cluster's CAs on disk: created once, 0600 secrets, reused, never mixed up."""

from __future__ import annotations

import stat
from datetime import datetime, timedelta, timezone

import pytest

from edgeaccess.pki import keys, sshca, x509ca
from edgeaccess.pki.authority import CertificateAuthority

NOW = datetime(2027, 1, 15, 8, 0, 0, tzinfo=timezone.utc)
SECRETS = ("ssh_user_ca", "ssh_host_ca", "tls_ca.key", "web_ca.key")
PUBLIC = ("ssh_user_ca.pub", "ssh_host_ca.pub", "tls_ca.crt", "web_ca.crt", "cluster_name")


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_use_creates_the_three_cas(tmp_path):
    directory = tmp_path / "ca"
    authority = CertificateAuthority.load_or_create(directory, "example", NOW)
    assert sorted(p.name for p in directory.iterdir()) == sorted(SECRETS + PUBLIC)
    for name in SECRETS:
        assert _mode(directory / name) == 0o600, name
    for name in PUBLIC:
        assert _mode(directory / name) & 0o022 == 0, name  # nobody else writes them
    assert _mode(directory) == 0o700
    assert (directory / "cluster_name").read_text().strip() == "example"
    assert (directory / "ssh_user_ca.pub").read_text().strip() == authority.user_ca_public_line
    assert authority.user_ca_public_line != authority.host_ca_public_line
    assert authority.pin == x509ca.ca_pin(x509ca.load_certificate_pem(
        (directory / "tls_ca.crt").read_bytes()))


def test_second_use_reuses_the_same_keys(tmp_path):
    directory = tmp_path / "ca"
    first = CertificateAuthority.load_or_create(directory, "example", NOW)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    again = CertificateAuthority.load_or_create(directory, "example", NOW + timedelta(days=3))
    assert again.pin == first.pin
    assert again.user_ca_public_line == first.user_ca_public_line
    assert again.host_ca_public_line == first.host_ca_public_line
    assert again.fingerprints() == first.fingerprints()
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before

    # what the reloaded CA signs verifies against the first one's public key
    cert = again.sign_user(keys.generate_private_key().public_key(), username="alice",
                           principals=["root"], roles=["access"], cluster="example",
                           now=NOW, ttl=timedelta(hours=1))
    cert.verify_cert_signature()
    assert keys.public_key_openssh(cert.signature_key()).decode() == first.user_ca_public_line


def test_another_clusters_directory_is_refused(tmp_path):
    directory = tmp_path / "ca"
    CertificateAuthority.load_or_create(directory, "example", NOW)
    with pytest.raises(ValueError, match="'example'.*not 'other'"):
        CertificateAuthority.load_or_create(directory, "other", NOW)


def test_signed_host_certificate_names_the_host_ca(tmp_path):
    authority = CertificateAuthority.load_or_create(tmp_path / "ca", "example", NOW)
    cert = authority.sign_host(keys.generate_private_key().public_key(), host_id="h1",
                               principals=["h1", "h1.example"], now=NOW,
                               ttl=timedelta(hours=1))
    assert keys.public_key_openssh(cert.signature_key()).decode() == \
        authority.host_ca_public_line
    assert sshca.load_certificate(cert.public_bytes()).valid_principals == [b"h1",
                                                                            b"h1.example"]


def test_secret_files_are_written_owner_only_even_over_an_open_file(tmp_path):
    path = tmp_path / "secret"
    path.write_text("old")
    path.chmod(0o644)
    keys.write_secret(path, b"new")
    assert path.read_bytes() == b"new"
    assert _mode(path) == 0o600
    assert not (tmp_path / "secret.tmp").exists()
