"""SSH end to end against the real daemons: ``twistd edgeproxy``, two
``twistd edgenode`` (labels env=dev and env=prod), the ``edge`` client and
the real OpenSSH client (``ssh -F $EDGE_HOME/ssh_config``, ``scp``, pexpect).

One proxy (``proxy`` fixture) and the two nodes serve the whole module;
each user gets a profile of its own. Refusals must reach the user through
OpenSSH: a userauth banner ("edgeaccess: access denied: ...") or a channel
open failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pexpect
import pytest

from edgeaccess.devcluster import NodeProcess, run_edge, wait_for
from edgeaccess.pki import keys, sshca

PASSWORD = "e2e-password-1"
#: Node name -> its SSH address as listed by the cluster (filled by ``nodes``).
ADDRESSES: dict[str, str] = {}
#: Cluster name -> CA pin (asking edgectl costs a process start).
PINS: dict[str, str] = {}

ROLE = """\
kind: role
version: v1
metadata: {name: %(name)s}
spec:
  options: {port_forwarding: %(forwarding)s}
  allow:
    logins: [root]
    node_labels: {env: %(envs)s}
"""


def ssh_argv(home: Path, target: str, *command: str, options=()) -> list[str]:
    return ["ssh", "-F", str(home / "ssh_config"), "-o", "BatchMode=yes", *options, target,
            *command]


def run(argv, input: bytes | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=input, capture_output=True, timeout=timeout,
                          stdin=None if input is not None else subprocess.DEVNULL)


def text(result) -> str:
    return (result.stdout + result.stderr).decode(errors="replace")


# --- the cluster --------------------------------------------------------------------


@pytest.fixture(scope="module")
def nodes(proxy, tmp_path_factory):
    """Two nodes joined to the proxy: ``dev`` (env=dev) and ``prod`` (env=prod)."""
    base = tmp_path_factory.mktemp("nodes")
    pin = PINS[proxy.cluster] = proxy.pin()
    started = {}
    for name in ("dev", "prod"):
        started[name] = NodeProcess(base / name, base / f"{name}.log", name=name,
                                    auth_server=proxy.addr("auth"), token=proxy.node_token(),
                                    ca_pin=pin, labels=f"env={name},suite=e2e").start()
    try:
        for name, node in started.items():
            ADDRESSES[name] = node.wait_listed(proxy)["address"]
    except Exception:
        for node in started.values():
            node.stop()
        pytest.fail("a node did not join; logs:\n" + "\n".join(
            n.log()[-2000:] for n in started.values()))
    yield started
    for node in started.values():
        node.stop()


def create_role(proxy, tmp_path: Path, name: str, envs: str, forwarding: bool,
                force: bool = False) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(ROLE % {"name": name, "envs": envs,
                            "forwarding": "true" if forwarding else "false"})
    proxy.edgectl("create", "-f", str(path), *(["--force"] if force else []))


@pytest.fixture(scope="module")
def users(proxy, nodes, tmp_path_factory):
    """Logged-in profiles: ``alice`` (preset access role, logins root and nosuchuser),
    ``dora`` (env=dev only, no forwarding), ``fred`` (every node, forwarding)."""
    base = tmp_path_factory.mktemp("users")
    create_role(proxy, base, "dev-only", "[dev]", forwarding=False)
    create_role(proxy, base, "forwarder", "['*']", forwarding=True)
    proxy.add_user("alice", PASSWORD, roles=("access",), logins=("root", "nosuchuser"))
    proxy.add_user("dora", PASSWORD, roles=("dev-only",))
    proxy.add_user("fred", PASSWORD, roles=("forwarder",))
    homes = {name: login(proxy, base / name, name) for name in ("alice", "dora", "fred")}
    return homes


def login(proxy, home: Path, user: str) -> Path:
    if proxy.cluster not in PINS:
        PINS[proxy.cluster] = proxy.pin()
    result = run_edge(home, "login", "--proxy", proxy.addr("web"), "--user", user,
                      "--password-stdin", "--ca-pin", PINS[proxy.cluster],
                      input=PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    return home


@pytest.fixture(scope="module")
def echo_server():
    """A TCP echo server on 127.0.0.1 (the target of port forwarding)."""

    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            while data := self.request.recv(65536):
                self.request.sendall(data)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


# --- exec, edge ssh, edge ls --------------------------------------------------------


def test_exec_output_stderr_and_exit_status(proxy, users):
    result = run(ssh_argv(users["alice"], f"root@dev.{proxy.cluster}",
                          "echo out; echo err >&2; exit 3"))
    assert result.returncode == 3, text(result)
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"


def test_exec_reads_stdin_until_eof(proxy, users):
    payload = os.urandom(300_000)
    result = run(ssh_argv(users["alice"], f"root@prod.{proxy.cluster}", "sha256sum"),
                 input=payload)
    assert result.returncode == 0, text(result)
    assert result.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()


def test_edge_ssh_runs_a_command_on_a_node(proxy, users):
    result = run_edge(users["alice"], "ssh", "root@dev", "echo", "hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hi\n"
    again = run_edge(users["alice"], "ssh", "--cluster", proxy.cluster, "root@prod",
                     "hostname >/dev/null; echo from-prod; exit 4")
    assert again.returncode == 4, again.stderr
    assert again.stdout == "from-prod\n"


def test_edge_ls_shows_both_nodes_with_labels(proxy, users):
    result = run_edge(users["alice"], "ls")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in ("dev", "prod"):
        [line] = [l for l in lines if l.split()[0] == name]
        assert f"env={name}" in line and "suite=e2e" in line
    listed = run_edge(users["alice"], "ls", "--format", "json")
    names = {n["name"]: n for n in json.loads(listed.stdout)}
    assert names["dev"]["labels"] == {"env": "dev", "suite": "e2e"}
    assert names["prod"]["labels"] == {"env": "prod", "suite": "e2e"}


def test_edge_ls_shows_only_the_nodes_the_roles_allow(proxy, users):
    result = run_edge(users["dora"], "ls", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert [n["name"] for n in json.loads(result.stdout)] == ["dev"]


def test_edge_scp_copies_20_mb_both_ways_byte_identical(proxy, users, tmp_path):
    original = tmp_path / "random.bin"
    original.write_bytes(os.urandom(20 * 1024 * 1024))
    remote_dir = tmp_path / "remote"  # the node runs on this machine, as root
    remote_dir.mkdir()
    up = run_edge(users["alice"], "scp", str(original), f"root@dev:{remote_dir}/up.bin",
                  timeout=60)
    assert up.returncode == 0, up.stderr
    assert (remote_dir / "up.bin").read_bytes() == original.read_bytes()
    back = tmp_path / "back.bin"
    down = run_edge(users["alice"], "scp", f"root@dev:{remote_dir}/up.bin", str(back),
                    timeout=60)
    assert down.returncode == 0, down.stderr
    assert hashlib.sha256(back.read_bytes()).digest() == \
        hashlib.sha256(original.read_bytes()).digest()


def test_sftp_put_ls_get_through_the_proxy(proxy, users, tmp_path):
    source = tmp_path / "put.bin"
    source.write_bytes(os.urandom(1_500_000))
    remote = tmp_path / "sftp-remote"
    remote.mkdir()
    batch = tmp_path / "batch"
    batch.write_text(f"put {source} {remote}/put.bin\nls -l {remote}\n"
                     f"get {remote}/put.bin {tmp_path}/got.bin\n")
    result = run(["sftp", "-F", str(users["alice"] / "ssh_config"), "-b", str(batch),
                  f"root@prod.{proxy.cluster}"])
    assert result.returncode == 0, text(result)
    assert "put.bin" in result.stdout.decode() and "1500000" in result.stdout.decode()
    assert (tmp_path / "got.bin").read_bytes() == source.read_bytes()


# --- roles and labels ----------------------------------------------------------------


def test_a_role_for_env_dev_gets_dev_and_is_refused_on_prod(proxy, users):
    home = users["dora"]
    allowed = run(ssh_argv(home, f"root@dev.{proxy.cluster}", "echo", "in-dev"))
    assert allowed.returncode == 0, text(allowed)
    assert allowed.stdout == b"in-dev\n"
    refused = run(ssh_argv(home, f"root@prod.{proxy.cluster}", "echo", "in-prod"))
    assert refused.returncode == 255
    assert b"in-prod" not in refused.stdout
    assert "access denied: no role allows access to a node with env=prod" in text(refused)


def test_a_role_change_applies_at_the_node_without_a_new_login(proxy, nodes, tmp_path):
    create_role(proxy, tmp_path, "shifting", "[dev]", forwarding=False)
    proxy.add_user("sam", PASSWORD, roles=("shifting",))
    home = login(proxy, tmp_path / "sam", "sam")
    target = f"root@dev.{proxy.cluster}"
    assert run(ssh_argv(home, target, "true")).returncode == 0
    certificate = (home / "key-cert.pub").read_bytes()
    create_role(proxy, tmp_path, "shifting", "[staging]", forwarding=False, force=True)

    def refused():
        result = run(ssh_argv(home, target, "true"))
        return result if result.returncode == 255 else None

    result = wait_for(refused, 20, "the node to apply the changed role", interval=0.3)
    assert "no role allows access to a node with env=dev" in text(result)
    # Pushed to the node (its /v1/watch stream), not fetched at a heartbeat.
    assert "control update from the stream: role shifting" in nodes["dev"].log()
    # Same certificate as before the change, still naming the role.
    assert (home / "key-cert.pub").read_bytes() == certificate
    cert = sshca.load_certificate(certificate)
    assert sshca.user_identity_from_certificate(cert).roles == ("shifting",)


def test_a_login_not_among_the_principals_is_refused(proxy, users, nodes):
    result = run(ssh_argv(users["alice"], f"daemon@dev.{proxy.cluster}", "true"))
    assert result.returncode == 255
    assert "Permission denied" in text(result)
    assert "login daemon is not among the certificate's principals" in text(result)


def test_an_unknown_unix_login_is_refused_with_a_clear_message(proxy, users, nodes):
    result = run(ssh_argv(users["alice"], f"nosuchuser@prod.{proxy.cluster}", "true"))
    assert result.returncode == 255
    assert "access denied: login nosuchuser does not exist on node prod" in text(result)
    assert "login nosuchuser does not exist on node prod" in nodes["prod"].log()


def test_an_unknown_node_at_the_proxy_gives_a_clear_error(proxy, users):
    result = run(ssh_argv(users["alice"], f"root@nowhere.{proxy.cluster}", "true"))
    assert result.returncode == 255
    assert b"node nowhere not found in cluster " + proxy.cluster.encode() in result.stderr
    # edge checks the node first and says so in one line (SPEC: exit non-zero
    # with a one-line reason), without running ssh.
    edge = run_edge(users["alice"], "ssh", "root@nowhere", "true")
    assert edge.returncode == 1
    assert edge.stderr.strip().splitlines() == [
        f"error: node nowhere not found in cluster {proxy.cluster} "
        f"(or your roles do not allow it); see edge ls"]


# --- port forwarding -----------------------------------------------------------------


def test_stdio_forwarding_is_allowed_by_a_role_with_port_forwarding(proxy, users,
                                                                   echo_server):
    result = run(ssh_argv(users["fred"], f"root@dev.{proxy.cluster}",
                          options=["-W", f"127.0.0.1:{echo_server}"]),
                 input=b"ping through the node\n")
    assert result.returncode == 0, text(result)
    assert result.stdout == b"ping through the node\n"


def test_stdio_forwarding_is_refused_by_a_role_without_port_forwarding(proxy, users,
                                                                      echo_server):
    result = run(ssh_argv(users["dora"], f"root@dev.{proxy.cluster}",
                          options=["-W", f"127.0.0.1:{echo_server}"]), input=b"ping\n")
    assert result.returncode == 255
    assert result.stdout == b""
    assert "open failed" in text(result) and "prohibited" in text(result), text(result)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_forward(home: Path, target: str, echo_port: int, log: Path):
    """``ssh -N -L`` in its own process group (with its ProxyJump child); its
    stderr goes to ``log``, not a pipe the jump process could hold open."""
    port = _free_port()
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            ssh_argv(home, target, options=["-N", "-o", "ExitOnForwardFailure=yes",
                                            "-L", f"127.0.0.1:{port}:127.0.0.1:{echo_port}"]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True)

    def listening():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        wait_for(listening, 15, "ssh -L to listen", process)
    except Exception:
        _stop_group(process)
        raise
    return process, port


def _stop_group(process: subprocess.Popen) -> None:
    """Stop an ssh started by this module and its ProxyJump child."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def _exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload``, half-close, and read until the other side closes.

    A reset counts as a close (ssh drops the local connection when the
    channel is refused, possibly before reading what was sent)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        try:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            while chunk := conn.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received


