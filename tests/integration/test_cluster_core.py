"""The cluster core end to end: a real ``twistd edgeproxy``, ``edgenode``, ``edge``,
``edgectl`` and OpenSSH on 127.0.0.1.

One proxy serves the whole module (``proxy`` fixture); one node joins it
(``node``); the restart test runs a proxy of its own.
"""

from __future__ import annotations

import json
import re
import socket
import stat
import subprocess
from datetime import datetime, timezone

import pytest

from edgeaccess.devcluster import (NodeProcess, ProcessFailed, ProxyProcess, join_node, run_edge,
                                  wait_for)
from edgeaccess.pki import x509ca
from edgeaccess.pki.authority import CertificateAuthority

PASSWORD = "integration-pass-1"
ROLE_YAML = """\
kind: role
version: v1
metadata: {name: %(name)s}
spec:
  options: {max_session_ttl: 2h}
  allow:
    logins: [%(login)s]
    node_labels: {env: test}
"""


def one_line_error(result) -> str:
    """The single ``error: ...`` line a failed command printed (the CLI contract)."""
    assert result.returncode != 0, f"expected a failure, got: {result.stdout}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {result.stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def login(proxy, home, *trust, user="alice", password=PASSWORD):
    return run_edge(home, "login", "--proxy", proxy.addr("web"), "--user", user,
                    "--password-stdin", *trust, input=password + "\n")


@pytest.fixture(scope="module")
def alice(proxy):
    """A user with the preset access role and the login root (the tests run as root)."""
    proxy.add_user("alice", PASSWORD, roles=("access",), logins=("root",))
    return "alice"


@pytest.fixture(scope="module")
def node(proxy, tmp_path_factory):
    """A node joined with a token and the CA pin, listening on a kernel-chosen port."""
    process, _ = join_node(proxy, tmp_path_factory.mktemp("node"), "node1",
                           labels="env=test,team=core")
    yield process
    process.stop()


def _keygen_list(path) -> str:
    return subprocess.run(["ssh-keygen", "-L", "-f", str(path)], capture_output=True,
                          text=True, check=True, timeout=30).stdout


# --- bootstrap and restart ---------------------------------------------------

def test_first_start_creates_the_cas_and_a_restart_reuses_them(tmp_path):
    fresh = ProxyProcess(tmp_path / "proxy", tmp_path / "proxy.log", cluster="restarted")
    try:
        fresh.start()
        # The CAs are in the backend, sealed with the CA key made beside it.
        assert stat.S_IMODE((fresh.data_dir / "ca.key").stat().st_mode) == 0o600
        assert sorted(p.name for p in (fresh.data_dir / "ca").iterdir()) == [
            "ssh_host_ca.pub", "ssh_user_ca.pub", "tls_ca.crt", "web_ca.crt"], "public copies only"
        assert stat.S_IMODE((fresh.data_dir / "admin" / "identity.pem").stat().st_mode) == 0o600
        pin = fresh.pin()
        admin_chain = (fresh.data_dir / "admin" / "identity.pem").read_bytes()
        assert pin == x509ca.ca_pin(x509ca.load_certificates_pem(admin_chain)[-1])
        user_ca = fresh.edgectl_json("status")["ssh_user_ca"]
        fresh.add_user("bob", PASSWORD, logins=("root",))
        assert "created certificate authorities" in fresh.log()

        fresh.stop()
        assert "Server Shut Down." in fresh.log()  # a clean stop on SIGTERM
        fresh.start()
        assert "loaded certificate authorities of cluster restarted" in fresh.log()
        assert fresh.pin() == pin
        assert fresh.edgectl_json("status")["ssh_user_ca"] == user_ca
        result = login(fresh, tmp_path / "edge", "--ca-pin", pin, user="bob")
        assert result.returncode == 0, result.stderr + fresh.log()[-3000:]
        roles = [r["metadata"]["name"] for r in fresh.edgectl_json("get", "roles")]
        assert sorted(roles) == ["access", "auditor", "editor"]
    finally:
        fresh.stop()


def test_a_data_dir_with_ca_files_keeps_its_cas(tmp_path):
    """The upgrade path: a data dir written when the CAs were files is imported."""
    old = ProxyProcess(tmp_path / "old", tmp_path / "old.log", cluster="upgraded")
    authority = CertificateAuthority.load_or_create(
        old.data_dir / "ca", "upgraded", datetime.now(timezone.utc))
    try:
        old.start()
        assert old.pin() == authority.pin
        assert "imported the certificate authorities from the data directory" in old.log()
        status = old.edgectl_json("status")
        assert status["ssh_user_ca"] == [authority.user_ca_public_line]
        assert status["ssh_host_ca"] == [authority.host_ca_public_line]
    finally:
        old.stop()


