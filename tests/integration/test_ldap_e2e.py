"""Corporate login with LDAP end to end (issue 6), against real processes.

A real OpenLDAP ``slapd`` (tests/ldapfixture.py) holds the users; a real
``twistd -n edgeproxy`` gets the connector and roles through ``edgectl``;
``edge login --auth CONNECTOR`` logs users in and OpenSSH reads the
certificates it writes. Everything listens on 127.0.0.1 with ports the
kernel chooses, in temporary directories.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import ssl
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgeaccess.devcluster import NodeProcess, ProxyProcess, run_edge, wait_for
from edgeaccess.httpclient import fetch_pinned_ca
from edgeaccess.pki import keys
from tests.ldapfixture import (
    DEFAULT_LDIF,
    GROUPS_DN,
    PASSWORDS,
    PEOPLE_DN,
    SERVICE_DN,
    SERVICE_PASSWORD,
    SlapdServer,
    free_port,
    make_server_pki,
    make_test_ca,
    running_under_ci,
    slapd_available,
)

if not slapd_available() and not running_under_ci():
    pytest.skip("slapd is not installed (Debian packages slapd, ldap-utils)",
                allow_module_level=True)

CLUSTER = "ldape2e"

# Users added to the shared test directory for these tests:
#   oncall  group ops, uid values "oncall" and "root" (its logins trait gives root)
#   frank   group devs, used up by the lock-out test
#   gina    group devs, used up by the parallel-guessing test
EXTRA_PASSWORDS = {"oncall": "oncall-password", "frank": "frank-password",
                   "gina": "gina-password"}
_EXTRA_ENTRIES = "".join(f"""
dn: uid={name},{PEOPLE_DN}
objectClass: inetOrgPerson
cn: {name.title()} Example
sn: Example
uid: {name}
{'uid: root' + chr(10) if name == 'oncall' else ''}userPassword: {password}
""" for name, password in EXTRA_PASSWORDS.items())

ROLES_YAML = """\
kind: role
version: v1
metadata: {name: ldap-ops}
spec:
  options: {max_session_ttl: 8h}
  allow:
    logins: ['{{external.logins}}']
    node_labels: {'*': '*'}
---
kind: role
version: v1
metadata: {name: ldap-dev}
spec:
  allow:
    node_labels: {env: dev}
"""


def connector_yaml(name: str, url: str, *, start_tls: bool = False, ca_file=None,
                   password_line: str = f"bind_password: {SERVICE_PASSWORD}",
                   timeout: float = 5) -> str:
    """An ``ldap_connector`` document shaped as in SPEC.md."""
    tls = ("  start_tls: true\n" if start_tls else "") + (
        f"  ca_file: {ca_file}\n" if ca_file else "")
    return f"""\
kind: ldap_connector
version: v1
metadata: {{name: {name}}}
spec:
  url: {url}
{tls}  bind_dn: {SERVICE_DN}
  {password_line}
  user_search: {{base_dn: '{PEOPLE_DN}', filter: '(uid={{username}})'}}
  group_search: {{base_dn: '{GROUPS_DN}', filter: '(member={{user_dn}})', name_attribute: cn}}
  attributes_to_traits: {{logins: [uid]}}
  groups_to_roles:
    - {{group: ops, roles: [ldap-ops]}}
    - {{group: devs, roles: [ldap-dev]}}
  timeout: {timeout}
"""


def write_ldif(path: Path) -> Path:
    """The shared test directory plus this module's users and memberships."""
    text = DEFAULT_LDIF.read_text()
    member = "member: uid={},%s\n" % PEOPLE_DN
    text = text.replace("cn: ops\n", "cn: ops\n" + member.format("oncall"))
    text = text.replace("cn: devs\n", "cn: devs\n" + member.format("frank")
                        + member.format("gina"))
    path.write_text(text.rstrip("\n") + "\n" + _EXTRA_ENTRIES)
    return path


# --- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ldap-e2e")


@pytest.fixture(scope="module")
def pki(workdir):
    return make_server_pki(workdir / "pki")


@pytest.fixture(scope="module")
def slapd(workdir, pki):
    server = SlapdServer(workdir / "slapd", ldif=write_ldif(workdir / "directory.ldif"),
                         tls=pki)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def proxy(workdir, slapd, pki):
    process = ProxyProcess(workdir / "proxy", workdir / "proxy.log", cluster=CLUSTER)
    try:
        process.start()
        roles = workdir / "roles.yaml"
        roles.write_text(ROLES_YAML)
        process.edgectl("create", "-f", str(roles))
        corp = workdir / "corp.yaml"
        corp.write_text(connector_yaml("corp", slapd.ldap_url, start_tls=True,
                                       ca_file=pki.ca_file))
        created = process.edgectl("create", "-f", str(corp))
        assert "ldap_connector corp has been created" in created.stdout
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def pin(proxy) -> str:
    return proxy.pin()


