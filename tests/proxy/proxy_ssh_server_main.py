"""Run the proxy's SSH service for the OpenSSH end-to-end tests.

``python proxy_ssh_server_main.py CONFIG.json`` listens on 127.0.0.1:0,
prints ``PORT <n>`` on stdout once listening and logs to ``<config>.log``.
The config names the host key and certificate files, the trusted user CA
lines, the cluster name and the nodes (``name``, ``uuid``, ``address``).
"""

from __future__ import annotations

import json
import sys

from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.logger import globalLogBeginner, textFileLogObserver

from edgeaccess.errors import NodeOffline
from edgeaccess.pki.keys import load_private_key
from edgeaccess.pki.sshca import load_certificate
from edgeaccess.proxy.router import Router
from edgeaccess.proxy.sshproxy import make_proxy_ssh_factory
from tests.serverscript import serve_on_ephemeral_port


def main(config_path: str) -> None:
    with open(config_path) as f:
        config = json.load(f)
    log_file = open(config_path + ".log", "a", buffering=1)
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(log_file)], redirectStandardIO=False
    )
    with open(config["host_key"], "rb") as f:
        host_key = load_private_key(f.read())
    with open(config["host_cert"], "rb") as f:
        host_cert = load_certificate(f.read())
    nodes = config["nodes"]

    def node_lookup(name: str):
        for node in nodes:
            if name in (node["name"], node["uuid"]):
                return succeed(node)
        return succeed(None)

    def no_tunnels(cluster, node, **kwargs):
        raise NodeOffline(f"node {node['name']}.{cluster} is offline")

    router = Router(config["cluster"], node_lookup, no_tunnels, reactor=reactor)
    factory = make_proxy_ssh_factory(
        host_key,
        host_cert,
        [line.encode() for line in config["user_cas"]],
        router,
        reactor,
    )
    serve_on_ephemeral_port(reactor, factory)


if __name__ == "__main__":
    main(sys.argv[1])