def test_a_proxy_refuses_another_clusters_data_dir(proxy, tmp_path):
    other = ProxyProcess(tmp_path / "other", tmp_path / "other.log", cluster="someone-else")
    CertificateAuthority.load_or_create(other.data_dir / "ca", proxy.cluster,
                                        datetime.now(timezone.utc))
    try:
        with pytest.raises(ProcessFailed):
            other.start()
        assert f"holds the CAs of cluster '{proxy.cluster}', not 'someone-else'" in other.log()
    finally:
        other.kill()


# --- edge login, status, logout ---------------------------------------------

def test_login_with_the_ca_pin_writes_a_profile_openssh_can_use(proxy, alice, tmp_path):
    home = tmp_path / "edge"
    result = login(proxy, home, "--ca-pin", proxy.pin())
    assert result.returncode == 0, result.stderr
    assert f"Logged in as alice to cluster {proxy.cluster}" in result.stdout

    for name in ("key", "key.pub", "key-cert.pub", "known_hosts", "ssh_config"):
        assert (home / name).exists(), name
    assert stat.S_IMODE((home / "key").stat().st_mode) == 0o600
    host_ca = proxy.edgectl_json("status")["ssh_host_ca"][0]
    assert any(line.startswith("@cert-authority ") and f"*.{proxy.cluster}" in line
               and line.endswith(host_ca) for line in (home / "known_hosts").read_text().splitlines())
    config = (home / "ssh_config").read_text()
    ssh_port = proxy.addr("ssh").rpartition(":")[2]
    assert f"Port {ssh_port}" in config and f"Host *.{proxy.cluster}" in config

    shown = _keygen_list(home / "key-cert.pub")
    assert 'Key ID: "alice"' in shown
    assert re.search(r"Principals: \n\s+root\n\s+Critical", shown), shown
    assert "permit-pty" in shown


def test_login_with_insecure_works(proxy, alice, tmp_path):
    result = login(proxy, tmp_path / "edge", "--insecure")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "edge" / "key-cert.pub").exists()


def test_login_refuses_a_proxy_that_does_not_match_the_pin(proxy, alice, tmp_path):
    _, stranger_ca = x509ca.create_ca(proxy.cluster, datetime.now(timezone.utc))
    result = login(proxy, tmp_path / "edge", "--ca-pin", x509ca.ca_pin(stranger_ca))
    line = one_line_error(result)
    assert "does not match the pin" in line
    assert not (tmp_path / "edge" / "key").exists()


def test_login_without_pin_or_insecure_refuses_the_self_signed_proxy(proxy, alice, tmp_path):
    result = login(proxy, tmp_path / "edge")
    line = one_line_error(result)
    assert "does not verify" in line and "--ca-pin" in line
    assert not (tmp_path / "edge" / "key").exists()


def test_a_later_login_trusts_the_ca_kept_from_the_pinned_one(proxy, alice, tmp_path):
    home = tmp_path / "edge"
    assert login(proxy, home, "--ca-pin", proxy.pin()).returncode == 0
    again = login(proxy, home)
    assert again.returncode == 0, again.stderr


