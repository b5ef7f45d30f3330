"""The identities of the LAN agent link: a node's server certificate for its
agent port, a proxy's client certificate, and the agent a heartbeat announces."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from authkit import CLUSTER, resolve
from edgeaccess import errors
from edgeaccess.node.lanagent import check_proxy_client
from edgeaccess.pki import keys, x509ca
from edgeaccess.tunnel.protocol import Inventory

UUID = "6f1c3c5e-8a51-4d6e-9a8e-1b2c3d4e5f60"


def _join(auth, *, agent_server: bool, addresses=("10.0.0.5",), remote_addr="192.0.2.7"):
    token = resolve(auth.create_token("node"))["token"]
    tls_key = keys.generate_private_key()
    result = resolve(auth.join_node(
        token=token, name="web1", uuid=UUID,
        ssh_public_key=keys.public_key_openssh(keys.generate_private_key()).decode(),
        tls_public_key=tls_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
        addresses=list(addresses), remote_addr=remote_addr, agent_server=agent_server))
    return result, tls_key


def test_a_lan_agent_node_gets_a_server_certificate_naming_where_it_is_dialled(auth):
    result, tls_key = _join(auth, agent_server=True,
                            addresses=["10.0.0.5", "node1.example.com", "*.evil", "0.0.0.0"])
    server = x509ca.load_certificate_pem(result["tls_server_certificate"].encode())
    client = x509ca.load_certificate_pem(result["tls_certificate"].encode())
    assert x509ca.extended_key_usages(server) == {ExtendedKeyUsageOID.SERVER_AUTH}
    assert x509ca.extended_key_usages(client) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert server.public_key() == client.public_key() == tls_key.public_key()
    # It is this node, for servers only: never a caller, never a proxy.
    assert not x509ca.is_client_certificate(server)
    for host in ("10.0.0.5", "192.0.2.7", "node1.example.com"):
        identity = x509ca.check_server_certificate(
            server, x509ca.ExpectedServer(cluster=CLUSTER, host=host, kinds=("node",)))
        assert (identity.kind, identity.name, identity.uuid) == ("node", "web1", UUID)
    for host in ("0.0.0.0", "x.evil", "10.0.0.6"):
        with pytest.raises(x509ca.ServerMismatch):
            x509ca.check_server_certificate(
                server, x509ca.ExpectedServer(cluster=CLUSTER, host=host, kinds=("node",)))
    with pytest.raises(x509ca.ServerMismatch, match="not a proxy"):
        x509ca.check_server_certificate(
            server, x509ca.ExpectedServer(cluster=CLUSTER, host="10.0.0.5"))


def test_nodes_that_do_not_ask_get_no_server_certificate(auth):
    result, _ = _join(auth, agent_server=False)
    assert "tls_server_certificate" not in result
    renewed = auth.renew_node(
        x509ca.Identity(kind="node", name="web1", cluster=CLUSTER, uuid=UUID),
        keys.public_key_openssh(keys.generate_private_key()).decode(),
        keys.generate_private_key().public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
        ["10.0.0.5"], agent_server=True, remote_addr="192.0.2.8")
    server = x509ca.load_certificate_pem(renewed["tls_server_certificate"].encode())
    x509ca.check_server_certificate(
        server, x509ca.ExpectedServer(cluster=CLUSTER, host="192.0.2.8", kinds=("node",)))


def test_the_proxy_client_certificate_is_for_the_agent_port_only(authority):
    from datetime import datetime, timezone

    key = keys.generate_private_key()
    proxy = x509ca.Identity(kind="proxy", name="proxy.example", cluster=CLUSTER)
    cert = authority.sign_tls(key.public_key(), proxy, now=datetime.now(timezone.utc),
                              ttl=timedelta(hours=1), usage="client")
    assert x509ca.extended_key_usages(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert check_proxy_client(cert, CLUSTER).kind == "proxy"
    # Not a caller anywhere else (every other port reads callers with is_client_certificate) ...
    assert not x509ca.is_client_certificate(cert)
    # ... and not a server.
    with pytest.raises(x509ca.ServerMismatch, match="not for servers"):
        x509ca.check_server_certificate(
            cert, x509ca.ExpectedServer(cluster=CLUSTER, host="proxy.example"))
    with pytest.raises(ValueError, match="of cluster unit, not other"):
        check_proxy_client(cert, "other")
    server = authority.sign_tls(key.public_key(), proxy, now=datetime.now(timezone.utc),
                                ttl=timedelta(hours=1), dns_names=["proxy.example"])
    with pytest.raises(ValueError, match="not for clients"):
        check_proxy_client(server, CLUSTER)
    with pytest.raises(ValueError, match="unknown certificate usage"):
        authority.sign_tls(key.public_key(), proxy, now=datetime.now(timezone.utc),
                           ttl=timedelta(hours=1), usage="both")


def _node():
    return x509ca.Identity(kind="node", name="web1", cluster=CLUSTER, uuid=UUID)


def _agent(name="web1", address="0.0.0.0:3027"):
    inventory = Inventory(name=name, kube_clusters=("k1",))
    return {"address": address, "inventory": json.loads(inventory.to_json())}


def test_a_heartbeat_announces_the_agent_port_and_what_it_serves(auth):
    stored = resolve(auth.heartbeat(_node(), {"name": "web1", "address": "0.0.0.0:3022",
                                              "agent": _agent()}, remote_addr="192.0.2.7"))
    assert stored["agent"]["address"] == "192.0.2.7:3027"  # dialled where it came from
    assert stored["agent"]["inventory"]["kube_clusters"] == ["k1"]
    [listed] = resolve(auth.list_nodes())
    assert listed["agent"] == stored["agent"]


@pytest.mark.parametrize("agent, error", [
    (_agent(name="db1"), errors.AccessDenied),
    (_agent(address="10.0.0.5"), errors.BadRequest),
    (_agent(address="10.0.0.5:99999"), errors.BadRequest),
    ({"address": "10.0.0.5:3027", "inventory": {"name": "web1", "kube_clusters": "k1"}},
     errors.BadRequest),
    ("10.0.0.5:3027", errors.BadRequest),
])
def test_a_malformed_or_foreign_agent_announcement_is_refused(auth, agent, error):
    with pytest.raises(error):
        resolve(auth.heartbeat(_node(), {"name": "web1", "address": "10.0.0.5:3022",
                                         "agent": agent}))
    assert resolve(auth.list_nodes()) == []
