"""CertificateUserAuthServer in memory: the userauth packets it answers with."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone

import pytest
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import keys, userauth
from twisted.conch.ssh.common import NS, getNS
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from zope.interface import implementer

from edgeaccess.pki.keys import generate_private_key
from edgeaccess.pki.sshca import issue_user_certificate
from edgeaccess.ssh.certauth import (
    MSG_USERAUTH_BANNER,
    CertificateRealm,
    CertificateUserAuthServer,
    SSHCertificateChecker,
)
from edgeaccess.ssh.interfaces import (
    ISessionObserver,
    NullSessionObserver,
    SessionPermissions,
    StaticAuthorizer,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
CERT_ALG = b"ssh-ed25519-cert-v01@openssh.com"


@implementer(ISessionObserver)
class RecordingObserver(NullSessionObserver):
    def __init__(self):
        self.refusals = []

    def auth_refused(self, username, login, peer_address, reason):
        self.refusals.append((username, login, peer_address, reason))


@implementer(IConchUser)
class Avatar:
    def __init__(self, verified, permissions):
        self.verified = verified
        self.permissions = permissions
        self.logged_out = False

    def logout(self):
        self.logged_out = True


class NextService:
    name = b"ssh-connection"

    def serviceStarted(self):
        pass

    def serviceStopped(self):
        pass


class FakeFactory:
    def __init__(self, portal, clock, observer):
        self.portal = portal
        self.clock = clock
        self.observer = observer

    def getService(self, transport, name):
        return NextService


class FakeSocket:
    def getPeer(self):
        return IPv4Address("TCP", "127.0.0.1", 50000)


class FakeTransport:
    sessionID = b"session-id"

    def __init__(self, factory):
        self.factory = factory
        self.transport = FakeSocket()
        self.packets = []
        self.service = None
        self.lost = False

    def isEncrypted(self, direction):
        return True

    def sendPacket(self, message, payload):
        self.packets.append((message, payload))

    def setService(self, service):
        # As SSHTransportBase does: the previous service is stopped.
        if self.service is not None:
            self.service.serviceStopped()
        self.service = service

    def loseConnection(self):
        self.lost = True

    def sendDisconnect(self, code, reason):
        self.lost = True


@pytest.fixture
def setup():
    ca = generate_private_key()
    clock = Clock()
    clock.advance(NOW.timestamp())
    observer = RecordingObserver()
    grants = {("alice", "root"): SessionPermissions(session_ttl=timedelta(minutes=5))}
    portal = Portal(
        CertificateRealm(StaticAuthorizer(grants), Avatar),
        [SSHCertificateChecker(lambda: [ca.public_key()], clock)],
    )
    transport = FakeTransport(FakeFactory(portal, clock, observer))
    server = CertificateUserAuthServer()
    server.transport = transport
    transport.service = server
    server.serviceStarted()
    yield ca, clock, observer, transport, server
    if transport.service is server:
        server.serviceStopped()


def _user(ca, username="alice"):
    key = generate_private_key()
    cert = issue_user_certificate(
        ca, key.public_key(), username=username, principals=["root"], roles=["access"],
        cluster="test", now=NOW, ttl=timedelta(hours=1),
    )
    return key, base64.b64decode(cert.public_bytes().split()[1])


def _request(server, login, alg, blob, key=None):
    if key is None:
        body = b"\x00" + NS(alg) + NS(blob)
    else:
        signed = (
            NS(server.transport.sessionID) + bytes((userauth.MSG_USERAUTH_REQUEST,))
            + NS(login) + NS(b"ssh-connection") + NS(b"publickey") + b"\x01"
            + NS(alg) + NS(blob)
        )
        body = b"\x01" + NS(alg) + NS(blob) + NS(keys.Key(key).sign(signed))
    server.ssh_USERAUTH_REQUEST(NS(login) + NS(b"ssh-connection") + NS(b"publickey") + body)


def test_only_publickey_is_offered(setup):
    _, _, _, transport, server = setup
    assert server.supportedAuthentications == [b"publickey"]
    server.ssh_USERAUTH_REQUEST(NS(b"root") + NS(b"ssh-connection") + NS(b"password") + b"\x00" + NS(b"pw"))
    message, payload = transport.packets[-1]
    assert message == userauth.MSG_USERAUTH_FAILURE
    assert getNS(payload)[0] == b"publickey"


def test_query_with_an_acceptable_certificate_gets_pk_ok(setup):
    ca, _, _, transport, server = setup
    _, blob = _user(ca)
    _request(server, b"root", CERT_ALG, blob)
    assert transport.packets == [(userauth.MSG_USERAUTH_PK_OK, NS(CERT_ALG) + NS(blob))]


def test_signed_request_logs_in_with_the_authorizers_permissions(setup):
    ca, clock, _, transport, server = setup
    key, blob = _user(ca)
    _request(server, b"root", CERT_ALG, blob, key=key)
    assert transport.packets[-1] == (userauth.MSG_USERAUTH_SUCCESS, b"")
    avatar = transport.avatar
    assert avatar.verified.identity.username == "alice"
    assert avatar.permissions.session_ttl == timedelta(minutes=5)
    clock.advance(299)
    assert not transport.lost
    clock.advance(1)
    assert transport.lost  # the session TTL closed the connection


def test_logout_cancels_the_session_ttl(setup):
    ca, clock, _, transport, server = setup
    key, blob = _user(ca)
    _request(server, b"root", CERT_ALG, blob, key=key)
    transport.logoutFunction()
    assert transport.avatar.logged_out
    clock.advance(600)
    assert not transport.lost


def test_client_that_never_authenticates_is_disconnected_after_two_minutes(setup):
    _, clock, _, transport, _ = setup
    clock.advance(119)
    assert not transport.lost
    clock.advance(1)
    assert transport.lost


def test_bare_key_is_refused_and_reported(setup):
    _, _, observer, transport, server = setup
    key = generate_private_key()
    _request(server, b"root", b"ssh-ed25519", keys.Key(key).public().blob())
    assert transport.packets[-1][0] == userauth.MSG_USERAUTH_FAILURE
    assert observer.refusals == [
        (None, "root", "127.0.0.1",
         "ssh-ed25519 is not a certificate algorithm: only OpenSSH user "
         "certificates are accepted")
    ]


def test_refused_certificate_gets_a_banner_with_the_reason(setup):
    ca, _, observer, transport, server = setup
    key, blob = _user(ca, username="mallory")
    _request(server, b"root", CERT_ALG, blob, key=key)
    (banner_type, banner), (failure_type, _) = transport.packets
    assert banner_type == MSG_USERAUTH_BANNER
    assert b"user mallory may not log in as root" in getNS(banner)[0]
    assert failure_type == userauth.MSG_USERAUTH_FAILURE
    assert observer.refusals[0][:3] == ("mallory", "root", "127.0.0.1")


def test_signature_by_another_key_is_refused(setup):
    ca, _, observer, transport, server = setup
    _, blob = _user(ca)
    _request(server, b"root", CERT_ALG, blob, key=generate_private_key())
    assert transport.packets[-1][0] == userauth.MSG_USERAUTH_FAILURE
    assert not hasattr(transport, "avatar")
    assert "does not match the certified key" in observer.refusals[0][3]
