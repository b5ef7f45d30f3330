"""Session start time with and without the node's audit stack.

``python -m benchmarks audit-session [--runs 20] [--pty]`` starts the node's
SSH server (the factory ``edgenode`` uses, alone in its process, as in
``benchmarks/_node_server.py``) three times:

``off``
    no audit observer (what a node would be without auditing; ``edgenode``
    itself has no switch to turn auditing off);
``disk``
    the node's real audit stack: :class:`~edgeaccess.audit.spool.Spool` on
    the benchmark's temporary directory (a normal disk: every event fsync'd),
    :class:`~edgeaccess.audit.observer.AuditingObserver` and
    :class:`~edgeaccess.audit.uploader.SpoolShipper`;
``tmpfs``
    the same with the spool on ``/dev/shm`` (fsync is free: what is left is
    the CPU cost of auditing).

The shipper delivers to an uploader in the node's process that acknowledges
everything at once (it keeps recording offsets, so the delivery protocol is
followed): the auth service's side of ingestion runs on another host in a
real cluster and is measured by ``python -m benchmarks audit``.

Each run is one ``ssh root@127.0.0.1 true`` (``--parallel N``: N of them at
once) from OpenSSH with a user certificate (``--pty``: ``ssh -tt``, so the session is also recorded);
the modes are interleaved run by run so that they see the same machine.
``--fsync-ms N`` adds N ms to each of the node's fsyncs (a slower disk than
this VM's ~0.2 ms). The same file runs against the tree before the disk
writer (its synchronous spool API), for BEFORE figures.
Prints one JSON object per mode: median (p50)/p90/p99/mean wall time of a whole
session (connect, key exchange, auth, exec, exit) and node CPU per session,
and checks that every audited session delivered its events.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from edgeaccess.audit.interfaces import IAuditUploader
from edgeaccess.devcluster import stop_process

MODES = ("off", "disk", "tmpfs")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- the node side (``--serve DIR MODE``) -----------------------------------------

@implementer(IAuditUploader)
class _AcknowledgingUploader:
    """An ``IAuditUploader`` in the node's process: acknowledges every event
    and recording chunk, counts them into ``DIR/acked-MODE.json``."""

    def __init__(self, report: Path) -> None:
        self._report = report
        self._held: dict[str, int] = {}
        self.events: dict[str, int] = {}
        self.completed = 0

    def _write(self) -> None:
        self._report.write_text(json.dumps({"events": self.events,
                                            "recordings": self.completed}))

    def send_events(self, events: list):
        for event in events:
            self.events[event["event"]] = self.events.get(event["event"], 0) + 1
        self._write()
        return succeed([event["id"] for event in events])

    def send_recording_chunk(self, session_id: str, offset: int, data: bytes, meta: dict):
        held = self._held.get(session_id, 0)
        if offset == held:
            self._held[session_id] = held + len(data)
        return succeed(self._held.get(session_id, 0))

    def complete_recording(self, session_id: str, length: int, meta: dict):
        held = self._held.get(session_id, 0)
        if held == length:
            self.completed += 1
            self._write()
        return succeed(held)


def serve(directory: Path, mode: str, spool_dir: Path | None) -> None:
    """Run the node SSH server of ``mode``; prints ``PORT n`` once listening."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from edgeaccess.audit.observer import AuditingObserver
    from edgeaccess.audit.spool import Spool
    from edgeaccess.audit.uploader import SpoolShipper
    from edgeaccess.pki.keys import load_private_key
    from edgeaccess.ssh.interfaces import SessionPermissions, StaticAuthorizer
    from edgeaccess.ssh.server import make_node_ssh_factory

    host_key = load_private_key((directory / "host_key").read_bytes())
    ca_line = (directory / "user_ca.pub").read_bytes()
    authorizer = StaticAuthorizer({("*", "root"): SessionPermissions(
        record_session=True, roles=("access",))})
    fsync_ms = float(os.environ.get("EDGE_BENCH_FSYNC_MS", "0"))
    if fsync_ms:  # --fsync-ms: a slower disk than this VM's (in whatever thread fsyncs)
        real_fsync = os.fsync

        def slow_fsync(fd: int) -> None:
            real_fsync(fd)
            time.sleep(fsync_ms / 1000)

        os.fsync = slow_fsync

    async def start() -> None:
        observer = None
        if mode != "off":
            uploader = _AcknowledgingUploader(directory / f"acked-{mode}.json")
            try:
                from edgeaccess.audit.diskwriter import DiskWriter
            except ImportError:  # the tree before the disk writer (BEFORE figures)
                spool = Spool.open(spool_dir)
                shipper = SpoolShipper(spool, uploader, reactor)
                observer = AuditingObserver(spool, cluster="bench", node_name="bench-node",
                                            node_id="bench-node-id", clock=reactor,
                                            on_spooled=shipper.kick)
            else:
                writer = DiskWriter(reactor)
                writer.start()
                spool = await Spool.open(spool_dir, writer)
                shipper = SpoolShipper(spool, uploader, reactor)
                observer = AuditingObserver(spool, cluster="bench", node_name="bench-node",
                                            node_id="bench-node-id", clock=reactor)
            shipper.startService()
        factory = make_node_ssh_factory(host_key, None, lambda: [ca_line], authorizer,
                                        "bench-node", reactor, observer=observer,
                                        reactor=reactor)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        print(f"PORT {port.getHost().port}", flush=True)

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(start()))
    reactor.run()


# --- the client side ------------------------------------------------------------------