def test_local_forwarding_is_allowed_and_refused_by_role(proxy, users, echo_server, tmp_path):
    process, port = _local_forward(users["fred"], f"root@prod.{proxy.cluster}", echo_server,
                                   tmp_path / "allowed.log")
    try:
        payload = os.urandom(200_000)
        assert _exchange(port, payload) == payload  # half-close passed through
    finally:
        _stop_group(process)

    log = tmp_path / "refused.log"
    process, port = _local_forward(users["dora"], f"root@dev.{proxy.cluster}", echo_server, log)
    try:
        assert _exchange(port, b"denied?") == b""
        wait_for(lambda: b"open failed" in log.read_bytes(), 10, "ssh to report the refusal")
    finally:
        _stop_group(process)
    assert b"prohibited" in log.read_bytes(), log.read_bytes()


# --- interactive ----------------------------------------------------------------------


def test_interactive_pty_session_with_resize_and_ctrl_c(proxy, users):
    child = pexpect.spawn(
        "ssh", ssh_argv(users["alice"], f"root@dev.{proxy.cluster}", options=["-tt"])[1:],
        env={**os.environ, "TERM": "xterm"}, dimensions=(24, 80), timeout=15)
    try:
        child.expect(r"[#$] ")
        child.sendline("PS1='[e2e''-prompt]# '")  # the echoed line does not match
        prompt = r"\[e2e-prompt\]# "
        child.expect(prompt)
        child.sendline("stty size")
        child.expect(r"(\d+) (\d+)\r\n")
        assert child.match.groups() == (b"24", b"80")
        child.expect(prompt)

        child.setwinsize(40, 100)
        deadline = time.monotonic() + 10
        while True:  # the window-change request races with the next command
            child.sendline("stty size")
            child.expect(r"(\d+) (\d+)\r\n")
            size = child.match.groups()
            child.expect(prompt)
            if size == (b"40", b"100") or time.monotonic() > deadline:
                break
        assert size == (b"40", b"100")

        # The command says when it runs: a ^C sent while bash is still
        # starting it (its echo alone is no proof) would reach bash, not it.
        child.sendline("sh -c 'echo slee''ping; exec sleep 30'")
        child.expect("sleeping\r\n")
        started = time.monotonic()
        child.sendcontrol("c")
        child.expect(prompt)
        assert time.monotonic() - started < 10
        child.sendline("echo status=$?")
        child.expect(r"status=(\d+)\r\n")
        assert child.match.group(1) == b"130"

        child.sendline("exit 5")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 5


