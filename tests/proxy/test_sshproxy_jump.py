"""``ssh -J``: OpenSSH jumps through the proxy to a real node SSH server.

The node server is the one of ``edgeaccess.ssh.server`` run by
``tests/ssh/node_ssh_server_main.py``; the proxy only splices bytes, so the
session is end to end between the OpenSSH client and the node.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from edgeaccess.devcluster import stop_process
from edgeaccess.pki.keys import generate_private_key, private_key_openssh, public_key_openssh
from edgeaccess.pki.sshca import issue_host_certificate
from tests.serverscript import start_script
from proxy_ssh_testkit import CLUSTER, REPO, ProxyEnv, now

NODE_MAIN = REPO / "tests" / "ssh" / "node_ssh_server_main.py"
NODE = "node1"

pytestmark = pytest.mark.skipif(not NODE_MAIN.exists(), reason="node SSH server missing")


class NodeProcess:
    def __init__(self, root: Path, host_ca, user_ca) -> None:
        host_key = generate_private_key()
        cert = issue_host_certificate(
            host_ca, host_key.public_key(), host_id="uuid-node1",
            principals=[NODE, f"{NODE}.{CLUSTER}"], now=now(), ttl=timedelta(hours=1),
        )
        (root / "node_key").write_bytes(private_key_openssh(host_key))
        (root / "node_key-cert.pub").write_bytes(cert.public_bytes())
        self.config = root / "node.json"
        self.config.write_text(json.dumps({
            "host_key": str(root / "node_key"),
            "host_cert": str(root / "node_key-cert.pub"),
            "user_cas": [public_key_openssh(user_ca).decode()],
            "grants": [["alice", "root", False, 0]],
            "node_name": NODE,
            "env_allow": [],
        }))
        self.process, self.port = start_script(NODE_MAIN, self.config, "node")

    def stop(self) -> None:
        stop_process(self.process)


@pytest.fixture(scope="module")
def jump(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxyjump")
    env = ProxyEnv(root, [])
    node = NodeProcess(root, env.host_ca, env.user_ca)
    env.nodes.append({"name": NODE, "uuid": "uuid-node1", "address": f"127.0.0.1:{node.port}"})
    try:
        env.start()
        yield env, env.ssh_config(env.user_key("alice", principals=("root",)))
    finally:
        env.stop()
        node.stop()


def ssh(config: Path, *args: str, data: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", "-F", str(config), *args], input=data, capture_output=True, timeout=30,
        stdin=None if data is not None else subprocess.DEVNULL,
    )


def test_ssh_jumps_through_the_proxy_to_the_node(jump):
    env, config = jump
    result = ssh(config, f"root@{NODE}.{CLUSTER}", "echo", "hello from the node")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello from the node\n"
    assert f"target={NODE}.{CLUSTER}:22 route=direct outcome=ok" in env.log_text()


def test_stdin_and_its_eof_reach_a_command_on_the_node(jump):
    _env, config = jump
    data = os.urandom(3 * 1024 * 1024)
    result = ssh(config, f"root@{NODE}.{CLUSTER}", "sha256sum", data=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_unknown_node_through_jump_says_so(jump):
    _env, config = jump
    result = ssh(config, f"root@ghost.{CLUSTER}", "true")
    assert result.returncode != 0
    assert f"node ghost not found in cluster {CLUSTER}" in result.stderr.decode()
