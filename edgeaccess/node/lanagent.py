"""The agent port of a LAN node: the proxy dials it for ``kube`` and ``app`` channels.

A node in direct mode (``--auth-server`` is the auth API, the proxy dials
the node) that publishes a Kubernetes cluster or web apps listens on
``--agent-listen`` (default: the SSH listen host, port :data:`AGENT_PORT`).
The proxy connects over mutual TLS 1.3 (ALPN :data:`ALPN_AGENT`) and the
connection speaks the reverse tunnel's own protocol
(:class:`~edgeaccess.tunnel.agent.AgentTunnelProtocol` over
:class:`~edgeaccess.tunnel.connection.TunnelConnection`): only the TCP
direction is turned round. The node is the agent (it says ``Hello`` with its
inventory and pings), the proxy opens channels, and the node checks each
one with the same acceptor as over a tunnel.

Who is who (docs/security.md, "Who trusts whom"): the node presents its
*server* certificate (kind ``node``, EKU serverAuth, the addresses it
joined with); it accepts only a *client* certificate of kind ``proxy`` of
its own cluster (EKU clientAuth), checked in the handshake's verify
callback, so anyone else's handshake fails before a byte of the protocol
is exchanged.
"""

from __future__ import annotations

from typing import Callable

from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from edgeaccess import tls
from edgeaccess.pki import x509ca
from edgeaccess.tunnel.agent import AgentTunnelProtocol
from edgeaccess.tunnel.protocol import Inventory

_log = Logger()

#: Default port of the agent listener (next to the proxy's 3026).
AGENT_PORT = 3027
#: ALPN of the proxy's connection to a LAN agent (its own, so a tunnel port
#: and an agent port can never be mistaken for one another).
ALPN_AGENT = b"edge-agent/1"


def check_proxy_client(cert, cluster: str) -> x509ca.Identity:
    """The identity of a client certificate (already verified against the
    cluster CA) if it is a proxy's *client* certificate of ``cluster``.

    :raises ValueError: saying what it is instead.
    """
    identity = x509ca.identity_from_certificate(cert)
    if identity.kind != "proxy":
        raise ValueError(f"a {identity.kind} certificate ({identity.name}), not a proxy's")
    if identity.cluster != cluster:
        raise ValueError(f"a proxy certificate of cluster {identity.cluster}, not {cluster}")
    if ExtendedKeyUsageOID.CLIENT_AUTH not in x509ca.extended_key_usages(cert):
        raise ValueError("a proxy certificate that is not for clients")
    return identity


@implementer(IOpenSSLServerConnectionCreator)
class AgentServerTLS:
    """The agent port's TLS: the node's current server certificate, a
    required client certificate from the cluster CA, proxies of this cluster only.

    :param credentials: ``() -> (key, server_certificate, ca_certs)``, asked
        for each connection: a renewed certificate is used from the next one on.
    """

    def __init__(self, credentials: Callable[[], tuple], cluster: str) -> None:
        self._credentials = credentials
        self.cluster = cluster
        self._cached: tuple = (None, None)

    def _context(self):
        key, cert, ca_certs = self._credentials()
        if self._cached[0] is not cert:
            options = tls.server_options(key, cert, ca_certs, client_certificates="required",
                                         alpn=[ALPN_AGENT])
            self._cached = (cert, options.getContext())
        return self._cached[1]

    def serverConnectionForTLS(self, tlsProtocol):  # noqa: N802 (Twisted interface)
        connection = SSL.Connection(self._context(), None)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                              self._verify(tlsProtocol))
        return connection

    def _verify(self, tls_protocol):
        def verify(connection, certificate, error_number, depth, ok) -> bool:
            if depth != 0:
                return bool(ok)
            peer = tls_protocol.transport.getPeer() if tls_protocol.transport else None
            address = getattr(peer, "host", "?")
            try:
                # Even when OpenSSL refused it (e.g. a server-only certificate:
                # "unsupported purpose"), to say what the client really is.
                check_proxy_client(certificate.to_cryptography(), self.cluster)
            except Exception as e:  # never raise into OpenSSL's callback
                _log.warn("agent port: refused {addr}: it presented {what}", addr=address,
                          what=e)
                return False
            if not ok:
                _log.warn("agent port: refused {addr}: its certificate does not verify "
                          "against the cluster CA (X.509 error {error})", addr=address,
                          error=error_number)
                return False
            return True

        return verify


class LanAgentFactory(Factory):
    """Builds the node's side of each proxy connection (see the module docstring).

    :param inventory: ``() -> Inventory`` (what the node serves now).
    :param accept_channel: ``(kind, target) -> factory`` (raises to refuse).
    """

    def __init__(self, *, clock, inventory: Callable[[], Inventory], accept_channel,
                 heartbeat_interval: float = 30.0, max_channels: int = 256) -> None:
        self.clock = clock
        self.inventory = inventory
        self.accept_channel = accept_channel
        self.heartbeat_interval = heartbeat_interval
        self.max_channels = max_channels

    def buildProtocol(self, addr) -> AgentTunnelProtocol:
        protocol = AgentTunnelProtocol(
            clock=self.clock, inventory=self.inventory(), accept_channel=self.accept_channel,
            heartbeat_interval=self.heartbeat_interval, max_channels=self.max_channels)
        # Nobody waits on the Hello of a connection the proxy made: a refused
        # or dropped one is the proxy's to report (and it logs it there).
        protocol.ready.addErrback(lambda failure: _log.debug(
            "agent port: a connection from {addr} ended before its Hello: {why}",
            addr=addr, why=failure.getErrorMessage()))
        return protocol


def agent_server_factory(factory: LanAgentFactory, server_tls: AgentServerTLS):
    """The TCP factory of the agent port: TLS (proxies only), then the protocol."""
    return TLSMemoryBIOFactory(server_tls, False, factory)
