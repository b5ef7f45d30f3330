"""Idle reverse tunnels held against a real proxy: memory and CPU per tunnel.

``python -m benchmarks tunnel-idle [--agents 1000] [--window 30] [--heartbeat 30]``

Starts ``twistd edgeproxy`` (fd limit raised through ``_tunnel_proxy.py``),
then this process becomes the load generator: it issues one node certificate
per agent from the proxy's own CA (``DATA_DIR/ca/tls_ca.*``) and runs
``--agents`` real :class:`~edgeaccess.tunnel.agent.TunnelAgent` services (TLS 1.3
mutual, ALPN ``edge-tunnel/1``, AMP Hello and heartbeats), at most
``--concurrency`` handshakes in flight. Results (one JSON line each):

* ``ramp``: time and proxy CPU to bring the tunnels up (TLS handshake, Hello,
  registration);
* ``memory``: proxy VmRSS before (after 50 warm-up tunnels) and after (``--settle``
  seconds after the ramp calmed down), per tunnel;
* ``baseline``: proxy CPU % with no tunnel at all, over 10 s;
* ``idle``: proxy CPU % of a core over ``--window`` seconds, with the agents
  heartbeating every ``--heartbeat`` seconds (the proxy's interval; agents
  adopt it from the Hello answer).
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import time
import uuid as uuidlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

from benchmarks._tunnel_env import cpu_seconds, emit, rss_kib, start_proxy

WARMUP = 50


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit towards ``wanted``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def quiet_logs() -> None:
    """Agents log every state change: keep only errors, on stderr."""
    from twisted.logger import LogLevel, formatEvent, globalLogBeginner

    def observer(event) -> None:
        if event.get("log_level", LogLevel.info) >= LogLevel.error:
            print("load generator:", formatEvent(event), file=sys.stderr)

    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


class Fleet:
    """``count`` tunnel agents with node certificates issued from the proxy's CA."""

    def __init__(self, reactor, proxy, count: int, concurrency: int = 100,
                 on_control=None) -> None:
        """:param on_control: ``(i) -> callable(bytes)``: agent ``i`` takes the
        proxy's control pushes (``benchmarks control-plane``)."""
        from edgeaccess import tls
        from edgeaccess.httpclient import split_addr
        from edgeaccess.pki import keys, x509ca
        from edgeaccess.tunnel.protocol import ALPN_PROTOCOL

        self.reactor = reactor
        self.concurrency = concurrency
        self.on_control = on_control
        authority = proxy.authority()
        ca_key, ca_cert = authority.tls_ca_key, authority.tls_ca_cert
        self.host, self.port = split_addr(proxy.addr("tunnel"), 3024)
        key = keys.generate_private_key()  # one key pair, one certificate per node
        now = datetime.now(timezone.utc)
        self.agents = []
        self.options = []
        for i in range(count):
            identity = x509ca.Identity(kind="node", name=f"n{i}", cluster=proxy.cluster,
                                       uuid=str(uuidlib.uuid4()))
            cert = x509ca.issue_identity_certificate(
                ca_key, ca_cert, key.public_key(), identity, now=now, ttl=timedelta(hours=6))
            self.options.append(tls.client_options(self.host, [ca_cert], cluster=proxy.cluster,
                                                   key=key, cert=cert, alpn=[ALPN_PROTOCOL]))
        self._made = 0

    def _agent(self, i: int):
        from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS

        from edgeaccess.errors import AccessDenied
        from edgeaccess.tunnel.agent import TunnelAgent
        from edgeaccess.tunnel.protocol import Inventory

        def refuse(kind: str, target: str):
            raise AccessDenied("load-generator agents serve no channels")

        options = self.options[i]
        return TunnelAgent(
            endpoint_factory=lambda: wrapClientTLS(
                options, TCP4ClientEndpoint(self.reactor, self.host, self.port, timeout=30)),
            inventory=Inventory(name=f"n{i}", labels={"bench": "idle"}),
            clock=self.reactor, rng=random.Random(i), accept_channel=refuse,
            on_control=self.on_control(i) if self.on_control is not None else None)

    def connected(self) -> int:
        """How many agents have a tunnel whose Hello the proxy accepted."""
        return sum(1 for agent in self.agents if agent.state == "connected")

    async def ramp(self, upto: int, deadline_s: float = 900.0) -> None:
        """Start agents until ``upto`` exist, ``concurrency`` handshakes at a time."""
        from twisted.internet.defer import DeferredSemaphore

        gate = DeferredSemaphore(self.concurrency)
        deadline = time.monotonic() + deadline_s
        while self._made < upto:
            await gate.acquire()
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.connected()} of {upto} agents connected")
            agent = self._agent(self._made)
            self._made += 1
            self.agents.append(agent)
            agent.startService()
            agent.when_connected().addBoth(lambda _: gate.release())
        while self.connected() < upto:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.connected()} of {upto} agents connected")
            await sleep(self.reactor, 0.1)

    async def stop(self) -> None:
        """Stop every agent (closing its tunnel)."""
        from twisted.internet.defer import DeferredList

        stopping = DeferredList([agent.stopService() for agent in self.agents])
        await stopping.addTimeout(60, self.reactor).addErrback(lambda _: None)


def sleep(reactor, seconds: float):
    """A Deferred that fires after ``seconds``."""
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


