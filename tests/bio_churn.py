"""Run by tests/test_internals.py in a child process under glibc's heap checks
(``MALLOC_CHECK_=3``): makes mutual TLS connections in memory, swaps the memory
BIOs of each (``shrink_tls_buffers``), moves data, drops them.

``python tests/bio_churn.py safe N`` prints ``swapped N`` and exits 0 when no
BIO is freed twice. ``owned N`` is the negative control: it makes each
connection's BIOs owned by Python (what a pyOpenSSL that freed them itself
would do) and bypasses the ownership guard, so the swapped BIOs are freed twice
and the child dies.
"""

from __future__ import annotations

import gc
import sys

from OpenSSL._util import ffi, lib
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient

from edgeaccess import internals, tls
from tests.pkitools import Identity, issue_identities


def main(mode: str, count: int) -> int:
    pki = issue_identities([
        ("proxy", Identity(kind="proxy", name="proxy.test", cluster="root"), ("proxy.test",)),
        ("node", Identity(kind="node", name="node-1", cluster="root", uuid="u-1"), ()),
    ])
    key, cert = pki["proxy"]
    node_key, node_cert = pki["node"]
    server_options = tls.server_options(key, cert, [pki["ca"]], client_certificates="required")
    client_options = tls.client_options("proxy.test", [pki["ca"]], cluster="root", key=node_key, cert=node_cert)
    if mode == "owned":
        internals._bio_ownership_problem = lambda connection: None
    swapped = 0
    for _ in range(count):
        clock = MemoryReactorClock()
        server = TLSMemoryBIOFactory(server_options, False, Factory.forProtocol(Protocol),
                                     clock=clock).buildProtocol(None)
        client = TLSMemoryBIOFactory(client_options, True, Factory.forProtocol(Protocol),
                                     clock=clock).buildProtocol(None)
        _, _, pump = connectedServerAndClient(lambda: server, lambda: client)
        for _ in range(3):
            clock.advance(0)
            pump.flush()
        connection = server.getHandle()
        if mode == "owned":
            connection._into_ssl = ffi.gc(connection._into_ssl, lib.BIO_free)
            connection._from_ssl = ffi.gc(connection._from_ssl, lib.BIO_free)
        swapped += tls.shrink_tls_buffers(server)
        client.write(b"x" * 1000)
        clock.advance(0)
        pump.flush()
        del server, client, pump, connection
        gc.collect()
    print("swapped", swapped)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
