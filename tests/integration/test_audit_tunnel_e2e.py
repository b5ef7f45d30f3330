"""Audit through the reverse tunnel: a real ``twistd edgeproxy``, tunnelled
``edgenode`` processes, OpenSSH (``ssh``, ``scp``, ``sftp``), ``edge``,
``edgectl`` and ``asciinema`` on 127.0.0.1.

The nodes join with ``--auth-server`` set to the proxy's web address: they
open no port, users reach them through their tunnel, and they deliver their
audit spool to the proxy's web port. Exec, interactive, scp and sftp
sessions produce their events with the right fields; a tunnel session's
recording replays in ``asciinema``; a node killed with -9 mid-session
delivers its spool when restarted; the proxy killed with -9 mid-session and
restarted on the same ports receives the cut session's ``session.end`` and
its recording tail exactly once. The proxy test runs last (it restarts the
module's proxy).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pexpect
import pytest
from cryptography.hazmat.primitives import serialization as ssh_serialization

from edgeaccess.devcluster import join_node, run_edge, wait_for
from edgeaccess.pki import keys, sshca
from tests.integration.steps import interactive_ssh, session_events

PASSWORD = "audit-tunnel-pass-1"


def login(proxy, home, user):
    return proxy.login(home, user, PASSWORD)


def search(proxy, *args):
    return proxy.edgectl_json("audit", "search", *args)


def start_tunnel_node(proxy, base, name, **options):
    return join_node(proxy, base, name, tunnel=True, labels="env=tunnel", **options)[0]


@pytest.fixture(scope="module")
def users(proxy):
    proxy.add_user("alice", PASSWORD, roles=("access",), logins=("root",))


@pytest.fixture(scope="module")
def tn1(proxy, users, tmp_path_factory):
    # A short outage budget: a session cut by a proxy crash ends (and is
    # audited) while the proxy is down, as the crash test below needs.
    process = start_tunnel_node(proxy, tmp_path_factory.mktemp("tn1"), "tn1",
                                extra_args=["--resume-budget", "2s"])
    yield process
    process.stop()


#: Set by the proxy-crash test (last in file order): the proxy was restarted.
_proxy_restarted: list[bool] = []


@pytest.fixture
def node(tn1, proxy, alice_home):
    """tn1, reachable: after the proxy-crash test restarted the proxy, its
    tunnel agent may still be backing off, so a test run after it waits."""
    if _proxy_restarted:
        wait_for(lambda: ssh(alice_home, "tn1", proxy, "true").returncode == 0, 60,
                 "tn1 reachable after the proxy restart", tn1.process, interval=0.5)
        _proxy_restarted.clear()
    return tn1


@pytest.fixture(scope="module")
def alice_home(proxy, users, tmp_path_factory):
    return login(proxy, tmp_path_factory.mktemp("alice") / "edge", "alice")


def ssh_options(home):
    return ["-F", str(home / "ssh_config"), "-o", "BatchMode=yes", "-o", "ConnectTimeout=15"]


def target(node_name, proxy):
    return f"root@{node_name}.{proxy.cluster}"


def ssh(home, node_name, proxy, *command):
    return subprocess.run(["ssh", *ssh_options(home), target(node_name, proxy), *command],
                          capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def interactive(home, node_name, proxy):
    return interactive_ssh(*ssh_options(home), target(node_name, proxy))


def check_common(event, proxy, node_name, session_id):
    # A tunnelled node's SSH clients arrive over a tunnel channel whose
    # OpenChannel carries the user's address as the proxy saw it.
    assert re.fullmatch(r"[0-9a-f-]{36}", event["id"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", event["time"])
    assert (event["cluster"], event["user"], event["login"], event["node"],
            event["session_id"], event["remote_addr"]) == \
        (proxy.cluster, "alice", "root", node_name, session_id, "127.0.0.1")


def new_events(proxy, event_type, seen, predicate=lambda e: True, count=1):
    """Wait for ``count`` events of ``event_type`` whose ids are not in ``seen``."""
    def found():
        fresh = [e for e in search(proxy, "--type", event_type, "--user", "alice")
                 if e["id"] not in seen and predicate(e)]
        return fresh if len(fresh) >= count else None

    return wait_for(found, 30, f"{count} new {event_type} event(s)", interval=0.3)


def ids(proxy, event_type):
    return {e["id"] for e in search(proxy, "--type", event_type)}


def cast_of(home, session_id, marker):
    def cast():
        result = run_edge(home, "play", session_id, "--format", "cast")
        return result.stdout if result.returncode == 0 and marker in result.stdout else None

    return wait_for(cast, 30, f"the recording of {session_id} with {marker!r}", interval=0.3)


def asciinema_cat(text, tmp_path):
    path = tmp_path / "session.cast"
    path.write_text(text)
    played = subprocess.run([sys.executable, "-m", "asciinema", "cat", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert played.returncode == 0, played.stderr
    return played.stdout


def spool_empty(node):
    spool = node.data_dir / "audit-spool"
    events = spool / "events.jsonl"
    return ((not events.exists() or not events.read_bytes())
            and not list((spool / "sessions").glob("*.json"))
            and not list((spool / "recordings").glob("*")))


# --- sessions through the tunnel ----------------------------------------------------

def test_an_exec_through_the_tunnel_produces_start_exec_and_end(proxy, node, alice_home):
    auth_before = ids(proxy, "auth")
    result = ssh(alice_home, "tn1", proxy, "echo", "tunnel-exec-marker")
    assert result.returncode == 0, result.stderr + node.log()[-2000:]
    assert result.stdout == "tunnel-exec-marker\n"

    [exec_event] = new_events(proxy, "exec", set(),
                              lambda e: e["command"] == "echo tunnel-exec-marker")
    session_id = exec_event["session_id"]
    events = session_events(proxy, session_id)
    assert [e["event"] for e in events] == ["session.start", "exec", "session.end"]
    for event in events:
        check_common(event, proxy, "tn1", session_id)
    assert len({e["id"] for e in events}) == 3
    assert events[0]["kind"] == "exec" and events[0]["roles"] == ["access"]
    assert events[2]["exit_status"] == 0 and events[2]["recorded"] is False
    assert events[2]["reason"] == "exited"
    # The edge ssh_config offers only the certificate: no refused-auth noise.
    assert [e for e in search(proxy, "--type", "auth") if e["id"] not in auth_before] == []


def test_an_interactive_tunnel_session_is_recorded_and_replays_in_asciinema(
        proxy, node, alice_home, tmp_path):
    before = ids(proxy, "session.start")
    child = interactive(alice_home, "tn1", proxy)
    child.sendline("echo tunnel-shell-$((6*7))")
    child.expect("tunnel-shell-42")
    child.setwinsize(40, 120)
    child.sendline("echo resized-$(tput cols)")
    child.expect("resized-120")
    child.sendline("exit 3")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 3

    [start] = new_events(proxy, "session.start", before, lambda e: e["node"] == "tn1")
    session_id = start["session_id"]
    events = session_events(proxy, session_id)
    assert [e["event"] for e in events] == ["session.start", "session.end"]
    for event in events:
        check_common(event, proxy, "tn1", session_id)
    assert events[0]["kind"] == "shell"
    assert (events[1]["exit_status"], events[1]["recorded"]) == (3, True)

    text = cast_of(alice_home, session_id, "resized-120")
    lines = text.splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2 and (header["width"], header["height"]) == (100, 30)
    records = [json.loads(line) for line in lines[1:]]
    assert [r[2] for r in records if r[1] == "r"] == ["120x40"]
    times = [r[0] for r in records]
    assert times == sorted(times)
    played = asciinema_cat(text, tmp_path)
    assert "tunnel-shell-42" in played and "resized-120" in played


@pytest.mark.parametrize("direction,flag", [("upload", "-t"), ("download", "-f")])
def test_scp_through_the_tunnel_produces_an_scp_event(proxy, node, alice_home, tmp_path,
                                                      direction, flag):
    # A space in the name: the event's path is the file, shell quoting removed.
    remote = f"/tmp/edge audit scp {direction} {tmp_path.name}"
    quoted = shlex.quote(remote)
    local = tmp_path / "local.txt"
    if direction == "upload":
        local.write_text("scp payload up\n")
        argv = [str(local), f"{target('tn1', proxy)}:{quoted}"]
    else:
        assert ssh(alice_home, "tn1", proxy, f"echo scp payload down > {quoted}").returncode == 0
        argv = [f"{target('tn1', proxy)}:{quoted}", str(local)]
    before = ids(proxy, "scp")
    # -O: the classic scp protocol (an exec of ``scp -t``/``scp -f`` on the node);
    # -T: the client cannot match a quoted remote name with the one it gets back.
    result = subprocess.run(["scp", "-O", "-T", *ssh_options(alice_home), *argv],
                            capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr + node.log()[-2000:]
    if direction == "download":
        assert local.read_text() == "scp payload down\n"
    else:
        assert ssh(alice_home, "tn1", proxy, "cat", quoted).stdout == "scp payload up\n"
    ssh(alice_home, "tn1", proxy, "rm", "-f", quoted)

    [scp] = new_events(proxy, "scp", before)
    session_id = scp["session_id"]
    check_common(scp, proxy, "tn1", session_id)
    assert (scp["action"], scp["path"]) == (direction, remote)
    assert re.fullmatch(rf"scp( -\w+)* {flag}( -\w+)* {re.escape(quoted)}", scp["command"])
    events = session_events(proxy, session_id)
    assert [e["event"] for e in events] == ["session.start", "exec", "scp", "session.end"]
    assert events[1]["command"] == scp["command"]
    assert events[3]["exit_status"] == 0


def test_sftp_through_the_tunnel_produces_an_sftp_event(proxy, node, alice_home, tmp_path):
    before = ids(proxy, "sftp")
    batch = tmp_path / "batch"
    batch.write_text("pwd\n")
    result = subprocess.run(["sftp", *ssh_options(alice_home), "-b", str(batch),
                             target("tn1", proxy)], capture_output=True, text=True,
                            timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr + node.log()[-2000:]
    [sftp] = new_events(proxy, "sftp", before)
    session_id = sftp["session_id"]
    check_common(sftp, proxy, "tn1", session_id)
    assert sftp["success"] is True
    events = session_events(proxy, session_id)
    assert [e["event"] for e in events] == ["session.start", "sftp", "session.end"]
    assert events[0]["kind"] == "sftp"


# --- the user's address at a tunnelled node ---------------------------------------

def source_restricted_home(proxy, alice_home, dest, source_address):
    """A copy of alice's profile whose certificate for nodes carries
    ``source-address``; the proxy hop keeps her real certificate, so only
    the tunnelled node decides."""
    dest.mkdir(mode=0o700)
    for name in ("key", "key.pub", "known_hosts"):
        shutil.copy2(alice_home / name, dest / name)
    shutil.copy2(alice_home / "key-cert.pub", dest / "jump-cert.pub")
    user_ca = proxy.authority().ssh_user_ca
    public = keys.load_public_key_openssh((alice_home / "key.pub").read_text())
    real = sshca.user_identity_from_certificate(ssh_serialization.load_ssh_public_identity(
        (alice_home / "key-cert.pub").read_bytes()))
    # What the cluster signed for alice, plus the source-address restriction.
    cert = sshca.issue_user_certificate(
        user_ca, public, username=real.username, principals=list(real.principals),
        roles=list(real.roles), traits=real.traits, cluster=proxy.cluster,
        now=datetime.now(timezone.utc), ttl=timedelta(hours=1),
        permit_port_forwarding=real.permit_port_forwarding,
        critical_options={"source-address": source_address})
    (dest / "key-cert.pub").write_text(cert.public_bytes().decode() + "\n")
    config = (alice_home / "ssh_config").read_text().replace(str(alice_home), str(dest))
    # The first CertificateFile is the proxy hop's.
    config = config.replace(str(dest / "key-cert.pub"), str(dest / "jump-cert.pub"), 1)
    (dest / "ssh_config").write_text(config)
    return dest


def test_the_tunnelled_node_sees_the_users_address_for_source_address(
        proxy, node, alice_home, tmp_path):
    allowed = source_restricted_home(proxy, alice_home, tmp_path / "allowed", "127.0.0.1/32")
    result = ssh(allowed, "tn1", proxy, "echo", "source-address-ok")
    assert result.returncode == 0, result.stderr + node.log()[-2000:]
    assert result.stdout == "source-address-ok\n"

    elsewhere = source_restricted_home(proxy, alice_home, tmp_path / "elsewhere",
                                       "10.9.9.9/32")
    before = ids(proxy, "auth")
    result = ssh(elsewhere, "tn1", proxy, "echo", "should-not-run")
    assert result.returncode == 255 and "should-not-run" not in result.stdout
    assert "Permission denied" in result.stderr
    # Refused by the node itself, which saw the user's real address.
    refusal = new_events(proxy, "auth", before,
                         lambda e: "not allowed by the certificate" in e.get("error", ""))[0]
    assert (refusal["node"], refusal["remote_addr"], refusal["success"]) == \
        ("tn1", "127.0.0.1", False)
    assert "client address 127.0.0.1 is not allowed" in refusal["error"]


# --- outages -----------------------------------------------------------------

def test_a_tunnel_node_killed_mid_session_delivers_its_spool_when_restarted(
        proxy, users, alice_home, tmp_path):
    node2 = start_tunnel_node(proxy, tmp_path, "tn2")
    try:
        child = interactive(alice_home, "tn2", proxy)
        child.sendline("echo before-the-node-crash-$((7*6))")
        child.expect("before-the-node-crash-42")
        sessions = node2.data_dir / "audit-spool" / "sessions"
        [open_session] = wait_for(lambda: list(sessions.glob("*.json")), 10, "the open session")
        session_id = open_session.stem
        node2.kill()
        # The proxy cannot tell a crash from an outage: it holds the user's
        # channel for the budget, until the node is back with a new session.
        node2.token = None
        node2.start()
        child.expect(pexpect.EOF)
        child.close()
        events = session_events(proxy, session_id)
        assert [e["event"] for e in events] == ["session.start", "session.end"]
        assert events[1]["reason"] == "node restarted"
        assert (events[1]["node"], events[1]["user"]) == ("tn2", "alice")
        assert "before-the-node-crash-42" in cast_of(alice_home, session_id,
                                                     "before-the-node-crash-42")
        wait_for(lambda: spool_empty(node2), 30, "an empty spool", interval=0.3)
        assert len(search(proxy, "--session", session_id)) == 2
    finally:
        node2.stop()


def test_a_proxy_killed_mid_session_gets_its_end_and_recording_tail_exactly_once(
        proxy, node, alice_home, tmp_path):
    child = interactive(alice_home, "tn1", proxy)
    child.sendline("echo before-the-proxy-crash-$((6*7))")
    child.expect("before-the-proxy-crash-42")
    sessions = node.data_dir / "audit-spool" / "sessions"
    [open_session] = wait_for(lambda: list(sessions.glob("*.json")), 10, "the open session")
    session_id = open_session.stem
    session_events(proxy, session_id, until_type="session.start")
    # The tail: typed just before the crash, still in the node's spool.
    child.sendline("echo the-tail-$((5*5))")
    child.expect("the-tail-25")
    proxy.kill()
    _proxy_restarted.append(True)
    child.expect(pexpect.EOF)  # the user's TCP went through the proxy
    child.close()
    # The node ends the cut session while nobody can take its events: the
    # end and the finished recording wait in its spool.
    wait_for(lambda: not list(sessions.glob("*.json")), 15, "the session ended at the node")
    wait_for(lambda: "audit delivery failed" in node.log(), 15, "a failed delivery round")
    spool = node.data_dir / "audit-spool"
    spooled = [json.loads(line) for line in (spool / "events.jsonl").read_text().splitlines()]
    # (session.start may still be there too: acknowledged lines are dropped
    # from the file in bulk, and re-sent ones are stored once.)
    assert "session.end" in [e["event"] for e in spooled if e.get("session_id") == session_id]
    state = json.loads((spool / "recordings" / f"{session_id}.json").read_text())
    cast_size = (spool / "recordings" / f"{session_id}.cast").stat().st_size
    assert state["complete"] is True and cast_size > 0

    proxy.start()
    restarted = time.monotonic()
    # The node's shipper backs off (up to 30 s between rounds), but retries at
    # once when its tunnel reconnects or a heartbeat (every second here) goes
    # through again: the spool arrives within seconds, whatever the backoff.
    events = session_events(proxy, session_id, timeout=15)
    print(f"spool delivered {time.monotonic() - restarted:.1f} s after the proxy restarted")
    assert Counter(e["event"] for e in events) == {"session.start": 1, "session.end": 1}
    end = events[-1]
    check_common(end, proxy, "tn1", session_id)
    # The node's tunnel to the dead proxy was lost: the session ended with
    # the outage budget (2 s here), and says so.
    assert end["reason"] == "tunnel outage exceeded 2s" and end["recorded"] is True
    text = cast_of(alice_home, session_id, "the-tail-25")
    played = asciinema_cat(text, tmp_path)
    assert "before-the-proxy-crash-42" in played and "the-tail-25" in played
    assert text.count("the-tail-25") == 1  # no chunk stored twice
    # Once the node's spool is empty nothing more is coming: still exactly once.
    wait_for(lambda: spool_empty(node), 30, "an empty spool", interval=0.3)
    events = search(proxy, "--session", session_id)
    assert Counter(e["event"] for e in events) == {"session.start": 1, "session.end": 1}
    assert len({e["id"] for e in events}) == 2
    assert run_edge(alice_home, "play", session_id, "--format", "cast").stdout == text
    result = proxy.edgectl("audit", "verify")
    assert "The audit chain is intact" in result.stdout
