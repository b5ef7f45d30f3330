"""Two proxies on one PostgreSQL, and the database restarted under them.

One durable PostgreSQL server for the module; proxies A and B share it, the
CA key (``--ca-key-file``) and the recordings directory (``--recordings-dir``);
a node joined through A listens on the LAN, so either proxy routes to it.

- A user created through A logs in through B with the one CA pin; a session
  recorded through A plays through B (``edge play``).
- ``pg_ctl restart -m fast`` and then ``-m immediate`` while logins (HTTP,
  to A and B in turn) and SSH sessions (OpenSSH, through A and B in turn)
  keep coming, and one session stays open through B: it keeps working;
  afterwards logins, sessions and audit work, ``edgectl audit
  verify`` passes, and every event that was acknowledged is there, once:
  one ``user.login`` per login answered, one ``exec`` per command that ran.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import subprocess
import threading
import time

import pexpect
import pytest

from edgeaccess.devcluster import ProxyProcess, join_node, run_edge, wait_for
from edgeaccess.devpostgres import BIN, PostgresServer
from edgeaccess.pki import keys

pytestmark = pytest.mark.skipif(not os.path.exists(BIN), reason="PostgreSQL 15 is not installed")

CLUSTER = "ha-faults"
PASSWORD = "ha-faults-pass-1234"


@pytest.fixture(scope="module")
def server():
    server = PostgresServer(durable=True)  # a crash loses no committed transaction
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(server, tmp_path_factory):
    base = tmp_path_factory.mktemp("ha-faults")
    url = server.create_database()
    key_file = base / "ca.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    shared = ["--backend", url, "--ca-key-file", str(key_file),
              "--recordings-dir", str(base / "recordings")]
    a = ProxyProcess(base / "a", base / "a.log", cluster=CLUSTER, extra_args=shared)
    b = ProxyProcess(base / "b", base / "b.log", cluster=CLUSTER, extra_args=shared)
    node = None
    try:
        a.start(timeout=60)
        b.start(timeout=60)
        a.add_user("alice", PASSWORD, roles=("access",), logins=("root",))
        node, _ = join_node(a, base, "db1", timeout=60)
        yield {"a": a, "b": b, "node": node, "base": base}
    except Exception:
        for process in (a, b, node):
            if process is not None:
                print(process.log()[-4000:])
        raise
    finally:
        for process in (node, a, b):
            if process is not None:
                process.stop()


@pytest.fixture(scope="module")
def homes(cluster):
    """alice logged in through A and through B, both with A's CA pin: one CA."""
    pin = cluster["a"].pin()
    assert cluster["b"].pin() == pin
    base = cluster["base"]
    return {name: cluster[name].login(base / f"home-{name}", "alice", PASSWORD, pin=pin)
            for name in ("a", "b")}


