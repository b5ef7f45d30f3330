"""The edgenode service logic in memory: it joins, heartbeats keep the role
cache (and so the node's access decisions) current, failures are retried,
the cache survives restarts, new user CAs are trusted, certificates are
renewed, and stopping cancels what is in flight.

The auth service is the real one with its real Klein API, reached through
the real :class:`~edgeaccess.clusterclient.ClusterClient` over StubTreq
(:mod:`nodekit`); the clock is a ``MemoryReactorClock``. Logins go through
the real SSH portal of the node with real certificates.
"""

from __future__ import annotations

import base64
import json
import random
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import keys as conch_keys
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.python.usage import UsageError

from edgeaccess.node.identity import NodeIdentity
from edgeaccess.node.service import NodeService, _advertised_hosts, backoff_delay
from edgeaccess.node.tap import parse_labels
from edgeaccess.pki import keys
from edgeaccess.pki.sshca import issue_user_certificate
from edgeaccess.ssh.certauth import CertificateCredentials

from nodekit import InMemoryCluster


START = 1_800_000_000.0
NOW = datetime.fromtimestamp(START, timezone.utc)
CLUSTER = "home"
CERT_ALG = b"ssh-ed25519-cert-v01@openssh.com"
INTERVAL = 5.0


class Reactor(MemoryReactorClock):
    """A memory reactor that records stop()."""

    def __init__(self) -> None:
        super().__init__()
        self.running = True
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


class FakePort:
    def __init__(self) -> None:
        self.listening = True

    def getHost(self):  # noqa: N802
        return IPv4Address("TCP", "127.0.0.1", 40022)

    def stopListening(self):  # noqa: N802
        self.listening = False


@pytest.fixture
def reactor() -> Reactor:
    reactor = Reactor()
    reactor.advance(START)
    return reactor


@pytest.fixture
def cluster(reactor) -> InMemoryCluster:
    cluster = InMemoryCluster(reactor, CLUSTER)
    cluster.put_role("dev", "dev")
    return cluster


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


def start_node(cluster: InMemoryCluster, data_dir, reactor, *, token=None,
               labels=None) -> NodeService:
    node = NodeService(
        data_dir=data_dir, auth_server="127.0.0.1:3025", token=token,
        ca_pin=cluster.authority.pin if token else None, nodename="n1",
        labels=labels or {"env": "dev"}, listen=lambda factory: succeed(FakePort()),
        advertise_addr="127.0.0.1:0", reactor=reactor, heartbeat_interval=INTERVAL,
        rng=random.Random(7), connect_cluster=cluster.connect)
    node.startService()
    return node


@pytest.fixture
def node(cluster, data_dir, reactor) -> NodeService:
    """A node that joined ``cluster`` with a token and sent its first heartbeat."""
    node = start_node(cluster, data_dir, reactor, token=cluster.token())
    assert node.identity is not None and node.port is not None
    yield node
    node.stopService()


def login(node: NodeService, ca, login_name: str = "root", roles=("dev",)):
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


def test_joining_pins_the_ca_and_keeps_a_client_only_identity(node, cluster, data_dir):
    calls = [c for c in cluster.calls if c[1] not in ("/v1/nodes/roles", "/v1/watch")]
    assert calls[:4] == [("GET", "/v1/cluster/ca"), ("GET", "/v1/cluster/ca"),
                         ("POST", "/v1/join"), ("POST", "/v1/nodes/heartbeat")]
    saved = NodeIdentity.load(data_dir)
    assert saved.cluster == CLUSTER and saved.mode == "direct"
    assert saved.tls_identity().kind == "node"
    cert = x509.load_pem_x509_certificate(saved.tls_certificate.encode())
    assert [u._name for u in cert.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value] == ["clientAuth"]


def test_the_first_heartbeat_lists_the_node_and_caches_its_roles(node, cluster, data_dir):
    [listed] = cluster.nodes()
    assert listed["name"] == "n1" and listed["uuid"] == node.identity.uuid
    assert listed["address"] == "127.0.0.1:40022"  # the kernel-chosen port, not :0
    assert listed["labels"] == {"env": "dev"}
    assert "dev" in node.roles
    cached = json.loads((data_dir / "control.json").read_text())["roles"]
    assert cached["dev"]["spec"]["allow"]["node_labels"] == {"env": "dev"}
    interface, avatar, logout = login(node, cluster.authority.ssh_user_ca)
    assert avatar.permissions.roles == ("dev",)


