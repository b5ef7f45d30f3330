"""The live control plane end to end: locks and role changes pushed within 2 s.

Real ``edgeproxy`` and ``edgenode`` processes and plain OpenSSH. The
module's proxy serves a tunnelled node (``ct1``) and a LAN node (``cl1``),
both with the default 30 s heartbeat: anything that reaches them within
2 s was pushed (over the tunnel, and over the LAN node's ``/v1/watch``
stream), not polled.
"""

from __future__ import annotations

import subprocess
import threading
from datetime import datetime, timezone
import time
from pathlib import Path

import pytest

from edgeaccess.devcluster import join_node, wait_for

PASSWORD = "control-e2e-pass-1"
DEFAULT_HEARTBEAT = ["--heartbeat-interval", "30"]
#: The product's promise (SPEC "Locks and live changes").
PUSH_DEADLINE = 2.0


@pytest.fixture(scope="module")
def nodes(proxy, tmp_path_factory):
    base = tmp_path_factory.mktemp("nodes")
    proxy.add_user("alice", PASSWORD, roles=("access",), logins=("root",))
    tunnelled, _ = join_node(proxy, base, "ct1", tunnel=True, extra_args=DEFAULT_HEARTBEAT)
    lan, _ = join_node(proxy, base, "cl1", extra_args=DEFAULT_HEARTBEAT)
    yield {"ct1": tunnelled, "cl1": lan}
    tunnelled.stop()
    lan.stop()


@pytest.fixture(scope="module")
def home(proxy, nodes, tmp_path_factory):
    home = tmp_path_factory.mktemp("alice")
    proxy.login(home, "alice", PASSWORD)
    for name in nodes:
        wait_for(lambda: ssh_ok(home, f"{name}.{proxy.cluster}"), 30, f"ssh to {name}")
    return home


def ssh_argv(home: Path, host: str, *command: str, tty: bool = False) -> list[str]:
    return ["ssh", "-F", str(home / "ssh_config"), "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=10", *(["-tt"] if tty else []), f"root@{host}", *command]


