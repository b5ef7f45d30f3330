"""Several proxies on one PostgreSQL database, end to end.

Three ``twistd edgeproxy`` processes (A, B, C) share a throw-away
PostgreSQL (edgeaccess.devpostgres) and, through it, the cluster's CAs
(sealed with the one CA key each is given). One tunnelled
node joins through A; it learns every proxy from their ``Discover`` and
keeps a tunnel to each. Users reach it with plain OpenSSH through any
proxy; a lock made through B cuts a session held through A; a graceful stop
of C leaves the node's tunnels to A and B; kill -9 of A leaves a session
through B running, and new sessions through B work within 5 s.

The tests share one cluster (the module's fixtures), the destructive ones
last; each test first starts again what an earlier one stopped
(:func:`running`), so any subset runs too. Times are printed (``-s`` or ``-rA``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from edgeaccess.devcluster import ProxyProcess, join_node, run_edge, wait_for
from edgeaccess.devpostgres import BIN, PostgresServer

sys.path.insert(0, str(Path(__file__).parent))
from test_control_plane_e2e import LiveSession, ssh, ssh_ok  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.exists(BIN), reason="PostgreSQL 15 is not installed")

PASSWORD = "ha-e2e-pass-1"
CLUSTER = "ha-e2e"
#: SPEC "Several proxies": a dead proxy's nodes are reachable through the others within 5 s.
FAILOVER_DEADLINE = 5.0


def report(what: str, seconds: float) -> None:
    print(f"\nMEASURED {what}: {seconds:.2f} s", flush=True)


def tunnels_up(proxy: ProxyProcess, node: str) -> int:
    return proxy.log().count(f"tunnel up from node:{node}.{proxy.cluster}")


def write_ca_key(directory: Path) -> Path:
    """The CA key every proxy of the cluster is given (``--ca-key-file``): the
    CAs are sealed with it in the shared backend (edgeaccess.pki.castore)."""
    from edgeaccess.pki import castore

    path = directory / "ca.key"
    path.write_bytes(castore.format_ca_key(os.urandom(32)))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def database():
    server = PostgresServer()
    yield server.create_database()
    server.stop()


@pytest.fixture(scope="module")
def proxies(database, tmp_path_factory):
    base = tmp_path_factory.mktemp("ha-proxies")
    ca_key = write_ca_key(base)
    started: dict[str, ProxyProcess] = {}
    try:
        for name in ("a", "b", "c"):
            process = ProxyProcess(base / name, base / f"{name}.log", cluster=CLUSTER,
                                   extra_args=["--backend", database,
                                               "--ca-key-file", str(ca_key)])
            started[name] = process
            process.start()
        started["a"].add_user("alice", PASSWORD, roles=("access",), logins=("root",))
        yield started
    except Exception:
        for process in started.values():
            print(process.log()[-4000:])
        raise
    finally:
        for process in started.values():
            process.stop()


@pytest.fixture(scope="module")
def node(proxies, tmp_path_factory):
    a, b, c = proxies["a"], proxies["b"], proxies["c"]
    # Every proxy knows the others before the node comes (its first Discover).
    for proxy in (a, b, c):
        wait_for(lambda: proxy.log().count("joined, tunnel address") >= 2, 20,
                 f"proxy {proxy.directory.name} to see the other two", proxy.process)
    node, _ = join_node(a, tmp_path_factory.mktemp("ha-node"), "hn1", tunnel=True)
    try:
        for proxy in (b, c):
            wait_for(lambda: tunnels_up(proxy, "hn1") >= 1, 30,
                     f"the node's tunnel to proxy {proxy.directory.name}", node.process)
    except Exception:
        print(node.log()[-4000:])
        node.stop()
        raise
    yield node
    node.stop()


@pytest.fixture(scope="module")
def homes(proxies, node, tmp_path_factory):
    """alice's ``edge`` profile through each proxy (its ssh_config jumps via that proxy)."""
    found = {}
    for name, proxy in proxies.items():
        home = tmp_path_factory.mktemp(f"alice-{name}")
        proxy.login(home, "alice", PASSWORD)
        found[name] = home
    for home in found.values():
        wait_for(lambda: ssh_ok(home, f"hn1.{CLUSTER}"), 30, "ssh to hn1", node.process)
    return found


def running(proxies: dict[str, ProxyProcess], node, *names: str) -> None:
    """Start again each of the proxies ``names`` that a destructive test
    stopped or killed, and wait for the node's tunnel to it. In file order
    (the destructive tests last) nothing is restarted."""
    for name in names:
        proxy = proxies[name]
        if proxy.process is not None and proxy.process.poll() is None:
            continue
        before = tunnels_up(proxy, "hn1")
        proxy.start()
        wait_for(lambda: tunnels_up(proxy, "hn1") > before, 30,
                 f"the node's tunnel to the restarted proxy {name}", node.process)


def jump_port(home: Path) -> int:
    """The proxy SSH port alice's ssh_config jumps through."""
    text = (home / "ssh_config").read_text()
    ports = {line.split()[-1] for line in text.splitlines() if line.strip().startswith("Port")}
    return int(max(ports, key=len)) if ports else 0