async def cpu_rate_until_quiet(reactor, pid: int, quiet_cpu: float, settle_s: float,
                               limit_s: float) -> None:
    """Wait until ``pid`` used at most ``quiet_cpu`` s per second for ``settle_s`` s."""
    deadline = time.monotonic() + limit_s
    calm_since = None
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        await sleep(reactor, 0.5)
        now = cpu_seconds(pid)
        if (now - last) / 0.5 <= quiet_cpu:
            calm_since = calm_since or time.monotonic()
            if time.monotonic() - calm_since >= settle_s:
                return
        else:
            calm_since = None
        last = now


def run_reactor(coroutine_fn) -> None:
    """Run ``coroutine_fn(reactor)`` under the reactor; re-raise its failure."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    outcome = []

    def start() -> None:
        d = Deferred.fromCoroutine(coroutine_fn(reactor))
        d.addErrback(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if outcome:
        outcome[0].raiseException()


async def measure_idle(reactor, base: Path, agents: int, window: float, heartbeat: float,
                       concurrency: int, memory_only: bool = False,
                       settle: float = 12.0) -> None:
    proxy = start_proxy(base, nofile=agents + 2048, tunnel_heartbeat=heartbeat)
    fleet = None
    try:
        pid = proxy.pid
        await cpu_rate_until_quiet(reactor, pid, 0.05, 2.0, 20.0)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await sleep(reactor, 10.0)
        emit({"benchmark": "tunnel-idle", "case": "baseline", "agents": 0,
              "window_s": round(time.monotonic() - t0, 1),
              "proxy_cpu_pct": round(100 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0), 2),
              "proxy_rss_kib": rss_kib(pid)})
        fleet = Fleet(reactor, proxy, agents, concurrency)
        await fleet.ramp(min(WARMUP, agents))
        await cpu_rate_until_quiet(reactor, pid, 0.05, 2.0, 20.0)
        rss_before, cpu_before, start = rss_kib(pid), cpu_seconds(pid), time.monotonic()
        await fleet.ramp(agents)
        ramp_s, ramp_cpu = time.monotonic() - start, cpu_seconds(pid) - cpu_before
        added = agents - min(WARMUP, agents)
        emit({"benchmark": "tunnel-idle", "case": "ramp", "agents": agents,
              "concurrency": concurrency, "seconds": round(ramp_s, 1),
              "proxy_cpu_s": round(ramp_cpu, 2),
              "proxy_cpu_ms_per_tunnel": round(1000 * ramp_cpu / max(added, 1), 2),
              "tunnels_per_s": round(added / ramp_s, 1)})
        await cpu_rate_until_quiet(reactor, pid, 0.2, 3.0, 60.0)
        # Steady state: the proxy's heap trimmer (every 10 s) has given back
        # what the ramp's handshakes freed.
        await sleep(reactor, settle)
        rss_after = rss_kib(pid)
        emit({"benchmark": "tunnel-idle", "case": "memory", "agents": agents,
              "proxy_rss_before_kib": rss_before, "proxy_rss_after_kib": rss_after,
              "kib_per_tunnel": round((rss_after - rss_before) / max(added, 1), 1),
              "fd_limit": raise_fd_limit(0)})
        if memory_only:
            return
        # The idle window: heartbeats only (the proxy keeps no periodic
        # per-node work since the node-record refresher went).
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await sleep(reactor, window)
        used, span = cpu_seconds(pid) - cpu0, time.monotonic() - t0
        still = fleet.connected()
        emit({"benchmark": "tunnel-idle", "case": "idle", "agents": agents,
              "connected_at_end": still, "heartbeat_s": heartbeat, "window_s": round(span, 1),
              "proxy_cpu_pct": round(100 * used / span, 2),
              "proxy_cpu_pct_per_10k_tunnels": round(100 * used / span * 10000 / agents, 2),
              "proxy_rss_kib": rss_kib(pid)})
    finally:
        if fleet is not None:
            proxy.kill()  # the agents would only start redialing a stopping proxy
            await fleet.stop()
        proxy.kill()


def main(argv: list[str]) -> int:
    """``python -m benchmarks tunnel-idle``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks tunnel-idle")
    parser.add_argument("--agents", type=int, default=1000, help="tunnels (5000, 10000...)")
    parser.add_argument("--window", type=float, default=30.0, help="idle CPU window, seconds")
    parser.add_argument("--heartbeat", type=float, default=30.0,
                        help="the proxy's tunnel heartbeat interval, seconds")
    parser.add_argument("--concurrency", type=int, default=100,
                        help="agent handshakes in flight during the ramp")
    parser.add_argument("--settle", type=float, default=12.0,
                        help="seconds idle after the ramp before memory is read (steady state)")
    parser.add_argument("--memory-only", action="store_true",
                        help="stop after the memory figure (no idle CPU window)")
    args = parser.parse_args(argv)
    limit = raise_fd_limit(args.agents + 2048)
    if limit < args.agents + 100:
        parser.error(f"fd limit {limit} is too low for {args.agents} agents")
    quiet_logs()
    with tempfile.TemporaryDirectory(prefix="edgeaccess-tunnel-idle-") as tmp:
        run_reactor(lambda reactor: measure_idle(reactor, Path(tmp), args.agents, args.window,
                                                 args.heartbeat, args.concurrency,
                                                 args.memory_only, args.settle))
    return 0
