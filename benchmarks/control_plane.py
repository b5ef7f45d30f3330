"""How fast a change reaches every tunnelled agent, and what pushing costs the proxy.

``python -m benchmarks control-plane [--agents 1000] [--trials 5] [--window 30]``

Starts ``twistd edgeproxy`` and ``--agents`` real tunnel agents in this
process (the ``tunnel-idle`` harness: TLS 1.3 mutual, AMP, heartbeats every
30 s), each taking the proxy's control pushes and applying them to a
:class:`~edgeaccess.controlplane.state.ControlState` as a node does. Then,
``--trials`` times each, ``edgectl lock --user ...`` and ``edgectl create -f
role.yaml`` (a new role) run as real processes; for each, the time from the
command returning to the change being applied at each agent. Results (JSON
lines):

* ``baseline``: proxy CPU % with no agent, over 10 s;
* ``idle``: proxy CPU % with every agent connected and taking pushes, over
  ``--window`` s (heartbeats only: nothing is pushed without a change);
* ``lock`` / ``role``: per change p50/p99/max over every agent of every
  trial, from ``edgectl`` returning (negative: in force before it returned)
  and from its start, the slowest agent of each trial, and proxy CPU per
  change;
* ``lock-api``: the same lock made through the auth API from this process,
  timed from the answer (the CLI's ~0.4 s exit is not in the way).

The agents share one process (and the machine's two cores) with each other,
so the tail includes the load generator decoding the same message 10,000
times; a real fleet decodes in parallel, one node each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchmarks._tunnel_env import cpu_seconds, emit, rss_kib, start_proxy
from benchmarks.tunnel_idle import (
    WARMUP,
    Fleet,
    cpu_rate_until_quiet,
    quiet_logs,
    raise_fd_limit,
    run_reactor,
    sleep,
)


class Arrivals:
    """Each agent's control state, and when each change reached it."""

    def __init__(self) -> None:
        from edgeaccess.controlplane import state as cstate

        self._cstate = cstate
        self.times: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.inits = 0

    def for_agent(self, i: int):
        state = self._cstate.ControlState()
        decode, times = self._cstate.decode, self.times

        def on_control(data: bytes) -> None:
            message = decode(data)
            state.apply(message)  # in force, as on a node
            arrived = time.monotonic()
            if message["type"] == "init":
                self.inits += 1
            for change in message.get("changes", ()):
                if change["value"] is not None:
                    times[(change["kind"], change["name"])].append(arrived)

        return on_control


async def edgectl(proxy, *args: str) -> tuple[str, float, float]:
    """Run ``edgectl`` without blocking the reactor: its output, when it
    started and when it returned (its exit is seen ~0.4 s after the answer:
    interpreter shutdown)."""
    from twisted.internet import reactor
    from twisted.internet.utils import getProcessOutputAndValue

    started = time.monotonic()
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-m", "edgeaccess.admin.main", "--data-dir", str(proxy.data_dir),
                         *args], env=None, reactor=reactor)
    returned = time.monotonic()
    if code != 0:
        raise RuntimeError(f"edgectl {' '.join(args)} failed: {err.decode()[-500:]}")
    return out.decode(), started, returned


def admin_client(reactor, proxy):
    """The admin API client in this process: a change's answer is timed exactly."""
    from edgeaccess import clusterclient
    from edgeaccess.pki import keys, x509ca

    pem = (proxy.data_dir / "admin" / "identity.pem").read_bytes()
    key = keys.load_private_key(pem[:pem.index(b"-----BEGIN CERTIFICATE-----")])
    certs = x509ca.load_certificates_pem(pem[pem.index(b"-----BEGIN CERTIFICATE-----"):])
    own, ca = certs[0], certs[1:]
    return clusterclient.connect(reactor, proxy.runtime()["listen"]["auth"], ca_certs=ca,
                                 cluster=proxy.cluster, credentials=lambda: (key, own))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


async def wait_all(reactor, arrivals: Arrivals, key, agents: int, deadline_s: float = 60.0):
    deadline = time.monotonic() + deadline_s
    while len(arrivals.times[key]) < agents:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key}: only {len(arrivals.times[key])} of {agents} agents")
        await sleep(reactor, 0.02)


