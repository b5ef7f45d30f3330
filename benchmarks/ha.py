"""Several proxies on one PostgreSQL: failover, propagation, idle tunnels.

``python -m benchmarks ha [--cases failover,propagation,idle] [options]``

Each case prints one JSON line per result, with its baseline from the same run:

* ``failover``: real processes (a throw-away PostgreSQL, proxies A and B,
  one tunnelled ``edgenode`` joined through A, OpenSSH through B). kill -9 of
  A, then the time until a *new* ``ssh`` session through B works and until B
  has dropped A (its record expired); A is restarted between rounds. Baseline:
  one proxy alone, kill -9 and restart, until ``ssh`` through it works again.
  Also: graceful stop of B until A has dropped it.
* ``propagation``: a write made through one proxy's backend until every
  proxy's control cache holds it (``--proxies`` PostgreSQL backends, each
  with its :class:`~edgeaccess.controlplane.cache.ControlCache`, in this one
  process; the LISTEN/NOTIFY path between proxies). Baseline: SQLite, one
  cache (commit to cache in one process).
* ``idle``: ``--nodes`` idle nodes, each with one tunnel to each of two
  proxies on one database (real TLS 1.3 agents, as ``tunnel-idle``): per
  proxy, RSS per tunnel and CPU % idle, against each proxy's own CPU with no
  tunnel over 10 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._tunnel_env import BenchProxy, cpu_seconds, emit, rss_kib

PASSWORD = "ha-bench-pass-1"
CLUSTER = "ha-bench"


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def _summary(values: list[float]) -> dict:
    return {"samples": len(values), "p50": round(statistics.median(values), 3),
            "p99": round(_percentile(values, 0.99), 3), "max": round(max(values), 3)}


def _ca_key(base: Path) -> Path:
    """The CA key every proxy of the bench cluster gets (``--ca-key-file``)."""
    import os

    from edgeaccess.pki import castore

    path = base / "ca.key"
    if not path.exists():
        base.mkdir(parents=True, exist_ok=True)
        path.write_bytes(castore.format_ca_key(os.urandom(32)))
        path.chmod(0o600)
    return path


def _proxy(base: Path, name: str, url: str, *, nofile: int = 0,
           heartbeat: float = 0.0) -> BenchProxy:
    proxy = BenchProxy(base / name, base / f"{name}.log", cluster=CLUSTER,
                       extra_args=["--backend", url, "--ca-key-file", str(_ca_key(base))])
    proxy.nofile = nofile
    proxy.tunnel_heartbeat = heartbeat
    try:
        proxy.start()
    except Exception:
        proxy.kill()
        raise RuntimeError(f"proxy {name} did not start; log:\n{proxy.log()[-3000:]}")
    return proxy


# -- failover ------------------------------------------------------------------------


def _ssh_ok(home: Path, host: str) -> bool:
    try:
        result = subprocess.run(
            ["ssh", "-F", str(home / "ssh_config"), "-o", "BatchMode=yes",
             "-o", "ConnectTimeout=5", f"root@{host}", "echo", "ha-ok"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0 and result.stdout == b"ha-ok\n"


def _wait(predicate, timeout: float, what: str, interval: float = 0.02) -> float:
    """Seconds until ``predicate()`` held."""
    from edgeaccess.devcluster import wait_for

    started = time.monotonic()
    wait_for(predicate, timeout, what, interval=interval)
    return time.monotonic() - started


def _count(proxy: BenchProxy, text: str) -> int:
    return proxy.log().count(text)


def failover(base: Path, rounds: int) -> None:
    from edgeaccess.devcluster import join_node
    from edgeaccess.devpostgres import PostgresServer

    server = PostgresServer()
    started: list = []
    try:
        url = server.create_database()
        a = _proxy(base, "a", url)
        started.append(a)
        b = _proxy(base, "b", url)
        started.append(b)
        a.add_user("alice", PASSWORD, roles=("access",), logins=("root",))
        node, _ = join_node(a, base, "hb1", tunnel=True)
        started.append(node)
        host = f"hb1.{CLUSTER}"
        tunnel_up = f"tunnel up from node:hb1.{CLUSTER}"
        _wait(lambda: _count(b, tunnel_up) >= 1, 30, "the node's tunnel to B")
        home_b = b.login(base / "home-b", "alice", PASSWORD)
        home_a = a.login(base / "home-a", "alice", PASSWORD)
        _wait(lambda: _ssh_ok(home_b, host), 30, "ssh through B")
        reachable, dropped = [], []
        for _ in range(rounds):
            left = _count(b, " left, tunnel address ")
            killed = time.monotonic()
            a.kill()
            _wait(lambda: _ssh_ok(home_b, host), 30, "a new session through B")
            reachable.append(time.monotonic() - killed)
            _wait(lambda: _count(b, " left, tunnel address ") > left, 30, "B to drop A")
            dropped.append(time.monotonic() - killed)
            ups = _count(a, tunnel_up)
            a.start()
            _wait(lambda: _count(a, tunnel_up) > ups, 60, "the node's tunnel back to A")
        emit({"benchmark": "ha", "case": "failover", "proxies": 2,
              "kill9_to_new_session_via_survivor_s": _summary(reachable),
              "kill9_to_dropped_by_survivor_s": _summary(dropped), "goal_s": 5.0})
        # Baseline: the same proxy alone in the node's path (users through A):
        # kill -9, restart, until ssh through it works again.
        _wait(lambda: _ssh_ok(home_a, host), 30, "ssh through A")
        killed = time.monotonic()
        a.kill()
        joined = _count(a, " joined, tunnel address ")
        a.start()
        restarted = time.monotonic() - killed
        _wait(lambda: _ssh_ok(home_a, host), 60, "ssh through the restarted A")
        emit({"benchmark": "ha", "case": "failover-baseline",
              "what": "one proxy: kill -9, restart, until ssh through it works",
              "proxy_restart_s": round(restarted, 2),
              "kill9_to_session_s": round(time.monotonic() - killed, 2)})
        # Graceful stop: the survivor drops the stopped proxy at once (its
        # record is deleted, not left to expire). The restarted A first has
        # to know B (ssh through A may work before A has registered: the
        # node redialed it by itself).
        _wait(lambda: _count(a, " joined, tunnel address ") > joined, 30, "A to know B")
        left = _count(a, " left, tunnel address ")
        stopping = time.monotonic()
        b.stop()
        stop_s = time.monotonic() - stopping
        _wait(lambda: _count(a, " left, tunnel address ") > left, 10, "A to drop B")
        emit({"benchmark": "ha", "case": "graceful-stop", "stop_s": round(stop_s, 2),
              "stop_begun_to_dropped_by_survivor_s": round(time.monotonic() - stopping, 2),
              "ssh_via_survivor_ok": _ssh_ok(home_a, host)})
    except Exception:
        for process in started:
            print(f"--- {process.log_path.name}:\n{process.log()[-3000:]}", flush=True)
        raise
    finally:
        for process in reversed(started):
            process.stop()
        server.stop()


# -- propagation ---------------------------------------------------------------------


async def _propagation(reactor, backends, samples: int) -> list[float]:
    """ms from a put through ``backends[i % n]`` until every cache holds it."""
    from twisted.internet.defer import Deferred

    from edgeaccess.controlplane.cache import ControlCache

    caches = [ControlCache(backend, reactor) for backend in backends]
    for cache in caches:
        cache.startService()
    for cache in caches:
        await cache.when_ready()
    state: dict = {"value": None, "seen": set(), "done": None}

    def listener(index: int):
        def heard(key: str, item) -> None:
            if key == "/locks/bench" and item is not None and item.value == state["value"]:
                state["seen"].add(index)
                if len(state["seen"]) == len(caches) and state["done"] is not None:
                    state["done"].callback(None)
        return heard

    for index, cache in enumerate(caches):
        cache.subscribe(listener(index))
    found = []
    try:
        for sample in range(samples):
            value = f'{{"id": "bench", "sample": {sample}}}'.encode()
            state.update(value=value, seen=set(), done=Deferred())
            started = time.perf_counter()
            await backends[sample % len(backends)].put("/locks/bench", value)
            if len(state["seen"]) < len(caches):
                await state["done"].addTimeout(10, reactor)
            found.append((time.perf_counter() - started) * 1000)
    finally:
        for cache in caches:
            cache.stopService()
    return found


async def propagation(reactor, proxies: int, samples: int) -> None:
    from edgeaccess.backend.postgres import PostgresBackend
    from edgeaccess.backend.sqlite import SQLiteBackend
    from edgeaccess.devpostgres import PostgresServer

    with tempfile.TemporaryDirectory() as directory:
        sqlite = await SQLiteBackend(Path(directory) / "b.sqlite3", reactor, reactor).start()
        baseline = await _propagation(reactor, [sqlite], samples)
        await sqlite.close()
    emit({"benchmark": "ha", "case": "propagation-baseline", "backend": "sqlite",
          "proxies": 1, "write_to_cache_ms": _summary(baseline)})
    server = PostgresServer(durable=True)
    try:
        url = server.create_database()
        backends = [await PostgresBackend(url, reactor, reactor).start() for _ in range(proxies)]
        try:
            found = await _propagation(reactor, backends, samples)
        finally:
            for backend in backends:
                await backend.close()
        emit({"benchmark": "ha", "case": "propagation", "backend": "postgresql",
              "proxies": proxies, "write_to_every_cache_ms": _summary(found),
              "goal_p99_ms": 100})
    finally:
        server.stop()


# -- idle tunnels ----------------------------------------------------------------------


def _connected(statuses: list[Path]) -> list[int]:
    found = []
    for status in statuses:
        try:
            found.append(json.loads(status.read_text())["connected"])
        except (FileNotFoundError, ValueError, KeyError):
            found.append(0)
    return found


async def idle(reactor, base: Path, nodes: int, window: float, heartbeat: float,
               concurrency: int, settle: float) -> None:
    from benchmarks.tunnel_idle import cpu_rate_until_quiet, sleep
    from edgeaccess.devpostgres import PostgresServer

    server = PostgresServer()
    proxies: list[BenchProxy] = []
    fleets: list = []
    try:
        url = server.create_database()
        proxies.append(_proxy(base, "a", url, nofile=nodes + 2048, heartbeat=heartbeat))
        proxies.append(_proxy(base, "b", url, nofile=nodes + 2048, heartbeat=heartbeat))
        pids = [p.pid for p in proxies]
        for pid in pids:
            await cpu_rate_until_quiet(reactor, pid, 0.05, 2.0, 20.0)
        cpu0, t0 = [cpu_seconds(pid) for pid in pids], time.monotonic()
        await sleep(reactor, 10.0)
        span = time.monotonic() - t0
        baseline = [round(100 * (cpu_seconds(pid) - c) / span, 2) for pid, c in zip(pids, cpu0)]
        emit({"benchmark": "ha", "case": "idle-baseline", "nodes": 0, "proxies": 2,
              "proxy_cpu_pct": baseline, "proxy_rss_kib": [rss_kib(pid) for pid in pids]})
        # Each proxy's agents from a process of their own (a process holds
        # at most ~20,000 descriptors here); the node identities differ
        # between the two fleets, which costs the proxies the same.
        rss_before = [rss_kib(pid) for pid in pids]
        cpu_before, start = [cpu_seconds(pid) for pid in pids], time.monotonic()
        statuses = [base / f"fleet-{i}.json" for i in range(len(proxies))]
        for proxy, status in zip(proxies, statuses):
            fleets.append(subprocess.Popen(
                [sys.executable, "-m", "benchmarks._ha_fleet", url, str(_ca_key(base)),
                 proxy.addr("tunnel"), CLUSTER, str(nodes), str(concurrency), str(status)],
                stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + 1800
        while _connected(statuses) != [nodes] * len(proxies):
            if time.monotonic() > deadline or any(f.poll() is not None for f in fleets):
                raise RuntimeError(f"agents connected: {_connected(statuses)} of {nodes}")
            await sleep(reactor, 0.5)
        ramp_s = time.monotonic() - start
        emit({"benchmark": "ha", "case": "ramp", "nodes": nodes, "proxies": 2,
              "seconds": round(ramp_s, 1),
              "proxy_cpu_ms_per_tunnel": [round(1000 * (cpu_seconds(pid) - c) / nodes, 2)
                                          for pid, c in zip(pids, cpu_before)]})
        for pid in pids:
            await cpu_rate_until_quiet(reactor, pid, 0.2, 3.0, 60.0)
        await sleep(reactor, settle)
        rss_after = [rss_kib(pid) for pid in pids]
        emit({"benchmark": "ha", "case": "memory", "nodes": nodes, "proxies": 2,
              "proxy_rss_before_kib": rss_before, "proxy_rss_after_kib": rss_after,
              "kib_per_tunnel": [round((after - before) / nodes, 1)
                                 for before, after in zip(rss_before, rss_after)]})
        cpu0, t0 = [cpu_seconds(pid) for pid in pids], time.monotonic()
        await sleep(reactor, window)
        span = time.monotonic() - t0
        emit({"benchmark": "ha", "case": "idle", "nodes": nodes, "proxies": 2,
              "heartbeat_s": heartbeat, "window_s": round(span, 1),
              "connected_at_end": _connected(statuses),
              "proxy_cpu_pct": [round(100 * (cpu_seconds(pid) - c) / span, 2)
                                for pid, c in zip(pids, cpu0)],
              "proxy_rss_kib": [rss_kib(pid) for pid in pids]})
    finally:
        for proxy in proxies:
            proxy.kill()  # the agents would only redial stopping proxies
        for fleet in fleets:
            fleet.terminate()
        for fleet in fleets:
            try:
                fleet.wait(60)
            except subprocess.TimeoutExpired:
                fleet.kill()
                fleet.wait()
        server.stop()


def main(argv: list[str]) -> int:
    """``python -m benchmarks ha``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks ha")
    parser.add_argument("--cases", default="failover,propagation",
                        help="comma-separated: failover, propagation, idle")
    parser.add_argument("--rounds", type=int, default=3, help="failover: kill -9 rounds")
    parser.add_argument("--proxies", type=int, default=3, help="propagation: proxies")
    parser.add_argument("--samples", type=int, default=300, help="propagation: writes")
    parser.add_argument("--nodes", type=int, default=1000, help="idle: nodes (10000)")
    parser.add_argument("--window", type=float, default=30.0, help="idle: CPU window, s")
    parser.add_argument("--heartbeat", type=float, default=30.0, help="idle: heartbeat, s")
    parser.add_argument("--concurrency", type=int, default=100,
                        help="idle: handshakes in flight per proxy during the ramp")
    parser.add_argument("--settle", type=float, default=12.0,
                        help="idle: seconds after the ramp before memory is read")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - {"failover", "propagation", "idle"}
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    from benchmarks.tunnel_idle import quiet_logs, raise_fd_limit, run_reactor

    with tempfile.TemporaryDirectory(prefix="edgeaccess-ha-") as tmp:
        base = Path(tmp)
        if "failover" in cases:
            failover(base / "failover", args.rounds)
        reactor_cases = [c for c in cases if c in ("propagation", "idle")]
        if reactor_cases:
            if "idle" in reactor_cases:
                limit = raise_fd_limit(args.nodes + 2048)
                if limit < args.nodes + 100:
                    parser.error(f"fd limit {limit} is too low for {args.nodes} nodes")
            quiet_logs()

            async def run(reactor) -> None:
                if "propagation" in reactor_cases:
                    await propagation(reactor, args.proxies, args.samples)
                if "idle" in reactor_cases:
                    await idle(reactor, base / "idle", args.nodes, args.window,
                               args.heartbeat, args.concurrency, args.settle)

            run_reactor(run)
    return 0
