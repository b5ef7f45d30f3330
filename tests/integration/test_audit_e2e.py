"""Audit end to end: a real ``twistd edgeproxy`` and ``edgenode``, OpenSSH, ``edge``,
``edgectl`` and ``asciinema`` on 127.0.0.1.

Sessions produce their events at the node, which spools them on disk and
ships them to the auth service; a node killed mid-session delivers its spool
(and ends the cut session) when it comes back; a stored event rewritten
with SQL and another deleted make ``edgectl audit verify`` fail naming the
place. The tamper test stops the module's proxy, so it runs last.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from edgeaccess.devcluster import join_node, run_edge, wait_for
from tests.integration.steps import interactive_ssh, session_events

PASSWORD = "audit-pass-1234"


def login(proxy, home, user):
    return proxy.login(home, user, PASSWORD)


def search(proxy, *args):
    return proxy.edgectl_json("audit", "search", *args)


def start_node(proxy, base, name):
    return join_node(proxy, base, name, labels="env=test")[0]


@pytest.fixture(scope="module", autouse=True)
def fsync_watch(tmp_path_factory):
    """Every Python process of this module (the proxy, the nodes) records the
    fsyncs made on its reactor thread (tests/integration/fsynccheck)."""
    directory = tmp_path_factory.mktemp("fsync-watch")
    here = str(Path(__file__).parent / "fsynccheck")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(
            p for p in (here, os.environ.get("PYTHONPATH")) if p))
        patch.setenv("EDGE_TEST_FSYNC_DIR", str(directory))
        yield directory


@pytest.fixture(scope="module")
def users(proxy):
    proxy.add_user("alice", PASSWORD, roles=("access",), logins=("root",))
    proxy.add_user("bob", PASSWORD, roles=("access",), logins=("root",))
    proxy.add_user("audrey", PASSWORD, roles=("auditor",))


@pytest.fixture(scope="module")
def node(proxy, users, tmp_path_factory):
    process = start_node(proxy, tmp_path_factory.mktemp("node"), "node1")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def alice_home(proxy, users, tmp_path_factory):
    return login(proxy, tmp_path_factory.mktemp("alice") / "edge", "alice")


def ssh_argv(home, node_name, cluster):
    return ["-F", str(home / "ssh_config"), f"root@{node_name}.{cluster}"]


def interactive(home, node_name, cluster):
    return interactive_ssh(*ssh_argv(home, node_name, cluster))


def check_common(event, proxy, session_id):
    assert re.fullmatch(r"[0-9a-f-]{36}", event["id"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", event["time"])
    assert (event["cluster"], event["user"], event["login"], event["node"],
            event["session_id"], event["remote_addr"]) == \
        (proxy.cluster, "alice", "root", "node1", session_id, "127.0.0.1")


def test_an_exec_produces_start_exec_and_end(proxy, node, alice_home):
    result = subprocess.run(["ssh", *ssh_argv(alice_home, "node1", proxy.cluster),
                             "echo", "audit-exec-marker"], capture_output=True, text=True,
                            timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr + node.log()[-2000:]

    def exec_event():
        return [e for e in search(proxy, "--type", "exec", "--user", "alice")
                if e["command"] == "echo audit-exec-marker"]

    [exec_event] = wait_for(exec_event, 30, "the exec event", interval=0.3)
    session_id = exec_event["session_id"]
    events = session_events(proxy, session_id)
    assert [e["event"] for e in events] == ["session.start", "exec", "session.end"]
    for event in events:
        check_common(event, proxy, session_id)
    assert len({e["id"] for e in events}) == 3
    assert events[0]["kind"] == "exec"
    assert events[2]["exit_status"] == 0 and events[2]["recorded"] is False
    logins = search(proxy, "--type", "user.login", "--user", "alice", "--since", "1h")
    assert logins and logins[-1]["success"] is True
    table = proxy.edgectl("audit", "search", "--session", session_id).stdout
    assert "session.start" in table and "command=echo audit-exec-marker" in table


def test_an_interactive_session_is_recorded_and_replays_in_asciinema(
        proxy, node, alice_home, tmp_path):
    child = interactive(alice_home, "node1", proxy.cluster)
    child.sendline("echo interactive-$((6*7))")
    child.expect("interactive-42")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()

    [start] = wait_for(lambda: [e for e in search(proxy, "--type", "session.start",
                                                  "--user", "alice")
                                if e["kind"] == "shell" and e["node"] == "node1"],
                         30, "session.start", interval=0.3)
    session_id = start["session_id"]
    events = session_events(proxy, session_id)
    assert [e["event"] for e in events] == ["session.start", "session.end"]
    for event in events:
        check_common(event, proxy, session_id)
    assert events[1]["recorded"] is True

    def cast():
        result = run_edge(alice_home, "play", session_id, "--format", "cast")
        if result.returncode == 0 and "interactive-42" in result.stdout:
            return result.stdout
        return None

    text = wait_for(cast, 30, "the recording", interval=0.3)
    header = json.loads(text.splitlines()[0])
    assert header["version"] == 2 and (header["width"], header["height"]) == (100, 30)
    path = tmp_path / "session.cast"
    path.write_text(text)
    played = subprocess.run([sys.executable, "-m", "asciinema", "cat", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert played.returncode == 0, played.stderr
    assert "interactive-42" in played.stdout

    replay = run_edge(alice_home, "play", session_id, "--speed", "1000")
    assert replay.returncode == 0 and "interactive-42" in replay.stdout

    auditor = login(proxy, tmp_path / "audrey", "audrey")
    assert "interactive-42" in run_edge(auditor, "play", session_id, "--format", "cast").stdout
    bob = login(proxy, tmp_path / "bob", "bob")
    refused = run_edge(bob, "play", session_id, "--format", "cast")
    assert refused.returncode == 1 and "may not read the recording" in refused.stderr


def test_a_node_killed_mid_session_delivers_its_spool_when_restarted(
        proxy, users, alice_home, tmp_path):
    node2 = start_node(proxy, tmp_path, "node2")
    try:
        child = interactive(alice_home, "node2", proxy.cluster)
        child.sendline("echo before-the-crash-$((7*6))")
        child.expect("before-the-crash-42")
        spool = node2.data_dir / "audit-spool" / "sessions"
        [open_session] = wait_for(lambda: list(spool.glob("*.json")), 10, "the open session")
        session_id = open_session.stem
        node2.kill()
        child.expect(pexpect.EOF)
        child.close()

        node2.token = None
        node2.start()
        events = session_events(proxy, session_id)
        assert [e["event"] for e in events] == ["session.start", "session.end"]
        assert events[1]["reason"] == "node restarted"
        assert events[1]["node"] == "node2" and events[1]["user"] == "alice"

        def recording():
            result = run_edge(alice_home, "play", session_id, "--format", "cast")
            return result.stdout if "before-the-crash-42" in result.stdout else None

        assert wait_for(recording, 30, "the recording's tail", interval=0.3)
        assert "cut by a node restart" in node2.log()
        # Delivered exactly once, and the spool is empty again.
        wait_for(lambda: not (node2.data_dir / "audit-spool" / "events.jsonl").read_bytes(),
                 30, "an empty spool", interval=0.3)
        assert len(search(proxy, "--session", session_id)) == 2
    finally:
        node2.stop()


def test_no_audit_file_is_fsynced_on_a_reactor_thread(fsync_watch, proxy, node):
    """After the sessions above (exec, recorded interactive, a node killed and
    restarted), neither the proxy nor any node fsync'd audit files on its
    reactor thread. The watch is live: joining fsyncs the node's identity
    files there (not audit I/O; rare), and it sees those."""
    stacks = [stack for log in fsync_watch.glob("fsync-*.log")
              for stack in log.read_text().split("\n====\n") if stack.strip()]
    assert any("edgeaccess/pki/keys.py" in stack for stack in stacks), stacks[:3]
    on_reactor = [stack for stack in stacks if "edgeaccess/audit/" in stack]
    assert on_reactor == [], on_reactor[0]


def test_sql_tampering_makes_verify_fail_and_name_the_place(proxy, users):
    ok = proxy.edgectl("audit", "verify")
    assert "The audit chain is intact" in ok.stdout
    events = search(proxy, "--limit", "10000")
    assert len(events) >= 6
    proxy.stop()
    database = sqlite3.connect(proxy.data_dir / "backend.sqlite3")
    with database:
        altered_key, deleted_key = "/audit/events/%020d" % 3, "/audit/events/%020d" % 5
        [(value,)] = database.execute("SELECT value FROM items WHERE key = ?", (altered_key,))
        record = json.loads(value)
        record["event"]["user"] = "mallory"
        database.execute("UPDATE items SET value = ? WHERE key = ?",
                         (json.dumps(record).encode(), altered_key))
        assert database.execute("DELETE FROM items WHERE key = ?", (deleted_key,)).rowcount == 1
    database.close()
    proxy.start()

    result = proxy.edgectl("audit", "verify", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: the audit chain is broken at event 3 (altered): event 3 (id "
        f"{record['event']['id']}) was altered: its content does not match its hash"]
    assert "removed at 5: event 5 was removed" in result.stdout
    as_json = json.loads(proxy.edgectl("audit", "verify", "--format", "json",
                                       check=False).stdout)
    assert [(p["seq"], p["kind"]) for p in as_json["problems"]] == [(3, "altered"),
                                                                     (5, "removed")]
