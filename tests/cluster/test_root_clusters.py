"""The root's side of a trust (RootClusters) and the leaf's channel gate
(LeafLinks._accept), in memory: an AuthServer over a MemoryBackend on a
fake clock, no sockets."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import attrs
import pytest
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from edgeaccess import errors
from edgeaccess.auth.service import AuthServer
from edgeaccess.backend.memory import MemoryBackend
from edgeaccess.cluster.leaf import LeafLinks
from edgeaccess.cluster.root import RootClusters
from edgeaccess.identity import kinds  # noqa: F401  (registers the resource kinds)
from edgeaccess.pki import keys, x509ca
from edgeaccess.pki.authority import CertificateAuthority
from edgeaccess.proxy.splice import SpliceFactory

START = 1_800_000_000.0


def resolve(coroutine):
    """Run a coroutine that must finish synchronously (memory backend)."""
    outcome: list = []
    Deferred.fromCoroutine(coroutine).addBoth(outcome.append)
    assert outcome, "the coroutine waited on something that never fires"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def authority(cluster: str) -> CertificateAuthority:
    now = datetime.fromtimestamp(START, timezone.utc)
    tls_key, tls_cert = x509ca.create_ca(cluster, now)
    return CertificateAuthority(cluster, keys.generate_private_key(),
                                keys.generate_private_key(), tls_key, tls_cert)


ROOT_AUTHORITY = authority("root")
LEAF_AUTHORITY = authority("leaf")


@attrs.define
class Recorder:
    events: list = attrs.Factory(list)

    def emit(self, event: str, **fields) -> None:
        self.events.append((event, fields))


@pytest.fixture
def root():
    clock = Clock()
    clock.advance(START)
    audit = Recorder()
    auth = AuthServer(ROOT_AUTHORITY, MemoryBackend(clock), clock, reactor=None,
                      threadpool=None, audit=audit)
    clusters = RootClusters(auth)
    resolve(clusters.load())
    return auth, clusters, clock, audit


def join_request(token: str, **changes) -> dict:
    tunnel_key = keys.generate_private_key()
    request = dict(
        token=token, leaf_name="leaf", host_ca=[LEAF_AUTHORITY.host_ca_public_line],
        tls_ca=LEAF_AUTHORITY.tls_ca_pem, remote_addr="127.0.0.1",
        tunnel_public_key=tunnel_key.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii"))
    request.update(changes)
    return request


def token(auth, kind: str = "trusted_cluster", ttl=None) -> str:
    return resolve(auth.create_token(kind, ttl))["token"]


def test_a_leaf_with_a_valid_token_is_admitted_with_a_cluster_identity(root):
    auth, clusters, _, audit = root
    answer = resolve(clusters.accept_leaf(**join_request(token(auth))))
    assert answer["cluster_name"] == "root"
    assert answer["ssh_user_ca"] == [ROOT_AUTHORITY.user_ca_public_line]
    cert = x509ca.load_certificate_pem(answer["tls_certificate"].encode())
    identity = x509ca.identity_from_certificate(cert)
    assert (identity.kind, identity.name, identity.cluster) == ("cluster", "leaf", "root")
    assert clusters.accepts_tunnel(identity)
    (record,) = resolve(clusters.remote_clusters())
    assert record["name"] == "leaf" and record["status"] == "offline"
    assert record["ssh_host_ca"] == [LEAF_AUTHORITY.host_ca_public_line]
    assert ("trusted_cluster.join", {"cluster_name": "leaf", "success": True,
                                     "remote_addr": "127.0.0.1"}) in audit.events
    # Known after a restart too.
    again = RootClusters(auth)
    resolve(again.load())
    assert again.known == {"leaf"}


REFUSED = [
    pytest.param(lambda auth: join_request("A" * 32), errors.TokenInvalid,
                 "invalid, unknown or expired", id="unknown-token"),
    pytest.param(lambda auth: join_request(token(auth, "node")), errors.TokenInvalid,
                 "not a trusted_cluster token", id="node-token"),
    pytest.param(lambda auth: join_request(token(auth), leaf_name="root"), errors.BadRequest,
                 "cannot trust itself", id="leaf-named-like-the-root"),
    pytest.param(lambda auth: join_request(token(auth), leaf_name="a/b"), errors.BadResource,
                 "invalid name", id="bad-leaf-name"),
    pytest.param(lambda auth: join_request(token(auth), host_ca=[]), errors.BadRequest,
                 "host_ca", id="no-host-ca"),
    pytest.param(lambda auth: join_request(token(auth), host_ca=["not a key\nx"]),
                 errors.BadRequest, "host_ca", id="garbage-host-ca"),
    pytest.param(lambda auth: join_request(token(auth), tls_ca="nope"), errors.BadRequest,
                 "not valid PEM", id="garbage-tls-ca"),
    pytest.param(lambda auth: join_request(token(auth), tunnel_public_key="nope"),
                 errors.BadRequest, "not valid PEM", id="garbage-tunnel-key"),
]


@pytest.mark.parametrize("make_request, error, message", REFUSED)
def test_a_bad_join_is_refused_and_stores_nothing(root, make_request, error, message):
    auth, clusters, _, _ = root
    request = make_request(auth)
    with pytest.raises(error, match=message) as raised:
        resolve(clusters.accept_leaf(**request))
    assert request["token"] not in str(raised.value)
    assert resolve(clusters.remote_clusters()) == []
    assert clusters.known == set()


def test_an_expired_token_is_refused(root):
    auth, clusters, clock, audit = root
    short = token(auth, ttl=timedelta(minutes=1))
    clock.advance(61)
    with pytest.raises(errors.TokenInvalid, match="expired"):
        resolve(clusters.accept_leaf(**join_request(short)))
    assert audit.events[-1][0] == "trusted_cluster.join"
    assert audit.events[-1][1]["success"] is False


def test_tunnels_of_unknown_or_foreign_clusters_are_not_accepted(root):
    auth, clusters, _, _ = root
    resolve(clusters.accept_leaf(**join_request(token(auth))))
    assert not clusters.accepts_tunnel(x509ca.Identity(kind="cluster", name="stranger",
                                                       cluster="root"))
    assert not clusters.accepts_tunnel(x509ca.Identity(kind="cluster", name="leaf",
                                                       cluster="elsewhere"))


@attrs.define
class FakeTunnel:
    identity: x509ca.Identity


def test_routes_to_an_offline_leaf_fail_with_cluster_offline(root):
    auth, clusters, _, _ = root
    assert clusters.leaf_router("leaf") is None  # not a leaf (yet)
    resolve(clusters.accept_leaf(**join_request(token(auth))))
    endpoint = clusters.leaf_router("leaf").route("leaf", "node1")
    with pytest.raises(errors.ClusterOffline, match="^cluster leaf is offline$"):
        resolve(_connect(endpoint))
    tunnel = FakeTunnel(x509ca.Identity(kind="cluster", name="leaf", cluster="root"))
    clusters.tunnel_up(tunnel)
    assert resolve(clusters.remote_clusters())[0]["status"] == "online"
    # A stale tunnel going down does not hide a newer one.
    clusters.tunnel_down(FakeTunnel(tunnel.identity))
    assert clusters.tunnels["leaf"] is tunnel
    clusters.tunnel_down(tunnel)
    assert resolve(clusters.remote_clusters())[0]["status"] == "offline"


async def _connect(endpoint):
    return await endpoint.connect(None)


# --- the leaf's gate on channels the root opens ---------------------------------------

class FakeTrust:
    def __init__(self) -> None:
        self.links = None
        self.auth = type("Auth", (), {"cluster_name": "leaf"})()


class FakeRouter:
    def __init__(self) -> None:
        self.asked: list = []

    def route(self, cluster, name, kind):
        self.asked.append((cluster, name, kind))
        raise errors.NotFound(f"node {name} not found")


def links_with(current: dict) -> tuple[LeafLinks, FakeRouter]:
    router = FakeRouter()
    links = LeafLinks(FakeTrust(), router, Clock())
    links.current = current
    return links, router


def test_the_leaf_relays_ssh_channels_of_a_trusted_root_to_its_own_nodes():
    links, router = links_with({"root": {"name": "root"}})
    factory = links._accept("root", "cluster", "ssh:leafnode")
    assert isinstance(factory, SpliceFactory)
    with pytest.raises(errors.NotFound):
        factory.endpoint_for()
    # Always resolved in the leaf's own cluster, whatever the root asked for.
    assert router.asked == [("leaf", "leafnode", "ssh")]


@pytest.mark.parametrize("root_name, kind, target, error", [
    pytest.param("gone", "cluster", "ssh:leafnode", errors.AccessDenied,
                 id="root-no-longer-trusted"),
    pytest.param("root", "ssh", "leafnode", errors.AccessDenied, id="not-a-cluster-channel"),
    pytest.param("root", "cluster", "kube:leafnode", errors.NotFound, id="unknown-target"),
    pytest.param("root", "cluster", "ssh:", errors.NotFound, id="empty-node-name"),
])
def test_the_leaf_refuses_other_channels(root_name, kind, target, error):
    links, router = links_with({"root": {"name": "root"}})
    with pytest.raises(error):
        links._accept(root_name, kind, target)
    assert router.asked == []


# --- the leaf's tunnel to each root resumes -------------------------------------------

def trust_state() -> dict:
    """What the CA exchange stores for the root (edgeaccess.cluster.leaf)."""
    tunnel_key = keys.generate_private_key()
    cert = ROOT_AUTHORITY.sign_tls(
        tunnel_key.public_key(), x509ca.Identity(kind="cluster", name="leaf", cluster="root"),
        now=datetime.fromtimestamp(START, timezone.utc), ttl=timedelta(days=1))
    return {"name": "root", "root_tls_ca": ROOT_AUTHORITY.tls_ca_pem,
            "cluster_certificate": x509ca.certificate_pem(cert).decode("ascii"),
            "tunnel_key": keys.private_key_pem(tunnel_key).decode(),
            "tunnel_addr": "127.0.0.1:3024"}


@pytest.mark.parametrize("budget", [45.0, 0.0])
def test_the_tunnel_to_a_root_holds_its_channels_for_the_proxys_resume_budget(budget):
    links = LeafLinks(FakeTrust(), FakeRouter(), Clock(), resume_budget=budget)
    agent = links._start_agent(trust_state())
    if budget:
        assert agent.resume is not None and agent.resume.budget == budget
    else:
        assert agent.resume is None  # --resume-budget 0: channels end with the tunnel
