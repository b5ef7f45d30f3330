"""The reverse tunnel end to end: real ``edgeproxy`` and ``edgenode`` processes,
OpenSSH, a TCP relay whose connections we cut, and kill -9.

A node started with ``--auth-server`` set to the proxy's web address joins
through the proxy, opens no listening port and keeps a TLS + AMP tunnel to
the proxy; users reach it with plain OpenSSH. The module's proxy (conftest)
serves the node ``tn1``; the relay and "proxy down at first start" tests
run clusters of their own. Reconnect times are printed (``-s`` or ``-rA``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeaccess.devcluster import NodeProcess, ProxyProcess, run_edge, wait_for
from edgeaccess.httpclient import Client
from edgeaccess import errors

sys.path.insert(0, str(Path(__file__).parent))
from tcprelay import TcpRelay  # noqa: E402

PASSWORD = "tunnel-e2e-pass-1"
MiB = 1024 * 1024

# One tunnel opened by hand with a node's certificate, claiming any name:
# argv = data_dir tunnel_addr claimed_name; prints one JSON line.
FORGE_SCRIPT = r"""
import json, sys
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from edgeaccess import tls
from edgeaccess.httpclient import split_addr
from edgeaccess.pki import keys, x509ca
from edgeaccess.tunnel.agent import AgentTunnelProtocol
from edgeaccess.tunnel.protocol import ALPN_PROTOCOL, Inventory

data_dir, addr, claim = sys.argv[1:4]

class OneTunnel(Factory):
    def buildProtocol(self, _addr):
        return AgentTunnelProtocol(clock=self.reactor, inventory=Inventory(name=claim))

async def main(reactor):
    with open(f"{data_dir}/tls.key", "rb") as f:
        key = keys.load_private_key(f.read())
    with open(f"{data_dir}/tls.crt", "rb") as f:
        cert = x509ca.load_certificate_pem(f.read())
    with open(f"{data_dir}/ca.pem", "rb") as f:
        cas = x509ca.load_certificates_pem(f.read())
    host, port = split_addr(addr, 3024)
    cluster = x509ca.identity_from_certificate(cert).cluster
    options = tls.client_options(host, cas, cluster=cluster, key=key, cert=cert,
                                 alpn=[ALPN_PROTOCOL])
    factory = OneTunnel()
    factory.reactor = reactor
    endpoint = wrapClientTLS(options, HostnameEndpoint(reactor, host, port, timeout=10))
    tunnel = await endpoint.connect(factory)
    try:
        await tunnel.ready.addTimeout(15, reactor)
        result = {"accepted": True}
    except Exception as e:
        result = {"accepted": False, "error": f"{type(e).__name__}: {e}"}
    tunnel.disconnect("forgery test done")
    print(json.dumps(result), flush=True)

task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
"""


# --- helpers --------------------------------------------------------------------

def edge_login(proxy: ProxyProcess, home: Path) -> None:
    proxy.login(home, "alice", PASSWORD)


def ssh_argv(home: Path, host: str, *command: str) -> list[str]:
    return ["ssh", "-F", str(home / "ssh_config"), "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=10", f"root@{host}", *command]


def ssh(home: Path, host: str, *command: str, input: bytes | None = None,
        stdin=None, timeout: float = 30.0) -> subprocess.CompletedProcess:
    if input is None and stdin is None:
        stdin = subprocess.DEVNULL
    return subprocess.run(ssh_argv(home, host, *command), input=input, stdin=stdin,
                          capture_output=True, timeout=timeout)


def reachable(home: Path, host: str) -> bool:
    try:
        result = ssh(home, host, "echo", "tunnel-ok", timeout=15)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0 and result.stdout == b"tunnel-ok\n"


def wait_reachable(home: Path, host: str, timeout: float = 30.0, process=None) -> None:
    wait_for(lambda: reachable(home, host), timeout, f"ssh to {host}", process, interval=0.1)


def tunnels_up(proxy: ProxyProcess, node: str) -> int:
    """How many times the proxy logged this node's tunnel coming up (over restarts)."""
    return proxy.log().count(f"tunnel up from node:{node}.{proxy.cluster}")


def wait_tunnel_up(proxy: ProxyProcess, node: str, more_than: int, timeout: float = 30.0,
                   process=None) -> None:
    wait_for(lambda: tunnels_up(proxy, node) > more_than, timeout,
             f"tunnel of {node} up (after {more_than})", process, interval=0.05)


def listed(proxy: ProxyProcess, name: str) -> list[dict]:
    return [n for n in proxy.edgectl_json("nodes", "ls") if n["name"] == name]


