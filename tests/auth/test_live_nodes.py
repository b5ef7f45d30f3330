"""Tunnelled nodes listed from memory (``AuthServer.live_nodes``) next to stored records."""

from __future__ import annotations

from authkit import CLUSTER, resolve
from edgeaccess.auth import service as auth_service
from edgeaccess.pki import x509ca

UUID = "6f1c3c5e-8a51-4d6e-9a8e-1b2c3d4e5f60"
OTHER = "00000000-0000-4000-8000-000000000001"


class Live:
    """A stand-in for the proxy's tunnel registry: the nodes whose tunnel is up."""

    def __init__(self, *records: dict) -> None:
        self.up = list(records)

    def records(self) -> list[dict]:
        return list(self.up)

    def find(self, name_or_uuid: str) -> list[dict]:
        return [r for r in self.up if name_or_uuid in (r["name"], r["uuid"])]


def _tunnelled(name: str = "web1", uuid: str = UUID, labels: dict | None = None) -> dict:
    return {"name": name, "uuid": uuid, "address": "tunnel", "labels": labels or {}}


def test_a_live_tunnelled_node_is_listed_without_a_stored_record(auth):
    auth.live_nodes = Live(_tunnelled(labels={"env": "dev"}))
    [listed] = resolve(auth.list_nodes())
    assert (listed["name"], listed["id"], listed["address"], listed["labels"]) == \
        ("web1", UUID, "tunnel", {"env": "dev"})
    assert listed["cluster"] == CLUSTER
    assert listed["last_heartbeat"] == "2027-01-15T08:00:00Z"


def test_a_live_node_outlives_its_stored_records_ttl(auth, clock):
    node = x509ca.Identity(kind="node", name="web1", cluster=CLUSTER, uuid=UUID)
    resolve(auth.heartbeat(node, {"name": "web1", "address": "tunnel"}))
    auth.live_nodes = Live(_tunnelled())
    clock.advance(3 * auth_service.NODE_TTL.total_seconds())
    [listed] = resolve(auth.list_nodes())
    assert listed["uuid"] == UUID
    assert listed["last_heartbeat"] == auth_service._iso(auth.now())
    assert resolve(auth.find_node("web1"))["uuid"] == UUID
    auth.live_nodes.up.clear()  # the tunnel went down
    assert resolve(auth.list_nodes()) == []
    assert resolve(auth.find_node("web1")) is None


def test_a_live_record_replaces_the_stored_one_of_the_same_node(auth):
    node = x509ca.Identity(kind="node", name="web1", cluster=CLUSTER, uuid=UUID)
    resolve(auth.heartbeat(node, {"name": "web1", "address": "10.0.0.5:3022", "version": "1.2"}))
    auth.live_nodes = Live(_tunnelled(labels={"via": "tunnel"}))
    [listed] = resolve(auth.list_nodes())
    assert (listed["address"], listed["labels"], listed["version"]) == \
        ("tunnel", {"via": "tunnel"}, "1.2")


def test_stored_and_live_nodes_are_listed_together_and_found_by_name_or_uuid(auth):
    lan = x509ca.Identity(kind="node", name="db1", cluster=CLUSTER, uuid=OTHER)
    resolve(auth.heartbeat(lan, {"name": "db1", "address": "10.0.0.6:3022"}))
    auth.live_nodes = Live(_tunnelled())
    assert [n["name"] for n in resolve(auth.list_nodes())] == ["db1", "web1"]
    assert resolve(auth.find_node(UUID))["address"] == "tunnel"
    assert resolve(auth.find_node("web1"))["id"] == UUID
    assert resolve(auth.find_node("db1"))["address"] == "10.0.0.6:3022"
