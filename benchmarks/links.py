"""Unstable links: keystroke echo beside a bulk copy on a slow, long uplink.

``python -m benchmarks links [--modes off,on] [--direction download|upload|both]
[--keys 30] [--file-size 4M] [--rate-kbit 1000] [--delay-ms 50] [--lab auto|netns|relay]``

A real proxy (``twistd edgeproxy`` on 127.0.0.1) and, for each mode, a
tunnelled ``edgenode`` whose uplink is the link of :mod:`benchmarks._linklab`
(default 1 Mbit/s each way, 100 ms RTT; the output says how it was shaped).
For each mode, in the same run:

1. ``idle``: an interactive OpenSSH session (``ssh -tt NODE 'exec cat >
   /dev/null'``, so the node's PTY echoes every byte) through the proxy and
   the tunnel; one byte is typed at a time and the time until its echo is
   back is measured (``--keys`` keystrokes, 150-300 ms apart);
2. ``busy``: the same while ``scp`` copies a file over the same tunnel
   (restarted whenever it finishes), after it has filled the link for 3 s:
   ``--direction download`` (default ``both``: each in turn) from the node,
   so the copy shares the node->proxy direction with the echoes; ``upload``
   to the node (``scp FILE NODE:/dev/null``), so the copy goes proxy->node,
   ahead of the keystrokes themselves. Meanwhile the sending side's tunnel
   socket is sampled every second (``ss -tmi``: ``Send-Q``, ``notsent``, and
   the bytes it moved: the tunnel's throughput) with the tbf queue's backlog
   in that direction: what the kernel holds below the scheduler. In an
   upload the sender is the proxy, whose socket ends at the lab's relay
   (see :mod:`benchmarks._linklab`).

Modes (the proxy and the node of a mode both run with it; each mode has its
own proxy): ``off`` is ``EDGE_TUNNEL_PRIORITY=off`` (the send path before the
scheduler: channels flush in arrival order, Twisted's 256 KiB TCP write
buffer, the kernel's default socket buffer); ``on`` the scheduler with the
short send path and the bulk cap (bulk bytes in flight + unsent near the
path's BDP while an interactive channel is open); ``nocap`` the scheduler
and short send path without the cap (``EDGE_TUNNEL_BULK_CAP=off``);
``on@N``/``nocap@N`` the same with ``EDGE_TUNNEL_NOTSENT_LOWAT=N``
(``@0``: the kernel's default unsent limit). The goal: busy p95 <= 2x idle
p95.

3. ``resume`` (with resumable channels, issue 17 item 1; ``--resume-sessions
   N``, 0 to skip): a command printing a counter every 100 ms and N idle
   interactive sessions through a fresh node's tunnel; the link is cut
   (every connection through it reset, new ones refused) for ``--outage``
   seconds and restored. Results: seconds from the link's return to the next
   line of output (goal <= 2 s), whether the output is whole and in order,
   how many idle sessions still echo, and RSS per channel (proxy and node)
   with the sessions open and while the link is down, over the RSS before.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import select
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from benchmarks._linklab import LinkLab
from benchmarks._tunnel_env import PASSWORD, NO_RECORDING_ROLE, BenchProxy, emit, parse_size
from edgeaccess.devcluster import NodeProcess, run_edge, stop_process


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class LabNode(NodeProcess):
    """A node started on the link lab's node host, with its own environment."""

    lab: LinkLab | None = None
    env: dict | None = None

    def _spawn(self, argv: list[str], env=None) -> None:
        assert self.lab is not None
        super()._spawn(self.lab.node_command(argv), {**(self.env or {}), **(env or {})})


