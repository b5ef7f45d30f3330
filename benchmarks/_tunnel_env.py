"""Real clusters for the reverse-tunnel benchmarks: proxy, nodes, OpenSSH, stunnel.

:class:`BenchCluster` starts ``twistd edgeproxy`` (through
``_tunnel_proxy.py``: raised fd limit, optional tunnel heartbeat), a user
``bench`` (a role without session recording unless ``record``) logged in with ``edge login`` (``EDGE_HOME/ssh_config``), a
tunnelled node ``tnode`` and a direct-mode node ``dnode`` listening on
127.0.0.1. :class:`CPath` is the same route built from C tools: an OpenSSH
``sshd`` as jump host and a ``stunnel4`` client/server pair (TLS 1.3,
mutual certificates from the cluster CA) in front of ``dnode``'s SSH port.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

from edgeaccess.devcluster import NodeProcess, ProxyProcess, run_edge, stop_process, wait_for

MIB = 1024 * 1024
GIB = 1024 * MIB
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
WRAPPER = str(Path(__file__).resolve().parent / "_tunnel_proxy.py")
PASSWORD = "bench-password-1"
NO_RECORDING_ROLE = """\
kind: role
version: v1
metadata: {name: %(name)s}
spec:
  options: {record_session: false}
  allow:
    logins: ["{{internal.logins}}"]
    node_labels: {"*": "*"}