def ssh(home, *command, timeout=60):
    return subprocess.run(["ssh", "-F", str(home / "ssh_config"), "-o", "BatchMode=yes",
                           f"root@db1.{CLUSTER}", *command], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def search(proxy, *args):
    return proxy.edgectl_json("audit", "search", "--since", "2h", *args)


def test_a_session_recorded_through_a_plays_through_b(cluster, homes):
    earlier = {e["id"] for e in search(cluster["b"], "--type", "session.start")}
    child = pexpect.spawn("ssh", ["-tt", "-F", str(homes["a"] / "ssh_config"),
                                  f"root@db1.{CLUSTER}"], timeout=60, encoding="utf-8")
    child.sendline("echo recorded-$((6*7))")
    child.expect("recorded-42")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    [start] = wait_for(lambda: [e for e in search(cluster["b"], "--type", "session.start")
                                if e.get("kind") == "shell" and e["id"] not in earlier],
                         60, "session.start", interval=0.5)

    def played():
        result = run_edge(homes["b"], "play", start["session_id"], "--format", "cast")
        return result.stdout if result.returncode == 0 and "recorded-42" in result.stdout \
            else None

    cast = wait_for(played, 60, "the recording through B", interval=0.5)
    assert json.loads(cast.splitlines()[0])["version"] == 2


class _Traffic:
    """Logins and SSH sessions in two threads, to A and B in turn, counted."""

    def __init__(self, cluster, homes) -> None:
        self.proxies = [cluster["a"], cluster["b"]]
        self.homes = [homes["a"], homes["b"]]
        self.stop = threading.Event()
        self.logins: list[tuple[float, int]] = []  # (when, proxy index) answered 200
        self.login_errors = 0
        self.commands: list[tuple[float, str]] = []  # (when, marker) that ran
        self.command_errors = 0
        context = ssl.create_default_context(
            cafile=str(cluster["a"].data_dir / "ca" / "tls_ca.crt"))
        context.check_hostname = False
        self._context = context
        self._public = keys.public_key_openssh(keys.generate_private_key()).decode()
        self._threads = [threading.Thread(target=self._log_in, daemon=True),
                         threading.Thread(target=self._run_commands, daemon=True)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(120)

    def _log_in(self) -> None:
        body = json.dumps({"user": "alice", "password": PASSWORD,
                           "ssh_public_key": self._public}).encode()
        turn = 0
        while not self.stop.is_set():
            index = turn % 2
            turn += 1
            host, port = self.proxies[index].addr("web").rsplit(":", 1)
            try:
                conn = http.client.HTTPSConnection(host, int(port), context=self._context,
                                                   timeout=60)
                conn.request("POST", "/v1/login", body, {"Content-Type": "application/json"})
                answer = conn.getresponse()
                answer.read()
                conn.close()
            except OSError:
                self.login_errors += 1
                continue
            if answer.status == 200:
                self.logins.append((time.monotonic(), index))
            else:
                self.login_errors += 1
                time.sleep(0.2)

    def _run_commands(self) -> None:
        turn = 0
        while not self.stop.is_set():
            index = turn % 2
            turn += 1
            marker = f"fault-marker-{turn}"
            try:
                result = ssh(self.homes[index], "echo", marker)
            except subprocess.TimeoutExpired:
                self.command_errors += 1
                continue
            if result.returncode == 0 and marker in result.stdout:
                self.commands.append((time.monotonic(), marker))
            else:
                self.command_errors += 1
                time.sleep(0.2)

    def wait_for_progress(self, since: float, logins: int = 2, commands: int = 2,
                          timeout: float = 90) -> None:
        """Until both kinds of traffic succeeded through both proxies after ``since``."""
        def progressed():
            done = [i for t, i in self.logins if t > since]
            ran = [m for t, m in self.commands if t > since]
            return len(done) >= logins and {0, 1} <= set(done) and len(ran) >= commands

        wait_for(progressed, timeout, "logins and sessions after the restart", interval=0.2)


def test_database_restarts_mid_traffic_lose_nothing_acknowledged(cluster, homes, server):
    a, b = cluster["a"], cluster["b"]
    before = len(search(a, "--type", "user.login", "--user", "alice"))
    # A session held open through B across both restarts.
    held = pexpect.spawn("ssh", ["-tt", "-F", str(homes["b"] / "ssh_config"),
                                 f"root@db1.{CLUSTER}"], timeout=60, encoding="utf-8")
    held.sendline("echo held-$((40+2))")
    held.expect("held-42")
    traffic = _Traffic(cluster, homes)
    traffic.start()
    try:
        traffic.wait_for_progress(0)
        for mode in ("fast", "immediate"):
            server.restart(mode)
            restarted = time.monotonic()
            traffic.wait_for_progress(restarted)
            held.sendline(f"echo still-$((1+1))-{mode}")
            held.expect(f"still-2-{mode}")
    finally:
        traffic.finish()
        held.sendline("exit")
        held.expect(pexpect.EOF)
        held.close()
    print(f"logins answered {len(traffic.logins)} (errors {traffic.login_errors}), "
          f"commands run {len(traffic.commands)} (errors {traffic.command_errors})")
    assert traffic.logins and traffic.commands
    # Both proxies' change feeds came back: a lock made through one is in the
    # other's cache (locks are read from it), each way.
    for maker, reader, name in ((a, b, "nobody-a"), (b, a, "nobody-b")):
        made = maker.edgectl("lock", "--user", name, "--ttl", "10m").stdout.strip()
        wait_for(lambda: any(lock["target"] == {"user": name}
                             for lock in reader.edgectl_json("locks", "ls")),
                 30, f"the lock on {name} through the other proxy", interval=0.3)
        assert made
    # Audit works after the restarts, and verify passes across both writers.
    result = a.edgectl_json("audit", "verify")
    assert result["ok"], result
    # Every login answered is one stored user.login, stored once.
    def all_logins():
        found = [e for e in search(b, "--type", "user.login", "--user", "alice")
                 if e.get("success")]
        return found if len(found) - before >= len(traffic.logins) else None

    found = wait_for(all_logins, 60, "every login's event", interval=0.5)
    assert len(found) - before == len(traffic.logins), "no login event twice"
    assert len({e["id"] for e in found}) == len(found)
    # Every command that ran is one exec event (the node's acknowledged delivery).
    markers = {marker for _, marker in traffic.commands}

    def all_commands():
        stored = [e["command"].split()[-1] for e in search(a, "--type", "exec")
                  if e.get("command", "").startswith("echo fault-marker-")]
        return stored if markers <= set(stored) else None

    stored = wait_for(all_commands, 90, "every command's exec event", interval=0.5)
    ran_and_stored = [m for m in stored if m in markers]
    assert len(ran_and_stored) == len(set(ran_and_stored)), "no exec event twice"
    final = b.edgectl_json("audit", "verify")
    assert final["ok"], final
    # Both proxies logged the lost feed and its return, and stayed up.
    for proxy in (a, b):
        assert proxy.process.poll() is None
        assert "change feed lost" in proxy.log()
