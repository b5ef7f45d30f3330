"""NodeUser and NodeSession in memory: requests a real client rarely sends."""

from __future__ import annotations

import pwd
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.serialization import ssh
from twisted.conch.error import ConchError
from twisted.conch.interfaces import EnvironmentVariableNotPermitted, ISession
from twisted.conch.ssh.common import NS
from twisted.internet.testing import MemoryReactorClock

from edgeaccess.errors import AccessDenied
from edgeaccess.pki.keys import generate_private_key
from edgeaccess.pki.sshca import issue_user_certificate
from edgeaccess.ssh.certauth import verify_user_certificate
from edgeaccess.ssh.interfaces import SessionPermissions
from edgeaccess.ssh.session import (
    NodeSessionChannel,
    NodeUser,
    lookup_login,
)

NOW = datetime(2026, 3, 1, tzinfo=timezone.utc)


def _avatar(cert=None, ca=None, env_allow=()):
    if cert is None:
        ca = generate_private_key()
        cert = issue_user_certificate(
            ca, generate_private_key().public_key(), username="alice",
            principals=["root"], roles=["access"], cluster="c", now=NOW,
            ttl=timedelta(hours=1),
        )
    verified = verify_user_certificate(
        cert, trusted_ca_keys=[ca.public_key()], login="root",
        peer_address="127.0.0.1", now=NOW.timestamp(),
    )
    ids = iter(f"session-{i}" for i in range(100))
    return NodeUser(
        verified, SessionPermissions(), passwd=pwd.getpwnam("root"), node_name="n1",
        reactor=MemoryReactorClock(), env_allow=env_allow, new_session_id=lambda: next(ids),
    )


class FakeProcess:
    pid = 1234

    def __init__(self):
        self.signals = []

    def signalProcess(self, name):
        self.signals.append(name)


def test_signal_request_is_delivered_to_the_process():
    session = ISession(_avatar())
    session.pty = FakeProcess()
    assert session.signal("INT") == 1
    assert session.signal("NOT-A-SIGNAL") == 0
    assert session.pty.signals == ["INT"]


def test_signal_channel_request_reaches_the_session():
    avatar = _avatar()
    channel = NodeSessionChannel(avatar=avatar)
    channel._session.pty = FakeProcess()
    assert channel.requestReceived(b"signal", NS(b"TERM")) == 1
    assert channel._session.pty.signals == ["TERM"]


def test_agent_forwarding_request_is_refused():
    channel = NodeSessionChannel(avatar=_avatar())
    assert channel.requestReceived(b"auth-agent-req@openssh.com", b"") == 0


def test_session_channel_offers_openssh_window():
    channel = NodeSessionChannel(avatar=_avatar())
    assert channel.localWindowSize == 2 * 1024 * 1024


def test_environment_allow_list():
    session = ISession(_avatar(env_allow=["EXTRA"]))
    for name in (b"LANG", b"LC_ALL", b"TERM", b"EXTRA"):
        session.setEnv(name, b"v")
    for name in (b"LD_PRELOAD", b"PATH", b"HOME", b"BASH_ENV"):
        with pytest.raises(EnvironmentVariableNotPermitted):
            session.setEnv(name, b"x")
    assert session.client_env == {"LANG": "v", "LC_ALL": "v", "TERM": "v", "EXTRA": "v"}


def test_pty_refused_when_the_certificate_lacks_permit_pty():
    ca, key = generate_private_key(), generate_private_key()
    cert = (
        ssh.SSHCertificateBuilder().public_key(key.public_key()).serial(1)
        .type(ssh.SSHCertificateType.USER).key_id(b"alice").valid_principals([b"root"])
        .valid_after(0).valid_before(2**40).sign(ca)
    )
    session = ISession(_avatar(cert=cert, ca=ca))
    with pytest.raises(ConchError, match="permit a PTY"):
        session.getPty(b"xterm", (24, 80, 0, 0), [])


def test_each_session_gets_its_own_id():
    avatar = _avatar()
    first, second = ISession(avatar), ISession(avatar)
    assert first.info.session_id != second.info.session_id
    assert first.info.username == "alice" and first.info.login == "root"


def test_unknown_login_is_refused():
    with pytest.raises(AccessDenied, match="login no-such-login-x does not exist on node n1"):
        lookup_login("no-such-login-x", "n1")
    assert lookup_login("root", "n1").pw_uid == 0
