"""The agent decides again: who the user is (certificate or a root's assertion) and as whom
the request reaches the API (edgeaccess.kube.agent)."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from twisted.internet.task import Clock

from edgeaccess import errors, httpwire
from edgeaccess.kube.agent import KubeAgent, UserIdentity, make_decider
from edgeaccess.kube.kubeconfig import AgentConfig
from tests.pkitools import Identity, issue_identities

ROLES = {
    "kube-view": {"kind": "role", "version": "v1", "metadata": {"name": "kube-view"},
                  "spec": {"allow": {"kubernetes_labels": {"*": "*"},
                                     "kubernetes_groups": ["viewers"]}}},
}
TRUSTED = [{"name": "root", "role_map": [{"remote": "root-view", "local": ["kube-view"]}]}]


def decide():
    return make_decider(cluster_name="leaf", role_documents=lambda: ROLES,
                        trusted_clusters=lambda: TRUSTED)


def test_local_and_mapped_root_users_get_the_node_roles_groups():
    imp = decide()(UserIdentity("ann", "leaf", ["kube-view"], {}), "k", {"env": "x"}, None, [])
    assert imp.user == "ann" and imp.groups == ("viewers", "system:authenticated")
    imp = decide()(UserIdentity("rob", "root", ["root-view"], {}), "k", {}, None, [])
    assert imp.groups == ("viewers", "system:authenticated")


@pytest.mark.parametrize("user, as_user, message", [
    (UserIdentity("x", "elsewhere", ["kube-view"], {}), None, "not accepted"),
    (UserIdentity("x", "root", ["other"], {}), None, "none of the roles"),
    (UserIdentity("x", "leaf", ["kube-view"], {}), "admin", "impersonating user 'admin'"),
])
def test_the_agent_refuses_what_its_roles_do_not_allow(user, as_user, message):
    with pytest.raises(errors.AccessDenied, match=message):
        decide()(user, "k", {}, as_user, [])


def _agent(ca, clock):
    config = AgentConfig(server="https://127.0.0.1:1", host="127.0.0.1", port=1, tls=True,
                         token="t")
    return KubeAgent(name="k", labels={}, config=config, reactor=clock, decide=decide(),
                     ca_certs=lambda: [ca], cluster_name="leaf")


def _head(**headers) -> httpwire.Head:
    return httpwire.Head((b"GET", b"/api", b"HTTP/1.1"),
                         [(k.replace("_", "-").encode(), v) for k, v in headers.items()])


def test_the_users_certificate_is_verified_against_the_cluster_ca():
    pki = issue_identities([("ann", Identity(kind="user", name="ann", cluster="leaf",
                                             roles=("kube-view",)), []),
                            ("node", Identity(kind="node", name="n", cluster="leaf"), [])],
                           cluster="leaf", ttl=timedelta(hours=1))
    other = issue_identities([("eve", Identity(kind="user", name="ann", cluster="leaf",
                                               roles=("kube-view",)), [])], cluster="leaf")
    clock = Clock()
    clock.advance(pki["ann"][1].not_valid_before_utc.timestamp() + 60)
    agent = _agent(pki["ca"], clock)

    def cert_header(cert):
        return base64.b64encode(cert.public_bytes(serialization.Encoding.DER))

    user = agent.identify(_head(Edge_User_Certificate=cert_header(pki["ann"][1])))
    assert (user.name, user.cluster, user.roles) == ("ann", "leaf", ("kube-view",))
    with pytest.raises(errors.AccessDenied, match="not from this cluster's CA"):
        agent.identify(_head(Edge_User_Certificate=cert_header(other["eve"][1])))
    with pytest.raises(errors.AccessDenied, match="only user certificates"):
        agent.identify(_head(Edge_User_Certificate=cert_header(pki["node"][1])))
    clock.advance(2 * 3600)
    with pytest.raises(errors.AccessDenied, match="expired"):
        agent.identify(_head(Edge_User_Certificate=cert_header(pki["ann"][1])))


def test_an_asserted_identity_is_accepted_only_for_users_of_other_clusters():
    pki = issue_identities([], cluster="leaf")
    agent = _agent(pki["ca"], Clock())
    root_user = json.dumps({"user": "rob", "cluster": "root", "roles": ["root-view"]}).encode()
    assert agent.identify(_head(Edge_Identity=root_user)).name == "rob"
    local = json.dumps({"user": "ann", "cluster": "leaf", "roles": ["kube-view"]}).encode()
    with pytest.raises(errors.AccessDenied, match="needs a certificate"):
        agent.identify(_head(Edge_Identity=local))
    with pytest.raises(errors.AccessDenied, match="no user identity"):
        agent.identify(_head())


class _TestAgent(KubeAgent):
    """The agent, with its API connections on in-memory transports."""

    def connect_api(self, factory):
        from twisted.internet.defer import succeed
        from twisted.internet.testing import StringTransport

        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.api_connections.append(protocol)
        return succeed(protocol)


def test_client_credentials_and_impersonation_never_reach_the_api_only_the_agents_do():
    from twisted.internet.testing import StringTransport

    pki = issue_identities([], cluster="leaf")
    config = AgentConfig(server="https://api:6443", host="api", port=6443, tls=True,
                         token="agent-token")
    agent = _TestAgent(name="k", labels={}, config=config, reactor=Clock(), decide=decide(),
                       ca_certs=lambda: [pki["ca"]], cluster_name="leaf")
    agent.api_connections = []
    agent._set_credential(__import__("edgeaccess.kube.kubeconfig", fromlist=["x"])
                          .read_static_credential(config))
    channel = agent.channel_factory().buildProtocol(None)
    proxy_side = StringTransport()
    channel.makeConnection(proxy_side)
    identity = json.dumps({"user": "rob", "cluster": "root", "roles": ["root-view"]}).encode()
    channel.dataReceived(b"GET /api/v1/pods HTTP/1.1\r\nHost: proxy\r\n"
                         b"Authorization: Bearer users-own-token\r\nimpersonate-USER: rob\r\n"
                         b"Impersonate-Group: viewers\r\nImpersonate-Extra-Scopes: x\r\n"
                         b"Edge-Identity: " + identity + b"\r\n\r\n")
    sent = agent.api_connections[0].transport.value()
    head = httpwire.parse_head(sent.split(b"\r\n\r\n")[0], request=True)
    assert head.get_all(b"authorization") == [b"Bearer agent-token"]
    assert head.get_all(b"impersonate-user") == [b"rob"]
    assert head.get_all(b"impersonate-group") == [b"viewers", b"system:authenticated"]
    assert head.get(b"impersonate-extra-scopes") is None and head.get(b"edge-identity") is None
    assert head.get(b"host") == b"api:6443"
    # The answer goes back as it came; the next request reuses the connection.
    agent.api_connections[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    assert proxy_side.value().endswith(b"\r\n\r\n{}")
    channel.dataReceived(b"GET /api HTTP/1.1\r\nHost: p\r\nEdge-Identity: " + identity +
                         b"\r\n\r\n")
    assert len(agent.api_connections) == 1
    assert agent.api_connections[0].transport.value().count(b"GET /api") == 2


def test_a_locked_user_gets_a_403_from_the_agent_and_a_lock_ends_the_channel():
    from twisted.internet.testing import StringTransport

    from edgeaccess.controlplane.sessions import LiveSessions

    pki = issue_identities([], cluster="leaf")
    config = AgentConfig(server="https://api:6443", host="api", port=6443, tls=True, token="t")
    locked = set()
    sessions = LiveSessions("leaf")

    def lock_check(user):
        if user.username in locked:
            raise errors.AccessDenied(f"user {user.username} is locked: drill")

    agent = _TestAgent(name="k", labels={}, config=config, reactor=Clock(), decide=decide(),
                       ca_certs=lambda: [pki["ca"]], cluster_name="leaf",
                       lock_check=lock_check, sessions=lambda: sessions)
    agent.api_connections = []
    identity = json.dumps({"user": "rob", "cluster": "root", "roles": ["root-view"]}).encode()
    request = b"GET /api HTTP/1.1\r\nHost: p\r\nEdge-Identity: " + identity + b"\r\n\r\n"
    channel = agent.channel_factory().buildProtocol(None)
    channel.makeConnection(StringTransport())
    channel.dataReceived(request)
    assert len(sessions) == 1
    locked.add("rob")
    other = agent.channel_factory().buildProtocol(None)
    other_side = StringTransport()
    other.makeConnection(other_side)
    other.dataReceived(request)
    assert other_side.value().startswith(b"HTTP/1.1 403") and b"locked: drill" in \
        other_side.value()
    lock = {"id": "l1", "target": {"user": "rob"}, "cluster": "root", "message": "drill",
            "expires": None}
    assert sessions.enforce([lock], 0.0) == 1
    assert channel.transport.disconnecting