"""


def parse_size(text: str) -> int:
    """``"1G"``, ``"256M"``, ``"64k"`` or a byte count."""
    units = {"k": 1024, "m": MIB, "g": GIB}
    text = text.strip().lower()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def free_port() -> int:
    """An unused TCP port of 127.0.0.1 (for daemons that cannot report theirs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime+stime of ``pid`` (plus cutime+cstime of reaped children), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    used = fields[11:15] if children else fields[11:13]
    return sum(int(value) for value in used) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def settled_cpu(pids: dict[str, tuple[int, bool]]) -> dict[str, float]:
    """CPU of each named process once it stops moving (sessions reaped)."""
    last = {name: cpu_seconds(pid, ch) for name, (pid, ch) in pids.items()}
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = {name: cpu_seconds(pid, ch) for name, (pid, ch) in pids.items()}
        if now == last:
            break
        last = now
    return last


class ProxyCommandMeter:
    """CPU of the ssh client's ``ProxyCommand`` processes during a transfer.

    ssh does not wait for its ProxyCommand (it signals it at exit), so their
    CPU often misses the client's ``RUSAGE_CHILDREN``. A thread reads
    ``/proc`` every 50 ms for processes with an argument equal to ``-W``
    (OpenSSH's jump, ``ssh -W``: ProxyJump and the C path) or ending in
    ``tlsroute.py`` (TLS routing) and keeps the last utime+stime seen of each
    (up to 50 ms of a process's end may be missed).
    """

    def __init__(self) -> None:
        import threading

        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proxy-command-meter", daemon=True)

    @staticmethod
    def _matches(argv: list[bytes]) -> bool:
        return any(arg == b"-W" or arg.endswith(b"tlsroute.py") for arg in argv)

    def _sample(self) -> None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if pid in self.seen or self._matches(argv):
                    self.seen[pid] = cpu_seconds(pid)
            except (OSError, ValueError, IndexError):
                continue

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> "ProxyCommandMeter":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu(self) -> float:
        """CPU-seconds of every ProxyCommand seen."""
        return sum(self.seen.values())


def wait_port(port: int, timeout: float, what: str, process=None) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections."""
    def accepting() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    wait_for(accepting, timeout, what, process)


def _wrapped(argv: list[str], nofile: int = 0, heartbeat: float = 0.0,
             nodelay: bool = False) -> list[str]:
    twistd_args = argv[3:]  # after [python, -c, "from twisted... run()"]
    wrapper = [sys.executable, WRAPPER]
    if nofile:
        wrapper += ["--nofile", str(nofile)]
    if heartbeat:
        wrapper += ["--tunnel-heartbeat", str(heartbeat)]
    if nodelay:
        wrapper.append("--tunnel-nodelay")
    return wrapper + ["--"] + twistd_args


class BenchProxy(ProxyProcess):
    """``ProxyProcess`` started through ``_tunnel_proxy.py`` (fd limit, heartbeat)."""

    nofile: int = 0
    tunnel_heartbeat: float = 0.0
    nodelay: bool = False

    def _spawn(self, argv: list[str], env=None) -> None:
        super()._spawn(_wrapped(argv, self.nofile, self.tunnel_heartbeat, self.nodelay), env)

    @property
    def pid(self) -> int:
        return self.process.pid


class BenchNode(NodeProcess):
    """``NodeProcess``, optionally with TCP_NODELAY on its tunnel (experiment)."""

    nodelay: bool = False

    def _spawn(self, argv: list[str], env=None) -> None:
        super()._spawn(_wrapped(argv, nodelay=self.nodelay) if self.nodelay else argv, env)


def start_proxy(base: Path, cluster: str = "bench", nofile: int = 0,
                tunnel_heartbeat: float = 0.0, nodelay: bool = False) -> BenchProxy:
    """A running proxy in ``base/proxy`` (log ``base/proxy.log``)."""
    proxy = BenchProxy(base / "proxy", base / "proxy.log", cluster=cluster)
    proxy.nofile = nofile
    proxy.tunnel_heartbeat = tunnel_heartbeat
    proxy.nodelay = nodelay
    try:
        proxy.start()
    except Exception:
        proxy.kill()
        raise RuntimeError(f"proxy did not start; log:\n{proxy.log()[-3000:]}")
    return proxy


class BenchCluster:
    """Proxy + logged-in user + tunnelled node ``tnode`` + direct nodes ``dnode``
    (``--agent-listen off``: TCP from the proxy) and ``lnode`` (agent port)."""

    def __init__(self, base: Path, *, direct_node: bool = True, record: bool = False,
                 nodelay: bool = False) -> None:
        self.base = base
        self.proxy = start_proxy(base, nodelay=nodelay)
        self.nodes: list[NodeProcess] = []
        try:
            self.login = os.environ.get("USER") or "root"
            # Session recording would write every byte to the node's audit
            # spool: measure the data path alone unless ``record`` is asked.
            role = "access"
            if not record:
                role = "bench-norec"
                (base / "role.yaml").write_text(NO_RECORDING_ROLE % {"name": role})
                self.proxy.edgectl("create", "-f", str(base / "role.yaml"))
            self.proxy.add_user("bench", PASSWORD, roles=(role,), logins=(self.login,))
            self.home = base / "edge-home"
            result = run_edge(self.home, "login", "--proxy", self.proxy.addr("web"),
                              "--user", "bench", "--password-stdin", "--ca-pin",
                              self.proxy.pin(), input=PASSWORD + "\n")
            if result.returncode != 0:
                raise RuntimeError(f"edge login failed: {result.stderr}")
            # Node heartbeats to auth every 30 s (devcluster's default is 1 s,
            # which would add HTTP requests to the proxy's CPU figures).
            slow = ["--heartbeat-interval", "30"]
            self.tnode = BenchNode(base / "tnode", base / "tnode.log", name="tnode",
                                   auth_server=self.proxy.addr("web"),
                                   token=self.proxy.node_token(), ca_pin=self.proxy.pin(),
                                   extra_args=slow)
            self.tnode.nodelay = nodelay
            self.nodes.append(self.tnode.start())
            self.dnode = self.lnode = None
            if direct_node:
                # dnode: SSH over plain TCP from the proxy (no agent port);
                # lnode: SSH over a channel of the proxy's connection to its
                # agent port (the default for LAN nodes).
                self.dnode = NodeProcess(base / "dnode", base / "dnode.log", name="dnode",
                                         auth_server=self.proxy.addr("auth"),
                                         token=self.proxy.node_token(),
                                         ca_pin=self.proxy.pin(),
                                         extra_args=slow + ["--agent-listen", "off"])
                self.nodes.append(self.dnode.start())
                self.lnode = NodeProcess(base / "lnode", base / "lnode.log", name="lnode",
                                         auth_server=self.proxy.addr("auth"),
                                         token=self.proxy.node_token(),
                                         ca_pin=self.proxy.pin(), extra_args=slow)
                self.nodes.append(self.lnode.start())
                listed = self.dnode.wait_listed(self.proxy)
                self.dnode_port = int(listed["address"].rpartition(":")[2])
                self.lnode.wait_listed(self.proxy)
            listed = self.tnode.wait_listed(self.proxy)
            if listed["address"] != "tunnel":
                raise RuntimeError(f"tnode is not tunnelled: {listed}")
        except Exception:
            self.stop()
            raise

    @property
    def ssh_config(self) -> Path:
        return self.home / "ssh_config"

    def edge_ssh(self, node: str) -> list[str]:
        """``ssh -F EDGE_HOME/ssh_config LOGIN@NODE.CLUSTER`` (through the proxy)."""
        return ["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes",
                f"{self.login}@{node}.{self.proxy.cluster}"]

    def direct_ssh(self) -> list[str]:
        """``ssh`` straight to dnode's port with the same certificate and host CA."""
        return ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={self.home / 'known_hosts'}",
                "-o", f"HostKeyAlias=dnode.{self.proxy.cluster}",
                "-o", "StrictHostKeyChecking=yes",
                "-o", f"IdentityFile={self.home / 'key'}",
                "-o", f"CertificateFile={self.home / 'key-cert.pub'}",
                "-o", "IdentitiesOnly=yes", "-p", str(self.dnode_port),
                f"{self.login}@127.0.0.1"]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.proxy.stop()


