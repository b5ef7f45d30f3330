"""TLS routing on the tunnel port: one TLS listener, two protocols by ALPN.

The tunnel port (3024, TLS 1.3, client certificate required) serves:

- ``edge-tunnel/1``: the reverse tunnel of nodes and leaf clusters
  (:class:`~edgeaccess.tunnel.server.TunnelServerFactory`, unchanged);
- ``edge-ssh/1``: a user's SSH connection to a node, opened by OpenSSH's
  ``ProxyCommand openssl s_client ... -alpn edge-ssh/1 -servername %h``. The
  client certificate must be a ``user`` identity of this cluster; the TLS
  server name (SNI) is the target, ``NAME.CLUSTER`` or ``NAME.LEAF``; the
  proxy routes it like a ProxyJump ``direct-tcpip`` channel and splices
  bytes. The proxy runs no SSH layer of its own: the user's SSH session
  (and its certificate check, RBAC, audit) is end to end with the node.

:class:`ALPNDispatchFactory` is what ``TLSMemoryBIOFactory`` wraps: its
protocol waits for the handshake (``IHandshakeListener``), reads the
negotiated ALPN and puts the real protocol in its place as the TLS
wrapper's ``wrappedProtocol``. Any other ALPN (or none) is closed.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Mapping

from twisted.internet.interfaces import (
    IAddress,
    IHandshakeListener,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeaccess import tls
from edgeaccess.proxy.interfaces import IRouter
from edgeaccess.proxy.splice import no_delay
from edgeaccess.tunnel.fasttls import eager_tcp_writes, install_fast_tls
from edgeaccess.tunnel.protocol import format_source

_log = Logger()

#: ALPN of a user's SSH stream routed by the TLS server name.
ALPN_SSH = b"edge-ssh/1"

#: Longest TLS server name accepted as a target (DNS names are <= 253).
MAX_TARGET_LENGTH = 253


def _alpn_text(protocol: bytes | None) -> str:
    return "none" if protocol is None else protocol.decode("ascii", "replace")


@implementer(IHandshakeListener)
class ALPNDispatcher(Protocol):
    """Stands in for the application protocol until the TLS handshake is
    done, then hands the connection to the protocol of the negotiated ALPN."""

    def __init__(self, factory: ALPNDispatchFactory, addr: IAddress) -> None:
        self._factory = factory
        self._addr = addr

    def dataReceived(self, data: bytes) -> None:
        # TLS delivers no application data before handshakeCompleted, which
        # replaces this protocol; anything else is a bug, not a stream.
        _log.warn("application data before the TLS handshake completed; closing")
        self.transport.loseConnection()

    def handshakeCompleted(self) -> None:
        """Swap in the negotiated protocol (or close)."""
        transport = self.transport
        negotiated = getattr(transport, "negotiatedProtocol", None)
        factory = self._factory.factories.get(negotiated) if negotiated else None
        if factory is None:
            _log.info("refused a TLS connection from {peer}: ALPN {alpn} is not served here",
                      peer=transport.getPeer(), alpn=_alpn_text(negotiated))
            transport.loseConnection()
            return
        protocol = factory.buildProtocol(self._addr)
        if protocol is None:
            transport.loseConnection()
            return
        # TLSMemoryBIOProtocol delivers every later event to wrappedProtocol.
        transport.wrappedProtocol = protocol
        protocol.makeConnection(transport)
        if IHandshakeListener.providedBy(protocol):
            protocol.handshakeCompleted()


class ALPNDispatchFactory(Factory):
    """Builds :class:`ALPNDispatcher`; ``factories`` maps ALPN names to the
    factories of the protocols they select.

    :param factories: ``{b"edge-tunnel/1": tunnel_factory, b"edge-ssh/1": ...}``;
        the TLS options must offer the same ALPN names.
    """

    noisy = False

    def __init__(self, factories: Mapping[bytes, IProtocolFactory]) -> None:
        self.factories = dict(factories)

    def buildProtocol(self, addr: IAddress) -> ALPNDispatcher:
        return ALPNDispatcher(self, addr)

    def doStart(self) -> None:
        super().doStart()
        for factory in self.factories.values():
            factory.doStart()

    def doStop(self) -> None:
        for factory in self.factories.values():
            factory.doStop()
        super().doStop()


class UserRelayFactory(Factory):
    """Builds :class:`UserRelay` for ``edge-ssh/1`` connections.

    :param router: resolves the TLS server name (``IRouter.route_host``).
    :param cluster: this proxy's cluster: only its ``user`` certificates pass.
    :param clock: the time a certificate's validity is checked against.
    """

    noisy = False

    def __init__(self, router: IRouter, cluster: str, clock: IReactorTime) -> None:
        self.router = router
        self.cluster = cluster
        self.clock = clock

    def buildProtocol(self, addr: IAddress) -> UserRelay:
        return UserRelay(self)


def _stop_relaying(transport: Any) -> None:
    """Unregister the peer producer, then close: a TLS transport with a
    producer registered postpones its close until it is unregistered."""
    if transport is None:
        return
    try:
        transport.unregisterProducer()
    except Exception:  # already gone
        pass
    transport.loseConnection()


class _NodeSide(Protocol):
    """The connection to the node; its bytes go to the user unchanged."""

    def __init__(self, user: UserRelay) -> None:
        self.user = user

    def dataReceived(self, data: bytes) -> None:
        self.user.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:
        user, self.user = self.user, None
        if user is not None:
            user.node_lost()


class UserRelay(Protocol):
    """One user's SSH stream, spliced onto the route to its node.

    The TLS layer has no half-close in Twisted (a transport's
    ``loseWriteConnection`` would skip TLS), so EOF from either side closes
    the whole relay once pending bytes are written; SSH needs no more.
    """

    def __init__(self, factory: UserRelayFactory) -> None:
        self.factory = factory
        self.node: _NodeSide | None = None
        self.pending: list[bytes] = []
        self.lost = False
        self.user = "-"
        self.target = "-"
        self.source: str | None = None
        self._endpoint: Any = None

    def _log_decision(self, outcome: str, route: str | None = None) -> None:
        _log.info("tls route user={user} peer={peer} target={target} route={route} "
                  "outcome={outcome}", user=self.user, peer=self.source or "-",
                  target=self.target, route=route or "-", outcome=outcome)

    def _refuse(self, why: str) -> None:
        self._log_decision(f"refused: {why}")
        self.transport.loseConnection()

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.source = format_source(getattr(peer, "host", ""), getattr(peer, "port", -1))
        identity = tls.peer_identity(self.transport)
        if identity is not None:
            self.user = f"{identity.kind}:{identity.name}"
        if identity is None or identity.kind != "user":
            self._refuse("only user certificates may open edge-ssh/1 streams")
            return
        if identity.cluster != self.factory.cluster:
            self._refuse(f"certificate of cluster {identity.cluster}")
            return
        self.user = identity.name
        why = self._certificate_expired()
        if why:
            self._refuse(why)
            return
        target = self._server_name()
        if not target:
            self._refuse("no target: the TLS server name (SNI) must be NODE.CLUSTER")
            return
        self.target = target
        # Hold the user's bytes until the node side exists.
        self.transport.pauseProducing()
        factory = Factory.forProtocol(lambda: _NodeSide(self))
        factory.noisy = False
        try:
            if self.source is None:
                self._endpoint = self.factory.router.route_host(target, kind="ssh")
            else:
                self._endpoint = self.factory.router.route_host(target, kind="ssh",
                                                                source=self.source)
            d = self._endpoint.connect(factory)
        except Exception:  # the router refused at once
            self._failed(Failure())
            return
        d.addCallbacks(self._connected, self._failed)

    def _certificate_expired(self) -> str | None:
        # OpenSSL already refused an expired certificate at the handshake;
        # a long-lived connection is checked against the injected clock too.
        cert = tls.peer_certificate(self.transport)
        now = datetime.fromtimestamp(self.factory.clock.seconds(), timezone.utc)
        if cert is None:
            return "no client certificate"
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            return "client certificate is not valid now"
        return None

    def _server_name(self) -> str | None:
        handle = getattr(self.transport, "getHandle", None)
        name = handle().get_servername() if handle is not None else None
        if not name or len(name) > MAX_TARGET_LENGTH:
            return None
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            return None
        if not all(c.isalnum() or c in "-._" for c in text):
            return None
        return text

    def dataReceived(self, data: bytes) -> None:
        if self.node is None:
            self.pending.append(data)
            return
        self.node.transport.write(data)

    def _connected(self, node: _NodeSide) -> None:
        route = getattr(self._endpoint, "route_kind", None)
        if self.lost:
            self._log_decision("user left while connecting", route)
            node.user = None
            node.transport.loseConnection()
            return
        self.node = node
        self._log_decision("ok", route)
        # A relay must not add Nagle delays of its own: the SSH client and
        # the node already decide how to coalesce (stunnel does the same).
        for transport in (self.transport, node.transport):
            no_delay(transport)
        # Bulk bytes: large TLS reads and writes, eager TCP writes.
        install_fast_tls(self.transport, self.factory.clock)
        eager_tcp_writes(node.transport)
        # Each side's write buffer pauses the other side's reading.
        self.transport.registerProducer(node.transport, True)
        node.transport.registerProducer(self.transport, True)
        pending, self.pending = self.pending, []
        for data in pending:
            node.transport.write(data)
        self.transport.resumeProducing()

    def _failed(self, reason: Failure) -> None:
        route = getattr(self._endpoint, "route_kind", None)
        self._log_decision(f"refused: {reason.getErrorMessage()}", route)
        if not self.lost:
            self.transport.loseConnection()

    def node_lost(self) -> None:
        """The node closed: close the user's stream after pending bytes."""
        self.node = None
        if not self.lost:
            _stop_relaying(self.transport)

    def connectionLost(self, reason: Failure) -> None:
        self.lost = True
        node, self.node = self.node, None
        if node is not None:
            node.user = None
            _stop_relaying(node.transport)


def tls_routing_factory(tunnel_factory: IProtocolFactory, router: IRouter, cluster: str,
                        clock: IReactorTime,
                        tunnel_alpn: bytes = b"edge-tunnel/1") -> ALPNDispatchFactory:
    """The tunnel port's factory: reverse tunnels and users' SSH streams.

    :param tunnel_factory: serves ``tunnel_alpn`` (the reverse tunnel).
    :param router: routes ``edge-ssh/1`` streams by their TLS server name.
    """
    return ALPNDispatchFactory({
        tunnel_alpn: tunnel_factory,
        ALPN_SSH: UserRelayFactory(router, cluster, clock),
    })
