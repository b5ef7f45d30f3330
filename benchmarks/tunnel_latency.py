"""Latency a reverse tunnel adds: small round trips, and ``ssh NODE true`` setup.

``python -m benchmarks tunnel-latency [--rounds 5000] [--size 1024] [--setup-runs 20]``

1. Round trips (``case: echo``): one process, the tunnel library over real
   TLS 1.3 on loopback (mutual certificates, ALPN ``edge-tunnel/1``, as in
   ``tests/tunnel/test_tls_loopback.py``). The proxy side opens a channel to
   the agent, whose echo protocol is served in the agent process itself (as
   the node serves SSH); the baseline is a direct TCP connection to the same
   echo protocol. Each round trip writes ``--size`` bytes and waits for all of
   them back; p50/p99/mean over ``--rounds`` after 200 warm-up rounds, the two
   paths interleaved in blocks. ``--nodelay`` sets TCP_NODELAY on the
   tunnel's connection once more (left from the experiment that made the
   product set it at every tunnel's connection: no difference now).
2. Setup (``case: ssh-setup``): ``ssh ... true`` against a real cluster,
   median of ``--setup-runs``: through proxy + tunnel (``tnode``), through
   the proxy to a direct-mode node (``dnode``), direct to ``dnode``, and the C
   path (OpenSSH jump through ``sshd`` + stunnel pair to ``dnode``), and TLS
   routing (the ``ProxyCommand`` ``edgeaccess/client/tlsroute.py`` to the
   proxy's tunnel port, ALPN ``edge-ssh/1``) to ``tnode`` and ``dnode``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import time
from datetime import datetime, timedelta, timezone

from benchmarks._tunnel_env import compared_paths, emit


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _echo_rounds(rounds: int, size: int, block: int = 500,
                 nodelay: bool = False) -> dict[str, list[float]]:
    """Run the in-process measurement; returns round-trip times (ms) per path."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, inlineCallbacks
    from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
    from twisted.internet.protocol import Factory, Protocol
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from edgeaccess import tls
    from edgeaccess.pki.keys import generate_private_key
    from edgeaccess.pki.x509ca import Identity, create_ca, issue_identity_certificate
    from edgeaccess.tunnel.agent import TunnelAgent
    from edgeaccess.tunnel.endpoints import TunnelChannelEndpoint
    from edgeaccess.tunnel.protocol import ALPN_PROTOCOL, Inventory
    from edgeaccess.tunnel.server import TunnelServerFactory

    class Echo(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)

    class PingPong(Protocol):
        """Writes ``size`` bytes, waits for them back, ``count`` times."""

        def __init__(self) -> None:
            self.samples: list[float] = []
            self.payload = b"x" * size
            self.pending = 0
            self.count = 0
            self.done: Deferred[list[float]] | None = None
            self.ready: Deferred[None] = Deferred()

        def connectionMade(self) -> None:
            self.ready.callback(None)

        def go(self, count: int) -> Deferred[list[float]]:
            self.samples, self.count, self.done = [], count, Deferred()
            self._send()
            return self.done

        def _send(self) -> None:
            self.pending = size
            self.started = time.perf_counter()
            self.transport.write(self.payload)

        def dataReceived(self, data: bytes) -> None:
            self.pending -= len(data)
            if self.pending > 0:
                return
            self.samples.append((time.perf_counter() - self.started) * 1000.0)
            if len(self.samples) < self.count:
                self._send()
            else:
                done, self.done = self.done, None
                done.callback(self.samples)

    now = datetime.now(timezone.utc)
    ca_key, ca_cert = create_ca("bench", now)
    material = {}
    for label, identity, dns in (
        ("proxy", Identity(kind="proxy", name="proxy", cluster="bench"), ("localhost",)),
        ("node", Identity(kind="node", name="n1", cluster="bench", uuid="u1"), ()),
    ):
        key = generate_private_key()
        material[label] = (key, issue_identity_certificate(
            ca_key, ca_cert, key.public_key(), identity, now=now, ttl=timedelta(hours=1),
            dns_names=dns))
    server_options = tls.server_options(*material["proxy"], [ca_cert],
                                        client_certificates="required", alpn=[ALPN_PROTOCOL])
    tunnels = TunnelServerFactory(clock=reactor, identity_for=tls.peer_identity)
    port = reactor.listenTCP(0, TLSMemoryBIOFactory(server_options, False, tunnels),
                             interface="127.0.0.1")
    echo_port = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
    client_options = tls.client_options("localhost", [ca_cert], cluster="bench", key=material["node"][0],
                                        cert=material["node"][1], alpn=[ALPN_PROTOCOL])
    agent = TunnelAgent(
        endpoint_factory=lambda: wrapClientTLS(
            client_options, TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)),
        inventory=Inventory(name="n1"), clock=reactor, rng=random.Random(),
        accept_channel=lambda kind, target: Factory.forProtocol(Echo))
    result: dict[str, list[float]] = {"tunnel": [], "tcp": []}
    failure = []

    @inlineCallbacks
    def measure():
        agent.startService()
        try:
            yield agent.when_connected().addTimeout(15, reactor)
            proxy_side = tunnels.registry.lookup("bench", "n1")
            if nodelay:  # the TLS wrapper passes this through to the TCP transport
                for tunnel in (proxy_side, agent.tunnel):
                    tunnel.transport.setTcpNoDelay(True)
            clients = {}
            for name, endpoint in (
                ("tunnel", TunnelChannelEndpoint(proxy_side, "ssh", "n1")),
                ("tcp", TCP4ClientEndpoint(reactor, "127.0.0.1", echo_port.getHost().port)),
            ):
                protocol = yield endpoint.connect(Factory.forProtocol(PingPong))
                yield protocol.ready if not protocol.ready.called else None
                yield protocol.go(200)  # warm-up
                clients[name] = protocol
            left = rounds
            while left > 0:
                count = min(block, left)
                for name, protocol in clients.items():
                    samples = yield protocol.go(count)
                    result[name].extend(samples)
                left -= count
            for protocol in clients.values():
                protocol.transport.loseConnection()
        except Exception as e:  # reported by the caller
            failure.append(e)
        finally:
            yield agent.stopService()
            yield port.stopListening()
            yield echo_port.stopListening()
            reactor.stop()

    reactor.callWhenRunning(measure)
    reactor.run()
    if failure:
        raise failure[0]
    return result