# --- certificates ---------------------------------------------------------------------


def _profile_copy(home: Path, dest: Path, certificate: str | None) -> Path:
    """A copy of ``home`` whose key has ``certificate`` beside it (or none at all)."""
    dest.mkdir(mode=0o700)
    for name in ("key", "key.pub", "known_hosts"):
        shutil.copy2(home / name, dest / name)
    if certificate is not None:
        (dest / "key-cert.pub").write_text(certificate)
    config = (home / "ssh_config").read_text().replace(str(home), str(dest))
    if certificate is None:
        config = "\n".join(l for l in config.splitlines() if "CertificateFile" not in l)
    (dest / "ssh_config").write_text(config + "\n")
    return dest


def _direct_config(home: Path, node: NodeProcess, cluster: str,
                   known_hosts: Path | None = None) -> Path:
    """An ssh_config reaching the node's SSH port directly, bypassing the proxy."""
    host, _, port = ADDRESSES[node.name].rpartition(":")
    certificate = home / "key-cert.pub"
    config = home / "direct_config"
    config.write_text(
        f"Host direct\n    HostName {host}\n    Port {port}\n"
        f"    HostKeyAlias {node.name}.{cluster}\n"
        f"    UserKnownHostsFile {known_hosts or home / 'known_hosts'}\n"
        f"    IdentityFile {home / 'key'}\n"
        + (f"    CertificateFile {certificate}\n" if certificate.exists() else "")
        + "    IdentitiesOnly yes\n    StrictHostKeyChecking yes\n"
        "    PreferredAuthentications publickey\n    BatchMode yes\n")
    return config


