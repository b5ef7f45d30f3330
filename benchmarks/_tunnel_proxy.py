"""``twistd`` with a raised fd limit and, optionally, a shorter tunnel heartbeat.

``python benchmarks/_tunnel_proxy.py [--nofile N] [--tunnel-heartbeat S] [--tunnel-nodelay] -- TWISTD-ARGS``

The reverse-tunnel benchmarks start ``twistd -n edgeproxy`` through this
wrapper: thousands of agents need more than the default 1,024 descriptors,
and the proxy has no option for its tunnel heartbeat interval
(``TunnelServerFactory(heartbeat_interval=30.0)``); agents adopt the
interval the proxy answers to their Hello. ``--tunnel-nodelay`` (an
experiment, for the proxy and the tunnelled node) sets TCP_NODELAY on every
tunnel connection.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    """Apply the limits, then run twistd with the remaining arguments."""
    if "--" not in argv:
        raise SystemExit("usage: _tunnel_proxy.py [--nofile N] [--tunnel-heartbeat S] -- ARGS")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="_tunnel_proxy")
    parser.add_argument("--nofile", type=int, default=0)
    parser.add_argument("--tunnel-heartbeat", type=float, default=0.0)
    parser.add_argument("--tunnel-nodelay", action="store_true")
    args = parser.parse_args(argv[:split])
    if args.nofile:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = args.nofile if hard == resource.RLIM_INFINITY else min(args.nofile, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    if args.tunnel_heartbeat:
        from edgeaccess.tunnel.server import TunnelServerFactory

        TunnelServerFactory.__init__.__kwdefaults__["heartbeat_interval"] = args.tunnel_heartbeat
    if args.tunnel_nodelay:
        _set_nodelay_on_tunnels()
    sys.argv = ["twistd", *argv[split + 1:]]
    from twisted.scripts.twistd import run

    run()


def _set_nodelay_on_tunnels() -> None:
    """Experiment: TCP_NODELAY on every tunnel connection (the product sets none)."""
    from edgeaccess.tunnel.connection import TunnelConnection

    original = TunnelConnection.connectionMade

    def connectionMade(self) -> None:
        original(self)
        try:
            self.transport.setTcpNoDelay(True)  # TLS wrapper -> TCP transport
        except Exception:
            pass

    TunnelConnection.connectionMade = connectionMade


if __name__ == "__main__":
    main(sys.argv[1:])
