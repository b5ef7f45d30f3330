"""Nobody but the cluster's proxy gets a client's secrets.

An impostor TLS server holds a certificate of the real cluster's CA that is
not a proxy's: a user's (the ``tls.crt`` a real ``edge login`` wrote), a
node's (the ``tls.crt`` of a really joined node), or a user certificate in
the shape the CA issued before server identities (clientAuth *and*
serverAuth, with 127.0.0.1 in its SAN: what data dirs and logins from then
still hold). It answers ``/v1/cluster/ca`` with the real CA and
``/v1/ping`` like the proxy, and records every byte it receives. Each real
client is pointed at it and must give it nothing: ``edge login`` no
password, ``edgectl`` no request, a joining node no token, a joined node no
heartbeat (so no say over its roles) and no audit event, a leaf's CA
exchange no token, the TLS-routing relay and the node's tunnel agent no
byte of SSH or AMP.

The impostor listens on two ports for the whole module: "web" (HTTP over
TLS) and "tunnel" (the TLS port the proxy announces as its tunnel address
with ``--tunnel-public-addr``, so tunnel agents and TLS routing dial it).
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

from edgeaccess.devcluster import NodeProcess, ProxyProcess, join_node, run_edge, wait_for
from edgeaccess.pki import keys, x509ca

from tests.integration.steps import trusted_cluster_yaml
from tests.pkitools import Identity, issue_legacy_certificate

PASSWORD = "impostor-test-password-1234"
HOLDERS = ("user", "node", "legacy-user")
DEADLINE = 90


class Impostor:
    """A TLS server on 127.0.0.1 that poses as the proxy.

    ``mode`` "http": answers like the proxy's web port; "raw": completes the
    handshake (ALPN edge-ssh/1 or edge-tunnel/1) and only records.
    """

    def __init__(self, mode: str, ca_pem: str, ping: dict) -> None:
        self.mode = mode
        self.ca_pem = ca_pem
        self.ping = ping
        self.context: ssl.SSLContext | None = None
        self.received = b""
        self.requests: list[str] = []
        self.handshakes = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self, key_path: Path, cert_path: Path) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(str(cert_path), str(key_path))
        context.set_alpn_protocols(["http/1.1", "edge-ssh/1", "edge-tunnel/1"])
        with self.lock:
            self.context = context
            self.received = b""
            self.requests = []
            self.handshakes = 0

    def secret_seen(self, secret: str) -> bool:
        with self.lock:
            return secret.encode() in self.received

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _record(self, data: bytes) -> None:
        with self.lock:
            self.received += data

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(30)
        try:
            with self.context.wrap_socket(raw, server_side=True) as conn:
                with self.lock:
                    self.handshakes += 1
                if self.mode == "raw":
                    while data := conn.recv(65536):
                        self._record(data)
                    return
                buffered = b""
                while True:
                    while b"\r\n\r\n" not in buffered:
                        data = conn.recv(65536)
                        if not data:
                            return
                        self._record(data)
                        buffered += data
                    head, _, buffered = buffered.partition(b"\r\n\r\n")
                    length = int((re.search(rb"(?i)content-length: *(\d+)", head)
                                  or [0, b"0"])[1])
                    while len(buffered) < length:
                        data = conn.recv(65536)
                        if not data:
                            return
                        self._record(data)
                        buffered += data
                    buffered = buffered[length:]
                    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                    with self.lock:
                        self.requests.append(request_line)
                    path = request_line.split(" ")[1] if " " in request_line else ""
                    if path == "/v1/cluster/ca":
                        body = {"tls_ca": [self.ca_pem], "service": "proxy"}
                    elif path == "/v1/ping":
                        body = self.ping
                    else:
                        body = {}  # takes whatever it is given
                    payload = json.dumps(body).encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"content-length: " + str(len(payload)).encode() + b"\r\n\r\n"
                                 + payload)
        except (OSError, ssl.SSLError, ValueError):
            return

    def paths(self) -> list[str]:
        with self.lock:
            return list(self.requests)

    def close(self) -> None:
        self.listener.close()


class World:
    """The real cluster (with a user logged in and a node joined), and the impostor."""

    def __init__(self, base: Path) -> None:
        self.base = base
        ca_dir = base / "holders"
        ca_dir.mkdir()
        self.tunnel_impostor = Impostor("raw", "", {})
        self.proxy = ProxyProcess(base / "proxy", base / "proxy.log", cluster="impostors",
                                  extra_args=["--tunnel-public-addr",
                                              f"127.0.0.1:{self.tunnel_impostor.port}"])
        self.web_impostor = None
        try:
            self._start(base, ca_dir)
        except BaseException:
            self.close()
            raise

    def _start(self, base: Path, ca_dir: Path) -> None:
        self.proxy.start()
        self.pin = self.proxy.pin()
        ca_pem = (self.proxy.data_dir / "ca" / "tls_ca.crt").read_text()
        ping = {"cluster_name": "impostors",
                "proxy": {"web_addr": self.proxy.addr("web"),
                          "ssh_addr": self.proxy.addr("ssh"),
                          "tunnel_addr": f"127.0.0.1:{self.tunnel_impostor.port}"}}
        self.web_impostor = Impostor("http", ca_pem, ping)
        self.tunnel_impostor.ca_pem = ca_pem
        self.proxy.add_user("alice", PASSWORD, roles=("access",), logins=("root",))
        self.home = self.proxy.login(base / "alice", "alice", PASSWORD, pin=self.pin)
        self.node, _ = join_node(self.proxy, base, "n1")
        self.node.stop()
        # The certificates the impostor may hold.
        self.holders = {
            "user": (self.home / "tls.key", self.home / "tls.crt"),
            "node": (self.node.data_dir / "tls.key", self.node.data_dir / "tls.crt"),
        }
        ca_key = self.proxy.authority().tls_ca_key
        ca_cert = x509ca.load_certificate_pem(ca_pem.encode())
        key, cert = issue_legacy_certificate(
            {"ca": ca_cert, "ca_key": ca_key},
            Identity(kind="user", name="mallory", cluster="impostors"),
            dns=("localhost",), ips=("127.0.0.1",))
        keys.write_secret(ca_dir / "legacy.key", keys.private_key_pem(key))
        (ca_dir / "legacy.crt").write_bytes(x509ca.certificate_pem(cert))
        self.holders["legacy-user"] = (ca_dir / "legacy.key", ca_dir / "legacy.crt")

    def hold(self, holder: str) -> None:
        self.web_impostor.hold(*self.holders[holder])
        self.tunnel_impostor.hold(*self.holders[holder])

    @property
    def web(self) -> str:
        return f"127.0.0.1:{self.web_impostor.port}"

    def close(self) -> None:
        self.proxy.stop()
        for impostor in (self.web_impostor, self.tunnel_impostor):
            if impostor is not None:
                impostor.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = World(tmp_path_factory.mktemp("impostors"))
    yield world
    world.close()


@pytest.fixture(params=HOLDERS)
def holder(request, world) -> str:
    world.hold(request.param)
    return request.param


def only_the_ca_was_asked(world) -> None:
    """The unverified CA fetch is all an impostor may serve."""
    assert all(" /v1/cluster/ca " in line for line in world.web_impostor.paths()), \
        world.web_impostor.paths()


def test_edge_login_sends_no_password(world, holder, tmp_path):
    result = run_edge(tmp_path / "home", "login", "--proxy", world.web, "--user", "alice",
                      "--password-stdin", "--ca-pin", world.pin, input=PASSWORD + "\n")
    assert result.returncode != 0
    assert not world.web_impostor.secret_seen(PASSWORD)
    only_the_ca_was_asked(world)
    assert "refused the server" in result.stderr or "does not verify" in result.stderr, \
        result.stderr


def test_edgectl_sends_no_request(world, holder):
    result = subprocess.run(
        [sys.executable, "-m", "edgeaccess.admin.main", "--auth-server", world.web,
         "--identity", str(world.proxy.data_dir / "admin" / "identity.pem"),
         "users", "add", "bob", "--roles", "access"],
        capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode != 0
    assert world.web_impostor.paths() == []
    assert "bob" not in world.web_impostor.received.decode("latin-1")


def test_a_joining_node_sends_no_token(world, holder, tmp_path):
    token = world.proxy.node_token()
    node = NodeProcess(tmp_path / "n2", tmp_path / "n2.log", name="n2",
                       auth_server=world.web, token=token, ca_pin=world.pin)
    node.start()
    try:
        wait_for(lambda: node.process.poll() is not None or world.web_impostor.secret_seen(token)
                 or any("/v1/join" in p for p in world.web_impostor.paths()),
                 DEADLINE, "the node to give up or to send its token")
    finally:
        node.stop()
    assert not world.web_impostor.secret_seen(token)
    only_the_ca_was_asked(world)
    assert "refused the server" in node.log() or "does not verify" in node.log(), \
        node.log()[-3000:]


def _done(d):
    """The result of a Deferred that has fired (the inline disk writer's)."""
    results: list = []
    d.addBoth(results.append)
    assert results, "the spool did not complete inline"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def _open_spool(directory: Path):
    """The node's audit spool, opened from the test (the node is stopped)."""
    from twisted.internet.task import Clock

    from edgeaccess.audit.diskwriter import InlineDiskWriter
    from edgeaccess.audit.spool import Spool

    return _done(Spool.open(directory, InlineDiskWriter(Clock())))


def test_a_joined_node_sends_no_heartbeat_and_no_audit_event(world, holder, tmp_path):
    node, _ = join_node(world.proxy, tmp_path, "n3", timeout=DEADLINE)
    # Listed means the heartbeat went through; the control state (roles,
    # CAs, locks) follows it and is kept in control.json.
    control = node.data_dir / "control.json"
    try:
        wait_for(control.exists, DEADLINE, "the node's control state", node.process)
    finally:
        node.stop()
    control_before = control.read_text()
    # The node's auth address now leads to the impostor (DNS or address
    # taken over); an audit event is waiting in its spool.
    meta = json.loads((node.data_dir / "identity.json").read_text())
    meta["auth_server"] = world.web
    (node.data_dir / "identity.json").write_text(json.dumps(meta))
    secret_event = "ev-must-not-leak-" + holder
    spool = _open_spool(node.data_dir / "audit-spool")
    _done(spool.append_event({
        "id": secret_event, "event": "session.start", "cluster": "impostors",
        "node": "n3", "user": "alice", "time": datetime.now(timezone.utc).isoformat()}))
    _done(spool.close())
    node.start()
    try:
        def settled():
            log = node.log()
            leaked = any(("/v1/audit" in p or "/v1/nodes" in p)
                         for p in world.web_impostor.paths())
            return leaked or ("heartbeat failed" in log and "audit delivery failed" in log)

        wait_for(settled, DEADLINE, "the node's heartbeat and audit delivery to fail",
                 node.process)
    finally:
        node.stop()
    assert world.web_impostor.paths() == []
    assert not world.web_impostor.secret_seen(secret_event)
    assert control.read_text() == control_before  # no say over roles, CAs or locks
    spool = _open_spool(node.data_dir / "audit-spool")
    assert secret_event in [e["id"] for e in spool.pending_events()]
    _done(spool.close())


def test_the_tunnel_agent_sends_nothing(world, holder, tmp_path):
    node = NodeProcess(tmp_path / "t1", tmp_path / "t1.log", name="t1",
                       auth_server=world.proxy.addr("web"), token=world.proxy.node_token(),
                       ca_pin=world.pin)
    node.start()
    try:
        # It joins through the real proxy, which announces the impostor as its
        # tunnel address: the agent dials it, again and again.
        wait_for(lambda: world.tunnel_impostor.received
                 or node.log().count("tunnel") and re.search(
                     r"(refused the server|does not verify|certificate verify failed|"
                     r"does not contain|VerificationError)", node.log()),
                 DEADLINE, "the tunnel agent to dial the impostor", node.process)
    finally:
        node.stop()
    assert world.tunnel_impostor.received == b""


def test_the_tls_routing_relay_sends_no_ssh_byte(world, holder, tmp_path):
    home = world.proxy.login(tmp_path / "routed", "alice", PASSWORD, pin=world.pin,
                             extra=["--tls-routing"])
    config = (home / "ssh_config").read_text()
    assert f"127.0.0.1:{world.tunnel_impostor.port}" in config
    result = subprocess.run(
        ["ssh", "-F", str(home / "ssh_config"), "-o", "BatchMode=yes",
         "-o", "ConnectTimeout=20", "root@n1.impostors", "true"],
        capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode != 0
    assert b"SSH-2.0" not in world.tunnel_impostor.received
    assert world.tunnel_impostor.received == b""


@pytest.fixture(scope="module")
def leaf(world, tmp_path_factory):
    base = tmp_path_factory.mktemp("leaf")
    leaf = ProxyProcess(base / "proxy", base / "proxy.log", cluster="leafy")
    leaf.start()
    yield leaf
    leaf.stop()


def trust_impostors(world, tmp_path, web: str):
    """A new trusted-cluster token of the root and a ``trusted_cluster``
    document for the leaf naming it, the root's web address ``web`` and the
    tunnel impostor as the root's tunnel address: ``(token, path)``."""
    token = world.proxy.edgectl_json("tokens", "add", "--type", "trusted_cluster")["token"]
    document = tmp_path / "trust.yaml"
    document.write_text(trusted_cluster_yaml(
        name="impostors", token=token, pin=world.pin, web=web,
        tunnel=f"127.0.0.1:{world.tunnel_impostor.port}", role_map={"access": ["access"]}))
    return token, document


def test_the_leaf_exchange_sends_no_token(world, holder, leaf, tmp_path):
    token, document = trust_impostors(world, tmp_path, world.web)
    result = leaf.edgectl("create", "-f", str(document), check=False)
    assert result.returncode != 0
    assert not world.web_impostor.secret_seen(token)
    only_the_ca_was_asked(world)
    assert "refused the server" in result.stderr or "does not verify" in result.stderr, \
        result.stderr


def test_the_leaf_tunnel_to_the_root_sends_nothing(world, holder, leaf, tmp_path):
    """The exchange goes to the real root; the tunnel address leads to the impostor."""
    _, document = trust_impostors(world, tmp_path, world.proxy.addr("web"))
    before = len(leaf.log())
    leaf.edgectl("create", "-f", str(document))
    try:
        wait_for(lambda: world.tunnel_impostor.received
                 or "refused the server" in leaf.log()[before:],
                 DEADLINE, "the leaf to dial the impostor", leaf.process)
    finally:
        leaf.edgectl("rm", "trusted_cluster/impostors")
    assert world.tunnel_impostor.received == b""


def _served_certificate(addr: str):
    from cryptography import x509 as cx509

    host, _, port = addr.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        with context.wrap_socket(raw) as conn:
            return cx509.load_der_x509_certificate(conn.getpeercert(binary_form=True))


def test_the_proxy_signs_its_server_certificate_at_every_start(world):
    """Server-only, kind proxy of its cluster, naming what it is dialled at;
    a restart with another --server-names is named at once (an existing data
    dir gets the current shape without any step)."""
    from cryptography import x509 as cx509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    world.proxy.stop()
    world.proxy.extra_args += ["--server-names", "proxy.impostors.test,10.1.2.3"]
    world.proxy.start()
    for port in ("web", "auth", "tunnel"):
        cert = _served_certificate(world.proxy.runtime()["listen"][port])
        assert x509ca.extended_key_usages(cert) == {ExtendedKeyUsageOID.SERVER_AUTH}
        identity = x509ca.identity_from_certificate(cert)
        assert (identity.kind, identity.cluster) == ("proxy", "impostors")
        sans = cert.extensions.get_extension_for_class(cx509.SubjectAlternativeName).value
        assert {"proxy.impostors.test", "localhost"} <= set(sans.get_values_for_type(cx509.DNSName))
        assert {"127.0.0.1", "10.1.2.3"} <= {str(a) for a in sans.get_values_for_type(
            cx509.IPAddress)}