def test_without_a_push_link_a_role_change_applies_at_the_next_heartbeat(
        node, cluster, reactor):
    ca = cluster.authority.ssh_user_ca
    assert not isinstance(login(node, ca), Failure)
    cluster.put_role("dev", "staging")
    assert not isinstance(login(node, ca), Failure)  # not fetched yet
    reactor.advance(INTERVAL)
    assert "no role allows access to a node with env=dev" in refused(login(node, ca))
    cluster.delete_role("dev")
    reactor.advance(INTERVAL)
    assert "none of the roles ['dev'] exist here" in refused(login(node, ca))


def test_failed_heartbeats_are_retried_within_the_interval(node, cluster, reactor):
    ca = cluster.authority.ssh_user_ca
    cluster.down = True
    before = len(cluster.calls)
    for _ in range(10):
        reactor.advance(INTERVAL)
    # Each failed attempt waits at most one interval, so at least one try per interval.
    assert len(cluster.calls) - before >= 10
    assert not reactor.stopped
    assert node.roles["dev"]["spec"]["allow"]["node_labels"] == {"env": "dev"}  # kept offline
    assert not isinstance(login(node, ca), Failure)
    cluster.down = False
    cluster.put_role("dev", "prod")
    reactor.advance(INTERVAL)
    assert "env=dev" in refused(login(node, ca))


def test_the_role_cache_survives_a_restart_while_the_auth_service_is_down(
        node, cluster, data_dir, reactor):
    node.stopService()
    cluster.down = True
    second = start_node(cluster, data_dir, reactor)
    assert "dev" in second.roles
    assert not isinstance(login(second, cluster.authority.ssh_user_ca), Failure)
    assert not reactor.stopped
    second.stopService()


def test_a_user_ca_sent_with_the_roles_is_trusted_and_kept(node, cluster, reactor, data_dir):
    new_ca = keys.generate_private_key()
    assert "not signed by a trusted user CA" in refused(login(node, new_ca))
    cluster.authority.ssh_user_ca = new_ca  # the auth service now signs with another CA
    reactor.advance(INTERVAL)
    assert not isinstance(login(node, new_ca), Failure)
    saved = json.loads((data_dir / "control.json").read_text())
    assert saved["ssh_user_ca"] == [keys.public_key_openssh(new_ca).decode()]


def test_certificates_are_renewed_when_a_third_of_their_life_is_left(node, cluster, reactor,
                                                                     data_dir):
    old = NodeIdentity.load(data_dir)
    old_blob = node.factory.publicKeys[CERT_ALG].blob()
    reactor.advance(timedelta(hours=10).total_seconds())
    assert NodeIdentity.load(data_dir).tls_certificate == old.tls_certificate
    reactor.advance(timedelta(hours=7).total_seconds())
    renewals = [c for c in cluster.calls if c[1] == "/v1/nodes/renew"]
    assert len(renewals) == 1
    saved = NodeIdentity.load(data_dir)
    assert saved.tls_certificate != old.tls_certificate
    assert saved.valid_before > old.valid_before
    assert node.factory.publicKeys[CERT_ALG].blob() != old_blob
    # The next calls present the new certificate (the API accepts it as the node).
    reactor.advance(INTERVAL)
    assert len([c for c in cluster.calls if c[1] == "/v1/nodes/renew"]) == 1
    assert cluster.nodes()[0]["uuid"] == saved.uuid


def test_stopping_the_node_cancels_its_calls_and_closes_its_client(node, cluster, reactor):
    client = node.cluster_client
    node.stopService()
    assert client._closed
    before = len(cluster.calls)
    reactor.advance(INTERVAL * 3)
    assert len(cluster.calls) == before  # nothing more is sent


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


def _pending(reactor) -> list:
    return [call for call in reactor.getDelayedCalls() if call.active()]


def test_stopping_during_the_join_backoff_cancels_the_retries(cluster, data_dir, reactor):
    """The join loop waits on the injected clock; stopping cancels its wait."""
    cluster.down = True
    node = start_node(cluster, data_dir, reactor, token=cluster.token())
    for _ in range(5):
        reactor.advance(60)  # the backoff's cap
    assert len(cluster.calls) >= 5 and node.identity is None  # one try (the CA) a wait
    node.stopService()
    assert _pending(reactor) == []
    before = len(cluster.calls)
    reactor.advance(3600)
    assert len(cluster.calls) == before and not reactor.stopped


def test_stopping_during_the_heartbeat_wait_leaves_nothing_scheduled(node, cluster, reactor):
    assert _pending(reactor)  # the next heartbeat
    node.stopService()
    assert _pending(reactor) == []
    assert not reactor.stopped