class Typist:
    """An interactive session: types one byte, waits for the PTY's echo."""

    def __init__(self, argv: list[str]) -> None:
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, bufsize=0)
        self.fd = self.process.stdout.fileno()

    def keystroke(self, timeout: float = 60.0) -> float:
        """Milliseconds from typing ``x`` to its echo."""
        start = time.monotonic()
        self.process.stdin.write(b"x")
        deadline = start + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no echo")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                data = os.read(self.fd, 4096)
                if not data:
                    raise RuntimeError("the session ended")
                if b"x" in data:
                    return (time.monotonic() - start) * 1000.0

    def close(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:
            pass
        stop_process(self.process, 5)


class Copier(threading.Thread):
    """``scp`` from the node, again and again, until stopped."""

    def __init__(self, argv: list[str]) -> None:
        super().__init__(daemon=True)
        self.argv = argv
        self.stopping = threading.Event()
        self.process: subprocess.Popen | None = None
        self.bytes = 0
        self.seconds = 0.0
        self.size = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stopping.is_set():
            start = time.monotonic()
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, err = self.process.communicate()
            if self.stopping.is_set():
                return
            if self.process.returncode != 0:
                self.failures.append(err.decode(errors="replace")[-300:])
                if len(self.failures) > 3:
                    return
                continue
            self.bytes += self.size
            self.seconds += time.monotonic() - start

    def stop(self) -> None:
        self.stopping.set()
        if self.process is not None:
            stop_process(self.process, 5)
        self.join(10)


def _socket_sample(lab: LinkLab, port: int, node: bool = True) -> dict | None:
    """A tunnel socket as ``ss`` shows it: the node's (to the relay's
    ``port``), or (``node=False``) the proxy's (its local ``port``)."""
    command = ["ss", "-tmin", "state", "established"]
    out = subprocess.run(lab.node_command(command) if node else command,
                         capture_output=True, text=True, timeout=10).stdout
    lines = out.splitlines()
    column = 3 if node else 2  # peer address : local address (ss drops State)
    for i, line in enumerate(lines):
        fields = line.split()
        if len(fields) >= 4 and fields[column].endswith(f":{port}"):
            detail = " ".join(lines[i + 1:i + 3])
            found = {"send_q": int(fields[1])}
            for name in ("notsent", "bytes_acked", "bytes_received"):
                value = re.search(name + r":(\d+)", detail)
                found[name] = int(value.group(1)) if value else 0
            return found
    return None


def _keystrokes(typist: Typist, count: int, rng: random.Random) -> tuple[list[float], int]:
    samples, timeouts = [], 0
    for _ in range(count):
        time.sleep(rng.uniform(0.15, 0.3))
        try:
            samples.append(typist.keystroke(timeout=30.0))
        except TimeoutError:
            timeouts += 1
            samples.append(30_000.0)
    return samples, timeouts


def mode_env(mode: str) -> dict[str, str]:
    """The tunnel settings of a mode (see the module docstring)."""
    base, _, lowat = mode.partition("@")
    env = {"EDGE_TUNNEL_PRIORITY": "off" if base == "off" else "on",
           "EDGE_TUNNEL_BULK_CAP": "off" if base == "nocap" else "on"}
    if lowat:
        env["EDGE_TUNNEL_NOTSENT_LOWAT"] = lowat
    return env


def _measure_mode(mode: str, proxy: BenchProxy, lab: LinkLab, base: Path, home: Path,
                  login: str, web_port: int, tunnel_port: int, keys: int, bulk_file: Path,
                  rng: random.Random, directions: list[str]) -> list[dict]:
    priority, _, lowat = mode.partition("@")
    env = mode_env(mode)
    name = "slow-" + re.sub(r"[^a-z0-9]", "-", mode.lower())
    node = LabNode(base / name, base / f"{name}.log", name=name,
                   auth_server=f"{lab.dial_host}:{web_port}", token=proxy.node_token(),
                   ca_pin=proxy.pin(), extra_args=["--heartbeat-interval", "30"])
    node.lab, node.env = lab, env
    node.start()
    typist = None
    try:
        listed = node.wait_listed(proxy, timeout=120.0)
        if listed["address"] != "tunnel":
            raise RuntimeError(f"{name} is not tunnelled: {listed}")
        target = f"{login}@{name}.{proxy.cluster}"
        ssh = ["ssh", "-F", str(home / "ssh_config"), "-o", "BatchMode=yes"]
        typist = Typist(ssh + ["-tt", target, "exec cat > /dev/null"])
        typist.keystroke(timeout=120.0)  # the session is up
        idle, idle_timeouts = _keystrokes(typist, keys, rng)
        results = []
        for direction in directions:
            results.append(_measure_busy(
                direction, typist, idle, idle_timeouts, mode, lab, home, target, tunnel_port,
                proxy, keys, bulk_file, rng, priority, lowat))
        return results
    finally:
        if typist is not None:
            typist.close()
        node.stop()


def _measure_busy(direction: str, typist: Typist, idle: list[float], idle_timeouts: int,
                  mode: str, lab: LinkLab, home: Path, target: str, tunnel_port: int,
                  proxy: BenchProxy, keys: int, bulk_file: Path, rng: random.Random,
                  priority: str, lowat: str) -> dict:
    copier = None
    upload = direction == "upload"
    try:
        scp = ["scp", "-q", "-F", str(home / "ssh_config"), "-o", "BatchMode=yes"]
        scp += ([str(bulk_file), f"{target}:/dev/null"] if upload
                else [f"{target}:{bulk_file}", "/dev/null"])
        copier = Copier(scp)
        copier.size = bulk_file.stat().st_size
        copier.start()
        time.sleep(3.0)  # the copy fills the link
        sockets: list[dict] = []
        backlog: list[int] = []
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(1.0):
                # The sender's socket: the node's in a download, the proxy's
                # (its tunnel port) in an upload.
                found = _socket_sample(lab, proxy.ports["tunnel"] if upload else tunnel_port,
                                       node=not upload)
                if found:
                    found["at"] = time.monotonic()
                    sockets.append(found)
                queued = lab.queue_bytes("uplink" if upload else "node")
                if queued is not None:
                    backlog.append(queued)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        busy, busy_timeouts = _keystrokes(typist, keys, rng)
        sampling.set()
        sampler.join(15)
        copier.stop()
        if copier.failures:
            raise RuntimeError(f"scp failed: {copier.failures}")
        idle_p95, busy_p95 = _percentile(idle, 0.95), _percentile(busy, 0.95)
        moved = None
        if len(sockets) >= 2:
            # Bytes the sender's socket had acknowledged (all channels: the
            # copy, and the keystrokes' few bytes), over the busy phase.
            field = "bytes_acked"
            seconds = sockets[-1]["at"] - sockets[0]["at"]
            if seconds > 0:
                moved = round((sockets[-1][field] - sockets[0][field]) * 8 / 1000 / seconds)
        result = {
            "benchmark": "links", "case": "keystroke-echo", "mode": mode,
            "direction": direction,
            "priority": priority != "off", "bulk_cap": mode_env(mode)["EDGE_TUNNEL_BULK_CAP"]
            == "on" and priority != "off",
            "notsent_lowat": lowat or None,
            "keystrokes": keys,
            "idle_p50_ms": round(statistics.median(idle), 1),
            "idle_p95_ms": round(idle_p95, 1),
            "busy_p50_ms": round(statistics.median(busy), 1),
            "busy_p95_ms": round(busy_p95, 1),
            "busy_max_ms": round(max(busy), 1),
            "busy_over_idle_p95": round(busy_p95 / idle_p95, 2),
            "goal_met": busy_p95 <= 2 * idle_p95,
            "timeouts": idle_timeouts + busy_timeouts,
            "sender_socket_send_q_median": (statistics.median(s["send_q"] for s in sockets)
                                          if sockets else None),
            "sender_socket_notsent_median": (statistics.median(s["notsent"] for s in sockets)
                                           if sockets else None),
            "tbf_backlog_median": statistics.median(backlog) if backlog else None,
            "sender": "proxy" if upload else "node",
            "tunnel_kbit_s": moved,
            "scp_completed_kbit_s": (round(copier.bytes * 8 / 1000 / copier.seconds)
                                     if copier.seconds else None),
            "shaping": lab.shaping,
        }
        return result
    finally:
        if copier is not None and copier.is_alive():
            copier.stop()


class Printer:
    """A command on the node printing a counter every 100 ms; lines as they arrive."""

    SCRIPT = ("i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done")

    def __init__(self, argv: list[str]) -> None:
        self.process = subprocess.Popen(argv + [self.SCRIPT], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        bufsize=0)
        self.lines: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                self.lines.append((time.monotonic(), int(line)))
            except ValueError:
                pass

    def wait_lines(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.lines) < count:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the printer session gave {len(self.lines)} lines")
            time.sleep(0.05)

    def close(self) -> None:
        stop_process(self.process, 5)


def _measure_resume(proxy: BenchProxy, lab: LinkLab, base: Path, home: Path, login: str,
                    web_port: int, sessions: int, outage: float) -> dict:
    """Cut the link for ``outage`` seconds under a running command and
    ``sessions`` idle interactive sessions: time from the link's return to
    output flowing again, the output's integrity, memory while down."""
    from benchmarks._tunnel_env import rss_kib

    name = "slow-resume"
    node = LabNode(base / name, base / f"{name}.log", name=name,
                   auth_server=f"{lab.dial_host}:{web_port}", token=proxy.node_token(),
                   ca_pin=proxy.pin(), extra_args=["--heartbeat-interval", "30"])
    node.lab, node.env = lab, {"EDGE_TUNNEL_PRIORITY": "on"}
    node.start()
    printer = None
    idle: list[Typist] = []
    try:
        node.wait_listed(proxy, timeout=120.0)
        target = f"{login}@{name}.{proxy.cluster}"
        ssh = ["ssh", "-F", str(home / "ssh_config"), "-o", "BatchMode=yes"]
        time.sleep(2.0)
        rss_base = (rss_kib(proxy.pid), rss_kib(node.process.pid))
        for _ in range(sessions):
            idle.append(Typist(ssh + ["-tt", target, "exec cat > /dev/null"]))
        for typist in idle:
            typist.keystroke(timeout=120.0)
        printer = Printer(ssh + [target])
        printer.wait_lines(10, 120.0)
        time.sleep(1.0)
        rss_up = (rss_kib(proxy.pid), rss_kib(node.process.pid))
        lab.cut()
        cut_at = time.monotonic()
        time.sleep(min(outage, 5.0))
        rss_down = (rss_kib(proxy.pid), rss_kib(node.process.pid))
        time.sleep(max(0.0, outage - (time.monotonic() - cut_at)))
        before = len(printer.lines)
        lab.restore()
        restored_at = time.monotonic()
        deadline = restored_at + 60.0
        while len(printer.lines) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        if len(printer.lines) == before:
            raise RuntimeError("no output within 60 s of the link's return")
        flowing_at = printer.lines[before][0]
        time.sleep(2.0)
        numbers = [n for _, n in printer.lines]
        whole = numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        alive = sum(1 for typist in idle if _still_echoes(typist))
        per = max(1, sessions + 1)
        return {
            "benchmark": "links", "case": "resume", "outage_s": outage,
            "restored_to_output_s": round(flowing_at - restored_at, 2),
            "goal_met": flowing_at - restored_at <= 2.0,
            "output_whole_and_in_order": whole,
            "lines_after_restore": len(numbers) - before,
            "idle_sessions": sessions, "idle_sessions_alive": alive,
            "proxy_kib_per_channel_up": round((rss_up[0] - rss_base[0]) / per, 1),
            "node_kib_per_channel_up": round((rss_up[1] - rss_base[1]) / per, 1),
            "proxy_kib_per_channel_down": round((rss_down[0] - rss_base[0]) / per, 1),
            "node_kib_per_channel_down": round((rss_down[1] - rss_base[1]) / per, 1),
            "shaping": lab.shaping,
        }
    finally:
        if printer is not None:
            printer.close()
        for typist in idle:
            typist.close()
        node.stop()


def _still_echoes(typist: Typist) -> bool:
    try:
        typist.keystroke(timeout=20.0)
        return True
    except (TimeoutError, RuntimeError, OSError):
        return False


def run(modes: list[str], keys: int, file_size: int, rate_kbit: int, delay_ms: float,
        lab_mode: str, emit_result=emit, resume_sessions: int = 0,
        outage: float = 10.0, directions: tuple[str, ...] = ("download",)) -> list[dict]:
    results = []
    rng = random.Random(17)
    with tempfile.TemporaryDirectory(prefix="edgeaccess-links-bench-") as tmp:
        base = Path(tmp)
        with LinkLab(rate_kbit=rate_kbit, delay_ms=delay_ms, mode=lab_mode,
                     log_dir=base) as lab:
            bulk_file = base / "bulk.bin"
            with open(bulk_file, "wb") as out:
                out.write(os.urandom(file_size))  # incompressible
            cases: list[tuple[str, str | None]] = [(mode, None) for mode in modes]
            if resume_sessions:
                cases.append(("on", "resume"))
            for index, (mode, special) in enumerate(cases):
                # Each mode its own proxy, with the mode's tunnel settings
                # (in an upload the proxy's side is the sender).
                web_relay, tunnel_relay = lab.reserve_port(), lab.reserve_port()
                proxy = BenchProxy(base / f"proxy{index}", base / f"proxy{index}.log",
                                   cluster="bench")
                proxy.env = mode_env(mode)
                proxy.extra_args = ["--tunnel-public-addr", f"{lab.dial_host}:{tunnel_relay}",
                                    "--server-names", lab.dial_host]
                try:
                    proxy.start()
                    lab.relay({web_relay: proxy.ports["web"],
                               tunnel_relay: proxy.ports["tunnel"]})
                    login = os.environ.get("USER") or "root"
                    home = base / f"edge-home{index}"
                    _login(proxy, base, home, login)
                    if special == "resume":
                        measured = _measure_resume(proxy, lab, base, home, login, web_relay,
                                                   resume_sessions, outage)
                        measured.update(rate_kbit=rate_kbit, rtt_ms=2 * delay_ms)
                        results.append(measured)
                        emit_result(measured)
                        continue
                    for measured in _measure_mode(mode, proxy, lab, base, home, login,
                                                  web_relay, tunnel_relay, keys, bulk_file,
                                                  rng, list(directions)):
                        measured.update(rate_kbit=rate_kbit, rtt_ms=2 * delay_ms)
                        results.append(measured)
                        emit_result(measured)
                finally:
                    lab.stop_relay()
                    proxy.stop()
    return results


def _login(proxy: BenchProxy, base: Path, home: Path, login: str) -> None:
    (base / "role.yaml").write_text(NO_RECORDING_ROLE % {"name": "bench-norec"})
    proxy.edgectl("create", "-f", str(base / "role.yaml"))
    proxy.add_user("bench", PASSWORD, roles=("bench-norec",), logins=(login,))
    result = run_edge(home, "login", "--proxy", proxy.addr("web"), "--user",
                      "bench", "--password-stdin", "--ca-pin", proxy.pin(),
                      input=PASSWORD + "\n")
    if result.returncode != 0:
        raise RuntimeError(f"edge login failed: {result.stderr}")


def main(argv: list[str]) -> int:
    """``python -m benchmarks links``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks links")
    parser.add_argument("--modes", default="off,on",
                        help="comma list of off, on, nocap, on@LOWAT, nocap@LOWAT "
                             "(EDGE_TUNNEL_NOTSENT_LOWAT)")
    parser.add_argument("--direction", default="both", choices=("download", "upload", "both"),
                        help="which way scp copies beside the keystrokes")
    parser.add_argument("--keys", type=int, default=30, help="keystrokes per phase")
    parser.add_argument("--file-size", default="4M", help="size of the file scp copies")
    parser.add_argument("--rate-kbit", type=int, default=1000)
    parser.add_argument("--delay-ms", type=float, default=50.0, help="one-way delay")
    parser.add_argument("--lab", default="auto", choices=("auto", "netns", "relay"))
    parser.add_argument("--resume-sessions", type=int, default=_RESUME_DEFAULT,
                        help="idle sessions held across the cut (0: no resume case)")
    parser.add_argument("--outage", type=float, default=10.0, help="seconds the link is cut")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    for mode in modes:
        if mode.partition("@")[0] not in ("on", "off", "nocap"):
            parser.error(f"unknown mode {mode!r}")
    directions = ("download", "upload") if args.direction == "both" else (args.direction,)
    run(modes, args.keys, parse_size(args.file_size), args.rate_kbit, args.delay_ms, args.lab,
        resume_sessions=args.resume_sessions, outage=args.outage, directions=directions)
    return 0


def _resumable() -> bool:
    from edgeaccess.tunnel import protocol

    return hasattr(protocol, "RESUME_CAPABILITY")


#: The resume case needs resumable channels (issue 17, item 1).
_RESUME_DEFAULT = 20 if _resumable() else 0
