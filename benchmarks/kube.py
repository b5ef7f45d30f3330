"""Kubernetes access through the proxy and a tunnelled agent, against the API stand-in directly.

``python -m benchmarks kube [--requests N] [--seconds S] [--exec-mib M]``
starts the world of the end-to-end tests (tests/kube_world.py: the API
stand-in, a proxy, a kube-only node with a reverse tunnel, user bob), then
measures, each way in the same run (directly against the stand-in with a
``system:masters`` client certificate, and through proxy + tunnel + agent with
bob's certificate):

- latency: ``N`` sequential ``GET .../pods/web-1`` on one keep-alive
  connection; p50/p99 and the difference (the added latency);
- throughput: 50 concurrent keep-alive clients for ``S`` seconds (requests/s);
- new sessions/s: a new TLS connection per request, 10 at a time;
- exec: ``kubectl exec web-1 -- head -c M MiB /dev/zero`` to /dev/null (MiB/s).

With each figure through the proxy, the CPU each process (proxy, agent,
stand-in) used per request or per MiB: on a loaded machine these are the
steady figures, the wall-clock rates are not. ``--baseline-tree DIR`` starts
a second world whose daemons run another source tree and measures it in turn
with this one (path ``baseline``). Prints one JSON object per figure, the
load average last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POD_PATH = "/api/v1/namespaces/default/pods/web-1"


def _context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    return context


async def _request(reader, writer, host: str, path: str) -> int:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n\r\n"
                 .encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def _latency(target, count: int) -> list[float]:
    host, port, prefix, context = target
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    times = []
    for i in range(count + 20):
        started = time.perf_counter()
        code = await _request(reader, writer, host, prefix + POD_PATH)
        assert code == 200, code
        if i >= 20:
            times.append(time.perf_counter() - started)
    writer.close()
    return times


async def _throughput(target, clients: int, seconds: float) -> float:
    host, port, prefix, context = target
    done = 0
    stop = time.perf_counter() + seconds

    async def client():
        nonlocal done
        reader, writer = await asyncio.open_connection(host, port, ssl=context)
        while time.perf_counter() < stop:
            await _request(reader, writer, host, prefix + POD_PATH)
            done += 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.perf_counter() - started)


async def _sessions(target, parallel: int, seconds: float) -> float:
    host, port, prefix, context = target
    done = 0
    stop = time.perf_counter() + seconds

    async def client():
        nonlocal done
        while time.perf_counter() < stop:
            reader, writer = await asyncio.open_connection(host, port, ssl=context)
            await _request(reader, writer, host, prefix + POD_PATH)
            writer.close()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(parallel)))
    return done / (time.perf_counter() - started)


def _exec_mib_s(kubectl_env: dict, mib: int) -> float:
    from tests.kube_world import KUBECTL

    started = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        subprocess.run([KUBECTL, "exec", "web-1", "--", "head", "-c", str(mib * 1024 * 1024),
                        "/dev/zero"], env=kubectl_env, stdout=sink, check=True, timeout=600)
    return mib / (time.perf_counter() - started)


def _pct(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def _targets(world) -> tuple:
    """``(direct, proxied)`` targets of a world: the stand-in as admin, the proxy as bob."""
    pki = world.standin.pki
    home = world.home("bob")
    server = next(line.split("server: ")[1] for line in
                  (home / "kubeconfig").read_text().splitlines() if "server: " in line)
    hostport = server.split("//")[1].split("/")[0]
    direct = ("127.0.0.1", world.standin.port, "",
              _context(pki["ca"], pki["admin_cert"], pki["admin_key"]))
    proxied = ("127.0.0.1", int(hostport.split(":")[1]), "/k8s/standin",
               _context(str(home / "ca.pem"), str(home / "tls.crt"), str(home / "tls.key")))
    return direct, proxied


def _start(base: Path, tree: str | None):
    """A world whose daemons run this tree, or ``tree`` (put first on their PYTHONPATH)."""
    from tests.kube_world import start_world

    saved = os.environ.get("PYTHONPATH")
    if tree:
        os.environ["PYTHONPATH"] = tree + (os.pathsep + saved if saved else "")
    try:
        return start_world(base, cluster="bench", users={"bob": ("kube-editor",)})
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks kube")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--exec-mib", type=int, default=256)
    parser.add_argument("--baseline-tree", metavar="DIR",
                        help="also run a second world whose proxy and agent run the source "
                             "tree DIR (e.g. `git archive COMMIT edgeaccess | tar -x -C DIR`), "
                             "measured in turns with this one")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks._tunnel_env import cpu_seconds
    from tests import kube_standin

    with tempfile.TemporaryDirectory() as tmp:
        worlds = {}
        try:
            worlds["proxy+tunnel"] = _start(Path(tmp) / "this", None)
            if args.baseline_tree:
                worlds["baseline"] = _start(Path(tmp) / "baseline", args.baseline_tree)
            first = next(iter(worlds.values()))
            direct = _targets(first)[0]
            routes = [("direct", first, direct)] + [
                (name, world, _targets(world)[1]) for name, world in worlds.items()]

            def pids(world) -> dict[str, int]:
                return {"proxy": world.proxy.process.pid, "agent": world.node.process.pid,
                        "standin": world.standin.process.pid}

            results = []
            lat = {}
            for name, _world, target in routes:
                times = asyncio.run(_latency(target, args.requests))
                lat[name] = times
                results.append({"figure": "latency", "path": name, "requests": len(times),
                                "p50_ms": 1000 * statistics.median(times),
                                "p99_ms": 1000 * _pct(times, 0.99)})
            for name in worlds:
                results.append({"figure": "added latency", "path": name, "p50_ms": 1000 * (
                    statistics.median(lat[name]) - statistics.median(lat["direct"])),
                    "p99_ms": 1000 * (_pct(lat[name], 0.99) - _pct(lat["direct"], 0.99))})
            for name, world, target in routes:
                before = {k: cpu_seconds(p) for k, p in pids(world).items()}
                started = time.perf_counter()
                rate = asyncio.run(_throughput(target, 50, args.seconds))
                done = rate * (time.perf_counter() - started)
                results.append({"figure": "throughput, 50 keep-alive clients", "path": name,
                                "requests_per_s": rate, "cpu_us_per_request": {
                                    k: round((cpu_seconds(p) - before[k]) / done * 1e6, 1)
                                    for k, p in pids(world).items()}})
            for name, _world, target in routes:
                results.append({"figure": "new sessions/s (TLS connection per request, 10 "
                                          "in parallel)", "path": name,
                                "sessions_per_s": asyncio.run(
                                    _sessions(target, 10, args.seconds))})
            direct_config = kube_standin.write_kubeconfig(
                Path(tmp) / "direct-kubeconfig", first.standin.port, first.standin.pki,
                user="admin")
            execs = [("direct", first, {**os.environ, "KUBECONFIG": str(direct_config)})] + [
                (name, world, world.env("bob")) for name, world in worlds.items()]
            for name, world, env in execs:
                before = {k: cpu_seconds(p) for k, p in pids(world).items()}
                rate = _exec_mib_s(env, args.exec_mib)
                results.append({"figure": f"exec stream of {args.exec_mib} MiB", "path": name,
                                "mib_per_s": rate, "cpu_ms_per_mib": {
                                    k: round((cpu_seconds(p) - before[k]) / args.exec_mib
                                             * 1e3, 2) for k, p in pids(world).items()}})
            results.append({"figure": "load average", "loadavg": os.getloadavg()})
            for result in results:
                print(json.dumps(result), flush=True)
        finally:
            for world in worlds.values():
                world.stop()
    return 0
