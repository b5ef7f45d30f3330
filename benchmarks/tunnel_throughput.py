"""Bulk SSH through the reverse tunnel against the same route built from C tools.

``python -m benchmarks tunnel-throughput [--size 1G] [--repeat 3]``

One run starts a real cluster (``_tunnel_env.BenchCluster``): ``twistd
edgeproxy``, a tunnelled ``edgenode`` (``tnode``), a direct-mode
``edgenode`` (``dnode``, listening on 127.0.0.1) and, for the C path, an
OpenSSH ``sshd`` jump host plus a ``stunnel4`` client/server pair in front of
``dnode``'s port. Paths, interleaved ``--repeat`` times:

* ``tunnel``: ``ssh -F $EDGE_HOME/ssh_config root@tnode.CLUSTER`` (OpenSSH ->
  proxy's Conch jump -> tunnel channel (AMP over TLS) -> node);
* ``proxy-tcp``: the same to ``dnode`` (``--agent-listen off``: the proxy
  dials the node's SSH port over TCP);
* ``proxy-agent``: the same to ``lnode``, a direct-mode node with its agent
  port (a channel of the proxy's mutual-TLS connection to it, resumable);
* ``c-path``: ``ssh`` with ``ProxyCommand ssh -W`` (what ``-J`` runs) through
  ``sshd`` -> stunnel client -> stunnel server (TLS 1.3, mutual) -> ``dnode``;
* ``direct``: ``ssh`` straight to ``dnode``'s port;
* ``tls-tunnel`` / ``tls-tcp``: TLS routing (``edge login --tls-routing``):
  the ``ProxyCommand`` ``edgeaccess/client/tlsroute.py`` to the proxy's
  tunnel port (ALPN ``edge-ssh/1``), spliced by the proxy without an SSH
  layer to ``tnode`` (tunnel channel), ``dnode`` (TCP) or ``lnode`` (agent
  port channel: ``tls-agent``).

The user's role sets ``record_session: false`` (``--record``: the preset
``access`` role, the node then records every session to its audit spool).
Download is ``head -c SIZE /dev/zero`` on the node, upload ``cat > /dev/null``.
Each result: MiB/s (median), CPU-seconds per GiB of the proxy side and the
node side (utime+stime from /proc; the C path's sshd counts its reaped
session processes; the shell commands on the node are not counted), of the
client (``ssh`` processes, ``head``/``wc``, as reaped) and of the client's
``ProxyCommand`` (``ssh -W`` for ProxyJump and the C path, ``tlsroute.py``
for TLS routing; ssh does not reap it: sampled from ``/proc``).
"""

from __future__ import annotations

import argparse
import re
import resource
import statistics
import subprocess
import time

from benchmarks._tunnel_env import (
    GIB,
    MIB,
    ProxyCommandMeter,
    compared_paths,
    emit,
    parse_size,
    settled_cpu,
)