class CPath:
    """OpenSSH ``sshd`` (jump host) + ``stunnel4`` client -> server -> dnode's SSH port."""

    def __init__(self, cluster: BenchCluster) -> None:
        self.cluster = cluster
        self.directory = cluster.base / "cpath"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen] = {}
        try:
            self._write_material()
            self._start_sshd()
            self._start_stunnels()
        except Exception:
            self.stop()
            raise

    def _write_material(self) -> None:
        from edgeaccess.pki import keys, x509ca

        d = self.directory
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(d / "jump_key")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(d / "sshd_host_key")], check=True)
        shutil.copy(d / "jump_key.pub", d / "authorized_keys")
        authority = self.cluster.proxy.authority()
        ca_key, ca_cert = authority.tls_ca_key, authority.tls_ca_cert
        now = datetime.now(timezone.utc)
        cluster = self.cluster.proxy.cluster
        # The TLS server side holds a server identity (EKU serverAuth, with
        # its name), the client side a node's (clientAuth), as in the cluster.
        for label, identity, names in (
            ("stunnel-server", x509ca.Identity(kind="proxy", name="stunnel-server",
                                               cluster=cluster), ("localhost",)),
            ("stunnel-client", x509ca.Identity(kind="node", name="stunnel-client",
                                               cluster=cluster, uuid="stunnel-client"), ()),
        ):
            key = keys.generate_private_key()
            cert = x509ca.issue_identity_certificate(
                ca_key, ca_cert, key.public_key(), identity, now=now,
                ttl=timedelta(hours=6), dns_names=names)
            keys.write_secret(d / f"{label}.pem",
                              keys.private_key_pem(key) + x509ca.certificate_pem(cert))
        (d / "ca.pem").write_bytes(x509ca.certificate_pem(ca_cert))

    def _start_sshd(self) -> None:
        d = self.directory
        self.sshd_port = free_port()
        (d / "sshd_config").write_text("\n".join([
            "ListenAddress 127.0.0.1", f"HostKey {d / 'sshd_host_key'}",
            f"AuthorizedKeysFile {d / 'authorized_keys'}", "PidFile none", "UsePAM no",
            "StrictModes no", "PermitRootLogin yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "AllowTcpForwarding yes", "LogLevel ERROR",
            ""]))
        os.makedirs("/run/sshd", exist_ok=True)
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self.processes["sshd"] = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(d / "sshd_config"), "-p", str(self.sshd_port)],
            stderr=open(d / "sshd.log", "wb"))
        wait_port(self.sshd_port, 10, "sshd", self.processes["sshd"])

    def _start_stunnels(self) -> None:
        d = self.directory
        self.server_port, self.client_port = free_port(), free_port()
        common = ["foreground = yes", "pid =", "debug = 3", "sslVersionMin = TLSv1.3",
                  f"CAfile = {d / 'ca.pem'}", "verifyChain = yes"]
        (d / "stunnel-server.conf").write_text("\n".join(common + [
            "[tunnel]", f"accept = 127.0.0.1:{self.server_port}",
            f"connect = 127.0.0.1:{self.cluster.dnode_port}",
            f"cert = {d / 'stunnel-server.pem'}", ""]))
        (d / "stunnel-client.conf").write_text("\n".join(common + [
            "[tunnel]", "client = yes", f"accept = 127.0.0.1:{self.client_port}",
            f"connect = 127.0.0.1:{self.server_port}",
            f"cert = {d / 'stunnel-client.pem'}", ""]))
        for name, port in (("stunnel-server", self.server_port),
                           ("stunnel-client", self.client_port)):
            self.processes[name] = subprocess.Popen(
                ["stunnel4", str(d / f"{name}.conf")],
                stdout=subprocess.DEVNULL, stderr=open(d / f"{name}.log", "wb"))
            wait_port(port, 10, name, self.processes[name])

    def ssh(self) -> list[str]:
        """``ssh -J`` through sshd to the stunnel client, which reaches dnode."""
        d = self.directory
        jump = (f"ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=no "
                f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o IdentitiesOnly=yes "
                f"-i {d / 'jump_key'} -p {self.sshd_port} -W %h:%p root@127.0.0.1")
        direct = self.cluster.direct_ssh()
        port_at = direct.index("-p")
        return (direct[:port_at] + ["-o", f"ProxyCommand={jump}", "-p", str(self.client_port)]
                + direct[port_at + 2:])

    def cpu_pids(self) -> dict[str, tuple[int, bool]]:
        """pid and whether to count reaped children (sshd forks per session)."""
        return {"sshd": (self.processes["sshd"].pid, True),
                "stunnel_client": (self.processes["stunnel-client"].pid, False),
                "stunnel_server": (self.processes["stunnel-server"].pid, False)}

    def stop(self) -> None:
        for process in self.processes.values():
            stop_process(process)


