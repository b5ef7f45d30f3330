"""LAN nodes across a broken proxy->node link: link restored -> output flowing again.

``python -m benchmarks lan-resume [--outage 10] [--repeat 3] [--kinds cut,stall]``

A real proxy (``twistd edgeproxy`` on 127.0.0.1) with two nodes, each
reached only through a relay of its own (``tests/integration/tcprelay.py``:
``cut``: every connection reset and new ones refused; ``stall``: a black
hole, nothing forwarded, nothing closed), in the same run:

* ``lan``: a direct-mode node whose agent port the proxy dials through the
  relay (``--agent-advertise-addr``): the proxy notices, redials, re-attaches;
* ``tunnel`` (the baseline): a tunnelled node whose uplink to the proxy's
  tunnel port is the relay (``--tunnel-public-addr``): the node redials.

For each path, kind and repeat: ``ssh NODE`` runs a counter printing every
100 ms (``benchmarks.links.Printer``); after 10 lines the link goes down for
``--outage`` seconds; the result is the time from the relay's ``resume()`` to
the next line, and whether the counter arrived whole and in order. Plus the
RSS the proxy and the node gained per open channel while the link is down
(10 idle ``ssh`` sessions held open besides the counter). One JSON object
per path and kind (median and max of the repeats).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._tunnel_env import NO_RECORDING_ROLE, PASSWORD, emit, rss_kib
from benchmarks.links import Printer
from edgeaccess.devcluster import ProxyProcess, join_node, run_edge, stop_process, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from tcprelay import TcpRelay  # noqa: E402


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _idle_sessions(ssh: list[str], count: int) -> list:
    import subprocess

    return [subprocess.Popen(ssh + ["-tt", "exec sleep 3600"], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(count)]


def _once(ssh: list[str], relay: TcpRelay, kind: str, outage: float) -> dict:
    printer = Printer(ssh)
    try:
        printer.wait_lines(10, 60.0)
        if kind == "cut":
            relay.cut_all(hold=True)
        else:
            relay.stall_all()
        time.sleep(outage)
        before = len(printer.lines)
        relay.resume()
        restored = time.monotonic()
        deadline = restored + 60.0
        while len(printer.lines) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        if len(printer.lines) == before:
            raise RuntimeError(f"{kind}: no output within 60 s of the link's return")
        flowing = printer.lines[before][0] - restored
        time.sleep(1.5)
        numbers = [n for _, n in printer.lines]
        return {"seconds": flowing,
                "whole": numbers == list(range(numbers[0], numbers[0] + len(numbers)))}
    finally:
        printer.close()


def run(outage: float, repeat: int, kinds: list[str], idle: int = 10,
        emit_result=emit) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="edgeaccess-lan-resume-") as tmp:
        base = Path(tmp)
        tunnel_relay = TcpRelay().start()
        agent_port = _free_port()
        lan_relay = TcpRelay(target=("127.0.0.1", agent_port)).start()
        proxy = ProxyProcess(base / "proxy", base / "proxy.log", cluster="bench",
                             extra_args=["--tunnel-public-addr", tunnel_relay.addr])
        nodes = []
        try:
            proxy.start()
            tunnel_relay.target = ("127.0.0.1", proxy.ports["tunnel"])
            login = os.environ.get("USER") or "root"
            (base / "role.yaml").write_text(NO_RECORDING_ROLE % {"name": "bench-norec"})
            proxy.edgectl("create", "-f", str(base / "role.yaml"))
            proxy.add_user("bench", PASSWORD, roles=("bench-norec",), logins=(login,))
            home = base / "home"
            login_result = run_edge(home, "login", "--proxy", proxy.addr("web"), "--user",
                                    "bench", "--password-stdin", "--ca-pin", proxy.pin(),
                                    input=PASSWORD + "\n")
            if login_result.returncode != 0:
                raise RuntimeError(f"edge login failed: {login_result.stderr}")
            slow = ["--heartbeat-interval", "30"]
            tnode, _ = join_node(proxy, base, "tnode", tunnel=True, extra_args=slow)
            nodes.append(tnode)
            lnode, _ = join_node(proxy, base, "lnode", extra_args=slow + [
                "--agent-listen", f"127.0.0.1:{agent_port}",
                "--agent-advertise-addr", lan_relay.addr])
            nodes.append(lnode)
            paths = {"lan": ("lnode", lan_relay, lnode), "tunnel": ("tnode", tunnel_relay, tnode)}
            for path, (name, relay, node) in paths.items():
                ssh = ["ssh", "-F", str(home / "ssh_config"), "-o", "BatchMode=yes",
                       f"{login}@{name}.{proxy.cluster}"]
                wait_for(lambda: _echo(ssh), 60, f"ssh to {name}", interval=0.3)
                rss_before = (rss_kib(proxy.process.pid), rss_kib(node.process.pid))
                held = _idle_sessions(ssh, idle)
                try:
                    time.sleep(3.0)
                    relay.stall_all()
                    time.sleep(8.0)  # detected (about 6 s), the channels detached
                    rss_down = (rss_kib(proxy.process.pid), rss_kib(node.process.pid))
                    relay.resume()
                    time.sleep(3.0)
                    alive = sum(1 for p in held if p.poll() is None)
                finally:
                    for process in held:
                        stop_process(process, 5)
                for kind in kinds:
                    runs = [_once(ssh, relay, kind, outage) for _ in range(repeat)]
                    seconds = [r["seconds"] for r in runs]
                    result = {
                        "benchmark": "lan-resume", "path": path, "case": kind,
                        "outage_s": outage, "runs": repeat,
                        "restored_to_output_median_s": round(statistics.median(seconds), 2),
                        "restored_to_output_max_s": round(max(seconds), 2),
                        "output_whole_and_in_order": all(r["whole"] for r in runs),
                        "idle_sessions": idle, "idle_sessions_alive_after_stall": alive,
                        "proxy_kib_per_channel_down": round(
                            (rss_down[0] - rss_before[0]) / idle, 1),
                        "node_kib_per_channel_down": round(
                            (rss_down[1] - rss_before[1]) / idle, 1),
                    }
                    results.append(result)
                    emit_result(result)
        finally:
            for node in nodes:
                node.stop()
            proxy.stop()
            tunnel_relay.close()
            lan_relay.close()
    return results


def _echo(ssh: list[str]) -> bool:
    import subprocess

    result = subprocess.run(ssh + ["echo", "ok"], capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    return result.stdout == "ok\n"


def main(argv: list[str]) -> int:
    """``python -m benchmarks lan-resume``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks lan-resume")
    parser.add_argument("--outage", type=float, default=10.0, help="seconds the link is down")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kinds", default="cut,stall", help="comma list of cut, stall")
    parser.add_argument("--idle", type=int, default=10,
                        help="idle sessions held open through a stall (memory per channel)")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if set(kinds) - {"cut", "stall"}:
        parser.error("kinds are cut and stall")
    run(args.outage, args.repeat, kinds, idle=args.idle)
    return 0