#: Which processes make up the proxy side and the node side of each path.
SIDES = {
    "tunnel": (("edgeproxy",), ("tnode",)),
    "proxy-tcp": (("edgeproxy",), ("dnode",)),
    "c-path": (("sshd", "stunnel_client"), ("dnode", "stunnel_server")),
    "direct": ((), ("dnode",)),
    "tls-tunnel": (("edgeproxy",), ("tnode",)),
    "tls-tcp": (("edgeproxy",), ("dnode",)),
    "proxy-agent": (("edgeproxy",), ("lnode",)),
    "tls-agent": (("edgeproxy",), ("lnode",)),
}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _ciphers(argv: list[str]) -> list[str]:
    """The ciphers ``ssh -v`` reports negotiating (every hop it can see)."""
    result = subprocess.run(argv[:1] + ["-v"] + argv[1:] + ["true"], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    return re.findall(r"kex: server->client cipher: (\S+)", result.stderr)


def _transfer(argv: list[str], direction: str, size: int, pids) -> dict:
    quoted = " ".join(f"'{a}'" for a in argv)
    if direction == "download":
        command = f"{quoted} 'head -c {size} /dev/zero' | wc -c"
        expected = str(size)
    else:
        command = f"head -c {size} /dev/zero | {quoted} 'cat > /dev/null; echo ok'"
        expected = "ok"
    before = settled_cpu(pids)
    client_before = _children_cpu()
    start = time.monotonic()
    with ProxyCommandMeter() as meter:
        result = subprocess.run(command, shell=True, capture_output=True, text=True,
                                timeout=900, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - start
    if result.returncode != 0 or result.stdout.strip() != expected:
        raise RuntimeError(f"{command!r}: rc {result.returncode}, {result.stdout!r}, "
                           f"{result.stderr[-1000:]}")
    after = settled_cpu(pids)
    cpu = {name: after[name] - before[name] for name in pids}
    cpu["client"] = _children_cpu() - client_before
    cpu["proxy_command"] = meter.cpu
    return {"seconds": seconds, "cpu": cpu}


def run(size: int, repeat: int, paths: list[str], emit_result=emit,
        record: bool = False, nodelay: bool = False) -> list[dict]:
    """Measure every path and direction; returns (and emits) the results."""
    results = []
    with compared_paths("edgeaccess-tunnel-bench-", record=record, nodelay=nodelay) as (
            cluster, cpath, commands):
        pids = {"edgeproxy": (cluster.proxy.pid, False),
                "tnode": (cluster.tnode.process.pid, False),
                "dnode": (cluster.dnode.process.pid, False),
                "lnode": (cluster.lnode.process.pid, False), **cpath.cpu_pids()}
        ciphers = {path: _ciphers(commands[path]) for path in paths}
        for direction in ("download", "upload"):
            runs: dict[str, list[dict]] = {path: [] for path in paths}
            for _ in range(repeat):  # interleaved: machine drift hits all paths alike
                for path in paths:
                    runs[path].append(_transfer(commands[path], direction, size, pids))
            baseline = None
            for path in paths:
                measured = runs[path]
                seconds = statistics.median(m["seconds"] for m in measured)
                gib = size / GIB
                proxy_names, node_names = SIDES[path]

                def per_gib(names) -> float:
                    return round(statistics.median(
                        sum(m["cpu"][n] for n in names) for m in measured) / gib, 2)

                result = {
                    "benchmark": "tunnel-throughput", "case": direction, "path": path,
                    "bytes": size, "runs": len(measured), "seconds": round(seconds, 2),
                    "mib_s": round(size / MIB / seconds, 1),
                    "best_mib_s": round(size / MIB / min(m["seconds"] for m in measured), 1),
                    "proxy_cpu_s_per_gib": per_gib(proxy_names),
                    "node_cpu_s_per_gib": per_gib(node_names),
                    "client_cpu_s_per_gib": per_gib(("client",)),
                    "proxy_command_cpu_s_per_gib": per_gib(("proxy_command",)),
                    "cpu_s_per_gib": {n: per_gib((n,)) for n in proxy_names + node_names},
                    "ciphers": ciphers[path], "recorded": record,
                    "tunnel_nodelay": nodelay,
                }
                if path == "c-path":
                    baseline = result["mib_s"]
                results.append(result)
            for result in results[-len(paths):]:
                if baseline and result["path"] != "c-path":
                    result["ratio_vs_c_path"] = round(result["mib_s"] / baseline, 2)
                emit_result(result)
    return results


def main(argv: list[str]) -> int:
    """``python -m benchmarks tunnel-throughput``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks tunnel-throughput")
    parser.add_argument("--size", default="256M", help="bytes per transfer (1G for the full run)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per path (median)")
    parser.add_argument("--paths", default=",".join(SIDES),
                        help="comma-separated subset of " + ",".join(SIDES))
    parser.add_argument("--record", action="store_true",
                        help="use the preset access role: nodes record every session")
    parser.add_argument("--nodelay", action="store_true",
                        help="experiment: TCP_NODELAY on the tunnel (proxy and tnode)")
    args = parser.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    unknown = set(paths) - set(SIDES)
    if unknown:
        parser.error(f"unknown paths: {', '.join(sorted(unknown))}")
    run(parse_size(args.size), args.repeat, paths, record=args.record, nodelay=args.nodelay)
    return 0
