"""The edgenode service logic in memory: heartbeats keep the role cache (and
so the node's access decisions) current, failures are retried, the cache
survives restarts, new user CAs are trusted, certificates are renewed.

The auth service is a fake ``Client``; the thread pool runs calls inline;
the clock is a ``MemoryReactorClock``. Logins go through the real SSH
portal of the node with real certificates.
"""

from __future__ import annotations

import base64
import json
import random
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import keys as conch_keys
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.python.usage import UsageError

from edgeaccess import errors
from edgeaccess.node.identity import NodeIdentity
from edgeaccess.node.service import NodeService, _advertised_hosts, backoff_delay
from edgeaccess.node.tap import parse_labels
from edgeaccess.pki import keys
from edgeaccess.pki.sshca import issue_host_certificate, issue_user_certificate
from edgeaccess.ssh.certauth import CertificateCredentials

NOW = datetime(2026, 5, 4, 12, 0, tzinfo=timezone.utc)
CLUSTER = "home"
CERT_ALG = b"ssh-ed25519-cert-v01@openssh.com"
INTERVAL = 5.0


def role(name: str, env: str) -> dict:
    return {"kind": "role", "version": "v1", "metadata": {"name": name},
            "spec": {"allow": {"logins": ["root"], "node_labels": {"env": [env]}}}}


