"""The proxy's SSH service in a subprocess, targets, and an OpenSSH client
configured to jump through it (the way ``edge login`` writes ssh_config).

Everything listens on 127.0.0.1 with ephemeral ports; files live in a
temporary directory.
"""

from __future__ import annotations

import json
import socket
import socketserver
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from edgeaccess.devcluster import stop_process
from edgeaccess.pki.keys import generate_private_key, private_key_openssh, public_key_openssh
from edgeaccess.pki.sshca import issue_host_certificate, issue_user_certificate
from tests.serverscript import start_script

HERE = Path(__file__).parent
REPO = HERE.parent.parent
CLUSTER = "test"
PROXY_ALIAS = f"proxy.{CLUSTER}"


def now() -> datetime:
    return datetime.now(timezone.utc)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class _EchoHandler(socketserver.BaseRequestHandler):
    """Echoes until EOF, then half-closes: exercises EOF both ways."""

    def handle(self) -> None:
        sock = self.request
        while True:
            data = sock.recv(65536)
            if not data:
                break
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)


class _SourceHandler(socketserver.BaseRequestHandler):
    """Sends ``server.size`` bytes as fast as it can, then closes."""

    def handle(self) -> None:
        chunk = b"s" * (1 << 20)
        left = self.server.size
        try:
            while left > 0:
                piece = chunk[: min(left, len(chunk))]
                self.request.sendall(piece)
                left -= len(piece)
            self.request.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class _SinkHandler(socketserver.BaseRequestHandler):
    """Reads slowly (``server.pace`` seconds per 64 KiB), counting bytes."""

    def handle(self) -> None:
        while True:
            data = self.request.recv(65536)
            if not data:
                break
            self.server.received += len(data)
            self.server.gate.wait(self.server.pace)
        self.request.sendall(str(self.server.received).encode())
        self.request.shutdown(socket.SHUT_WR)


class TCPTarget(socketserver.ThreadingTCPServer):
    """A plain TCP server on 127.0.0.1 standing for a node."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler, **attrs) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        for name, value in attrs.items():
            setattr(self, name, value)
        self.gate = threading.Event()  # never set: a pacing timer for sinks
        self.received = 0
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def echo_target() -> TCPTarget:
    return TCPTarget(_EchoHandler)


def source_target(size: int) -> TCPTarget:
    return TCPTarget(_SourceHandler, size=size)


def sink_target(pace: float) -> TCPTarget:
    return TCPTarget(_SinkHandler, pace=pace)


class ProxyEnv:
    """A running proxy SSH service and a client set up to jump through it."""

    def __init__(self, root: Path, nodes: list[dict]) -> None:
        self.root = root
        self.user_ca = generate_private_key()
        self.other_ca = generate_private_key()
        self.host_ca = generate_private_key()
        host_key = generate_private_key()
        host_cert = issue_host_certificate(
            self.host_ca,
            host_key.public_key(),
            host_id="proxy-1",
            principals=[PROXY_ALIAS, CLUSTER],
            now=now(),
            ttl=timedelta(hours=1),
        )
        (root / "proxy_host_key").write_bytes(private_key_openssh(host_key))
        (root / "proxy_host_key-cert.pub").write_bytes(host_cert.public_bytes())
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_bytes(
            b"@cert-authority * " + public_key_openssh(self.host_ca) + b"\n"
        )
        self.nodes = nodes
        self.config = root / "proxy.json"
        self.log = Path(str(self.config) + ".log")
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> None:
        self.config.write_text(
            json.dumps(
                {
                    "host_key": str(self.root / "proxy_host_key"),
                    "host_cert": str(self.root / "proxy_host_key-cert.pub"),
                    "user_cas": [public_key_openssh(self.user_ca).decode()],
                    "cluster": CLUSTER,
                    "nodes": self.nodes,
                }
            )
        )
        self.process, self.port = start_script(HERE / "proxy_ssh_server_main.py", self.config,
                                               "proxy", self.log_text)

    def stop(self) -> None:
        stop_process(self.process)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def user_key(self, name: str, *, principals=("root",), ca=None) -> Path:
        """Write ``name`` and ``name-cert.pub``; returns the key's path."""
        key = generate_private_key()
        path = self.root / name
        path.write_bytes(private_key_openssh(key))
        path.chmod(0o600)
        cert = issue_user_certificate(
            ca or self.user_ca,
            key.public_key(),
            username=name,
            principals=list(principals),
            roles=["access"],
            cluster=CLUSTER,
            now=now(),
            ttl=timedelta(hours=1),
        )
        Path(str(path) + "-cert.pub").write_bytes(cert.public_bytes())
        return path

    def ssh_config(self, key: Path, jump_user: str = "jumper") -> Path:
        """An ssh_config like the one ``edge login`` writes: ``*.test`` jumps
        through the proxy, host keys are checked against the host CA."""
        path = self.root / f"ssh_config-{key.name}"
        path.write_text(
            f"""Host {PROXY_ALIAS}
    HostName 127.0.0.1
    Port {self.port}
    User {jump_user}
    HostKeyAlias {PROXY_ALIAS}
Host *.{CLUSTER} !{PROXY_ALIAS}
    ProxyJump {PROXY_ALIAS}
Host *
    UserKnownHostsFile {self.known_hosts}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    IdentitiesOnly yes
    IdentityAgent none
    IdentityFile {key}
    CertificateFile {key}-cert.pub
    ConnectTimeout 10
"""
        )
        return path

    def forward(self, config: Path, target: str, **popen) -> subprocess.Popen:
        """``ssh -W target proxy``: a direct-tcpip channel on stdin/stdout."""
        return subprocess.Popen(
            ["ssh", "-F", str(config), "-W", target, PROXY_ALIAS], **popen
        )
