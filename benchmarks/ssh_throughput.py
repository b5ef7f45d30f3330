"""SSH data path: the edgeaccess node against OpenSSH's sshd, in one run.

``python -m benchmarks ssh [--size 1G] [--repeat 3] [--setup-runs 10] [--with-stock]
[--baseline-tree DIR]``

Starts, on 127.0.0.1 ephemeral ports, the node's real SSH server
(``make_node_ssh_factory`` in a process of its own, certificate login) and an
``sshd -D`` with its own config, host key and ``AuthorizedKeysFile``; then runs
the real ``ssh`` client against both, interleaved, with the same cipher:

* download: ``ssh HOST 'head -c SIZE /dev/zero' | wc -c``;
* upload:   ``head -c SIZE /dev/zero | ssh HOST 'cat > /dev/null'``;
* setup:    ``ssh HOST true``, median of ``--setup-runs`` (curve25519 on both).

Ciphers: aes128-ctr + hmac-sha2-256, then aes128-gcm@openssh.com.  Prints one
JSON object per result (median of ``--repeat`` runs) with MiB/s or ms, the CPU
seconds of the server side (server process plus the commands it reaped) and
of the client side, and the ratio against sshd.  ``--with-stock`` adds the node
with Conch's stock transport and process protocol (aes128-ctr only).
``--baseline-tree DIR`` adds the node run from another source tree (a copy or
checkout of an earlier version with ``edgeaccess/`` and ``benchmarks/``), to
compare two versions in the same run.  ``server_cpu_s_per_gib`` is the
server-side CPU per GiB transferred, the figure to compare on a shared machine.

Both servers run the command with ``SHLVL=1`` (the node sets it for exec;
sshd gets ``SetEnv SHLVL=1``) so bash skips root's ``.bashrc``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from edgeaccess.devcluster import stop_process

CIPHERS = [
    ("aes128-ctr", "hmac-sha2-256"),
    ("aes128-gcm@openssh.com", None),
]
_MIB = 1024 * 1024
_GIB = 1024 * _MIB
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def parse_size(text: str) -> int:
    """``"1G"``, ``"256M"``, ``"64k"`` or a byte count."""
    units = {"k": 1024, "m": _MIB, "g": 1024 * _MIB}
    text = text.strip().lower()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(condition, deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _process_cpu(pid: int) -> float:
    """utime+stime+cutime+cstime of ``pid`` in seconds (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / _CLOCK_TICKS


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class _Server:
    """A running SSH server: name, port, pid, and how ssh logs in to it."""

    def __init__(self, name: str, process: subprocess.Popen, port: int, identity: Path):
        self.name = name
        self.process = process
        self.port = port
        self.identity = identity

    def settled_cpu(self) -> float:
        """Server CPU once the finished session's processes are reaped."""
        last = _process_cpu(self.process.pid)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = _process_cpu(self.process.pid)
            if now == last:
                break
            last = now
        return last

    def stop(self) -> None:
        stop_process(self.process)


def _make_keys(directory: Path) -> None:
    from edgeaccess.pki.keys import (
        generate_private_key,
        private_key_openssh,
        public_key_openssh,
    )
    from edgeaccess.pki.sshca import issue_user_certificate

    ca, user, host = (generate_private_key() for _ in range(3))
    (directory / "host_key").write_bytes(private_key_openssh(host))
    (directory / "user_ca.pub").write_bytes(public_key_openssh(ca))
    for name in ("id", "id_plain"):
        path = directory / name
        path.write_bytes(private_key_openssh(user))
        path.chmod(0o600)
    cert = issue_user_certificate(
        ca,
        user.public_key(),
        username="bench",
        principals=["root"],
        roles=["access"],
        cluster="bench",
        now=datetime.now(timezone.utc),
        ttl=timedelta(hours=12),
    )
    (directory / "id-cert.pub").write_bytes(cert.public_bytes())
    (directory / "authorized_keys").write_bytes(public_key_openssh(user) + b"\n")


def _start_node(directory: Path, stock: bool, tree: Path | None = None) -> _Server:
    """The node server; ``tree``: run it from that source tree instead of ours."""
    name = "node-stock" if stock else "node-baseline" if tree else "node"
    argv = [sys.executable, "-m", "benchmarks._node_server", str(directory)]
    if stock:
        argv.append("--stock")
    env = None
    if tree is not None:
        env = {**os.environ, "PYTHONPATH": str(tree)}
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=open(directory / f"{name}.log", "wb"),
        cwd=tree or Path(__file__).resolve().parent.parent,
        env=env,
    )
    line = process.stdout.readline().decode()  # "PORT n", or EOF if it died
    if not line.startswith("PORT "):
        process.kill()
        raise RuntimeError(f"node server did not start (see {directory}/{name}.log)")
    return _Server(name, process, int(line.split()[1]), directory / "id")


def _start_sshd(directory: Path) -> _Server:
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    host_key = directory / "sshd_host_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True
    )
    config = directory / "sshd_config"
    config.write_text(
        "\n".join(
            [
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"AuthorizedKeysFile {directory / 'authorized_keys'}",
                "PidFile none",
                "UsePAM no",
                "StrictModes no",
                "PermitRootLogin yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "SetEnv SHLVL=1",
                "LogLevel ERROR",
                "",
            ]
        )
    )
    os.makedirs("/run/sshd", exist_ok=True)  # privilege separation directory
    port = _free_port()
    process = subprocess.Popen(
        [sshd, "-D", "-e", "-f", str(config), "-p", str(port)],
        stderr=open(directory / "sshd.log", "wb"),
    )

    def accepting() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited (see {directory}/sshd.log)")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    _wait_for(accepting, 10, "sshd to listen")
    return _Server("sshd", process, port, directory / "id_plain")


