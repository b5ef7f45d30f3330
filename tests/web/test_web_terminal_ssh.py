"""The web terminal's SSH client in memory: the host certificate check (table),
and the Conch client with its certificate against the proxy's own Conch SSH
server over iosim (key exchange with a host certificate, user certificate
auth, a refused session channel reported in the user's words)."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone

import pytest
from twisted.internet.task import Clock
from twisted.test import iosim

from edgeaccess.pki import keys, sshca
from edgeaccess.proxy.sshproxy import make_proxy_ssh_factory
from edgeaccess.web.sshclient import HostCertificateRefused, SSHTerminal, check_host_certificate

NOW = datetime(2027, 1, 15, 8, 0, tzinfo=timezone.utc)


def _line(key) -> str:
    return keys.public_key_openssh(key.public_key()).decode()


def _blob(cert) -> bytes:
    return base64.b64decode(cert.public_bytes().split()[1])


@pytest.fixture(scope="module")
def cas():
    return {"host": keys.generate_private_key(), "other": keys.generate_private_key(),
            "user": keys.generate_private_key()}


def _host_cert(ca, host_key, principals=("web1", "web1.prod"), now=NOW):
    return sshca.issue_host_certificate(ca, host_key.public_key(), host_id="u1",
                                        principals=list(principals), now=now,
                                        ttl=timedelta(hours=1))


def test_a_valid_host_certificate_gives_the_key_that_signs(cas):
    host = keys.generate_private_key()
    key = check_host_certificate(_blob(_host_cert(cas["host"], host)),
                                 ca_keys=[_line(cas["host"])], principal="web1.prod", now=NOW)
    assert key.public().toString("OPENSSH").split()[:2] == \
        keys.public_key_openssh(host.public_key()).split()[:2]


@pytest.mark.parametrize("case, message", [
    ("other CA", "unknown CA"),
    ("other principal", "not for web1.prod"),
    ("expired", "not valid now"),
    ("user certificate", "user certificate"),
    ("plain key", "not a host certificate"),
    ("garbage", "not a host certificate"),
])
def test_untrusted_host_certificates_are_refused(cas, case, message):
    host = keys.generate_private_key()
    blob = {
        "other CA": lambda: _blob(_host_cert(cas["other"], host)),
        "other principal": lambda: _blob(_host_cert(cas["host"], host, ("web2", "web2.prod"))),
        "expired": lambda: _blob(_host_cert(cas["host"], host, now=NOW - timedelta(hours=2))),
        "user certificate": lambda: _blob(sshca.issue_user_certificate(
            cas["host"], host.public_key(), username="web1", principals=["web1.prod"],
            roles=[], cluster="prod", now=NOW, ttl=timedelta(hours=1))),
        "plain key": lambda: base64.b64decode(keys.public_key_openssh(host.public_key()).split()[1]),
        "garbage": lambda: b"\x00\x00\x00\x03abc",
    }[case]()
    with pytest.raises(HostCertificateRefused, match=message):
        check_host_certificate(blob, ca_keys=[_line(cas["host"])], principal="web1.prod",
                               now=NOW)


class _Sink:
    def __init__(self):
        self.ends, self.out = [], []

    def output(self, data):
        self.out.append(data)

    def exited(self, status, signal):
        pass

    def closed(self, reason):
        self.ends.append(reason)


def _terminal(cas, *, trusted_host_ca):
    from twisted.conch.ssh import keys as conch_keys

    clock = Clock()
    clock.advance(NOW.timestamp())
    host = keys.generate_private_key()
    server_factory = make_proxy_ssh_factory(
        host, _host_cert(cas["host"], host, ("proxy", "proxy.prod")),
        [cas["user"].public_key()], router=None, clock=clock)
    server_factory.doStart()
    user = keys.generate_private_key()
    cert = sshca.issue_user_certificate(cas["user"], user.public_key(), username="alice",
                                        principals=["root"], roles=["access"], cluster="prod",
                                        now=NOW, ttl=timedelta(hours=1))
    sink = _Sink()
    terminal = SSHTerminal(
        sink, login="root", key=conch_keys.Key(user), certificate_blob=_blob(cert),
        host_check=lambda blob: check_host_certificate(
            blob, ca_keys=[_line(trusted_host_ca)], principal="proxy.prod", now=NOW))
    outcome = []
    terminal.ready.addBoth(outcome.append)
    client = terminal.factory().buildProtocol(None)
    server = server_factory.buildProtocol(None)
    _, _, pump = iosim.connectedServerAndClient(lambda: server, lambda: client)
    pump.flush()
    return terminal, sink, outcome


def test_the_client_authenticates_with_its_certificate_over_a_host_certificate(cas):
    # The proxy's SSH server accepts the certificate, then refuses a session
    # channel: authentication and the host certificate key exchange worked.
    terminal, sink, outcome = _terminal(cas, trusted_host_ca=cas["host"])
    assert not terminal.host_refusal and not terminal.refused
    assert outcome and "refused the session" in str(outcome[0].value)


def test_a_node_with_an_untrusted_host_certificate_gets_nothing(cas):
    terminal, sink, outcome = _terminal(cas, trusted_host_ca=cas["other"])
    assert outcome and "not who it should be" in str(outcome[0].value)
    assert "unknown CA" in terminal.host_refusal
