"""The push over a reverse tunnel, in memory: init, then every change, in order."""

from __future__ import annotations

from datetime import timedelta

from twisted.python.failure import Failure
from twisted.internet.error import ConnectionLost

from edgeaccess.tunnel.protocol import CONTROL_CAPABILITY, MAX_CONTROL_PIECE

from twisted.test import iosim

from edgeaccess.tunnel.agent import AgentTunnelProtocol
from edgeaccess.tunnel.protocol import Inventory

from .support import ProxyWorld, Received, resolve
from tunnel.support import connected_pair



def role_doc(name: str, padding: int = 0) -> dict:
    return {"kind": "role", "version": "v1",
            "metadata": {"name": name, "description": "x" * padding},
            "spec": {"allow": {"logins": ["root"], "node_labels": {"*": "*"}}}}


def test_a_new_tunnel_gets_the_whole_state_first():
    world = ProxyWorld()
    agent, server, pump, received = world.agent()
    assert server.takes_control
    assert received.types() == ["init"]
    state = received.messages[0]["state"]
    assert set(state["roles"]) == {"access", "editor", "auditor"}
    assert state["ssh_user_ca"] == [world.auth.authority.user_ca_public_line]
    assert state["locks"] == {} and state["trusted_clusters"] == {}


def test_every_change_follows_in_commit_order_and_leaves_the_same_state():
    world = ProxyWorld()
    agent, server, pump, received = world.agent()
    lock = resolve(world.auth.create_lock({"user": "alice"}, message="incident"))
    resolve(world.auth.upsert_resource(role_doc("dev")))
    resolve(world.auth.delete_lock(lock["id"]))
    resolve(world.auth.delete_resource("role", "auditor"))
    world.settle(pump)
    changes = [(c["kind"], c["name"], c["value"] is None)
               for m in received.messages[1:] for c in m["changes"]]
    assert changes == [("lock", lock["id"], False), ("role", "dev", False),
                       ("lock", lock["id"], True), ("role", "auditor", True)]
    assert received.state.state == world.control.publisher.state()


def test_a_tunnel_dropped_mid_snapshot_applies_nothing_and_the_next_one_gets_it_whole():
    world = ProxyWorld()
    for index in range(4):  # an init of several ControlUpdate pieces
        resolve(world.auth.upsert_resource(role_doc(f"big{index}", padding=30_000)))
    lock = resolve(world.auth.create_lock({"node": "node-1"}, message="before"))
    node = Received()  # the node's state, as it applies what arrives
    _, _, first_pump, _ = connected_pair(world.clock, server_factory=world.factory,
                                         on_control=node)
    assert [l["id"] for l in node.state.locks] == [lock["id"]]
    first_pump.serverIO.loseConnection()
    world.settle(first_pump)
    # Offline: an administrator removes the lock and adds another.
    resolve(world.auth.delete_lock(lock["id"]))
    second = resolve(world.auth.create_lock({"user": "mallory"}, message="meanwhile"))
    # The next tunnel's init is cut after its first piece.
    victim = AgentTunnelProtocol(clock=world.clock, inventory=Inventory(name="node-1"),
                                 on_control=node)
    server = world.factory.buildProtocol(None)
    pump = iosim.connect(server, iosim.makeFakeServer(server), victim,
                         iosim.makeFakeClient(victim), greet=False, clock=world.clock)
    pump.flush(advanceClock=False)
    world.clock.advance(0)  # registered: the init is written now
    outgoing = pump.serverIO.getOutBuffer()
    assert len(outgoing) > MAX_CONTROL_PIECE * 2
    victim.dataReceived(outgoing[: MAX_CONTROL_PIECE + 1000])  # the first piece only
    victim.connectionLost(Failure(ConnectionLost("cut mid-snapshot")))
    # Half a snapshot is never applied: the node keeps enforcing what it knew.
    assert [l["id"] for l in node.state.locks] == [lock["id"]]
    # The tunnel after that brings the whole state, the changes made meanwhile included.
    connected_pair(world.clock, server_factory=world.factory, on_control=node)
    assert [l["id"] for l in node.state.locks] == [second["id"]]
    assert node.types() == ["init", "init"] and "big3" in node.state.roles


def test_an_agent_without_a_control_callback_gets_no_pushes():
    world = ProxyWorld()
    agent, server, pump, _ = connected_pair(world.clock, server_factory=world.factory)
    assert CONTROL_CAPABILITY not in agent.offered_capabilities()
    assert not server.takes_control
    assert world.control.publisher.sink_count() == 0


def test_a_closed_tunnel_is_no_longer_a_sink():
    world = ProxyWorld()
    agent, server, pump, received = world.agent()
    assert world.control.publisher.sink_count() == 1
    agent.transport.loseConnection()
    world.settle(pump)
    assert world.control.publisher.sink_count() == 0