def ssh(home: Path, host: str, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(ssh_argv(home, host, *command), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=30)


def ssh_ok(home: Path, host: str) -> bool:
    result = ssh(home, host, "echo", "control-ok")
    return result.returncode == 0 and result.stdout == "control-ok\n"


class LiveSession:
    """An interactive ``ssh -tt`` session kept open; its output collected."""

    def __init__(self, home: Path, host: str) -> None:
        self.process = subprocess.Popen(
            ssh_argv(home, host, "echo session-ready; sleep 300", tty=True),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.output = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(lambda: b"session-ready" in self.output, 30, f"session on {host}",
                 self.process)

    def _read(self) -> None:
        while True:
            data = self.process.stdout.read1(4096)
            if not data:
                return
            self.output += data

    def ended_within(self, seconds: float) -> float | None:
        """Seconds until the session ended (None if it is still open after ``seconds``)."""
        start = time.monotonic()
        try:
            self.process.wait(seconds)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(5)
        return time.monotonic() - start

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def lock(proxy, *args: str) -> tuple[str, float]:
    """``edgectl lock ...``: the lock id and the moment it returned."""
    result = proxy.edgectl("lock", *args)
    return result.stdout.strip(), time.monotonic()


def wait_until(predicate, since: float, what: str, deadline: float = 15.0) -> float:
    """Seconds from ``since`` until ``predicate()`` held (fails after ``deadline``)."""
    wait_for(predicate, deadline, what, interval=0.05)
    return time.monotonic() - since


def test_both_nodes_get_their_state_pushed(proxy, nodes, home):
    assert "control state from the tunnel" in nodes["ct1"].log()
    assert "control stream up" in nodes["cl1"].log()
    assert "control state from the stream" in nodes["cl1"].log()


def test_a_user_lock_cuts_live_sessions_on_both_nodes_and_refuses_new_ones(proxy, nodes, home):
    hosts = [f"{name}.{proxy.cluster}" for name in ("ct1", "cl1")]
    sessions = [LiveSession(home, host) for host in hosts]
    try:
        lock_id, locked_at = lock(proxy, "--user", "alice", "--message", "incident 42 under review")
        for host, session in zip(hosts, sessions):
            ended = session.ended_within(10)
            assert ended is not None, f"the session on {host} survived the lock"
            elapsed = time.monotonic() - locked_at
            print(f"session on {host} ended {elapsed:.2f} s after edgectl lock returned")
            assert elapsed <= PUSH_DEADLINE + 0.5
            assert b"incident 42 under review" in session.output, session.output[-500:]
        for host in hosts:
            refused = ssh(home, host, "true")
            assert refused.returncode != 0
            assert "incident 42 under review" in refused.stderr, refused.stderr
        listed = proxy.edgectl_json("locks", "ls")
        assert [(l["id"], l["target"]) for l in listed] == [(lock_id, {"user": "alice"})]
        assert listed[0]["message"] == "incident 42 under review" and listed[0]["expires"] is None

        proxy.edgectl("locks", "rm", lock_id)
        removed_at = time.monotonic()
        for host in hosts:
            took = wait_until(lambda: ssh_ok(home, host), removed_at, f"access to {host}")
            print(f"access to {host} back {took:.2f} s after locks rm")
        assert time.monotonic() - removed_at <= PUSH_DEADLINE + 2.0  # two ssh round trips
        assert proxy.edgectl_json("locks", "ls") == []
    finally:
        for session in sessions:
            session.close()
    events = {e["event"] for e in proxy.edgectl_json("audit", "search", "--since", "1h")}
    assert {"lock.created", "lock.deleted"} <= events


def test_a_node_lock_cuts_and_refuses_that_node_only(proxy, nodes, home):
    target, other = f"ct1.{proxy.cluster}", f"cl1.{proxy.cluster}"
    session = LiveSession(home, target)
    try:
        lock_id, locked_at = lock(proxy, "--node", "ct1", "--message", "node under maintenance")
        assert session.ended_within(10) is not None
        assert time.monotonic() - locked_at <= PUSH_DEADLINE + 0.5
        assert b"node under maintenance" in session.output
        refused = ssh(home, target, "true")
        assert refused.returncode != 0 and "node under maintenance" in refused.stderr
        assert ssh_ok(home, other)
    finally:
        session.close()
    proxy.edgectl("locks", "rm", lock_id)
    wait_for(lambda: ssh_ok(home, target), 10, "access to ct1 after locks rm")


def test_a_lock_with_a_ttl_expires_by_itself(proxy, nodes, home):
    host = f"cl1.{proxy.cluster}"
    _, locked_at = lock(proxy, "--user", "alice", "--ttl", "4s", "--message", "short lock")
    assert "short lock" in ssh(home, host, "true").stderr
    [listed] = proxy.edgectl_json("locks", "ls")
    expires = datetime.fromisoformat(listed["expires"].replace("Z", "+00:00"))
    wait_until(lambda: ssh_ok(home, host), locked_at, "access after the ttl", 20)
    # Not before the lock's expiry (the clocks are the same machine's).
    assert datetime.now(timezone.utc) >= expires
    assert proxy.edgectl_json("locks", "ls") == []


def test_a_new_deny_in_a_role_reaches_a_tunnelled_node_within_two_seconds(proxy, nodes, home,
                                                                          tmp_path):
    host = f"ct1.{proxy.cluster}"
    role = tmp_path / "access.yaml"
    original = proxy.edgectl_json("get", "roles", "access")[0]
    import yaml

    denied = {**original, "spec": {**original["spec"], "deny": {"logins": ["root"]}}}
    role.write_text(yaml.safe_dump(denied))
    proxy.edgectl("create", "-f", str(role), "--force")
    changed_at = time.monotonic()
    try:
        took = wait_until(lambda: ssh(home, host, "true").returncode != 0, changed_at,
                          "the deny in force on ct1")
        print(f"deny in force on ct1 {took:.2f} s after edgectl create returned")
        assert took <= PUSH_DEADLINE + 1.0  # includes one refused ssh attempt
    finally:
        role.write_text(yaml.safe_dump(original))
        proxy.edgectl("create", "-f", str(role), "--force")
    wait_for(lambda: ssh_ok(home, host), 10, "access to ct1 after the deny is gone")


def test_a_locked_user_stays_locked_across_proxy_and_node_restarts(proxy, nodes, home):
    hosts = [f"{name}.{proxy.cluster}" for name in ("ct1", "cl1")]
    lock_id, _ = lock(proxy, "--user", "alice", "--message", "still locked")
    proxy.stop()
    proxy.start()
    for name, node in nodes.items():
        node.stop()
        node.start()
        node.wait_listed(proxy, 60)
    for host in hosts:
        result = ssh(home, host, "true")
        assert result.returncode != 0 and "still locked" in result.stderr, result.stderr
    # The node's own copy (its data dir) holds the lock too.
    for node in nodes.values():
        assert lock_id in (node.data_dir / "control.json").read_text()
    proxy.edgectl("locks", "rm", lock_id)
    for host in hosts:
        wait_for(lambda: ssh_ok(home, host), 60, f"access to {host} after the restarts")