async def measure(reactor, base: Path, agents: int, trials: int, window: float,
                  concurrency: int) -> None:
    proxy = start_proxy(base, nofile=agents + 2048, tunnel_heartbeat=30.0)
    arrivals = Arrivals()
    fleet = None
    try:
        pid = proxy.pid
        await cpu_rate_until_quiet(reactor, pid, 0.05, 2.0, 20.0)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await sleep(reactor, 10.0)
        emit({"benchmark": "control-plane", "case": "baseline", "agents": 0,
              "proxy_cpu_pct": round(100 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0), 2)})
        fleet = Fleet(reactor, proxy, agents, concurrency, on_control=arrivals.for_agent)
        await fleet.ramp(min(WARMUP, agents))
        await cpu_rate_until_quiet(reactor, pid, 0.05, 2.0, 20.0)
        rss_before = rss_kib(pid)
        await fleet.ramp(agents)
        deadline = time.monotonic() + 60
        while arrivals.inits < agents and time.monotonic() < deadline:
            await sleep(reactor, 0.1)
        await cpu_rate_until_quiet(reactor, pid, 0.2, 3.0, 90.0)
        await sleep(reactor, 12.0)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await sleep(reactor, window)
        span = time.monotonic() - t0
        emit({"benchmark": "control-plane", "case": "idle", "agents": agents,
              "connected": fleet.connected(), "inits": arrivals.inits, "heartbeat_s": 30.0,
              "window_s": round(span, 1),
              "proxy_cpu_pct": round(100 * (cpu_seconds(pid) - cpu0) / span, 2),
              "proxy_rss_kib": rss_kib(pid),
              "kib_per_tunnel": round((rss_kib(pid) - rss_before)
                                      / max(agents - min(WARMUP, agents), 1), 1)})
        api = admin_client(reactor, proxy)
        await api.get_json("/v1/status")  # the connection is up before timing
        for case in ("lock", "role", "lock-api"):
            latencies, from_start, slowest, cpu_per_change = [], [], [], []
            for trial in range(trials):
                cpu_before = cpu_seconds(pid)
                if case == "lock-api":
                    # The same change through the API in this process: timed
                    # from its answer (no CLI start-up or exit in the way).
                    started = time.monotonic()
                    answer = await api.post_json("/v1/locks", {
                        "target": {"user": f"bench-api-{trial}"}, "message": "benchmark"})
                    returned = time.monotonic()
                    key = ("lock", answer["id"])
                elif case == "lock":
                    out, started, returned = await edgectl(proxy, "lock", "--user", f"bench-{trial}",
                                                  "--message", "benchmark")
                    key = ("lock", out.strip())
                else:
                    role = base / f"role{trial}.yaml"
                    name = f"bench-role-{trial}"
                    role.write_text(json.dumps({
                        "kind": "role", "version": "v1", "metadata": {"name": name},
                        "spec": {"allow": {"logins": ["bench"], "node_labels": {"*": "*"}}}}))
                    _, started, returned = await edgectl(proxy, "create", "-f", str(role))
                    key = ("role", name)
                await wait_all(reactor, arrivals, key, agents)
                cpu_per_change.append(cpu_seconds(pid) - cpu_before)
                times = [t - returned for t in arrivals.times[key]]
                latencies += times
                from_start += [t - started for t in arrivals.times[key]]
                slowest.append(max(times))
                await sleep(reactor, 1.0)
            emit({"benchmark": "control-plane", "case": case, "agents": agents,
                  "trials": trials,
                  "p50_s": round(percentile(latencies, 0.5), 3),
                  "p99_s": round(percentile(latencies, 0.99), 3),
                  "max_s": round(max(latencies), 3),
                  "slowest_agent_per_trial_s": [round(s, 3) for s in slowest],
                  "before_return_pct": round(100 * sum(1 for l in latencies if l < 0)
                                             / len(latencies), 1),
                  "from_edgectl_start_p50_s": round(percentile(from_start, 0.5), 3),
                  "from_edgectl_start_p99_s": round(percentile(from_start, 0.99), 3),
                  "from_edgectl_start_max_s": round(max(from_start), 3),
                  "proxy_cpu_s_per_change": round(statistics.mean(cpu_per_change), 3)})
        await api.close()
    finally:
        proxy.kill()
        if fleet is not None:
            await fleet.stop()


def main(argv: list[str]) -> int:
    """``python -m benchmarks control-plane``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks control-plane")
    parser.add_argument("--agents", type=int, default=1000, help="tunnelled agents (10000...)")
    parser.add_argument("--trials", type=int, default=5, help="changes of each kind")
    parser.add_argument("--window", type=float, default=30.0, help="idle CPU window, seconds")
    parser.add_argument("--concurrency", type=int, default=100,
                        help="agent handshakes in flight during the ramp")
    args = parser.parse_args(argv)
    limit = raise_fd_limit(args.agents + 2048)
    if limit < args.agents + 100:
        parser.error(f"fd limit {limit} is too low for {args.agents} agents")
    quiet_logs()
    with tempfile.TemporaryDirectory(prefix="edgeaccess-control-plane-") as tmp:
        run_reactor(lambda reactor: measure(reactor, Path(tmp), args.agents, args.trials,
                                            args.window, args.concurrency))
    return 0