def _ssh(server: _Server, cipher: str, mac: str | None) -> str:
    options = [
        "ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=no",
        "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o IdentitiesOnly=yes",
        "-o KexAlgorithms=curve25519-sha256",
        f"-i {server.identity} -p {server.port} -c {cipher}",
    ]
    if mac:
        options.append(f"-m {mac}")
    return " ".join(options) + " root@127.0.0.1"


def _timed(server: _Server, command: str) -> tuple[float, float, float, str]:
    """Run a shell ``command``: (seconds, server CPU, client CPU, stdout)."""
    server_before = server.settled_cpu()
    client_before = _children_cpu()
    start = time.monotonic()
    result = subprocess.run(
        command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600
    )
    seconds = time.monotonic() - start
    if result.returncode != 0:
        raise RuntimeError(f"{command!r} failed: {result.stderr.decode(errors='replace')}")
    return (
        seconds,
        server.settled_cpu() - server_before,
        _children_cpu() - client_before,
        result.stdout.decode().strip(),
    )


def _transfer(server: _Server, direction: str, size: int, cipher: str, mac: str | None):
    ssh = _ssh(server, cipher, mac)
    if direction == "download":
        command = f"{ssh} 'head -c {size} /dev/zero' | wc -c"
    else:
        command = f"head -c {size} /dev/zero | {ssh} 'cat > /dev/null; echo ok'"
    seconds, server_cpu, client_cpu, output = _timed(server, command)
    expected = str(size) if direction == "download" else "ok"
    if output != expected:
        raise RuntimeError(f"{server.name} {direction}: got {output!r}, wanted {expected!r}")
    return seconds, server_cpu, client_cpu


def run(
    size: int,
    repeat: int,
    setup_runs: int,
    with_stock: bool,
    emit,
    baseline_tree: Path | None = None,
) -> list[dict]:
    """Run every scenario; ``emit(result)`` is called for each result dict."""
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="edgeaccess-bench-") as tmp:
        directory = Path(tmp)
        _make_keys(directory)
        servers: list[_Server] = []
        try:
            servers.append(_start_sshd(directory))
            servers.append(_start_node(directory, stock=False))
            if baseline_tree is not None:
                servers.append(_start_node(directory, stock=False, tree=baseline_tree))
            if with_stock:
                servers.append(_start_node(directory, stock=True))
            for cipher, mac in CIPHERS:
                for direction in ("download", "upload"):
                    runs: dict[str, list[tuple[float, float, float]]] = {
                        s.name: [] for s in servers
                    }
                    for _ in range(repeat):  # interleaved: drift hits all alike
                        for server in servers:
                            if server.name == "node-stock" and "gcm" in cipher:
                                continue
                            runs[server.name].append(
                                _transfer(server, direction, size, cipher, mac)
                            )
                    baseline = None
                    for name, measured in runs.items():
                        if not measured:
                            continue
                        seconds = statistics.median(m[0] for m in measured)
                        result = {
                            "benchmark": "ssh",
                            "case": direction,
                            "server": name,
                            "cipher": cipher,
                            "mac": mac or "(aead)",
                            "bytes": size,
                            "runs": len(measured),
                            "seconds": round(seconds, 3),
                            "mib_s": round(size / _MIB / seconds, 1),
                            "best_mib_s": round(size / _MIB / min(m[0] for m in measured), 1),
                            "server_cpu_s": round(statistics.median(m[1] for m in measured), 2),
                            "server_cpu_s_per_gib": round(
                                statistics.median(m[1] for m in measured) * _GIB / size, 2
                            ),
                            "server_cpu_s_per_gib_range": [
                                round(min(m[1] for m in measured) * _GIB / size, 2),
                                round(max(m[1] for m in measured) * _GIB / size, 2),
                            ],
                            "client_cpu_s": round(statistics.median(m[2] for m in measured), 2),
                        }
                        if name == "sshd":
                            baseline = result["mib_s"]
                        else:
                            result["ratio_vs_sshd"] = round(result["mib_s"] / baseline, 2)
                        results.append(result)
                        emit(result)
            setup: dict[str, float] = {}
            for server in servers:
                samples = []
                command = f"{_ssh(server, 'aes128-ctr', 'hmac-sha2-256')} true"
                for _ in range(setup_runs):
                    samples.append(_timed(server, command)[0] * 1000)
                setup[server.name] = statistics.median(samples)
            for name, ms in setup.items():
                result = {
                    "benchmark": "ssh",
                    "case": "setup",
                    "server": name,
                    "kex": "curve25519-sha256",
                    "runs": setup_runs,
                    "median_ms": round(ms, 1),
                }
                if name != "sshd":
                    result["ratio_vs_sshd"] = round(ms / setup["sshd"], 2)
                results.append(result)
                emit(result)
        finally:
            for server in servers:
                server.stop()
    return results


def main(argv: list[str]) -> int:
    """Command line entry point (``python -m benchmarks ssh``)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks ssh")
    parser.add_argument("--size", default="1G", help="bytes per transfer (1G, 256M, ...)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (median)")
    parser.add_argument("--setup-runs", type=int, default=10)
    parser.add_argument(
        "--with-stock", action="store_true", help="also measure stock Conch (aes128-ctr)"
    )
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help="also measure the node from this source tree (an earlier version)",
    )
    args = parser.parse_args(argv)
    run(
        parse_size(args.size),
        args.repeat,
        args.setup_runs,
        args.with_stock,
        lambda result: print(json.dumps(result), flush=True),
        args.baseline_tree,
    )
    return 0
