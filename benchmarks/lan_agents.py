"""Kubernetes through a LAN node's agent port against the same through a reverse tunnel.

``python -m benchmarks lan-agents [--requests N] [--seconds S] [--exec-mib M]``
starts the Kubernetes world (tests/kube_world.py: the API stand-in, a proxy,
a tunnelled kube agent publishing ``standin``, user bob), joins a second
kube-only node in direct mode that publishes the same stand-in as
``standin-lan`` on its agent port (``--agent-listen``), and measures in the
same run, with the request helpers of ``benchmarks/kube.py``: directly
against the stand-in, through proxy + tunnel, through proxy + LAN agent
connection:

- latency of ``N`` sequential GETs on one keep-alive connection (p50/p99);
- requests/s of 50 concurrent keep-alive clients for ``S`` seconds;
- new sessions/s (a TLS connection per request, 10 at a time);
- a ``kubectl exec`` stream of ``M`` MiB (MiB/s).

Prints one JSON object per figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks lan-agents")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--exec-mib", type=int, default=256)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.kube import _context, _exec_mib_s, _latency, _pct, _sessions, _throughput
    from edgeaccess.devcluster import join_node, wait_for
    from tests import kube_standin
    from tests.kube_world import start_world

    with tempfile.TemporaryDirectory() as tmp:
        world = start_world(Path(tmp), cluster="bench", users={"bob": ("kube-editor",)})
        lan = None
        try:
            lan, _ = join_node(
                world.proxy, Path(tmp), "kube-lan",
                auth_server=world.proxy.runtime()["listen"]["auth"], extra_args=[
                    "--kube-cluster", "standin-lan", "--kubeconfig",
                    str(Path(tmp) / "agent-kubeconfig"), "--kube-labels", "env=test",
                    "--no-ssh", "--agent-listen", "127.0.0.1:0"])
            wait_for(lambda: "standin-lan" in world.edge("bob", "kube", "ls").stdout, 30,
                     "the LAN agent's cluster in edge kube ls")
            pki = world.standin.pki
            home = world.home("bob")
            port = int(world.proxy.runtime()["listen"]["kube"].rpartition(":")[2])
            user = _context(str(home / "ca.pem"), str(home / "tls.crt"), str(home / "tls.key"))
            paths = {
                "direct": ("127.0.0.1", world.standin.port, "",
                           _context(pki["ca"], pki["admin_cert"], pki["admin_key"])),
                "proxy+tunnel": ("127.0.0.1", port, "/k8s/standin", user),
                "proxy+lan agent": ("127.0.0.1", port, "/k8s/standin-lan", user),
            }
            results = []
            lat = {}
            for name, target in paths.items():
                lat[name] = times = asyncio.run(_latency(target, args.requests))
                results.append({"figure": "latency", "path": name, "requests": len(times),
                                "p50_ms": 1000 * statistics.median(times),
                                "p99_ms": 1000 * _pct(times, 0.99)})
            for name in ("proxy+tunnel", "proxy+lan agent"):
                results.append({"figure": "added latency", "path": name, "p50_ms": 1000 * (
                    statistics.median(lat[name]) - statistics.median(lat["direct"])),
                    "p99_ms": 1000 * (_pct(lat[name], 0.99) - _pct(lat["direct"], 0.99))})
            for name, target in paths.items():
                results.append({"figure": "throughput, 50 keep-alive clients", "path": name,
                                "requests_per_s": asyncio.run(
                                    _throughput(target, 50, args.seconds))})
            for name, target in paths.items():
                results.append({"figure": "new sessions/s (TLS connection per request, 10 "
                                          "in parallel)", "path": name,
                                "sessions_per_s": asyncio.run(_sessions(target, 10,
                                                                        args.seconds))})
            direct_config = kube_standin.write_kubeconfig(
                Path(tmp) / "direct-kubeconfig", world.standin.port, pki, user="admin")
            results.append({"figure": f"exec stream of {args.exec_mib} MiB", "path": "direct",
                            "mib_per_s": _exec_mib_s(
                                {**os.environ, "KUBECONFIG": str(direct_config)},
                                args.exec_mib)})
            for name, cluster in (("proxy+tunnel", "standin"), ("proxy+lan agent",
                                                                 "standin-lan")):
                login = world.edge("bob", "kube", "login", cluster)
                assert login.returncode == 0, login.stderr
                results.append({"figure": f"exec stream of {args.exec_mib} MiB",
                                "path": name,
                                "mib_per_s": _exec_mib_s(world.env("bob"), args.exec_mib)})
            for result in results:
                print(json.dumps(result), flush=True)
        finally:
            if lan is not None:
                lan.stop()
            world.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