class SyncThreadPool:
    """Runs "threaded" calls inline, reporting like twisted's ThreadPool."""

    def callInThreadWithCallback(self, on_result, function, *args, **kwargs):  # noqa: N802
        try:
            result = function(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class Reactor(MemoryReactorClock):
    """A memory reactor whose thread pool runs calls at once."""

    def __init__(self) -> None:
        super().__init__()
        self.running = True
        self.stopped = False
        self._pool = SyncThreadPool()

    def getThreadPool(self):  # noqa: N802
        return self._pool

    def callFromThread(self, function, *args, **kwargs):  # noqa: N802
        function(*args, **kwargs)

    def stop(self) -> None:
        self.stopped = True


class FakeAuth:
    """The auth API as the node sees it through ``Client``."""

    def __init__(self, host_ca, user_ca_lines) -> None:
        self.host_ca = host_ca
        self.user_ca_lines = list(user_ca_lines)
        self.roles = [role("dev", "dev")]
        self.down = False
        self.calls: list[tuple[str, str]] = []
        self.heartbeats: list[dict] = []
        self.renewals: list[dict] = []
        self.now = NOW

    def _check(self, method: str, path: str) -> None:
        self.calls.append((method, path))
        if self.down:
            raise errors.EdgeError("cannot reach 127.0.0.1:3025: connection refused")

    def post(self, path, body):
        self._check("POST", path)
        if path == "/v1/nodes/heartbeat":
            self.heartbeats.append(body)
            return {}
        if path == "/v1/nodes/renew":
            self.renewals.append(body)
            valid_before = self.now + timedelta(hours=24)
            cert = issue_host_certificate(
                self.host_ca, load_ssh_public_key(body["ssh_public_key"].encode()),
                host_id="uuid-1", principals=["n1", f"n1.{CLUSTER}"], now=self.now,
                ttl=timedelta(hours=24))
            return {"ssh_host_certificate": cert.public_bytes().decode(),
                    "tls_certificate": "renewed-tls-certificate",
                    "valid_before": valid_before.isoformat().replace("+00:00", "Z")}
        raise AssertionError(path)

    def get(self, path):
        self._check("GET", path)
        assert path == "/v1/nodes/roles"
        return {"roles": list(self.roles), "ssh_user_ca": list(self.user_ca_lines)}


class FakePort:
    def __init__(self) -> None:
        self.listening = True

    def getHost(self):  # noqa: N802
        return IPv4Address("TCP", "127.0.0.1", 40022)

    def stopListening(self):  # noqa: N802
        self.listening = False


class Node(NodeService):
    """The real service talking to :class:`FakeAuth`."""

    fake: FakeAuth

    def _client(self):
        return self.fake


@pytest.fixture
def pki(tmp_path):
    host_ca, user_ca = keys.generate_private_key(), keys.generate_private_key()
    host_key = keys.generate_private_key()
    host_cert = issue_host_certificate(host_ca, host_key.public_key(), host_id="uuid-1",
                                       principals=["n1", f"n1.{CLUSTER}"], now=NOW,
                                       ttl=timedelta(hours=24))
    identity = NodeIdentity(
        uuid="uuid-1", name="n1", cluster=CLUSTER, auth_server="127.0.0.1:3025",
        mode="direct", ssh_key=host_key, ssh_certificate=host_cert.public_bytes().decode(),
        tls_key=keys.generate_private_key(), tls_certificate="tls-certificate",
        ca_pem="ca-pem", user_ca_lines=[keys.public_key_openssh(user_ca).decode()],
        valid_before=(NOW + timedelta(hours=24)).isoformat().replace("+00:00", "Z"))
    identity.save(tmp_path / "data")
    return {"host_ca": host_ca, "user_ca": user_ca, "data_dir": tmp_path / "data",
            "identity": identity}


def start_node(pki, fake: FakeAuth, at: datetime = NOW, labels=None) -> tuple[Node, Reactor]:
    reactor = Reactor()
    reactor.advance(at.timestamp())
    node = Node(data_dir=pki["data_dir"], auth_server="127.0.0.1:3025", token=None,
                ca_pin=None, nodename="n1", labels=labels or {"env": "dev"},
                listen=lambda factory: succeed(FakePort()), advertise_addr="127.0.0.1:0",
                reactor=reactor, heartbeat_interval=INTERVAL, rng=random.Random(7))
    node.fake = fake
    node.startService()
    return node, reactor


def login(node: Node, ca, login_name: str = "root", roles=("dev",)):
    """A full certificate login through the node's portal: the avatar or the Failure."""
    user_key = keys.generate_private_key()
    cert = issue_user_certificate(ca, user_key.public_key(), username="alice",
                                  principals=["root"], roles=list(roles), cluster=CLUSTER,
                                  now=NOW, ttl=timedelta(hours=8))
    data = b"session data to sign"
    credentials = CertificateCredentials(
        username=login_name, algorithm=CERT_ALG,
        blob=base64.b64decode(cert.public_bytes().split()[1]), sig_data=data,
        signature=conch_keys.Key(user_key).sign(data), peer_address="127.0.0.1")
    results: list = []
    node.factory.portal.login(credentials, None, IConchUser).addBoth(results.append)
    assert len(results) == 1
    return results[0]


def refused(result) -> str:
    assert isinstance(result, Failure), result
    return str(result.value)


def test_the_first_heartbeat_lists_the_node_and_caches_its_roles(pki):
    fake = FakeAuth(pki["host_ca"], pki["identity"].user_ca_lines)
    node, _reactor = start_node(pki, fake)
    assert fake.calls[:2] == [("POST", "/v1/nodes/heartbeat"), ("GET", "/v1/nodes/roles")]
    [beat] = fake.heartbeats
    assert beat["name"] == "n1" and beat["uuid"] == "uuid-1"
    assert beat["address"] == "127.0.0.1:40022"  # the kernel-chosen port, not :0
    assert beat["labels"] == {"env": "dev"}
    assert list(node.roles) == ["dev"]
    saved = json.loads((pki["data_dir"] / "control.json").read_text())
    assert saved["roles"] == {"dev": role("dev", "dev")}
    interface, avatar, logout = login(node, pki["user_ca"])
    assert avatar.permissions.roles == ("dev",)


def test_without_a_push_link_a_role_change_applies_at_the_next_heartbeat(pki):
    fake = FakeAuth(pki["host_ca"], pki["identity"].user_ca_lines)
    node, reactor = start_node(pki, fake)
    assert not isinstance(login(node, pki["user_ca"]), Failure)
    fake.roles = [role("dev", "staging")]
    assert not isinstance(login(node, pki["user_ca"]), Failure)  # not fetched yet
    reactor.advance(INTERVAL)
    assert len(fake.heartbeats) == 2
    assert "no role allows access to a node with env=dev" in refused(login(node, pki["user_ca"]))
    fake.roles = []
    reactor.advance(INTERVAL)
    assert "none of the roles ['dev'] exist here" in refused(login(node, pki["user_ca"]))


def test_failed_heartbeats_are_retried_within_the_interval(pki):
    fake = FakeAuth(pki["host_ca"], pki["identity"].user_ca_lines)
    node, reactor = start_node(pki, fake)
    fake.down = True
    before = len(fake.calls)
    for _ in range(10):
        reactor.advance(INTERVAL)
    # Each failed attempt waits at most one interval, so at least one try per interval.
    assert len(fake.calls) - before >= 10
    assert not reactor.stopped
    assert node.roles == {"dev": role("dev", "dev")}  # the cache is kept while offline
    assert not isinstance(login(node, pki["user_ca"]), Failure)
    fake.down = False
    fake.roles = [role("dev", "prod")]
    reactor.advance(INTERVAL)
    assert "env=dev" in refused(login(node, pki["user_ca"]))


def test_the_role_cache_survives_a_restart_while_the_auth_service_is_down(pki):
    fake = FakeAuth(pki["host_ca"], pki["identity"].user_ca_lines)
    first, _ = start_node(pki, fake)
    first.stopService()
    fake.down = True
    second, reactor = start_node(pki, fake)
    assert second.roles == {"dev": role("dev", "dev")}
    assert not isinstance(login(second, pki["user_ca"]), Failure)
    assert not reactor.stopped


def test_a_user_ca_sent_with_the_roles_is_trusted_and_kept(pki):
    fake = FakeAuth(pki["host_ca"], pki["identity"].user_ca_lines)
    node, reactor = start_node(pki, fake)
    new_ca = keys.generate_private_key()
    assert "not signed by a trusted user CA" in refused(login(node, new_ca))
    fake.user_ca_lines.append(keys.public_key_openssh(new_ca).decode())
    reactor.advance(INTERVAL)
    assert not isinstance(login(node, new_ca), Failure)
    node.stopService()
    offline = FakeAuth(pki["host_ca"], [])
    offline.down = True
    second, _ = start_node(pki, offline)
    assert not isinstance(login(second, new_ca), Failure)  # kept in control.json


def test_host_certificates_are_renewed_when_a_third_of_their_life_is_left(pki):
    fake = FakeAuth(pki["host_ca"], pki["identity"].user_ca_lines)
    node, reactor = start_node(pki, fake, at=NOW + timedelta(hours=10))
    assert fake.renewals == []
    old_blob = node.factory.publicKeys[CERT_ALG].blob()
    fake.now = NOW + timedelta(hours=17)
    reactor.advance(timedelta(hours=7).total_seconds())
    assert len(fake.renewals) == 1
    saved = NodeIdentity.load(pki["data_dir"])
    assert saved.valid_before.startswith((NOW + timedelta(hours=41)).strftime("%Y-%m-%dT%H"))
    assert saved.tls_certificate == "renewed-tls-certificate"
    assert node.factory.publicKeys[CERT_ALG].blob() != old_blob
    reactor.advance(INTERVAL)
    assert len(fake.renewals) == 1  # renewed once, not on every heartbeat


@pytest.mark.parametrize("attempt", [0, 1, 3, 10, 50])
def test_backoff_is_jittered_and_capped(attempt):
    rng = random.Random(attempt)
    delays = [backoff_delay(attempt, rng, base=1.0, cap=60.0) for _ in range(200)]
    bound = min(60.0, 2.0 ** attempt)
    assert all(0 <= d <= bound for d in delays)
    assert max(delays) > bound / 2  # full jitter spreads over the whole range
    assert len(set(delays)) > 100


@pytest.mark.parametrize("addr, hosts", [
    ("127.0.0.1:3022", ["127.0.0.1"]),
    ("0.0.0.0:3022", []),
    ("[::]:3022", []),
    ("[2001:db8::5]:3022", ["2001:db8::5"]),
    ("node.example.com:22", ["node.example.com"]),
])
def test_advertised_hosts_skip_wildcard_addresses(addr, hosts):
    assert _advertised_hosts(addr) == hosts


@pytest.mark.parametrize("text, labels", [
    ("", {}),
    ("env=dev", {"env": "dev"}),
    ("env=dev, team=web,", {"env": "dev", "team": "web"}),
    ("kind=lan,empty=", {"kind": "lan", "empty": ""}),
])
def test_labels_option_is_parsed(text, labels):
    assert parse_labels(text) == labels


@pytest.mark.parametrize("text", ["env", "=dev", "env=de v", "bad key=x", "env=a;b"])
def test_bad_labels_option_is_refused(text):
    with pytest.raises(UsageError, match="invalid label"):
        parse_labels(text)