def echo_results(rounds: int, size: int, nodelay: bool = False) -> list[dict]:
    """The ``echo`` results: per path and the tunnel's added latency."""
    samples = _echo_rounds(rounds, size, nodelay=nodelay)
    out = []
    for path in ("tcp", "tunnel"):
        s = samples[path]
        out.append({"benchmark": "tunnel-latency", "case": "echo", "path": path,
                    "bytes": size, "rounds": len(s), "tunnel_nodelay": nodelay,
                    "p50_ms": round(_percentile(s, 0.5), 4),
                    "p99_ms": round(_percentile(s, 0.99), 4),
                    "mean_ms": round(statistics.fmean(s), 4)})
    tcp, tunnel = out
    out.append({"benchmark": "tunnel-latency", "case": "echo", "path": "added-by-tunnel",
                "bytes": size,
                "p50_ms": round(tunnel["p50_ms"] - tcp["p50_ms"], 4),
                "p99_ms": round(tunnel["p99_ms"] - tcp["p99_ms"], 4)})
    return out


def setup_results(runs: int) -> list[dict]:
    """``ssh ... true`` through each path of a real cluster, median of ``runs``."""
    out = []
    with compared_paths("edgeaccess-tunnel-latency-") as (cluster, cpath, commands):
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(runs + 1):  # the first round warms caches, not counted
            for name, argv in commands.items():
                start = time.monotonic()
                result = subprocess.run(argv + ["true"], capture_output=True, text=True,
                                        timeout=60, stdin=subprocess.DEVNULL)
                elapsed = (time.monotonic() - start) * 1000.0
                if result.returncode != 0:
                    raise RuntimeError(f"{name}: {result.stderr[-1000:]}")
                samples[name].append(elapsed)
        direct = statistics.median(samples["direct"][1:])
        for name, values in samples.items():
            median = statistics.median(values[1:])
            out.append({"benchmark": "tunnel-latency", "case": "ssh-setup", "path": name,
                        "runs": runs, "median_ms": round(median, 1),
                        "p90_ms": round(_percentile(values[1:], 0.9), 1),
                        "added_vs_direct_ms": round(median - direct, 1)})
    return out


def main(argv: list[str]) -> int:
    """``python -m benchmarks tunnel-latency``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks tunnel-latency")
    parser.add_argument("--rounds", type=int, default=5000, help="echo round trips per path")
    parser.add_argument("--size", type=int, default=1024, help="bytes per round trip")
    parser.add_argument("--setup-runs", type=int, default=20, help="ssh true runs per path")
    parser.add_argument("--nodelay", action="store_true",
                        help="set TCP_NODELAY on the tunnel's TCP connection (both ends)")
    parser.add_argument("--skip-echo", action="store_true")
    parser.add_argument("--skip-setup", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_setup:  # before the reactor runs (it cannot be restarted)
        for result in setup_results(args.setup_runs):
            emit(result)
    if not args.skip_echo:
        for result in echo_results(args.rounds, args.size, args.nodelay):
            emit(result)
    return 0