def listening_sockets(pid: int) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN that process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = TCP_LISTEN
                found.append(fields[1])
    return found


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def start_tunnel_node(proxy: ProxyProcess, base: Path, name: str, **kw) -> NodeProcess:
    """A node joined through the proxy's web address: tunnel mode."""
    before = tunnels_up(proxy, name)
    node = NodeProcess(base / name, base / f"{name}.log", name=name,
                       auth_server=proxy.addr("web"), token=proxy.node_token(),
                       ca_pin=proxy.pin(), labels="env=test,kind=tunnel", **kw)
    node.start()
    try:
        wait_tunnel_up(proxy, name, before, process=node.process)
        node.wait_listed(proxy)
    except Exception:
        node.stop()
        pytest.fail(f"tunnel node {name} did not come up; node log:\n{node.log()[-3000:]}"
                    f"\nproxy log:\n{proxy.log()[-3000:]}")
    return node


def report(what: str, seconds: float) -> None:
    print(f"\nMEASURED {what}: {seconds:.2f} s", flush=True)


# --- fixtures ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def alice(proxy):
    proxy.add_user("alice", PASSWORD, roles=("access",), logins=("root",))
    return "alice"


@pytest.fixture(scope="module")
def home(proxy, alice, tmp_path_factory):
    home = tmp_path_factory.mktemp("edge-home")
    edge_login(proxy, home)
    return home


@pytest.fixture(scope="module")
def tnode(proxy, tmp_path_factory):
    node = start_tunnel_node(proxy, tmp_path_factory.mktemp("tnode"), "tn1")
    yield node
    node.stop()


@pytest.fixture
def host(proxy, tnode, home):
    """``tn1.CLUSTER``, once reachable."""
    name = f"tn1.{proxy.cluster}"
    wait_reachable(home, name, process=tnode.process)
    return name


# --- reachability, listing, no inbound port ------------------------------------------

def test_a_tunnel_node_is_listed_as_tunnel_and_reachable_with_openssh(proxy, tnode, home,
                                                                        host):
    [record] = listed(proxy, "tn1")
    identity = json.loads((tnode.data_dir / "identity.json").read_text())
    assert identity["mode"] == "tunnel"
    assert record["address"] == "tunnel" and record["id"] == identity["uuid"]
    assert "tn1" in proxy.edgectl("nodes", "ls").stdout

    shown = run_edge(home, "ls", "--format", "json")
    assert shown.returncode == 0, shown.stderr
    [seen] = [n for n in json.loads(shown.stdout) if n["name"] == "tn1"]
    assert seen["address"] == "tunnel"
    text = run_edge(home, "ls")
    assert any(line.split()[:2] == ["tn1", "tunnel"] for line in text.stdout.splitlines()), \
        text.stdout

    result = ssh(home, host, "hostname")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == os.uname().nodename
    # By uuid too: the proxy resolves either to the same tunnel.
    by_uuid = ssh(home, f"{identity['uuid']}.{proxy.cluster}", "echo", "uuid-ok")
    assert by_uuid.stdout == b"uuid-ok\n", by_uuid.stderr


def test_a_tunnel_node_holds_no_listening_tcp_socket(proxy, tnode, host):
    assert listening_sockets(tnode.process.pid) == []
    # The same reading finds the proxy's four listeners: the check can fail.
    assert len(listening_sockets(proxy.runtime()["pid"])) >= 4
    ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=10)
    if ss.returncode == 0:
        assert f"pid={tnode.process.pid}," not in ss.stdout


# --- bulk data and flow control ------------------------------------------------------

def test_fifty_mib_cross_the_tunnel_byte_identical_both_ways(home, host, tmp_path):
    payload = os.urandom(50 * MiB)
    digest = hashlib.sha256(payload).hexdigest()
    local = tmp_path / "payload"
    local.write_bytes(payload)
    remote = tmp_path / "uploaded"

    started = time.monotonic()
    with open(local, "rb") as source:
        up = ssh(home, host, f"cat > {remote}", stdin=source, timeout=120)
    upload = time.monotonic() - started
    assert up.returncode == 0, up.stderr
    assert hashlib.sha256(remote.read_bytes()).hexdigest() == digest

    started = time.monotonic()
    down = ssh(home, host, "cat", str(local), timeout=120)
    download = time.monotonic() - started
    assert down.returncode == 0, down.stderr
    assert len(down.stdout) == len(payload)
    assert hashlib.sha256(down.stdout).hexdigest() == digest
    report("50 MiB upload", upload)
    report("50 MiB download", download)


