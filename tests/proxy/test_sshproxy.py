"""The proxy's SSH service pieces, in memory: avatar, checker, factory."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone

import pytest
from twisted.conch.error import ConchError, ValidPublicKey
from twisted.conch.ssh import connection
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.forwarding import packOpen_direct_tcpip
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from edgeaccess.errors import CertificateInvalid
from edgeaccess.pki.keys import generate_private_key
from edgeaccess.pki.sshca import (
    issue_host_certificate,
    issue_user_certificate,
    user_identity_from_certificate,
)
from edgeaccess.proxy.router import Router
from edgeaccess.proxy.sshproxy import (
    NO_SESSION_MESSAGE,
    ProxyAvatar,
    ProxyCertificateChecker,
    make_proxy_ssh_factory,
)
from edgeaccess.ssh.certauth import CertificateCredentials, VerifiedCertificate
from edgeaccess.ssh.forwarding import DirectTCPIPChannel, ForwardingSSHConnection
from edgeaccess.ssh.interfaces import SessionPermissions

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def clock_at(when: datetime) -> Clock:
    clock = Clock()
    clock.advance(when.timestamp())
    return clock


def cert_credentials(cert, login: str, signature=None, sig_data=None):
    algorithm, blob = cert.public_bytes().split()[:2]
    return CertificateCredentials(
        username=login, algorithm=algorithm, blob=base64.b64decode(blob),
        sig_data=sig_data, signature=signature, peer_address="127.0.0.1",
    )


def user_cert(ca, principals=("root",)):
    return issue_user_certificate(
        ca, generate_private_key().public_key(), username="alice",
        principals=list(principals), roles=["access"], cluster="example",
        now=NOW, ttl=timedelta(hours=1),
    )


def avatar_with(router) -> ProxyAvatar:
    ca = generate_private_key()
    cert = user_cert(ca)
    verified = VerifiedCertificate(
        certificate=cert, identity=user_identity_from_certificate(cert), login="root",
        peer_address="127.0.0.1", force_command=None,
    )
    return ProxyAvatar(verified, SessionPermissions(port_forwarding=True), router)


def make_router(nodes):
    reactor = MemoryReactorClock()
    router = Router("example", lambda name: succeed(nodes.get(name)), reactor=reactor)
    return router, reactor


def direct_tcpip(host: str, port: int = 22) -> bytes:
    return packOpen_direct_tcpip((host, port), ("127.0.0.1", 40000))


def test_session_channel_is_refused_with_a_message():
    avatar = avatar_with(make_router({})[0])
    with pytest.raises(ConchError) as raised:
        avatar.lookupChannel(b"session", 1000, 1000, b"")
    assert raised.value.args == (NO_SESSION_MESSAGE, connection.OPEN_ADMINISTRATIVELY_PROHIBITED)


def test_other_channel_types_are_unknown():
    avatar = avatar_with(make_router({})[0])
    with pytest.raises(ConchError) as raised:
        avatar.lookupChannel(b"x11", 1000, 1000, b"")
    assert raised.value.args[1] == connection.OPEN_UNKNOWN_CHANNEL_TYPE


def test_remote_port_forwarding_is_refused():
    avatar = avatar_with(make_router({})[0])
    assert avatar.gotGlobalRequest(b"tcpip-forward", NS(b"0.0.0.0") + b"\0\0\0\x50") == 0


def test_direct_tcpip_to_unknown_node_fails_with_the_router_message():
    avatar = avatar_with(make_router({})[0])
    results = []
    avatar.lookupChannel(b"direct-tcpip", 1000, 1000, direct_tcpip("ghost.example")).addErrback(
        results.append
    )
    assert results[0].value.args == (
        "node ghost not found in cluster example", connection.OPEN_CONNECT_FAILED
    )


def test_direct_tcpip_to_a_node_dials_the_node_and_yields_a_splice_channel():
    router, reactor = make_router({"web1": {"name": "web1", "uuid": "u", "address": "10.1.1.1:3022"}})
    avatar = avatar_with(router)
    results = []
    avatar.lookupChannel(b"direct-tcpip", 5000, 1000, direct_tcpip("web1.example")).addBoth(
        results.append
    )
    host, port, factory, _timeout, _bind = reactor.tcpClients[0]
    assert (host, port) == ("10.1.1.1", 3022)
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    assert isinstance(results[0], DirectTCPIPChannel)
    assert results[0].remoteWindowLeft == 5000


def test_checker_accepts_any_jump_login_for_a_valid_certificate():
    ca = generate_private_key()
    checker = ProxyCertificateChecker(lambda: [ca.public_key()], clock_at(NOW))
    failures = []
    checker.requestAvatarId(cert_credentials(user_cert(ca), "laptop-user")).addErrback(
        failures.append
    )
    # No signature yet: "this certificate would do", whatever the login.
    assert failures[0].check(ValidPublicKey)


@pytest.mark.parametrize(
    "make_cert, when, error",
    [
        (lambda ca, other: user_cert(other), NOW, CertificateInvalid),
        (lambda ca, other: user_cert(ca), NOW + timedelta(hours=2), CertificateInvalid),
    ],
    ids=["untrusted CA", "expired"],
)
def test_checker_still_refuses_bad_certificates(make_cert, when, error):
    ca, other = generate_private_key(), generate_private_key()
    checker = ProxyCertificateChecker(lambda: [ca.public_key()], clock_at(when))
    failures = []
    checker.requestAvatarId(cert_credentials(make_cert(ca, other), "root")).addErrback(
        failures.append
    )
    assert failures[0].check(error)


def test_factory_presents_the_host_certificate_and_forwarding_connection():
    host_ca, host_key = generate_private_key(), generate_private_key()
    host_cert = issue_host_certificate(
        host_ca, host_key.public_key(), host_id="proxy", principals=["proxy.example"],
        now=NOW, ttl=timedelta(hours=1),
    )
    factory = make_proxy_ssh_factory(
        host_key, host_cert, [generate_private_key().public_key()],
        make_router({})[0], clock_at(NOW),
    )
    assert b"ssh-ed25519-cert-v01@openssh.com" in factory.publicKeys
    assert factory.services[b"ssh-connection"] is ForwardingSSHConnection
