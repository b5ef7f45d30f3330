"""Reconnect storm: kill -9 the proxy under N tunnels, restart it, time the return.

``python -m benchmarks tunnel-storm [--agents 1000] [--timeout 300]``

Brings ``--agents`` real tunnel agents up against ``twistd edgeproxy`` (the
load generator of ``tunnel_idle``), sends SIGKILL to the proxy's process
group, starts it again at once on the same ports and data dir, and waits
until every agent has a tunnel whose Hello the restarted proxy accepted.
Agents back off as real nodes do (1 s growing to 60 s, full jitter). One
JSON line: seconds from the kill to the proxy listening again and to all
agents back (and the median/p90 agent), the proxy-side cross-check (``tunnel
up`` log lines of the new proxy), and the new proxy's CPU: its start-up and
the storm itself (CPU % of a core between listening and all back).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._tunnel_env import cpu_seconds, emit, rss_kib, start_proxy
from benchmarks.tunnel_idle import Fleet, quiet_logs, raise_fd_limit, run_reactor, sleep


async def storm(reactor, base: Path, agents: int, timeout: float, concurrency: int) -> None:
    from twisted.internet.threads import deferToThread

    proxy = start_proxy(base, nofile=agents + 2048)
    fleet = None
    try:
        fleet = Fleet(reactor, proxy, agents, concurrency)
        start = time.monotonic()
        await fleet.ramp(agents)
        ramp_s = time.monotonic() - start
        await sleep(reactor, 2.0)  # registrations and node records settle
        log_offset = len(proxy.log())
        killed = time.monotonic()
        proxy.kill()
        while fleet.connected() > 0 and time.monotonic() - killed < 30:
            await sleep(reactor, 0.01)
        noticed = time.monotonic() - killed
        back_at: list[float] = []

        def record(_):
            back_at.append(time.monotonic() - killed)

        for agent in fleet.agents:
            agent.when_connected().addCallbacks(record, lambda _: None)
        await deferToThread(proxy.start)
        ready = time.monotonic() - killed
        pid = proxy.pid
        cpu_ready = cpu_seconds(pid)
        peak_rate, last_cpu, last_t = 0.0, cpu_ready, time.monotonic()
        while len(back_at) < agents and time.monotonic() - killed < timeout:
            await sleep(reactor, 0.5)
            now_cpu, now_t = cpu_seconds(pid), time.monotonic()
            peak_rate = max(peak_rate, (now_cpu - last_cpu) / (now_t - last_t))
            last_cpu, last_t = now_cpu, now_t
        all_back = time.monotonic() - killed
        storm_cpu = cpu_seconds(pid) - cpu_ready
        await sleep(reactor, 1.0)
        registered = proxy.log()[log_offset:].count("tunnel up: node ")
        ordered = sorted(back_at)
        emit({"benchmark": "tunnel-storm", "agents": agents, "ramp_s": round(ramp_s, 1),
              "back": len(back_at), "all_back": len(back_at) == agents,
              "agents_noticed_s": round(noticed, 2),
              "proxy_listening_s": round(ready, 2),
              "all_back_s": round(all_back, 1),
              "median_back_s": round(statistics.median(ordered), 1) if ordered else None,
              "p90_back_s": round(ordered[int(0.9 * len(ordered))], 1) if ordered else None,
              "proxy_registered": registered,
              "proxy_startup_cpu_s": round(cpu_ready, 2),
              "storm_cpu_s": round(storm_cpu, 2),
              "storm_cpu_pct": round(100 * storm_cpu / max(all_back - ready, 0.001), 1),
              "storm_peak_cpu_pct": round(100 * peak_rate, 1),
              "storm_cpu_ms_per_tunnel": round(1000 * storm_cpu / max(len(back_at), 1), 2),
              "proxy_rss_kib": rss_kib(pid)})
    finally:
        proxy.kill()
        if fleet is not None:
            await fleet.stop()


def main(argv: list[str]) -> int:
    """``python -m benchmarks tunnel-storm``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks tunnel-storm")
    parser.add_argument("--agents", type=int, default=1000, help="tunnels (5000, 10000...)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="give up this many seconds after the kill")
    parser.add_argument("--concurrency", type=int, default=100,
                        help="agent handshakes in flight during the initial ramp")
    args = parser.parse_args(argv)
    limit = raise_fd_limit(args.agents + 2048)
    if limit < args.agents + 100:
        parser.error(f"fd limit {limit} is too low for {args.agents} agents")
    quiet_logs()
    with tempfile.TemporaryDirectory(prefix="edgeaccess-tunnel-storm-") as tmp:
        run_reactor(lambda reactor: storm(reactor, Path(tmp), args.agents, args.timeout,
                                          args.concurrency))
    return 0