def test_a_terminal_s_keystrokes_echo_while_scp_fills_the_same_tunnel(proxy, tnode, home,
                                                                       host, tmp_path):
    # Ordering and timing are measured elsewhere (tests/tunnel/test_scheduler.py,
    # python -m benchmarks links); here: the node classes a PTY session as
    # interactive and tells the proxy, and both sessions work side by side.
    import select

    payload = os.urandom(20 * MiB)
    source = tmp_path / "bulk"
    source.write_bytes(payload)
    argv = ssh_argv(home, host, "exec cat > /dev/null")
    argv.insert(argv.index(f"root@{host}"), "-tt")  # a PTY: the node echoes each byte
    terminal = subprocess.Popen(argv,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, bufsize=0)

    def echoed(key: bytes) -> bool:
        terminal.stdin.write(key)
        deadline = time.monotonic() + 30
        seen = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([terminal.stdout], [], [], 1.0)
            if ready:
                seen += os.read(terminal.stdout.fileno(), 4096)
                if key in seen:
                    return True
        return False

    copy = None
    try:
        assert echoed(b"a")
        copy = subprocess.Popen(
            ["scp", "-q", "-F", str(home / "ssh_config"), "-o", "BatchMode=yes",
             f"root@{host}:{source}", str(tmp_path / "copied")],
            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        keys = 0
        while copy.poll() is None and keys < 200:
            assert echoed(bytes([98 + keys % 24]))
            keys += 1
        assert copy.wait(120) == 0, copy.stderr.read()
        assert (tmp_path / "copied").read_bytes() == payload
        assert echoed(b"z")
    finally:
        if copy is not None and copy.poll() is None:
            copy.kill()
        terminal.kill()
        terminal.wait(10)
    wait_for(lambda: "sent as interactive" in tnode.log(), 10, "the node classing the PTY")
    assert "sent as interactive" in proxy.log()  # told by the node (ChannelPriority)


def _cat_writes(marker: str) -> int | None:
    """Bytes written so far by the node's ``cat /dev/zero <marker>`` (None: not running)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if marker.encode() in argv and argv[0].endswith(b"cat"):
                for line in (entry / "io").read_text().splitlines():
                    if line.startswith("wchar:"):
                        return int(line.split()[1])
        except OSError:
            continue
    return None


def test_a_stalled_reader_does_not_stall_another_session(proxy, tnode, home, host):
    marker = f"/nonexistent-stall-{os.getpid()}-{time.monotonic_ns()}"
    proxy_pid = proxy.runtime()["pid"]
    rss_before = {"proxy": rss_kib(proxy_pid), "node": rss_kib(tnode.process.pid)}
    # Its stdout is a pipe nobody reads: the stream must stall all the way back.
    stalled = subprocess.Popen(ssh_argv(home, host, "cat", "/dev/zero", marker),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
    try:
        samples: list[int | None] = []

        def source_blocked() -> bool:
            samples.append(_cat_writes(marker))
            return len(samples) > 3 and samples[-1] is not None and samples[-1] > 0 \
                and samples[-1] == samples[-2] == samples[-3]

        wait_for(source_blocked, 20, "the stalled stream to push back to cat", stalled,
                 interval=0.2)
        buffered = samples[-1]
        print(f"\nstalled session: cat blocked after {buffered / MiB:.1f} MiB", flush=True)
        assert buffered < 256 * MiB, buffered

        started = time.monotonic()
        other = ssh(home, host, "head", "-c", str(10 * MiB), "/dev/urandom", timeout=20)
        elapsed = time.monotonic() - started
        assert other.returncode == 0, other.stderr
        assert len(other.stdout) == 10 * MiB
        report("10 MiB beside a stalled session", elapsed)

        # Both processes stayed bounded while /dev/zero could fill memory at GB/s.
        assert rss_kib(proxy_pid) - rss_before["proxy"] < 64 * 1024
        assert rss_kib(tnode.process.pid) - rss_before["node"] < 64 * 1024
        # The stalled session is stalled, not dead: reading resumes it.
        assert stalled.poll() is None
        chunk = stalled.stdout.read(4 * MiB)
        assert chunk == bytes(4 * MiB)
        wait_for(lambda: (_cat_writes(marker) or 0) > buffered, 10,
                 "cat to write again once read", stalled)
    finally:
        stalled.kill()
        stalled.wait(10)
        stalled.stdout.close()


# --- identity: restart without a token, no impersonation -------------------------------

def forge_tunnel(data_dir: Path, tunnel_addr: str, claim: str) -> dict:
    result = subprocess.run([sys.executable, "-c", FORGE_SCRIPT, str(data_dir), tunnel_addr,
                             claim], capture_output=True, text=True, timeout=40)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_node_certificate_cannot_register_as_another_node(proxy, tnode, home, host,
                                                           tmp_path):
    # Node A joins, then stops: its certificate is ours to misuse.
    node_a = start_tunnel_node(proxy, tmp_path, "tn-a")
    node_a.stop()
    tn1_before = listed(proxy, "tn1")

    # The same tool with A's own name is accepted: a refusal below is about the name.
    assert forge_tunnel(node_a.data_dir, proxy.addr("tunnel"), "tn-a") == {"accepted": True}
    for claim in ("tn1", "ghost"):
        answer = forge_tunnel(node_a.data_dir, proxy.addr("tunnel"), claim)
        assert answer["accepted"] is False
        assert f"this certificate is for 'tn-a', not '{claim}'" in answer["error"]
        assert f"refused tunnel from node:tn-a.{proxy.cluster}: Hello names '{claim}'" \
            in proxy.log()

    # The heartbeat API, through the proxy (the node's address) and the auth port.
    for addr in (proxy.addr("web"), proxy.addr("auth")):
        client = Client(addr, ca_pem=(node_a.data_dir / "ca.pem").read_text(),
                        cert_file=str(node_a.data_dir / "tls.crt"),
                        key_file=str(node_a.data_dir / "tls.key"))
        for claim in ("tn1", "ghost"):
            with pytest.raises(errors.AccessDenied, match="only register as itself"):
                client.post("/v1/nodes/heartbeat", {"name": claim, "address": "127.0.0.1:1",
                                                    "labels": {}})

    assert listed(proxy, "ghost") == []
    [tn1] = listed(proxy, "tn1")
    assert tn1["id"] == tn1_before[0]["id"] and tn1["address"] == "tunnel"
    assert reachable(home, host)


def test_a_restarted_tunnel_node_reuses_its_identity_without_a_token(proxy, tnode, home,
                                                                      host):
    before = json.loads((tnode.data_dir / "identity.json").read_text())
    ups = tunnels_up(proxy, "tn1")
    tnode.stop()
    tnode.token = None
    tnode.start()
    wait_tunnel_up(proxy, "tn1", ups, process=tnode.process)
    wait_reachable(home, host, process=tnode.process)
    log = tnode.log()
    assert "identity loaded" in log
    assert "joined cluster" not in log.rpartition("identity loaded")[2]
    assert json.loads((tnode.data_dir / "identity.json").read_text())["uuid"] == before["uuid"]
    [record] = listed(proxy, "tn1")
    assert record["id"] == before["uuid"] and record["address"] == "tunnel"
    assert listening_sockets(tnode.process.pid) == []


# --- proxy restarts ---------------------------------------------------------------------

def restart_until_reachable(proxy, tnode, home, host, ups, how, since=None):
    """Start the stopped ``proxy`` again, wait for tunnel ``ups + 1`` of the
    node and an SSH session through it, and report the times (``since``:
    ``(what, monotonic time)`` the last one counts from, else the start).
    Returns the seconds from the start to a working session."""
    started = time.monotonic()
    proxy.start()
    ready = time.monotonic()
    wait_tunnel_up(proxy, "tn1", ups, process=tnode.process)
    tunnel = time.monotonic()
    wait_reachable(home, host, process=tnode.process)
    done = time.monotonic()
    what, origin = since or ("proxy start", started)
    report(f"{how} restart: proxy start", ready - started)
    report(f"{how} restart: proxy ready -> tunnel up", tunnel - ready)
    report(f"{how} restart: {what} -> ssh works", done - origin)
    return done - started


def test_after_a_graceful_proxy_stop_agents_reconnect_as_asked(proxy, tnode, home, host):
    ups = tunnels_up(proxy, "tn1")
    proxy.stop()
    assert "agents to reconnect: proxy shutting down" in proxy.log()
    wait_for(lambda: "asks us to reconnect in 0.0 s: proxy shutting down" in tnode.log(), 10,
             "the node to obey Reconnect", tnode.process)
    assert "as the proxy asked" in tnode.log()
    assert restart_until_reachable(proxy, tnode, home, host, ups, "SIGTERM") < 20


def test_after_proxy_kill_9_and_restart_the_node_is_reachable_again(proxy, tnode, home,
                                                                    host):
    ups = tunnels_up(proxy, "tn1")
    waits = tnode.log().count("tunnel agent tn1: waiting")
    killed = time.monotonic()
    proxy.kill()
    wait_for(lambda: tnode.log().count("tunnel agent tn1: waiting") > waits, 10,
             "the agent to notice the dead proxy", tnode.process)
    assert tnode.process.poll() is None
    assert restart_until_reachable(proxy, tnode, home, host, ups, "kill -9",
                                   since=("kill", killed)) < 30
    assert len(listed(proxy, "tn1")) == 1


# --- a cut TCP connection under live processes ------------------------------------------

def test_a_cut_connection_reconnects_through_the_relay(tmp_path):
    relay = TcpRelay().start()
    relayed = ProxyProcess(tmp_path / "proxy", tmp_path / "proxy.log", cluster="relayed",
                           extra_args=["--tunnel-public-addr", relay.addr])
    node = None
    try:
        relayed.start()
        relay.target = ("127.0.0.1", relayed.ports["tunnel"])
        assert relayed.addr("tunnel") == relay.addr
        relayed.add_user("alice", PASSWORD, roles=("access",), logins=("root",))
        home = tmp_path / "edge"
        edge_login(relayed, home)
        node = start_tunnel_node(relayed, tmp_path, "tnr")
        host = f"tnr.{relayed.cluster}"
        wait_reachable(home, host, process=node.process)
        # The node dialled the advertised address: its tunnel runs through the relay.
        assert relay.forwarded >= 1 and relay.active() == 1

        for round_ in (1, 2):
            ups = tunnels_up(relayed, "tnr")
            forwarded = relay.forwarded
            cut = time.monotonic()
            assert relay.cut_all() >= 1
            wait_tunnel_up(relayed, "tnr", ups, process=node.process)
            tunnel = time.monotonic()
            wait_reachable(home, host, process=node.process)
            done = time.monotonic()
            assert relay.forwarded > forwarded  # back through the relay, not around it
            assert node.process.poll() is None and relayed.process.poll() is None
            report(f"relay cut #{round_}: cut -> tunnel up", tunnel - cut)
            report(f"relay cut #{round_}: cut -> ssh works", done - cut)
            assert done - cut < 30
        assert "tunnel down: node tnr" in relayed.log()
        assert relayed.edgectl_json("nodes", "ls")[0]["address"] == "tunnel"
    finally:
        if node is not None:
            node.stop()
        relayed.stop()
        relay.close()


# --- a proxy that is not there yet ---------------------------------------------------------

def test_a_node_whose_proxy_is_down_keeps_retrying_and_joins_once_it_is_up(tmp_path):
    late_proxy = ProxyProcess(tmp_path / "proxy", tmp_path / "proxy.log", cluster="late")
    node = None
    try:
        late_proxy.start()
        token, pin, web = late_proxy.node_token(), late_proxy.pin(), late_proxy.addr("web")
        late_proxy.stop()
        node = NodeProcess(tmp_path / "node", tmp_path / "node.log", name="patient",
                           auth_server=web, token=token, ca_pin=pin)
        node.start()
        wait_for(lambda: node.log().count("join failed") >= 2, 20,
                 "two failed join attempts", node.process)
        assert "retrying in" in node.log() and "cannot reach" in node.log()
        started = time.monotonic()
        late_proxy.start()
        wait_tunnel_up(late_proxy, "patient", 0, timeout=40, process=node.process)
        report("first join once the proxy came up", time.monotonic() - started)
        assert node.wait_listed(late_proxy)["address"] == "tunnel"
        assert "joined cluster late as node patient" in node.log()
        assert listening_sockets(node.process.pid) == []
    finally:
        if node is not None:
            node.stop()
        late_proxy.stop()


def test_a_node_follows_the_tunnel_address_when_the_proxy_moves_it(tmp_path):
    moving = ProxyProcess(tmp_path / "proxy", tmp_path / "proxy.log", cluster="moving")
    node = None
    try:
        moving.start()
        node = start_tunnel_node(moving, tmp_path, "mover")
        old_addr = moving.addr("tunnel")
        ups = tunnels_up(moving, "mover")
        moving.stop()
        moving.ports["tunnel"] = 0  # the same web address, another tunnel port
        moving.start()
        assert moving.addr("tunnel") != old_addr
        started = time.monotonic()
        wait_tunnel_up(moving, "mover", ups, timeout=30, process=node.process)
        report("tunnel address moved: proxy ready -> tunnel up", time.monotonic() - started)
        assert f"the proxy's tunnel address is now {moving.addr('tunnel')}" in node.log()
    finally:
        if node is not None:
            node.stop()
        moving.stop()
