"""The edgeaccess node SSH server, alone in its process, for benchmarks.

``python -m benchmarks._node_server DIR [--stock]`` reads ``DIR/host_key``
(OpenSSH private key) and ``DIR/user_ca.pub``, listens on an ephemeral port of
127.0.0.1 and prints ``PORT <n>`` once listening.  Every certificate from the
user CA may log in as root.  ``--stock`` swaps in Conch's own transport and
process protocol, to measure what edgeaccess.ssh.transport/process gain.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint


def main(argv: list[str]) -> None:
    """Start the node SSH server and run the reactor."""
    from edgeaccess.pki.keys import load_private_key
    from edgeaccess.ssh import session as node_session
    from edgeaccess.ssh.interfaces import SessionPermissions, StaticAuthorizer
    from edgeaccess.ssh.server import make_node_ssh_factory

    directory = Path(argv[0])
    host_key = load_private_key((directory / "host_key").read_bytes())
    ca_line = (directory / "user_ca.pub").read_bytes()
    authorizer = StaticAuthorizer(
        {("*", "root"): SessionPermissions(record_session=False)}
    )
    factory = make_node_ssh_factory(
        host_key,
        None,
        lambda: [ca_line],
        authorizer,
        "bench-node",
        reactor,
        reactor=reactor,
    )
    if "--stock" in argv:
        from twisted.conch.ssh.session import SSHSessionProcessProtocol
        from twisted.conch.ssh.transport import SSHServerTransport

        factory.protocol = SSHServerTransport
        node_session.NodeSessionChannel.process_protocol = SSHSessionProcessProtocol

    def listening(port) -> None:
        print(f"PORT {port.getHost().port}", flush=True)

    TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory).addCallback(
        listening
    )
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
