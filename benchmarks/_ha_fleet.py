"""One load-generator process for ``benchmarks ha --cases idle``: N idle agents to one proxy.

``python -m benchmarks._ha_fleet BACKEND_URL CA_KEY_FILE TUNNEL_ADDR CLUSTER NODES CONCURRENCY STATUS_FILE``

A process holds at most ~20,000 descriptors here (the hard limit cannot be
raised), so each proxy's 10,000 tunnels come from a process of their own.
Node certificates are issued from the cluster's CA, read from the shared
PostgreSQL backend with the CA key, as in ``tunnel-idle``; the process writes ``{"connected": N}`` to STATUS_FILE every
0.5 s and runs until SIGTERM.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from benchmarks.tunnel_idle import Fleet, quiet_logs, raise_fd_limit, run_reactor, sleep


class _Proxy:
    """What :class:`Fleet` reads of a proxy: its tunnel address and the CAs."""

    def __init__(self, url: str, ca_key_file: str, tunnel_addr: str, cluster: str) -> None:
        self.url = url
        self.ca_key_file = ca_key_file
        self._tunnel = tunnel_addr
        self.cluster = cluster

    def addr(self, name: str) -> str:
        assert name == "tunnel"
        return self._tunnel

    def authority(self):
        """The cluster's CAs, private keys included, from the shared backend."""
        import psycopg

        from edgeaccess.pki import castore

        with psycopg.connect(self.url) as connection:
            (value,) = connection.execute("SELECT value FROM items WHERE key = %s",
                                          (castore.AUTHORITIES_KEY,)).fetchone()
        key = castore.parse_ca_key(Path(self.ca_key_file).read_text(), "the CA key file")
        return castore.open_authority(bytes(value), self.cluster, key)


def main(argv: list[str]) -> int:
    url, ca_key_file, tunnel_addr, cluster, nodes, concurrency, status = argv
    raise_fd_limit(int(nodes) + 1024)
    quiet_logs()

    async def run(reactor) -> None:
        fleet = Fleet(reactor, _Proxy(url, ca_key_file, tunnel_addr, cluster), int(nodes),
                      int(concurrency))
        stopping = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))

        async def report() -> None:
            while not stopping:
                Path(status).write_text(json.dumps({"connected": fleet.connected()}))
                await sleep(reactor, 0.5)

        from twisted.internet.defer import Deferred

        reporting = Deferred.fromCoroutine(report())
        await fleet.ramp(int(nodes))
        await reporting
        await fleet.stop()

    run_reactor(run)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