def _forged_certificate(home: Path, ca_key, *, valid_from: datetime, ttl: timedelta,
                        cluster: str) -> str:
    public = keys.load_public_key_openssh((home / "key.pub").read_text())
    cert = sshca.issue_user_certificate(
        ca_key, public, username="alice", principals=["root"], roles=["access"],
        cluster=cluster, now=valid_from, ttl=ttl)
    return cert.public_bytes().decode() + "\n"


def test_direct_connection_to_the_node_with_the_real_certificate_works(proxy, users, nodes):
    config = _direct_config(users["alice"], nodes["dev"], proxy.cluster)
    result = run(["ssh", "-F", str(config), "root@direct", "echo", "direct"])
    assert result.returncode == 0, text(result)
    assert result.stdout == b"direct\n"


def _refused_through_the_proxy_and_by_the_node(home, proxy, nodes, proxy_says, node_says):
    """``ssh true`` with ``home``'s profile fails through the proxy, and
    directly at the dev node (which refuses it by itself too)."""
    through_proxy = run(ssh_argv(home, f"root@dev.{proxy.cluster}", "true"))
    assert through_proxy.returncode == 255
    assert proxy_says in text(through_proxy)
    direct = run(["ssh", "-F", str(_direct_config(home, nodes["dev"], proxy.cluster)),
                  "root@direct", "true"])
    assert direct.returncode == 255
    assert node_says in text(direct)