def test_a_lock_ends_the_proxys_own_sessions_of_that_user_after_the_grace():
    world = ProxyWorld()
    ended: list[str] = []
    world.control.sessions.register(user="alice", cluster="unit", terminate=ended.append)
    world.control.sessions.register(user="bob", cluster="unit", terminate=ended.append)
    resolve(world.auth.create_lock({"user": "alice"}, message="stop",
                                   ttl=timedelta(minutes=5)))
    assert ended == []  # the node tells the user first
    world.clock.advance(1)
    assert ended == ["user alice is locked: stop"]
    assert len(world.control.sessions) == 1


def test_a_lock_removed_during_the_grace_ends_nothing():
    world = ProxyWorld()
    ended: list[str] = []
    world.control.sessions.register(user="alice", cluster="unit", terminate=ended.append)
    lock = resolve(world.auth.create_lock({"user": "alice"}, message="brief"))
    world.clock.advance(0.1)
    resolve(world.auth.delete_lock(lock["id"]))
    world.control.sessions.register(user="alice", cluster="unit", terminate=ended.append)
    world.clock.advance(1)
    assert ended == [] and len(world.control.sessions) == 2


def test_the_proxy_refuses_locked_users_and_nodes():
    import pytest

    from edgeaccess.identity.locks import Locked

    world = ProxyWorld()

    class Identity:
        username, cluster = "alice", "unit"

    world.control.check_user(Identity())
    world.control.check_target("web-1.unit", "alice")
    resolve(world.auth.create_lock({"user": "alice"}, message="m1"))
    resolve(world.auth.create_lock({"node": "web-1"}, message="m2"))
    with pytest.raises(Locked, match="m1"):
        world.control.check_user(Identity())
    with pytest.raises(Locked, match="m2"):
        world.control.check_target("web-1.unit", "bob")
    with pytest.raises(Locked, match="m2"):
        world.control.check_target("web-1", "bob")
    world.control.check_target("web-1.leaf", "bob")  # a leaf's node: its own locks decide
    refusals = [e for e in world.audit.named("auth") if e.get("lock_id")]
    assert len(refusals) == 3


def test_a_leaf_relays_its_roots_user_locks_to_its_nodes():
    root, leaf = ProxyWorld("root"), ProxyWorld("leaf")
    # The leaf's tunnel to the root takes pushes like a node's does.
    relay = lambda data: leaf.control.root_control("root", data)  # noqa: E731
    _, _, root_pump, _ = connected_pair(root.clock, server_factory=root.factory,
                                        on_control=relay)
    agent, server, pump, at_leaf_node = leaf.agent()
    lock = resolve(root.auth.create_lock({"user": "alice"}, message="root says no"))
    resolve(root.auth.create_lock({"node": "node-1"}, message="a root node"))
    root.settle(root_pump)
    leaf.settle(pump)
    [relayed] = at_leaf_node.state.locks
    assert relayed["id"] == f"root.{lock['id']}" and relayed["cluster"] == "root"
    from edgeaccess.identity.locks import matching_lock

    now = leaf.clock.seconds()
    assert matching_lock(at_leaf_node.state.locks, now, user="alice", user_cluster="root",
                         local_cluster="leaf") is not None
    # The leaf's own alice is someone else.
    assert matching_lock(at_leaf_node.state.locks, now, user="alice", user_cluster="leaf",
                         local_cluster="leaf") is None
    leaf.control.root_gone("root")
    leaf.settle(pump)
    assert at_leaf_node.state.locks == []


def test_nothing_secret_is_pushed():
    import json as jsonlib

    world = ProxyWorld()
    agent, server, pump, received = world.agent()
    state = {"name": "root", "enabled": True, "ssh_user_ca": ["ssh-ed25519 AAAA root"],
             "role_map": [{"remote": "access", "local": ["access"]}],
             "tunnel_key": "-----BEGIN PRIVATE KEY----- secret", "ca_pin": "sha256:00",
             "cluster_certificate": "cert", "root_tls_ca": "ca"}
    world.backend.put("/trusted_state/root", jsonlib.dumps(state).encode())
    connector = {"kind": "ldap_connector", "version": "v1", "metadata": {"name": "corp"},
                 "spec": {"bind_password": "hunter2"}}
    world.backend.put("/resources/ldap_connector/corp",
                      jsonlib.dumps(connector).encode())
    world.settle(pump)
    pushed = jsonlib.dumps(received.messages) + world.control.publisher.init_bytes().decode()
    assert "secret" not in pushed and "hunter2" not in pushed and "cluster_certificate" not in pushed
    assert received.state.trusted == [{"name": "root", "ssh_user_ca": ["ssh-ed25519 AAAA root"],
                                       "role_map": [{"remote": "access", "local": ["access"]}]}]