@pytest.fixture(scope="module")
def web(proxy, pin, workdir) -> "WebClient":
    ca_file = workdir / "cluster-ca.pem"
    ca_file.write_text(fetch_pinned_ca(proxy.addr("web"), pin))
    return WebClient(proxy.addr("web"), ca_file)


class WebClient:
    """Plain HTTPS calls to the proxy's web port, verified against the cluster CA."""

    def __init__(self, addr: str, ca_file: Path) -> None:
        host, _, port = addr.rpartition(":")
        self.host, self.port = host, int(port)
        self.context = ssl.create_default_context(cafile=str(ca_file))
        self.ssh_public_key = keys.public_key_openssh(keys.generate_private_key()).decode()

    def connect(self, timeout: float = 30) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                           timeout=timeout)

    def ping(self, conn: http.client.HTTPSConnection | None = None) -> dict:
        conn = conn or self.connect()
        conn.request("GET", "/v1/ping")
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, body
        return json.loads(body)

    def login(self, user: str, password: str, auth: str = "corp") -> tuple[int, dict]:
        conn = self.connect()
        try:
            body = json.dumps({"user": user, "password": password, "auth": auth,
                               "ssh_public_key": self.ssh_public_key})
            conn.request("POST", "/v1/login", body=body,
                         headers={"content-type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()


def edge_login(proxy, pin, home: Path, user: str, password: str, auth: str = "corp"):
    return run_edge(home, "login", "--proxy", proxy.addr("web"), "--auth", auth,
                    "--user", user, "--password-stdin", "--ca-pin", pin,
                    input=password + "\n")


def certificate(home: Path) -> dict:
    """``ssh-keygen -L`` of the profile's SSH certificate, parsed."""
    listing = subprocess.run(["ssh-keygen", "-L", "-f", str(home / "key-cert.pub")],
                             capture_output=True, text=True, check=True).stdout
    key_id = re.search(r'Key ID: "([^"]*)"', listing).group(1)
    block = re.search(r"Principals:\s*\n((?:\s{16,}\S.*\n)*)", listing).group(1)
    return {"key_id": key_id, "principals": block.split(), "listing": listing}


def assert_refused(result, reason: str) -> None:
    """Exit status 1 and exactly one line on stderr, containing ``reason``."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert reason in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# --- the connector resource ----------------------------------------------------


def test_connector_created_with_edgectl_is_listed_with_bind_password_redacted(
        proxy, workdir, web):
    shown = proxy.edgectl("get", "connectors").stdout
    assert "name: corp" in shown
    assert "bind_password: '********'" in shown
    assert SERVICE_PASSWORD not in shown
    as_json = proxy.edgectl_json("get", "connectors", "corp")
    assert as_json[0]["spec"]["bind_password"] == "********"
    assert as_json[0]["spec"]["start_tls"] is True
    assert SERVICE_PASSWORD not in json.dumps(as_json)
    # Creating it again needs --force.
    again = proxy.edgectl("create", "-f", str(workdir / "corp.yaml"), check=False)
    assert again.returncode == 1 and "--force" in again.stderr
    # The web port names the connector (beside those other tests add), and
    # nothing else about it.
    connectors = web.ping()["auth"]["connectors"]
    assert "corp" in connectors and all(isinstance(name, str) for name in connectors)


def test_invalid_connector_is_refused_with_the_field_named(proxy, workdir):
    bad = workdir / "bad-connector.yaml"
    bad.write_text(connector_yaml("bad", "http://127.0.0.1:1"))
    result = proxy.edgectl("create", "-f", str(bad), check=False)
    assert_refused(result, "spec.url")
    assert_refused(proxy.edgectl("get", "connectors", "bad", check=False), "not found")


# --- logging in -------------------------------------------------------------------


def test_ldap_login_maps_groups_to_roles_and_traits_to_certificate_principals(
        proxy, pin, tmp_path):
    home = tmp_path / "alice"
    result = edge_login(proxy, pin, home, "alice", PASSWORDS["alice"])
    assert result.returncode == 0, result.stderr
    cert = certificate(home)
    assert cert["key_id"] == "alice"
    # ops -> ldap-ops, whose logins are {{external.logins}} = the uid values.
    assert sorted(cert["principals"]) == ["alice", "alice.ops"]
    status = run_edge(home, "status")
    assert "ldap-ops" in status.stdout and "ldap-dev" in status.stdout

    # bob is only in devs -> ldap-dev, which grants no login at all.
    home = tmp_path / "bob"
    result = edge_login(proxy, pin, home, "bob", PASSWORDS["bob"])
    assert result.returncode == 0, result.stderr
    cert = certificate(home)
    assert cert["key_id"] == "bob"
    assert "bob" not in cert["principals"]
    assert "ldap-ops" not in run_edge(home, "status").stdout
    assert "login of bob (ldap via corp)" in proxy.log()


@pytest.mark.parametrize("spelling", ["ALICE", " alice", "Ａｌｉｃｅ"])
def test_certificate_names_the_directory_user_however_the_name_was_typed(
        proxy, pin, tmp_path, spelling):
    result = edge_login(proxy, pin, tmp_path, spelling, PASSWORDS["alice"])
    assert result.returncode == 0, result.stderr
    cert = certificate(tmp_path)
    assert cert["key_id"] == "alice"
    assert sorted(cert["principals"]) == ["alice", "alice.ops"]


@pytest.mark.parametrize("user, password, reason", [
    ("bob", "not-bobs-password", "invalid username or password"),
    ("bob", "", "invalid username or password"),
    ("nobody", "whatever", "invalid username or password"),
    ("carol", PASSWORDS["carol"], "not in any group mapped to a role"),
    # Filter injection, with a password that works for alice: an unescaped
    # filter would find her entry (or several) and let the bind succeed.
    ("*", PASSWORDS["alice"], "invalid username or password"),
    ("a*", PASSWORDS["alice"], "invalid username or password"),
    ("x)(uid=*", PASSWORDS["alice"], "invalid username or password"),
    ("alice)(|(uid=*", PASSWORDS["alice"], "invalid username or password"),
], ids=["wrong-password", "empty-password", "unknown-user", "no-mapped-group",
        "star", "prefix-star", "filter-break-out", "or-injection"])
def test_ldap_login_refused(proxy, pin, tmp_path, user, password, reason):
    result = edge_login(proxy, pin, tmp_path, user, password)
    assert_refused(result, reason)
    assert not (tmp_path / "key-cert.pub").exists()


def test_unknown_connector_is_refused(proxy, pin, tmp_path):
    result = edge_login(proxy, pin, tmp_path, "alice", PASSWORDS["alice"], auth="nosuch")
    assert_refused(result, "unknown login connector 'nosuch'")


def test_ldaps_and_starttls_with_the_right_ca_work_and_a_wrong_ca_is_refused(
        proxy, pin, slapd, pki, workdir, tmp_path, web):
    password_file = workdir / "ldap.pass"
    password_file.write_text(SERVICE_PASSWORD + "\n")
    wrong_ca = make_test_ca(workdir / "wrong-ca", "not the directory's CA")
    documents = {
        "corp-ldaps": connector_yaml("corp-ldaps", slapd.ldaps_url, ca_file=pki.ca_file,
                                     password_line=f"bind_password_file: {password_file}"),
        "corp-wrongca": connector_yaml("corp-wrongca", slapd.ldap_url, start_tls=True,
                                       ca_file=wrong_ca.cert_file,
                                       password_line=f"bind_password_file: {password_file}"),
    }
    for name, text in documents.items():
        (workdir / f"{name}.yaml").write_text(text)
        proxy.edgectl("create", "-f", str(workdir / f"{name}.yaml"))
    assert web.ping()["auth"]["connectors"] == ["corp", "corp-ldaps", "corp-wrongca"]
    shown = proxy.edgectl("get", "connectors", "corp-ldaps").stdout
    assert str(password_file) in shown and SERVICE_PASSWORD not in shown

    result = edge_login(proxy, pin, tmp_path / "ok", "alice", PASSWORDS["alice"],
                        auth="corp-ldaps")
    assert result.returncode == 0, result.stderr
    assert sorted(certificate(tmp_path / "ok")["principals"]) == ["alice", "alice.ops"]

    result = edge_login(proxy, pin, tmp_path / "no", "alice", PASSWORDS["alice"],
                        auth="corp-wrongca")
    assert_refused(result, "identity provider unreachable: TLS certificate not trusted")
    assert not (tmp_path / "no" / "key-cert.pub").exists()


def test_slow_then_down_directory_gives_identity_provider_unreachable(
        proxy, pin, workdir, tmp_path, web):
    flaky = SlapdServer(workdir / "slapd-flaky", ldif=write_ldif(workdir / "flaky.ldif"))
    flaky.start()
    try:
        (workdir / "flaky.yaml").write_text(
            connector_yaml("flaky", flaky.ldap_url, timeout=1))
        proxy.edgectl("create", "-f", str(workdir / "flaky.yaml"))
        assert edge_login(proxy, pin, tmp_path, "bob", PASSWORDS["bob"],
                          auth="flaky").returncode == 0

        # Slow: slapd stopped, its port still accepts connections.
        os.kill(flaky.pid, signal.SIGSTOP)
        try:
            pings: list[float] = []
            with ThreadPoolExecutor(4) as pool:
                slow = [pool.submit(web.login, "bob", PASSWORDS["bob"], "flaky")
                        for _ in range(3)]
                while not all(f.done() for f in slow):
                    started = time.monotonic()
                    web.ping()
                    pings.append(time.monotonic() - started)
                answers = [f.result() for f in slow]
        finally:
            os.kill(flaky.pid, signal.SIGCONT)
        for status, body in answers:
            assert status == 503, body
            assert body["error"]["message"] == "identity provider unreachable: timed out"
        assert pings and max(pings) < 1.0, pings

        # Down: nothing listens any more.
        flaky.stop()
        result = edge_login(proxy, pin, tmp_path, "bob", PASSWORDS["bob"], auth="flaky")
        assert_refused(result, "identity provider unreachable")
        assert "connection refused" in result.stderr
        assert web.ping()["cluster_name"] == CLUSTER
        assert "Traceback" not in proxy.log()
    finally:
        if flaky.pid is not None:
            os.kill(flaky.pid, signal.SIGCONT)
        flaky.stop()
        proxy.edgectl("rm", "ldap_connector/flaky", check=False)


# --- lock-out -----------------------------------------------------------------------


def test_lockout_applies_to_ldap_users_whatever_the_spelling(proxy, pin, tmp_path):
    # The directory finds frank under every one of these spellings.
    for spelling in ["frank", "FRANK", " frank", "Ｆｒａｎｋ", "frank\u00a0"]:
        assert_refused(edge_login(proxy, pin, tmp_path, spelling, "wrong"),
                       "invalid username or password")
    result = edge_login(proxy, pin, tmp_path, "frank", EXTRA_PASSWORDS["frank"])
    assert_refused(result, "account frank is locked after too many failed logins")
    result = edge_login(proxy, pin, tmp_path, "Frank", EXTRA_PASSWORDS["frank"])
    assert_refused(result, "is locked")
    assert not (tmp_path / "key-cert.pub").exists()
    # Other users are not affected.
    assert edge_login(proxy, pin, tmp_path, "bob", PASSWORDS["bob"]).returncode == 0


def test_parallel_guesses_reach_the_directory_at_most_five_times(slapd, web):
    dn = f'BIND dn="uid=gina,{PEOPLE_DN}"'
    before = slapd.log_tail(10**8).count(dn)
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda i: web.login("gina", f"guess-{i}"), range(20)))
    assert all(status in (401, 403) for status, _ in answers), answers
    locked = [body for status, body in answers if status == 403]
    assert len(locked) == 15, answers
    status, body = web.login("gina", EXTRA_PASSWORDS["gina"])
    assert status == 403 and body["error"]["code"] == "account_locked"
    assert slapd.log_tail(10**8).count(dn) - before == 5


# --- the reactor under load ----------------------------------------------------------


def test_reactor_stays_responsive_under_200_concurrent_logins(web):
    users = ["alice", "bob", "oncall", "alice.ops"]
    passwords = {**PASSWORDS, **EXTRA_PASSWORDS, "alice.ops": PASSWORDS["alice"]}
    done = threading.Event()
    pings: list[float] = []
    fresh_pings: list[float] = []

    def pinger():
        conn = web.connect(timeout=10)
        while not done.is_set():
            started = time.monotonic()
            web.ping(conn)  # one kept-alive connection: the reactor's latency alone
            pings.append(time.monotonic() - started)
            started = time.monotonic()
            web.ping()  # a new TLS connection each time, as a client would
            fresh_pings.append(time.monotonic() - started)
            done.wait(0.02)
        conn.close()

    start = threading.Barrier(201)

    def one_login(i: int):
        user = users[i % len(users)]
        start.wait(30)
        return web.login(user, passwords[user])

    thread = threading.Thread(target=pinger, daemon=True)
    thread.start()
    wait_for(lambda: len(pings) >= 3, 10, "first pings")
    began = time.monotonic()
    try:
        with ThreadPoolExecutor(200) as pool:
            futures = [pool.submit(one_login, i) for i in range(200)]
            start.wait(30)
            answers = [f.result(timeout=120) for f in futures]
        elapsed = time.monotonic() - began
    finally:
        done.set()
        thread.join(15)
    statuses = [status for status, _ in answers]
    assert statuses.count(200) == 200, [a for a in answers if a[0] != 200][:3]
    summary = {
        "logins": 200, "burst_seconds": round(elapsed, 2),
        "pings": len(pings),
        "keepalive_ping_ms": _stats(pings), "new_connection_ping_ms": _stats(fresh_pings),
    }
    print("\nping latency during a burst of 200 LDAP logins:", json.dumps(summary))
    assert len(pings) >= 5, summary
    assert max(pings) < 1.0, summary
    assert max(fresh_pings) < 2.0, summary


def _stats(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"median": round(statistics.median(ordered) * 1000, 1),
            "p95": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 1),
            "max": round(ordered[-1] * 1000, 1)}


# --- OpenSSH through the proxy -------------------------------------------------------


def test_ldap_user_reaches_a_node_as_root_with_openssh(proxy, pin, workdir, tmp_path):
    node = NodeProcess(workdir / "node", workdir / "node.log", name="ldapnode",
                       auth_server=proxy.addr("auth"), token=proxy.node_token(),
                       ca_pin=pin, labels="env=prod")
    try:
        node.start()
        node.wait_listed(proxy)
        home = tmp_path / "oncall"
        result = edge_login(proxy, pin, home, "oncall", EXTRA_PASSWORDS["oncall"])
        assert result.returncode == 0, result.stderr
        assert sorted(certificate(home)["principals"]) == ["oncall", "root"]
        ssh = ["ssh", "-F", str(home / "ssh_config"), "-o", "BatchMode=yes",
               f"root@ldapnode.{CLUSTER}"]
        answer = subprocess.run(ssh + ["echo", "ldap-ok"], capture_output=True, text=True,
                                timeout=60, stdin=subprocess.DEVNULL)
        assert answer.returncode == 0, (answer.stderr, node.log()[-2000:])
        assert answer.stdout.strip() == "ldap-ok"

        # bob's roles give no login: the node refuses him.
        home = tmp_path / "bob"
        assert edge_login(proxy, pin, home, "bob", PASSWORDS["bob"]).returncode == 0
        refused = subprocess.run(["ssh", "-F", str(home / "ssh_config"), "-o", "BatchMode=yes",
                                  f"root@ldapnode.{CLUSTER}", "true"],
                                 capture_output=True, text=True, timeout=60,
                                 stdin=subprocess.DEVNULL)
        assert refused.returncode != 0
    finally:
        node.stop()


# --- the web login form (Chromium) ---------------------------------------------


def test_web_login_with_the_ldap_connector_and_a_wrong_ldap_password(proxy, tmp_path):
    """The login form offers the connector; a directory user logs in through
    it in Chromium (verifying the web port), a wrong directory password keeps
    the form with a message and the connector chosen, and a user in no
    mapped group is told so."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import browser as browsers  # tests/browser.py

    if browsers.available():
        pytest.skip(browsers.available())
    url = f"https://{proxy.addr('web')}"
    with browsers.browser_trusting(tmp_path / "browser", [browsers.web_ca_of(proxy)]) as b:
        page = b.new_page()

        def log_in(user: str, password: str) -> None:
            page.goto(url + "/")
            options = page.locator("#connector option").all_inner_texts()
            assert options[0] == "Local account" and "corp (LDAP)" in options
            page.select_option("#connector", "corp")
            page.fill("#user", user)
            page.fill("#password", password)
            page.click("#login")

        log_in("bob", "not-bobs-password")
        assert page.inner_text("#login-error") == "Invalid user name or password."
        assert page.input_value("#connector") == "corp" and page.input_value("#user") == "bob"
        log_in("carol", PASSWORDS["carol"])
        assert "not in any group mapped to a role" in page.inner_text("#login-error")
        log_in("oncall", EXTRA_PASSWORDS["oncall"])
        page.wait_for_selector("#nodes")
        assert "oncall" in page.inner_text("header.top")
        session = [c for c in page.context.cookies() if c["name"] == "__Host-edge-session"]
        assert session and session[0]["secure"] and session[0]["httpOnly"]
        # The same person cannot log in locally: there is no local account.
        page.context.clear_cookies()
        page.goto(url + "/")
        page.fill("#user", "oncall")
        page.fill("#password", EXTRA_PASSWORDS["oncall"])
        page.click("#login")
        assert page.inner_text("#login-error") == "Invalid user name or password."
    events = proxy.edgectl_json("audit", "search", "--since", "1h", "--type", "user.login")
    assert any(e.get("user") == "oncall" and e.get("success") for e in events)