def test_a_plain_key_without_certificate_is_refused(proxy, users, nodes, tmp_path):
    bare = _profile_copy(users["alice"], tmp_path / "bare", certificate=None)
    _refused_through_the_proxy_and_by_the_node(
        bare, proxy, nodes, "Permission denied (publickey)", "Permission denied (publickey)")
    wait_for(lambda: "only OpenSSH user certificates are accepted" in nodes["dev"].log(),
             5, "the node to log the refusal")


def test_an_expired_certificate_is_refused_by_proxy_and_node(proxy, users, nodes, tmp_path):
    user_ca = proxy.authority().ssh_user_ca
    now = datetime.now(timezone.utc)
    expired = _forged_certificate(users["alice"], user_ca, valid_from=now - timedelta(hours=3),
                                  ttl=timedelta(hours=1), cluster=proxy.cluster)
    home = _profile_copy(users["alice"], tmp_path / "expired", expired)
    _refused_through_the_proxy_and_by_the_node(
        home, proxy, nodes, "certificate has expired", "access denied: certificate has expired")


def test_a_certificate_from_another_ca_is_refused_by_the_node(proxy, users, nodes, tmp_path):
    stranger = keys.generate_private_key()
    forged = _forged_certificate(users["alice"], stranger,
                                 valid_from=datetime.now(timezone.utc),
                                 ttl=timedelta(hours=1), cluster=proxy.cluster)
    home = _profile_copy(users["alice"], tmp_path / "stranger", forged)
    direct = run(["ssh", "-F", str(_direct_config(home, nodes["prod"], proxy.cluster)),
                  "root@direct", "true"])
    assert direct.returncode == 255
    assert "certificate is not signed by a trusted user CA" in text(direct)


def test_the_client_refuses_a_node_whose_host_ca_it_does_not_trust(proxy, users, nodes,
                                                                  tmp_path):
    stranger = keys.generate_private_key()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"@cert-authority *.{proxy.cluster} "
                           f"{keys.public_key_openssh(stranger).decode()}\n")
    config = _direct_config(users["alice"], nodes["dev"], proxy.cluster, known_hosts)
    result = run(["ssh", "-F", str(config), "root@direct", "echo", "should-not-run"])
    assert result.returncode == 255
    assert b"should-not-run" not in result.stdout
    assert "Host key verification failed" in text(result)


def test_a_profile_in_a_directory_with_spaces_and_percent_signs_works(proxy, users, tmp_path):
    home = login(proxy, tmp_path / "my edge %d %h", "alice")
    # OpenSSH itself cannot run ProxyJump with a -F path holding "%" (it expands the
    # path in the jump command): reach the profile's ssh_config through a link.
    link = tmp_path / "ssh_config"
    link.symlink_to(home / "ssh_config")
    result = run(["ssh", "-F", str(link), "-o", "BatchMode=yes", f"root@dev.{proxy.cluster}",
                  "echo", "odd-home"])
    assert result.returncode == 0, text(result)
    assert result.stdout == b"odd-home\n"