def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / _CLOCK_TICKS


def _start(directory: Path, mode: str, spool_dir: Path | None) -> tuple[subprocess.Popen, int]:
    argv = [sys.executable, "-m", "benchmarks.audit_session_start", "--serve",
            str(directory), mode]
    if spool_dir is not None:
        argv.append(str(spool_dir))
    process = subprocess.Popen(argv, stdout=subprocess.PIPE,
                               stderr=open(directory / f"node-{mode}.log", "wb"),
                               cwd=Path(__file__).resolve().parent.parent)
    line = process.stdout.readline().decode()
    if not line.startswith("PORT "):
        process.kill()
        raise RuntimeError(f"node server {mode} did not start (see {directory})")
    return process, int(line.split()[1])


def _ssh(directory: Path, port: int, pty: bool) -> float:
    argv = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes",
            "-i", str(directory / "id"), "-o", f"CertificateFile={directory / 'id-cert.pub'}",
            "-p", str(port)]
    if pty:  # an interactive shell (recorded when audited) that exits at once
        command, stdin = ["-tt", "root@127.0.0.1"], b"exit\n"
    else:
        command, stdin = ["root@127.0.0.1", "true"], b""
    started = time.perf_counter()
    result = subprocess.run([*argv, *command], capture_output=True, input=stdin, timeout=60)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"ssh failed: {result.stderr.decode(errors='replace')}")
    return elapsed


def _acked(directory: Path, mode: str) -> dict:
    try:
        return json.loads((directory / f"acked-{mode}.json").read_text())
    except (FileNotFoundError, ValueError):
        return {"events": {}, "recordings": 0}


def run(runs: int, warmup: int, pty: bool, emit, parallel: int = 1) -> list[dict]:
    """Measure every mode; ``emit`` gets one result dict per mode. Each run
    is ``parallel`` sessions started at once."""
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.ssh_throughput import _make_keys

    with tempfile.TemporaryDirectory(prefix="edge-audit-bench-") as tmp, \
            tempfile.TemporaryDirectory(prefix="edge-audit-spool-",
                                        dir="/dev/shm" if os.path.isdir("/dev/shm")
                                        else None) as shm:
        directory = Path(tmp)
        _make_keys(directory)
        spools = {"off": None, "disk": directory / "spool", "tmpfs": Path(shm) / "spool"}
        servers = {}
        try:
            for mode in MODES:
                servers[mode] = _start(directory, mode, spools[mode])
            times: dict[str, list[float]] = {mode: [] for mode in MODES}
            cpu: dict[str, float] = {}
            for i in range(warmup + runs):
                if i == warmup:
                    cpu = {mode: _cpu(servers[mode][0].pid) for mode in MODES}
                for mode in MODES:
                    with ThreadPoolExecutor(parallel) as pool:
                        elapsed = list(pool.map(
                            lambda _: _ssh(directory, servers[mode][1], pty), range(parallel)))
                    if i >= warmup:
                        times[mode].extend(elapsed)
            sessions = (warmup + runs) * parallel
            expected = {"session.start": sessions, "exec": sessions, "session.end": sessions}
            if pty:
                expected = {"session.start": sessions, "session.end": sessions}
            for mode in MODES[1:]:
                deadline = time.monotonic() + 30
                while _acked(directory, mode)["events"] != expected or (
                        pty and _acked(directory, mode)["recordings"] != sessions):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{mode}: delivered {_acked(directory, mode)}, "
                                           f"expected {expected}")
                    time.sleep(0.05)
            node_cpu = {mode: _cpu(servers[mode][0].pid) - cpu[mode] for mode in MODES}
        finally:
            for process, _ in servers.values():
                stop_process(process)
        results = []
        base = statistics.median(times["off"])
        for mode in MODES:
            samples = sorted(times[mode])
            median = statistics.median(samples)
            result = {"benchmark": "audit_session_start", "mode": mode, "pty": pty,
                      "runs": runs, "parallel": parallel,
                      "fsync_added_ms": float(os.environ.get("EDGE_BENCH_FSYNC_MS", "0")), "median_ms": round(median * 1000, 1),
                      "p90_ms": round(samples[int(0.9 * (len(samples) - 1))] * 1000, 1),
                      "p99_ms": round(samples[int(0.99 * (len(samples) - 1))] * 1000, 1),
                      "mean_ms": round(statistics.fmean(samples) * 1000, 1),
                      "node_cpu_ms_per_session": round(
                          node_cpu[mode] / (runs * parallel) * 1000, 2),
                      "median_vs_off_ms": round((median - base) * 1000, 1)}
            if mode != "off":
                result["delivered"] = _acked(directory, mode)
            emit(result)
            results.append(result)
        return results


def main(argv: list[str]) -> int:
    """``python -m benchmarks audit-session``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks audit-session")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pty", action="store_true",
                        help="ssh -tt: interactive sessions, recorded when audited")
    parser.add_argument("--parallel", type=int, default=1,
                        help="sessions started at once in each run")
    parser.add_argument("--fsync-ms", type=float, default=0.0,
                        help="add this many ms to every fsync of the node (a slower disk)")
    args = parser.parse_args(argv)
    os.environ["EDGE_BENCH_FSYNC_MS"] = str(args.fsync_ms)
    run(args.runs, args.warmup, args.pty, lambda r: print(json.dumps(r), flush=True),
        parallel=args.parallel)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]) if len(sys.argv) > 4 else None)
    else:
        sys.exit(main(sys.argv[1:]))
