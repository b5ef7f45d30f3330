"""TLS routing end to end: OpenSSH's ``ProxyCommand`` (``edgeaccess/client/tlsroute.py``)
opens a mutual TLS stream to the proxy's tunnel port (ALPN ``edge-ssh/1``, the node
as the TLS server name) and the proxy splices it to the node, with no SSH
layer of its own.

One proxy (conftest) serves a LAN node ``lan1`` and a tunnelled node
``tn1``; the user logs in with ``edge login --tls-routing``.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import subprocess
from pathlib import Path

import pytest

from edgeaccess.devcluster import ProxyProcess, join_node, run_edge, wait_for

PASSWORD = "tls-routing-pass-1"
MiB = 1024 * 1024


# --- helpers --------------------------------------------------------------------

def ssh_argv(home: Path, host: str, *command: str) -> list[str]:
    return ["ssh", "-F", str(home / "ssh_config"), "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=10", f"root@{host}", *command]


def ssh(home: Path, host: str, *command: str, input: bytes | None = None,
        timeout: float = 60.0) -> subprocess.CompletedProcess:
    stdin = subprocess.DEVNULL if input is None else None
    return subprocess.run(ssh_argv(home, host, *command), input=input, stdin=stdin,
                          capture_output=True, timeout=timeout)


def s_client(proxy: ProxyProcess, cert_dir: Path, server_name: str, alpn: str,
             timeout: float = 20.0) -> tuple[bytes, bool]:
    """One raw TLS stream to the tunnel port, as the ProxyCommand opens it:
    returns the first line the far end sent (b"" if none) and whether the
    proxy closed the stream by itself (s_client ignores its stdin's EOF)."""
    host, _, port = proxy.addr("tunnel").rpartition(":")
    argv = ["openssl", "s_client", "-quiet", "-nocommands", "-verify_quiet",
            "-verify_return_error", "-no-CApath", "-no-CAstore",
            "-CAfile", str(cert_dir / "ca.pem"), "-cert", str(cert_dir / "tls.crt"),
            "-key", str(cert_dir / "tls.key"), "-verify_ip", host, "-alpn", alpn,
            "-servername", server_name, "-connect", f"{host}:{port}"]
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    try:
        first_line = b""
        ready, _, _ = select.select([child.stdout], [], [], timeout)
        if ready:
            first_line = child.stdout.readline()
        try:
            child.wait(timeout=0.5 if first_line else timeout)
            closed = True
        except subprocess.TimeoutExpired:
            closed = False
        return first_line, closed
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()
        child.stdin.close()


def route_lines(proxy: ProxyProcess) -> list[str]:
    return [line for line in proxy.log().splitlines() if "tls route user=" in line]


def wait_route_line(proxy: ProxyProcess, before: int, *fragments: str) -> str:
    def found():
        for line in route_lines(proxy)[before:]:
            if all(f in line for f in fragments):
                return line
        return None

    return wait_for(found, 15, f"a routing line with {fragments}", interval=0.1)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- fixtures ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def home(proxy, tmp_path_factory):
    proxy.add_user("alice", PASSWORD, roles=("access",), logins=("root",))
    home = tmp_path_factory.mktemp("edge-home")
    result = run_edge(home, "login", "--proxy", proxy.addr("web"), "--user", "alice",
                      "--password-stdin", "--ca-pin", proxy.pin(), "--tls-routing",
                      input=PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    return home


@pytest.fixture(scope="module")
def lan_node(proxy, tmp_path_factory):
    node, _ = join_node(proxy, tmp_path_factory.mktemp("lan1"), "lan1",
                        labels="env=test,kind=lan")
    yield node
    node.stop()


@pytest.fixture(scope="module")
def tunnel_node(proxy, tmp_path_factory):
    node, _ = join_node(proxy, tmp_path_factory.mktemp("tn1"), "tn1", tunnel=True,
                        labels="env=test,kind=tunnel")
    yield node
    node.stop()


@pytest.fixture(params=["lan1", "tn1"])
def host(request, proxy, home, lan_node, tunnel_node) -> str:
    return f"{request.param}.{proxy.cluster}"


# --- the user's configuration ------------------------------------------------------

def test_login_with_tls_routing_writes_a_proxy_command_and_remembers_it(proxy, home):
    config = (home / "ssh_config").read_text()
    assert "ProxyJump" not in config
    assert "ProxyCommand " in config and "tlsroute.py" in config
    assert f"--connect {proxy.addr('tunnel')}" in config
    assert "--alpn edge-ssh/1" in config and config.count("--servername %h") == 1
    assert "--verify-host 127.0.0.1" in config
    profile = json.loads((home / "profile.json").read_text())
    assert profile["tls_routing"] is True and profile["tunnel_addr"] == proxy.addr("tunnel")


def test_edge_config_switches_between_proxy_jump_and_tls_routing(proxy, home, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("profile.json", "ssh_config", "ca.pem"):
        (copy / name).write_bytes((home / name).read_bytes())
    jump = run_edge(copy, "config", "--proxy-jump")
    assert jump.returncode == 0, jump.stderr
    assert f"ProxyJump edge-proxy-{proxy.cluster}" in jump.stdout
    assert "ProxyCommand" not in (copy / "ssh_config").read_text()
    assert json.loads((copy / "profile.json").read_text())["tls_routing"] is False
    back = run_edge(copy, "config", "--tls-routing")
    assert back.returncode == 0, back.stderr
    assert (copy / "ssh_config").read_text().replace(str(copy), str(home)) == \
        (home / "ssh_config").read_text()


# --- reaching nodes ------------------------------------------------------------------

def test_ssh_reaches_the_node_and_passes_the_exit_status(proxy, home, host):
    before = len(route_lines(proxy))
    result = ssh(home, host, "echo", "tls-routed-$((6*7))")
    assert (result.returncode, result.stdout) == (0, b"tls-routed-42\n"), result.stderr
    assert result.stderr == b""  # the relay stays quiet on the user's terminal
    name = host.split(".")[0]
    route = "tunnel" if name == "tn1" else "agent"  # a LAN node: its agent port
    wait_route_line(proxy, before, "user=alice", f"target={host}", f"route={route}",
                    "outcome=ok")
    failed = ssh(home, host, "exit 7")
    assert failed.returncode == 7, failed.stderr


def test_20_mib_both_ways_with_scp_are_byte_identical(home, host, tmp_path):
    source = tmp_path / "up.bin"
    source.write_bytes(os.urandom(20 * MiB))
    remote = f"/tmp/edge-tls-routing-{os.getpid()}-{host.split('.')[0]}.bin"
    config = str(home / "ssh_config")
    try:
        up = subprocess.run(["scp", "-q", "-F", config, "-o", "BatchMode=yes", str(source),
                             f"root@{host}:{remote}"], capture_output=True, timeout=120,
                            stdin=subprocess.DEVNULL)
        assert up.returncode == 0, up.stderr
        remote_sum = ssh(home, host, "sha256sum", remote)
        assert remote_sum.stdout.split()[0].decode() == sha256_of(source)
        back = tmp_path / "down.bin"
        down = subprocess.run(["scp", "-q", "-F", config, "-o", "BatchMode=yes",
                               f"root@{host}:{remote}", str(back)], capture_output=True,
                              timeout=120, stdin=subprocess.DEVNULL)
        assert down.returncode == 0, down.stderr
        assert sha256_of(back) == sha256_of(source)
    finally:
        ssh(home, host, "rm", "-f", remote)


def test_stdin_streams_through_and_eof_ends_the_command(home, host):
    data = os.urandom(3 * MiB)
    result = ssh(home, host, "sha256sum", input=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_node_audit_shows_the_users_address(proxy, home, lan_node):
    marker = f"tls-routing-audit-{os.getpid()}"
    result = ssh(home, f"lan1.{proxy.cluster}", "echo", marker)
    assert result.returncode == 0, result.stderr

    def exec_event():
        return [e for e in proxy.edgectl_json("audit", "search", "--type", "exec")
                if e.get("command") == f"echo {marker}"]

    [event] = wait_for(exec_event, 30, "the exec event", interval=0.3)
    assert (event["user"], event["login"], event["node"], event["remote_addr"]) == \
        ("alice", "root", "lan1", "127.0.0.1")


# --- refusals ------------------------------------------------------------------------

def test_an_unknown_node_fails_cleanly_with_one_routing_line(proxy, home):
    before = len(route_lines(proxy))
    target = f"nosuch.{proxy.cluster}"
    result = ssh(home, target, "true", timeout=30)
    assert result.returncode == 255
    line = wait_route_line(proxy, before, "user=alice", f"target={target}",
                           "outcome=refused")
    assert "not found" in line
    assert len([l for l in route_lines(proxy)[before:] if target in l]) == 1


def test_a_node_certificate_is_refused(proxy, lan_node):
    before = len(route_lines(proxy))
    first_line, closed = s_client(proxy, lan_node.data_dir, f"lan1.{proxy.cluster}",
                                  "edge-ssh/1")
    assert (first_line, closed) == (b"", True)
    line = wait_route_line(proxy, before, "user=node:lan1", "outcome=refused")
    assert "only user certificates" in line


def test_only_the_edge_ssh_alpn_reaches_a_node(proxy, home, lan_node):
    # The positive control of the refusals: the raw stream gets the node's banner.
    target = f"lan1.{proxy.cluster}"
    first_line, _ = s_client(proxy, home, target, "edge-ssh/1")
    assert first_line.startswith(b"SSH-2.0-")
    for alpn in ("http/1.1", "edge-ssh/2"):
        assert s_client(proxy, home, target, alpn) == (b"", True), alpn