def test_login_to_a_port_nobody_listens_on(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_edge(tmp_path / "edge", "login", "--proxy", f"127.0.0.1:{port}", "--user",
                      "alice", "--password-stdin", "--insecure", input="x\n")
    assert "cannot reach" in one_line_error(result)


def test_status_shows_the_login_and_logout_removes_the_keys(proxy, alice, tmp_path):
    home = tmp_path / "edge"
    assert login(proxy, home, "--ca-pin", proxy.pin()).returncode == 0
    status = run_edge(home, "status")
    assert status.returncode == 0, status.stderr
    assert re.search(r"User:\s+alice", status.stdout)
    assert re.search(rf"Cluster:\s+{proxy.cluster}", status.stdout)
    assert re.search(r"Logins:\s+root", status.stdout)
    assert re.search(r"Roles:\s+access", status.stdout)
    assert re.search(r"Valid until:\s+\d{4}-\d\d-\d\dT.*\[valid for 1[12]h", status.stdout)

    logout = run_edge(home, "logout")
    assert logout.returncode == 0
    for name in ("key", "key-cert.pub", "tls.key"):
        assert not (home / name).exists(), name
    assert "not logged in" in one_line_error(run_edge(home, "status"))


def test_wrong_password_is_one_line_and_exit_1(proxy, alice, tmp_path):
    result = login(proxy, tmp_path / "edge", "--ca-pin", proxy.pin(), password="not-it-at-all")
    assert result.returncode == 1
    assert one_line_error(result) == "error: invalid username or password"
    assert PASSWORD not in result.stderr


def test_five_failures_lock_the_account(proxy, tmp_path):
    proxy.add_user("locky", PASSWORD, logins=("root",))
    pin = proxy.pin()
    for _ in range(5):
        result = login(proxy, tmp_path / "edge", "--ca-pin", pin, user="locky",
                       password="wrong-password")
        assert one_line_error(result) == "error: invalid username or password"
    result = login(proxy, tmp_path / "edge", "--ca-pin", pin, user="locky")
    assert "locked after too many failed logins" in one_line_error(result)
    users = {u["name"]: u for u in proxy.edgectl_json("users", "ls")}
    assert users["locky"]["locked"] is True
    assert "login refused for locky" in proxy.log()
    assert "account now locked" in proxy.log()
    assert "wrong-password" not in proxy.log()


def test_role_max_session_ttl_caps_the_login(proxy, tmp_path):
    role = tmp_path / "short.yaml"
    role.write_text(ROLE_YAML % {"name": "short-sessions", "login": "root"})
    proxy.edgectl("create", "-f", str(role))
    proxy.add_user("shorty", PASSWORD, roles=("short-sessions",))
    home = tmp_path / "edge"
    result = run_edge(home, "login", "--proxy", proxy.addr("web"), "--user", "shorty",
                      "--password-stdin", "--ca-pin", proxy.pin(), "--ttl", "8h",
                      input=PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    assert re.search(r"\[valid for (1h5\d|2h00)m\]", run_edge(home, "status").stdout)


# --- edgectl ------------------------------------------------------------------

def test_status_json_has_cluster_name_and_pin(proxy):
    status = proxy.edgectl_json("status")
    assert status["cluster_name"] == proxy.cluster
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", status["ca_pin"])
    text = proxy.edgectl("status").stdout
    assert status["ca_pin"] in text and proxy.cluster in text


def test_tokens_add_ls_rm(proxy):
    record = proxy.edgectl_json("tokens", "add", "--type", "node", "--ttl", "10m")
    assert re.fullmatch(r"[0-9a-f]{32}", record["token"])
    expires = datetime.fromisoformat(record["expires"].replace("Z", "+00:00"))
    assert 9 * 60 < (expires - datetime.now(timezone.utc)).total_seconds() <= 10 * 60
    assert record["token"] in [t["token"] for t in proxy.edgectl_json("tokens", "ls")]
    text = proxy.edgectl("tokens", "add", "--type", "node").stdout
    assert "--ca-pin sha256:" in text and "twistd -n edgenode" in text
    proxy.edgectl("tokens", "rm", record["token"])
    assert record["token"] not in [t["token"] for t in proxy.edgectl_json("tokens", "ls")]
    assert "not found" in one_line_error(proxy.edgectl("tokens", "rm", record["token"],
                                                       check=False))


@pytest.mark.parametrize("text, expected", [
    ("kind: role\nmetadata: {name: broken\n", "invalid YAML at line"),
    ("kind: gadget\nversion: v1\nmetadata: {name: x}\n", "unknown resource kind 'gadget'"),
    ("kind: role\nversion: v1\nmetadata: {}\nspec: {}\n", "metadata.name is required"),
])
def test_create_with_bad_input_is_one_clear_line(proxy, tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = proxy.edgectl("create", "-f", str(path), check=False)
    assert result.returncode == 1
    assert expected in one_line_error(result)


def test_create_twice_needs_force_and_rm_deletes(proxy, tmp_path):
    path = tmp_path / "dev.yaml"
    path.write_text(ROLE_YAML % {"name": "dev", "login": "ubuntu"})
    assert "role dev has been created" in proxy.edgectl("create", "-f", str(path)).stdout
    again = proxy.edgectl("create", "-f", str(path), check=False)
    assert "--force" in one_line_error(again)

    path.write_text(ROLE_YAML % {"name": "dev", "login": "debian"})
    proxy.edgectl("create", "-f", str(path), "--force")
    [dev] = proxy.edgectl_json("get", "role", "dev")
    assert dev["spec"]["allow"]["logins"] == ["debian"]

    listed = proxy.edgectl("get", "roles").stdout
    for name in ("access", "editor", "auditor", "dev"):
        assert f"name: {name}" in listed, listed

    assert "role dev has been deleted" in proxy.edgectl("rm", "role/dev").stdout
    assert "role dev not found" in one_line_error(
        proxy.edgectl("get", "role", "dev", check=False))
    assert "not found" in one_line_error(proxy.edgectl("rm", "role/dev", check=False))


def test_users_add_ls_rm(proxy):
    added = proxy.edgectl_json("users", "add", "carol", "--roles", "access",
                               "--logins", "carol,deploy")
    assert re.fullmatch(r"https://127\.0\.0\.1:\d+/web/signup/[0-9a-f]{32}",
                        added["signup_url"])
    users = {u["name"]: u for u in proxy.edgectl_json("users", "ls")}
    assert users["carol"]["logins"] == ["carol", "deploy"]
    assert users["carol"]["has_password"] is False
    assert "carol" in proxy.edgectl("users", "ls").stdout
    proxy.edgectl("users", "rm", "carol")
    assert "carol" not in [u["name"] for u in proxy.edgectl_json("users", "ls")]
    assert "user carol not found" in one_line_error(
        proxy.edgectl("users", "rm", "carol", check=False))


def test_users_add_with_an_unknown_role_is_refused(proxy):
    result = proxy.edgectl("users", "add", "dora", "--roles", "nosuchrole", check=False)
    assert "unknown role(s): nosuchrole" in one_line_error(result)


# --- nodes ----------------------------------------------------------------------

def test_nodes_ls_lists_the_joined_node(proxy, node):
    [listed] = [n for n in proxy.edgectl_json("nodes", "ls") if n["name"] == "node1"]
    identity = json.loads((node.data_dir / "identity.json").read_text())
    assert listed["id"] == identity["uuid"]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", listed["address"])
    assert listed["labels"] == {"env": "test", "team": "core"}
    assert "node1" in proxy.edgectl("nodes", "ls").stdout
    shown = _keygen_list(node.data_dir / "ssh_host_key-cert.pub")
    for principal in ("node1", f"node1.{proxy.cluster}", identity["uuid"],
                      f"{identity['uuid']}.{proxy.cluster}"):
        assert f"\n                {principal}\n" in shown, shown


def test_ssh_through_the_proxy_to_the_node(proxy, alice, node, tmp_path):
    home = tmp_path / "edge"
    assert login(proxy, home, "--ca-pin", proxy.pin()).returncode == 0
    result = subprocess.run(
        ["ssh", "-F", str(home / "ssh_config"), f"root@node1.{proxy.cluster}", "echo", "hi"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr + node.log()[-2000:]
    assert result.stdout == "hi\n"


def test_a_restarted_node_keeps_its_identity_without_a_token(proxy, node):
    before = json.loads((node.data_dir / "identity.json").read_text())
    node.stop()
    node.token = None
    node.start()
    wait_for(lambda: "identity loaded" in node.log(), 30, "identity loaded", node.process)
    restarted = datetime.now(timezone.utc)

    def heartbeat_after_restart():
        for listed in proxy.edgectl_json("nodes", "ls"):
            seen = datetime.fromisoformat(listed["last_heartbeat"].replace("Z", "+00:00"))
            if listed["name"] == "node1" and seen >= restarted:
                return listed
        return None

    listed = wait_for(heartbeat_after_restart, 30, "a heartbeat after the restart",
                      node.process, interval=0.2)
    assert "joined cluster" not in node.log().rpartition("identity loaded")[2]
    assert len([n for n in proxy.edgectl_json("nodes", "ls") if n["name"] == "node1"]) == 1
    assert listed["id"] == before["uuid"]
    assert json.loads((node.data_dir / "identity.json").read_text())["uuid"] == before["uuid"]


def test_an_expired_token_makes_the_join_fail_with_a_clear_log_line(proxy, tmp_path):
    token = proxy.node_token(ttl="1s")
    wait_for(lambda: token not in [t["token"] for t in proxy.edgectl_json("tokens", "ls")],
             10, "the token to expire", interval=0.2)
    late = NodeProcess(tmp_path / "late", tmp_path / "late.log", name="late",
                       auth_server=proxy.addr("auth"), token=token, ca_pin=proxy.pin())
    late.start()
    try:
        late.process.wait(30)  # a refused join is fatal: the node stops by itself
        assert "node cannot start: the join token is invalid, unknown or expired" in late.log()
        assert not (late.data_dir / "identity.json").exists()
        assert "node join refused for late" in proxy.log()
        assert "late" not in [n["name"] for n in proxy.edgectl_json("nodes", "ls")]
    finally:
        late.stop()