def test_every_proxy_lists_the_node_joined_through_a(proxies, node, homes):
    running(proxies, node, "a", "b", "c")
    for name in ("b", "c"):
        proxy = proxies[name]
        [listed] = [n for n in proxy.edgectl_json("nodes", "ls") if n["name"] == "hn1"]
        assert listed["address"] == "tunnel"
        shown = run_edge(homes[name], "ls", "--format", "json")
        assert shown.returncode == 0, shown.stderr
        assert [n["address"] for n in json.loads(shown.stdout) if n["name"] == "hn1"] == ["tunnel"]
    # One tunnel per proxy, each to the proxy's own tunnel address.
    log = node.log()
    for proxy in proxies.values():
        assert f"adding proxy {proxy.addr('tunnel')}" in log


def test_the_node_is_reachable_with_openssh_through_each_proxy(proxies, node, homes):
    running(proxies, node, "a", "b", "c")
    for name, proxy in proxies.items():
        assert str(proxy.ports["ssh"]) in (homes[name] / "ssh_config").read_text()
        result = ssh(homes[name], f"hn1.{CLUSTER}", "echo", f"via-{name}")
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"via-{name}\n"


def test_a_lock_made_through_b_cuts_a_session_held_through_a(proxies, node, homes):
    running(proxies, node, "a", "b")
    a, b = proxies["a"], proxies["b"]
    session = LiveSession(homes["a"], f"hn1.{CLUSTER}")
    try:
        locked_at = time.monotonic()
        lock_id = b.edgectl("lock", "--user", "alice", "--message", "ha lock via b").stdout.strip()
        ended = session.ended_within(10)
        assert ended is not None, "the session held through A survived a lock made through B"
        report("edgectl lock through B started -> session through A ended", time.monotonic() - locked_at)
        assert b"ha lock via b" in session.output, session.output[-500:]
        refused = ssh(homes["a"], f"hn1.{CLUSTER}", "true")
        assert refused.returncode != 0
        # B's own cache has the lock too (its watch may trail A's): until it
        # does, a removal could reach B before the lock itself and the late
        # lock would cut the next test's session.
        wait_for(lambda: not ssh_ok(homes["b"], f"hn1.{CLUSTER}")
                 and f"refused alice to -: lock {lock_id}" in b.log(), 15,
                 "B itself refusing alice too")
    finally:
        session.close()
    a.edgectl("locks", "rm", lock_id)
    wait_for(lambda: ssh_ok(homes["b"], f"hn1.{CLUSTER}"), 15, "access back after locks rm")


def test_a_graceful_stop_of_c_leaves_the_node_its_tunnels_to_a_and_b(proxies, node, homes):
    running(proxies, node, "a", "b", "c")
    a, b, c = proxies["a"], proxies["b"], proxies["c"]
    c_tunnel = c.addr("tunnel")
    left_before = [p.log().count(" left, tunnel address ") for p in (a, b)]
    stopped_at = time.monotonic()
    c.stop()
    assert "agents to reconnect: proxy shutting down" in c.log()
    assert "withdrew from the cluster" in c.log()
    # The others drop C at once (its record is deleted, not left to expire).
    for proxy, before in zip((a, b), left_before):
        wait_for(lambda: proxy.log().count(" left, tunnel address ") > before, 10,
                 f"proxy {proxy.directory.name} to drop C", proxy.process)
    report("graceful stop of C -> A and B dropped it", time.monotonic() - stopped_at)
    wait_for(lambda: f"dropping proxy {c_tunnel}" in node.log(), 10,
             "the node to drop its agent for C", node.process)
    for name in ("a", "b"):
        assert ssh_ok(homes[name], f"hn1.{CLUSTER}")
    # The node's tunnels to A and B never went down.
    assert "tunnel down: node hn1" not in a.log() + b.log()


def test_kill_9_of_a_keeps_a_session_through_b_and_new_sessions_work_within_5_s(
        proxies, node, homes):
    running(proxies, node, "a", "b")
    a, b = proxies["a"], proxies["b"]
    session = LiveSession(homes["b"], f"hn1.{CLUSTER}")
    try:
        left_before = b.log().count(" left, tunnel address ")
        killed_at = time.monotonic()
        a.kill()
        # New sessions through B: the node's tunnel to B was up all along.
        wait_for(lambda: ssh_ok(homes["b"], f"hn1.{CLUSTER}"), FAILOVER_DEADLINE,
                 "a new session through B")
        reachable = time.monotonic() - killed_at
        report("kill -9 of A -> new session through B", reachable)
        # The session opened through B before the kill still carries bytes
        # both ways (the pty echoes what we type).
        assert session.process.poll() is None
        session.process.stdin.write(b"still-here-after-kill\n")
        session.process.stdin.flush()
        wait_for(lambda: b"still-here-after-kill" in session.output, 10,
                 "the open session to echo after the kill")
        # B drops the dead proxy within 5 s (its record expires).
        wait_for(lambda: b.log().count(" left, tunnel address ") > left_before, 10,
                 "B to drop the killed A", b.process)
        dropped = time.monotonic() - killed_at
        report("kill -9 of A -> B dropped A", dropped)
        assert dropped <= FAILOVER_DEADLINE + 0.5  # the last step is a 0.2 s log poll
        [listed] = [n for n in b.edgectl_json("nodes", "ls") if n["name"] == "hn1"]
        assert listed["address"] == "tunnel"
    finally:
        session.close()
