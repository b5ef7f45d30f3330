"""Kubernetes and apps of a LAN node (direct mode): the proxy dials the node's agent port.

One world for the module: a proxy whose public host is ``edge.localhost``,
the Kubernetes API stand-in (tests/kube_standin.py; no kube-apiserver can be
installed here) and the demo app, and a node joined through the *auth* port
(direct mode, SSH on its own port) that publishes both with
``--kube-cluster`` and ``--app`` on ``--agent-listen``. Users: bob (roles
kube-editor and access), alice (kube-viewer).

A second node, "victim", announces an agent address where an impostor
listens: the proxy must refuse every server there that is not that very
node, and give it nothing.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import attrs
import pytest

from edgeaccess.devcluster import NodeProcess, ProxyProcess, run_edge, stop_process, wait_for
from edgeaccess.pki.authority import CertificateAuthority

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
from tests import kube_standin  # noqa: E402
from tests.apps.appkit import (  # noqa: E402
    PUBLIC_HOST,
    app_login,
    curl,
    edge_login,
    start_demo_app,
)
from tests.integration.steps import (  # noqa: E402
    app_post_streams_byte_exact,
    app_websocket_echoes,
    kubectl_port_forward_round_trips,
)
from tests.kube_world import KUBECTL, PASSWORD, ROLES, KubeWorld, start_standin  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.exists(KUBECTL), reason="kubectl is not installed")


@attrs.define
class LanWorld(KubeWorld):
    extra: dict = attrs.Factory(dict)


class Impostor:
    """A TLS server posing as a LAN node's agent port.

    It presents ``cert``/``key`` (switchable), asks for a client certificate
    without checking it, and records what arrives after the handshake. When
    ``hello`` is set it sends that AMP box first (a node's ``Hello`` naming
    the victim), as a real agent would.
    """

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.port = self.server.getsockname()[1]
        self.context: ssl.SSLContext | None = None
        self.hello = b""
        self.received = b""
        self.handshakes = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def present(self, cert: Path, key: Path, ca: Path, hello: bytes = b"") -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(str(cert), str(key))
        context.load_verify_locations(str(ca))
        context.verify_mode = ssl.CERT_OPTIONAL
        context.set_alpn_protocols(["edge-agent/1"])
        with self.lock:
            self.context, self.hello = context, hello

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(raw,), daemon=True).start()

    def _handle(self, raw: socket.socket) -> None:
        with self.lock:
            context, hello = self.context, self.hello
        raw.settimeout(20)
        try:
            conn = context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        with self.lock:
            self.handshakes += 1
        try:
            if hello:
                conn.sendall(hello)
            while data := conn.recv(65536):
                with self.lock:
                    self.received += data
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.server.close()


def _hello_box(name: str) -> bytes:
    from twisted.protocols import amp

    from edgeaccess.tunnel.protocol import PROTOCOL_VERSION, Inventory

    inventory = Inventory(name=name, kube_clusters=("victim",))
    return amp.AmpBox(_command=b"Hello", _ask=b"1",
                      protocol_version=str(PROTOCOL_VERSION).encode(),
                      capabilities=b"\x00\x00", inventory=inventory.to_json().encode()
                      ).serialize()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("lan")
    # kubectl (Go) resolves no *.localhost: the public host is 127.0.0.1, the
    # apps are at NAME.edge.localhost (curl resolves it).
    proxy = ProxyProcess(base / "proxy", base / "proxy.log", cluster="lan-agents",
                         extra_args=["--apps-domain", PUBLIC_HOST])
    # The cluster's CAs made here (the proxy imports a data dir's CA files), so
    # that the tests can issue certificates of the real CA to impostors.
    authority = CertificateAuthority.load_or_create(
        proxy.data_dir / "ca", "lan-agents", datetime.now(timezone.utc))
    proxy.start()
    standin = demo = node = victim = impostor = None
    try:
        standin = start_standin(base / "standin")
        demo, demo_port = start_demo_app(proxy)
        roles = base / "roles.yaml"
        roles.write_text(ROLES)
        proxy.edgectl("create", "-f", str(roles), "--force")
        kubeconfig = kube_standin.write_kubeconfig(base / "agent-kubeconfig", standin.port,
                                                   standin.pki)
        auth = proxy.runtime()["listen"]["auth"]
        impostor = Impostor()
        # Both nodes join while the users log in.
        node = NodeProcess(base / "lan-agent", base / "lan-agent.log", name="lan-agent",
                           auth_server=auth, token=proxy.node_token(), ca_pin=proxy.pin(),
                           extra_args=[
            "--kube-cluster", "standin", "--kubeconfig", str(kubeconfig),
            "--kube-labels", "env=test", "--agent-listen", "127.0.0.1:0",
            "--app", f"name=demo,uri=http://127.0.0.1:{demo_port},labels=team:web"]).start()
        victim = NodeProcess(base / "victim", base / "victim.log", name="victim",
                             auth_server=auth, token=proxy.node_token(), ca_pin=proxy.pin(),
                             extra_args=[
            "--kube-cluster", "victim", "--kubeconfig", str(kubeconfig), "--no-ssh",
            "--agent-listen", "127.0.0.1:0",
            "--agent-advertise-addr", f"127.0.0.1:{impostor.port}"]).start()
        world = LanWorld(base, proxy, standin, node)
        for user, user_roles in {"bob": ("kube-editor", "access"),
                                 "alice": ("kube-viewer",)}.items():
            proxy.add_user(user, PASSWORD, roles=user_roles)
            home = base / f"home-{user}"
            home.mkdir()
            world.homes[user] = home
            edge_login(proxy, home, user, PASSWORD)
        assert node.wait_listed(proxy)["address"] != "tunnel"
        victim.wait_listed(proxy)
        wait_for(lambda: "standin" in world.edge("bob", "kube", "ls").stdout, 30,
                 "the LAN node's Kubernetes cluster in edge kube ls")
        for user in ("bob", "alice"):
            result = world.edge(user, "kube", "login", "standin")
            assert result.returncode == 0, result.stderr
        world.extra = {"demo_port": demo_port, "victim": victim, "impostor": impostor,
                       "authority": authority}
        yield world
    finally:
        for process in (node, victim):
            if process is not None:
                process.stop()
        stop_process(demo)
        if standin is not None:
            standin.stop()
        if impostor is not None:
            impostor.close()
        proxy.stop()


@pytest.fixture(scope="module")
def demo(world):
    return app_login(world.home("bob"), "demo")


def _node_dir(world, name: str) -> Path:
    return world.base / name / "data"


def _agent_port(world, name: str = "lan-agent") -> int | None:
    """The agent port the node's record announces (None: none announced, e.g. by a
    node that is still renewing for its server certificate)."""
    nodes = {n["name"]: n for n in world.proxy.edgectl_json("nodes", "ls")}
    agent = nodes.get(name, {}).get("agent")
    return int(agent["address"].rpartition(":")[2]) if agent else None


# --- listing ---------------------------------------------------------------------------


def test_the_lan_node_announces_its_agent_and_users_list_its_resources(world):
    nodes = {n["name"]: n for n in world.proxy.edgectl_json("nodes", "ls")}
    agent = nodes["lan-agent"]["agent"]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", agent["address"])
    assert agent["address"] != nodes["lan-agent"]["address"]  # not the SSH port
    assert agent["inventory"]["kube_clusters"] == ["standin"]
    assert [a["name"] for a in agent["inventory"]["apps"]] == ["demo"]
    kube = json.loads(world.edge("bob", "kube", "ls", "--format", "json").stdout)
    assert {k["name"]: k["labels"] for k in kube}["standin"] == {"env": "test"}
    apps = json.loads(run_edge(world.home("bob"), "apps", "ls", "--format", "json").stdout)
    assert [(a["name"], a["node"]) for a in apps] == [("demo", "lan-agent")]


# --- Kubernetes ------------------------------------------------------------------------


def test_kubectl_get_reaches_the_api_as_the_user_through_the_lan_agent(world):
    result = world.kubectl("alice", "get", "pods")
    assert result.returncode == 0, result.stderr
    assert "web-1" in result.stdout
    seen = [r for r in world.standin.requests() if r["impersonated_user"] == "alice"]
    assert seen and all(r["authenticated"] == "edge-agent" for r in seen)
    assert all(r["impersonated_groups"] == ["viewers", "system:authenticated"] for r in seen)
    # The agent decides again: a viewer's exec is refused by the API's RBAC.
    refused = world.kubectl("alice", "exec", "web-1", "--", "true")
    assert refused.returncode != 0
    assert 'cannot create resource "pods" subresource "exec"' in refused.stderr


@pytest.mark.parametrize("websockets", ["true", "false"], ids=["websocket", "spdy"])
def test_kubectl_exec_with_stdin_through_the_lan_agent(world, websockets):
    result = world.kubectl("bob", "exec", "-i", "web-1", "--", "sh", "-c",
                           "tr a-z A-Z; exit 3", input="over the lan\n",
                           env={"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": websockets})
    assert result.stdout == "OVER THE LAN\n", result.stderr
    assert result.returncode == 3


def test_kubectl_port_forward_through_the_lan_agent(world, upper_echo_port):
    kubectl_port_forward_round_trips(world.env("bob"), upper_echo_port,
                                     "through the agent port", repeat=3000)


def test_the_proxy_keeps_one_connection_per_lan_agent(world):
    for _ in range(2):
        assert world.kubectl("bob", "get", "pods").returncode == 0
    log = (world.base / "proxy.log").read_text()
    assert log.count("connected to the agent of node lan-agent") == 1, log[-3000:]


# --- web apps --------------------------------------------------------------------------


def test_app_5mb_post_streams_both_ways_byte_exact_through_the_lan_agent(world, demo, tmp_path):
    app_post_streams_byte_exact(demo, tmp_path)
    answer = json.loads(curl(demo, "/api/whoami").stdout)
    assert answer["verified"] is True and answer["claims"]["username"] == "bob"


def test_app_websocket_echo_through_the_lan_agent(world, demo):
    app_websocket_echoes(world.proxy, "demo", demo, "hello lan")


# --- who is who ------------------------------------------------------------------------


def _dial_agent_port(port: int, cert: Path, key: Path, ca: Path) -> bytes | str:
    """What a client with ``cert`` gets from the agent port: the bytes it is
    sent, or the error that ends it."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    context.load_cert_chain(str(cert), str(key))
    context.set_alpn_protocols(["edge-agent/1"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
            with context.wrap_socket(raw) as conn:
                received = b""
                while chunk := conn.recv(65536):
                    received += chunk
                return received
    except (ssl.SSLError, ConnectionError) as e:
        return f"refused: {e}"


def _issue(world, identity, usage: str | None, path: Path) -> tuple[Path, Path]:
    """A certificate of the real cluster CA."""
    from edgeaccess.pki import keys, x509ca

    authority = world.extra["authority"]
    key = keys.generate_private_key()
    cert = authority.sign_tls(key.public_key(), identity, now=datetime.now(timezone.utc),
                              ttl=timedelta(hours=1), usage=usage,
                              ip_addresses=["127.0.0.1"] if usage == "server" else ())
    path.mkdir(parents=True, exist_ok=True)
    (path / "tls.key").write_bytes(keys.private_key_pem(key))
    (path / "tls.crt").write_bytes(x509ca.certificate_pem(cert))
    return path / "tls.crt", path / "tls.key"


def test_only_a_proxy_of_the_cluster_may_dial_the_agent_port(world, tmp_path):
    from edgeaccess.pki.x509ca import Identity

    port = _agent_port(world)
    ca = world.home("bob") / "ca.pem"
    holders = {
        "user": (world.home("bob") / "tls.crt", world.home("bob") / "tls.key"),
        "node": (_node_dir(world, "victim") / "tls.crt", _node_dir(world, "victim") / "tls.key"),
        "proxy server": _issue(world, Identity(kind="proxy", name="127.0.0.1",
                                               cluster=world.proxy.cluster),
                               None, tmp_path / "proxy-server"),
        "other cluster's proxy": _issue(world, Identity(kind="proxy", name="x",
                                                        cluster="elsewhere"),
                                        "client", tmp_path / "other-proxy"),
    }
    for holder, (cert, key) in holders.items():
        answer = _dial_agent_port(port, cert, key, ca)
        assert isinstance(answer, str) and answer.startswith("refused"), (holder, answer)
    log = (world.base / "lan-agent.log").read_text()
    assert "agent port: refused 127.0.0.1: it presented a user certificate" in log
    assert "it presented a node certificate" in log
    assert "a proxy certificate that is not for clients" in log
    assert "a proxy certificate of cluster elsewhere" in log
    # A proxy's client certificate of this cluster is let in (and greeted with Hello).
    cert, key = _issue(world, Identity(kind="proxy", name="127.0.0.1",
                                       cluster=world.proxy.cluster),
                       "client", tmp_path / "proxy-client")
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    context.load_cert_chain(str(cert), str(key))
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with context.wrap_socket(raw) as conn:
            assert b"Hello" in conn.recv(65536)


def test_a_server_that_is_not_the_node_gets_nothing(world):
    impostor = world.extra["impostor"]
    ca = world.home("bob") / "ca.pem"
    attempts = {
        # a user's certificate (client-only) at the victim's agent address
        "user": (world.home("bob") / "tls.crt", world.home("bob") / "tls.key", b""),
        # a real node's server certificate, naming 127.0.0.1 too, claiming to be the victim
        "other node": (_node_dir(world, "lan-agent") / "tls-server.crt",
                       _node_dir(world, "lan-agent") / "tls.key", _hello_box("victim")),
    }
    env = world.env("bob")
    kubeconfig_victim = world.edge("bob", "kube", "login", "victim")
    assert kubeconfig_victim.returncode == 0, kubeconfig_victim.stderr
    try:
        for holder, (cert, key, hello) in attempts.items():
            impostor.present(cert, key, ca, hello)
            before = impostor.handshakes
            result = subprocess.run([KUBECTL, "get", "pods", "--request-timeout", "30s"],
                                    env=env, capture_output=True, text=True, timeout=60)
            assert result.returncode != 0, (holder, result.stdout)
            # the proxy's 503 Status: the agent is offline (kubectl words it so)
            assert "ServiceUnavailable" in result.stderr, (holder, result.stderr)
            if holder == "other node":
                assert impostor.handshakes > before
        # Nothing of the protocol reached it but the refusal of its own Hello:
        # no channel opened, no request, no header of a user's.
        from twisted.protocols import amp

        boxes = amp.parseString(impostor.received)
        assert boxes and all(box.get(b"_error_code") == b"ACCESS_DENIED" for box in boxes), boxes
        assert b"OpenChannel" not in impostor.received and b"Impersonate" not in impostor.received
        log = (world.base / "proxy.log").read_text()
        assert "it presented a user certificate" in log
        assert "refused the agent at" in log and "not node" in log
    finally:
        world.edge("bob", "kube", "login", "standin")


# --- the pool follows the node ---------------------------------------------------------


def test_a_restarted_node_is_dialled_again_at_its_new_agent_address(world):
    """Runs last: stops and restarts the LAN node (its agent port is ephemeral, so it
    comes back elsewhere); meanwhile kubectl gets a clear 503, then works again. The node
    comes back without its server certificate, as one joined before agent ports existed:
    it renews at its first heartbeat and opens the port then."""
    before = _agent_port(world)
    dialled = (world.base / "proxy.log").read_text().count(
        "connected to the agent of node lan-agent")
    world.node.stop()
    down = world.kubectl("bob", "get", "pods", "--request-timeout", "20s")
    assert down.returncode != 0 and "ServiceUnavailable" in down.stderr, down.stderr
    (_node_dir(world, "lan-agent") / "tls-server.crt").unlink()
    world.node.start()
    wait_for(lambda: _agent_port(world) not in (None, before), 60, "the new agent address",
             world.node.process, interval=0.5)
    again = wait_for(lambda: (r := world.kubectl("bob", "get", "pods")).returncode == 0 and r,
                     60, "kubectl through the restarted node", interval=0.5)
    assert "web-1" in again.stdout
    log = (world.base / "proxy.log").read_text()
    assert log.count("connected to the agent of node lan-agent") == dialled + 1
    node_log = (world.base / "lan-agent.log").read_text()
    assert "has no server certificate for its agent port yet" in node_log
    assert (_node_dir(world, "lan-agent") / "tls-server.crt").exists()
