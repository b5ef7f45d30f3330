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


class _Connection:
    """What a session channel calls on its SSH connection, recorded."""

    def __init__(self) -> None:
        self.calls: list = []

    def sendRequest(self, channel, kind, data, wantReply=0):  # noqa: N802
        self.calls.append(("request", kind))

    def sendExtendedData(self, channel, kind, data):  # noqa: N802
        self.calls.append(("stderr", data))

    def sendClose(self, channel):  # noqa: N802
        self.calls.append(("close",))


class _SlowAudit:
    """An observer whose session.start is not durable yet (a stalled disk)."""

    def __init__(self) -> None:
        from twisted.internet.defer import Deferred

        self.durable = Deferred()

    def session_started(self, session, kind):
        return self.durable

    def exec_started(self, session, command):
        return None


def test_a_client_cannot_fill_memory_while_its_session_waits_for_the_audit():
    avatar = _avatar()
    avatar.observer = _SlowAudit()
    spawned = []
    channel = NodeSessionChannel(avatar=avatar)
    channel.conn = _Connection()
    channel.remoteWindowLeft = channel.remoteMaxPacket = 1 << 20
    channel._session._spawn = lambda *args: spawned.append(args)
    channel._session._environment = lambda: {}  # (no TCP transport here)
    channel.max_held_bytes = 1000
    assert channel.requestReceived(b"exec", NS(b"cat")) == 1  # accepted; the program waits
    channel.dataReceived(b"x" * 600)
    assert channel.conn.calls == [] and channel.buf == b"x" * 600  # held
    channel.dataReceived(b"y" * 600)  # past the bound: refused, nothing kept
    assert channel.buf == b""
    assert ("request", b"exit-status") in channel.conn.calls
    assert any(call[0] == "stderr" and b"too slow" in call[1] for call in channel.conn.calls)
    assert channel.conn.calls[-1] == ("close",)
    channel.dataReceived(b"z" * 10)
    avatar.observer.durable.callback(None)  # the disk came back: too late
    assert spawned == [] and channel.client is None and channel.buf == b""