def tls_routing_ssh(cluster: BenchCluster, node: str) -> list[str]:
    """``ssh`` to ``NODE.CLUSTER`` with the profile's ssh_config rendered in
    TLS-routing mode (what ``edge config --tls-routing`` writes), kept in a
    file of its own so the ProxyJump paths are unchanged."""
    from edgeaccess.client import profile as profiles

    home = cluster.home
    path = home / "ssh_config_tls_routing"
    if not path.exists():
        profile = profiles.load(home)
        if profile is None:
            raise RuntimeError(f"no edge profile in {home}")
        path.write_text(profiles.render_ssh_config(
            home, profile.cluster, profile.username, profile.ssh_addr,
            profile.leaf_clusters, tls_routing_addr=cluster.proxy.addr("tunnel")))
    return ["ssh", "-F", str(path), "-o", "BatchMode=yes",
            f"{cluster.login}@{node}.{cluster.proxy.cluster}"]


@contextmanager
def compared_paths(prefix: str, **cluster_options):
    """A :class:`BenchCluster` (``cluster_options``) with the C path beside it,
    stopped on the way out. Yields ``(cluster, cpath, commands)``: the ``ssh``
    argv of every path (``tunnel``, ``proxy-tcp``, ``c-path``, ``direct``,
    ``tls-tunnel``, ``tls-tcp``), to which the remote command is appended."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        cluster = BenchCluster(Path(tmp), **cluster_options)
        cpath = None
        try:
            cpath = CPath(cluster)
            yield cluster, cpath, {
                "tunnel": cluster.edge_ssh("tnode"),
                "proxy-tcp": cluster.edge_ssh("dnode"),
                "proxy-agent": cluster.edge_ssh("lnode"),
                "c-path": cpath.ssh(),
                "direct": cluster.direct_ssh(),
                "tls-tunnel": tls_routing_ssh(cluster, "tnode"),
                "tls-tcp": tls_routing_ssh(cluster, "dnode"),
                "tls-agent": tls_routing_ssh(cluster, "lnode"),
            }
        finally:
            if cpath is not None:
                cpath.stop()
            cluster.stop()


def emit(result: dict) -> None:
    """Print one result as a JSON line."""
    print(json.dumps(result), flush=True)


def monotonic_ms() -> float:
    return time.monotonic() * 1000.0
