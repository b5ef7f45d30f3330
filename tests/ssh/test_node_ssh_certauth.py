"""Certificate checks of edgeaccess.ssh.certauth, in memory with a fake clock."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import ssh
from twisted.conch.error import ValidPublicKey
from twisted.conch.ssh import keys
from twisted.conch.ssh.common import NS
from twisted.internet.task import Clock

from edgeaccess.errors import AccessDenied, CertificateInvalid
from edgeaccess.pki.keys import generate_private_key, public_key_openssh
from edgeaccess.pki.sshca import issue_host_certificate, issue_user_certificate
from edgeaccess.ssh.certauth import (
    CertificateCredentials,
    CertificateRealm,
    SSHCertificateChecker,
    parse_certificate_blob,
    verify_session_signature,
    verify_user_certificate,
)
from edgeaccess.ssh.interfaces import SessionPermissions, StaticAuthorizer

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
CERT_ALG = b"ssh-ed25519-cert-v01@openssh.com"


def _blob(cert) -> bytes:
    return base64.b64decode(cert.public_bytes().split()[1])


@pytest.fixture
def ca():
    return generate_private_key()


@pytest.fixture
def user_key():
    return generate_private_key()


def _issue(ca, user_key, **overrides):
    args = dict(
        username="alice", principals=["root", "ubuntu"], roles=["access"],
        cluster="test", now=NOW, ttl=timedelta(hours=1),
    )
    args.update(overrides)
    return issue_user_certificate(ca, user_key.public_key(), **args)


def _verify(cert, ca, login="root", peer="127.0.0.1", at=NOW):
    return verify_user_certificate(
        cert, trusted_ca_keys=[ca.public_key()], login=login, peer_address=peer,
        now=at.timestamp(),
    )


def test_valid_certificate_yields_identity_and_login(ca, user_key):
    verified = _verify(_issue(ca, user_key), ca, login="ubuntu")
    assert verified.identity.username == "alice"
    assert verified.identity.roles == ("access",)
    assert verified.login == "ubuntu"
    assert verified.force_command is None


@pytest.mark.parametrize(
    "at, message",
    [
        (NOW - timedelta(minutes=2), "not yet valid"),
        (NOW + timedelta(hours=1), "expired"),
        (NOW + timedelta(hours=5), "expired"),
    ],
)
def test_certificate_outside_its_validity_is_refused(ca, user_key, at, message):
    with pytest.raises(CertificateInvalid, match=message):
        _verify(_issue(ca, user_key), ca, at=at)


def test_certificate_valid_until_the_last_second(ca, user_key):
    cert = _issue(ca, user_key)
    _verify(cert, ca, at=NOW + timedelta(hours=1) - timedelta(seconds=1))


def test_certificate_of_untrusted_ca_is_refused(ca, user_key):
    cert = _issue(generate_private_key(), user_key)
    with pytest.raises(CertificateInvalid, match="trusted user CA"):
        _verify(cert, ca)


def test_trusted_ca_may_be_given_as_openssh_line(ca, user_key):
    verify_user_certificate(
        _issue(ca, user_key), trusted_ca_keys=[public_key_openssh(ca) + b" comment"],
        login="root", peer_address="127.0.0.1", now=NOW.timestamp(),
    )


def test_host_certificate_is_not_a_user_certificate(ca, user_key):
    cert = issue_host_certificate(
        ca, user_key.public_key(), host_id="h", principals=["root"], now=NOW,
        ttl=timedelta(hours=1),
    )
    with pytest.raises(CertificateInvalid, match="not a user certificate"):
        _verify(cert, ca)


def test_login_must_be_a_principal(ca, user_key):
    with pytest.raises(AccessDenied, match="login admin is not among"):
        _verify(_issue(ca, user_key), ca, login="admin")


def test_tampered_certificate_signature_is_refused(ca, user_key):
    blob = bytearray(_blob(_issue(ca, user_key)))
    blob[-1] ^= 1  # inside the CA's signature
    cert = parse_certificate_blob(CERT_ALG, bytes(blob))
    with pytest.raises(CertificateInvalid, match="signature is invalid"):
        _verify(cert, ca)


@pytest.mark.parametrize(
    "sources, peer, allowed",
    [
        ("127.0.0.0/8", "127.0.0.1", True),
        ("10.0.0.1,192.0.2.0/24", "192.0.2.77", True),
        ("10.0.0.1, 10.0.0.2", "10.0.0.2", True),
        ("192.0.2.0/24", "127.0.0.1", False),
        ("192.0.2.0/24", "::ffff:192.0.2.5", True),
        ("2001:db8::/32", "2001:db8::1", True),
        ("2001:db8::/32", "127.0.0.1", False),
    ],
)
def test_source_address_is_checked_against_the_peer(ca, user_key, sources, peer, allowed):
    cert = _issue(ca, user_key, critical_options={"source-address": sources})
    if allowed:
        _verify(cert, ca, peer=peer)
    else:
        with pytest.raises(AccessDenied, match="not allowed by the certificate"):
            _verify(cert, ca, peer=peer)


def test_force_command_is_returned_for_the_session(ca, user_key):
    cert = _issue(ca, user_key, critical_options={"force-command": "/usr/bin/uptime"})
    assert _verify(cert, ca).force_command == "/usr/bin/uptime"


def test_unknown_critical_option_is_refused(ca, user_key):
    cert = _issue(ca, user_key, critical_options={"no-touch-required": ""})
    with pytest.raises(CertificateInvalid, match="no-touch-required"):
        _verify(cert, ca)


def test_blob_of_another_type_than_its_algorithm_is_refused(ca, user_key):
    blob = _blob(_issue(ca, user_key))
    with pytest.raises(CertificateInvalid, match="does not match"):
        parse_certificate_blob(b"ecdsa-sha2-nistp256-cert-v01@openssh.com", blob)
    with pytest.raises(CertificateInvalid, match="unsupported"):
        parse_certificate_blob(b"ssh-ed25519", blob)
    with pytest.raises(CertificateInvalid, match="malformed"):
        parse_certificate_blob(CERT_ALG, blob[:40])


def test_session_signature_must_be_made_by_the_certified_key(ca, user_key):
    cert = _issue(ca, user_key)
    data = b"session id and userauth request"
    good = keys.Key(user_key).sign(data)
    verify_session_signature(cert, CERT_ALG, good, data)
    with pytest.raises(CertificateInvalid, match="does not match the certified key"):
        verify_session_signature(cert, CERT_ALG, good, data + b"!")
    other = keys.Key(generate_private_key()).sign(data)
    with pytest.raises(CertificateInvalid, match="does not match the certified key"):
        verify_session_signature(cert, CERT_ALG, other, data)


def test_session_signature_of_another_algorithm_is_refused(ca):
    ecdsa_key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        ssh.SSHCertificateBuilder().public_key(ecdsa_key.public_key()).serial(1)
        .type(ssh.SSHCertificateType.USER).key_id(b"alice").valid_principals([b"root"])
        .valid_after(0).valid_before(2**40).sign(ca)
    )
    alg = b"ecdsa-sha2-nistp256-cert-v01@openssh.com"
    data = b"payload"
    verify_session_signature(cert, alg, keys.Key(ecdsa_key).sign(data), data)
    forged = NS(b"ssh-ed25519") + NS(b"\x00" * 64)
    with pytest.raises(CertificateInvalid, match="algorithm does not match"):
        verify_session_signature(cert, alg, forged, data)


def _credentials(cert, user_key, signed=True, login="root"):
    data = b"to be signed"
    return CertificateCredentials(
        username=login, algorithm=CERT_ALG, blob=_blob(cert),
        sig_data=data if signed else None,
        signature=keys.Key(user_key).sign(data) if signed else None,
        peer_address="127.0.0.1",
    )


def test_checker_uses_the_current_ca_list_and_clock(ca, user_key):
    trusted: list = []
    clock = Clock()
    clock.advance(NOW.timestamp())
    checker = SSHCertificateChecker(lambda: list(trusted), clock)
    creds = _credentials(_issue(ca, user_key), user_key)
    failure = checker.requestAvatarId(creds)
    assert isinstance(_failure_value(failure), CertificateInvalid)
    trusted.append(ca.public_key())  # e.g. a CA rotation adds the new key
    verified = _result(checker.requestAvatarId(creds))
    assert verified.identity.username == "alice"
    clock.advance(3600)
    assert "expired" in str(_failure_value(checker.requestAvatarId(creds)))


def test_checker_answers_an_unsigned_query_with_valid_public_key(ca, user_key):
    clock = Clock()
    clock.advance(NOW.timestamp())
    checker = SSHCertificateChecker(lambda: [ca.public_key()], clock)
    creds = _credentials(_issue(ca, user_key), user_key, signed=False)
    assert isinstance(_failure_value(checker.requestAvatarId(creds)), ValidPublicKey)
    bad = _credentials(_issue(ca, user_key), user_key, signed=False, login="nobody")
    assert isinstance(_failure_value(checker.requestAvatarId(bad)), AccessDenied)


def test_realm_builds_the_avatar_with_the_authorizers_permissions(ca, user_key):
    permissions = SessionPermissions(port_forwarding=True, roles=("access",))
    built = []

    class Avatar:
        def logout(self):
            pass

    def factory(verified, perms):
        built.append((verified.login, perms))
        return Avatar()

    realm = CertificateRealm(StaticAuthorizer({("alice", "root"): permissions}), factory)
    verified = _verify(_issue(ca, user_key), ca)
    interface, avatar, logout = _result(realm.requestAvatar(verified, None, _iconch()))
    assert isinstance(avatar, Avatar)
    assert built == [("root", permissions)]
    denied = _verify(_issue(ca, user_key), ca, login="ubuntu")
    assert isinstance(_failure_value(realm.requestAvatar(denied, None, _iconch())), AccessDenied)


def _iconch():
    from twisted.conch.interfaces import IConchUser

    return IConchUser


def _result(d):
    results = []
    d.addBoth(results.append)
    assert results and not hasattr(results[0], "raiseException"), results
    return results[0]


def _failure_value(d):
    results = []
    d.addBoth(results.append)
    assert results and hasattr(results[0], "value"), results
    return results[0].value
