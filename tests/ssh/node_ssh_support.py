"""A node SSH server in a subprocess and an OpenSSH client set up for it.

The server (``node_ssh_server_main.py``) trusts one user CA and presents a
host certificate from a host CA; the client trusts that host CA through an
``@cert-authority`` line and checks host keys strictly. Certificates are
issued per test with the PKI helpers.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edgeaccess.devcluster import stop_process
from edgeaccess.pki.keys import (
    generate_private_key,
    private_key_openssh,
    public_key_openssh,
)
from edgeaccess.pki.sshca import issue_host_certificate, issue_user_certificate
from tests.serverscript import start_script

HERE = Path(__file__).parent
NODE = "node1"
CLUSTER = "test"
#: username -> (login, port_forwarding, session_ttl seconds or 0)
GRANTS = [
    ["alice", "root", True, 0],
    ["bob", "root", False, 0],
    ["*", "nosuchuser-edge", False, 0],
    ["shorty", "root", False, 1],
    ["*", "nobody", False, 0],
    ["slowdisk", "root", False, 0],   # the observer makes its start durable late
    ["brokendisk", "root", False, 0],  # the observer cannot make its start durable
]


def now() -> datetime:
    return datetime.now(timezone.utc)


class NodeEnv:
    """The running server and the client's files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.user_ca = generate_private_key()
        self.other_ca = generate_private_key()
        self.host_ca = generate_private_key()
        self.wrong_host_ca = generate_private_key()
        host_key = generate_private_key()
        host_cert = issue_host_certificate(
            self.host_ca,
            host_key.public_key(),
            host_id="uuid-1",
            principals=[NODE, f"{NODE}.{CLUSTER}"],
            now=now(),
            ttl=timedelta(hours=1),
        )
        (root / "host_key").write_bytes(private_key_openssh(host_key))
        (root / "host_key-cert.pub").write_bytes(host_cert.public_bytes())
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_bytes(
            b"@cert-authority " + NODE.encode() + b" "
            + public_key_openssh(self.host_ca) + b"\n"
        )
        self.wrong_known_hosts = root / "wrong_known_hosts"
        self.wrong_known_hosts.write_bytes(
            b"@cert-authority " + NODE.encode() + b" "
            + public_key_openssh(self.wrong_host_ca) + b"\n"
        )
        self.config = root / "server.json"
        self.config.write_text(
            json.dumps(
                {
                    "host_key": str(root / "host_key"),
                    "host_cert": str(root / "host_key-cert.pub"),
                    "user_cas": [public_key_openssh(self.user_ca).decode()],
                    "grants": GRANTS,
                    "node_name": NODE,
                    "env_allow": ["EDGE_ALLOWED"],
                }
            )
        )
        self.log = Path(str(self.config) + ".log")
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> None:
        self.process, self.port = start_script(HERE / "node_ssh_server_main.py", self.config,
                                               "server", self.log_text)

    def stop(self) -> None:
        stop_process(self.process)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def user_key(
        self,
        name: str,
        *,
        principals=("root",),
        ca=None,
        issued_at: datetime | None = None,
        ttl: timedelta = timedelta(hours=1),
        critical_options: dict | None = None,
        with_certificate: bool = True,
        private_key=None,
    ) -> Path:
        """Write ``name`` (private key) and ``name-cert.pub`` for ``ssh -i``."""
        key = private_key or generate_private_key()
        path = self.root / name
        path.write_bytes(private_key_openssh(key))
        path.chmod(0o600)
        if with_certificate:
            cert = issue_user_certificate(
                ca or self.user_ca,
                key.public_key(),
                username=name,
                principals=list(principals),
                roles=["access"],
                cluster=CLUSTER,
                now=issued_at or now(),
                ttl=ttl,
                critical_options=critical_options,
            )
            Path(str(path) + "-cert.pub").write_bytes(cert.public_bytes())
        return path

    def ssh_options(self, key: Path, known_hosts: Path | None = None) -> list[str]:
        """Options shared by ssh, scp and sftp (``-F /dev/null``: no user config)."""
        options = [
            "-F", "/dev/null",
            "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"HostKeyAlias={NODE}",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", f"IdentityFile={key}",
            "-o", "ConnectTimeout=10",
        ]
        cert = Path(str(key) + "-cert.pub")
        if cert.exists():
            options += ["-o", f"CertificateFile={cert}"]
        return options

    def ssh(
        self, key: Path, *command: str, login: str = "root", extra=(), known_hosts=None,
        input: bytes | None = None, timeout: float = 30,
    ) -> subprocess.CompletedProcess:
        """Run ``ssh`` to the node and wait for it."""
        args = ["ssh", *self.ssh_options(key, known_hosts), "-p", str(self.port),
                *extra, f"{login}@127.0.0.1", *command]
        return subprocess.run(
            args, input=input, capture_output=True, timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )


@pytest.fixture(scope="module")
def node_env(tmp_path_factory):
    env = NodeEnv(tmp_path_factory.mktemp("nodessh"))
    env.start()
    try:
        yield env
    finally:
        env.stop()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
