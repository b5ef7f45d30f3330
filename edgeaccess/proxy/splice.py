"""Splice an inbound stream onto an outbound endpoint, with backpressure
and half-close in both directions.

Used where a proxy relays bytes it does not interpret: a leaf proxy
relaying a root user's SSH connection from the root's tunnel to a leaf
node. Each transport is registered as the producer of the other, so a
slow reader on either side pauses the opposite writer instead of growing
a buffer.
"""

from __future__ import annotations

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

_log = Logger()


@implementer(IHalfCloseableProtocol)
class _Half(Protocol):
    """One side of a splice."""

    def __init__(self) -> None:
        self.peer: _Half | None = None
        self.read_closed = False
        self.write_closed = False

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def readConnectionLost(self) -> None:
        self.read_closed = True
        peer = self.peer
        if peer is None or peer.transport is None:
            return
        lose_write = getattr(peer.transport, "loseWriteConnection", None)
        if isinstance(peer.transport, TLSMemoryBIOProtocol):
            # Twisted's TLS passes loseWriteConnection straight to TCP,
            # ahead of TLS data still buffered: close the whole stream.
            lose_write = None
        if lose_write is not None and not peer.write_closed:
            peer.write_closed = True
            lose_write()
        else:
            peer.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        if self.read_closed:
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            if peer.transport is not None:
                peer.transport.loseConnection()


def _link(a: _Half, b: _Half) -> None:
    a.peer, b.peer = b, a
    # a's transport pauses b's transport when a's outgoing buffer is full.
    a.transport.registerProducer(b.transport, True)
    b.transport.registerProducer(a.transport, True)


class SpliceFactory(Factory):
    """Each inbound connection is spliced onto a new connection to
    ``endpoint_for()`` (called once per inbound connection; with
    ``with_peer``, called with the inbound connection's peer address, e.g.
    a tunnel channel's, which carries the user's source address)."""

    def __init__(self, endpoint_for, description: str = "", *, with_peer: bool = False) -> None:
        self.endpoint_for = endpoint_for
        self.description = description
        self.with_peer = with_peer

    def buildProtocol(self, addr):
        inbound = _Inbound(self)
        return inbound


class _Inbound(_Half):
    def __init__(self, factory: SpliceFactory) -> None:
        super().__init__()
        self.factory = factory
        self.pending: list[bytes] = []
        self.lost = False

    def connectionLost(self, reason) -> None:
        self.lost = True
        super().connectionLost(reason)

    def connectionMade(self) -> None:
        # Hold the inbound side until the outbound one exists.
        self.transport.pauseProducing()
        try:
            if self.factory.with_peer:
                endpoint = self.factory.endpoint_for(self.transport.getPeer())
            else:
                endpoint = self.factory.endpoint_for()
            d = endpoint.connect(Factory.forProtocol(_Half))
        except Exception as e:  # routing refused at once
            self._failed(e)
            return
        d.addCallbacks(self._connected, self._failed_failure)

    def dataReceived(self, data: bytes) -> None:
        if self.peer is None:
            self.pending.append(data)
            return
        super().dataReceived(data)

    def _connected(self, outbound: _Half) -> None:
        if self.lost:
            outbound.transport.loseConnection()
            return
        _link(self, outbound)
        for data in self.pending:
            outbound.transport.write(data)
        self.pending = []
        if self.read_closed:
            self.readConnectionLost()
        self.transport.resumeProducing()

    def readConnectionLost(self) -> None:
        self.read_closed = True
        if self.peer is not None:
            super().readConnectionLost()

    def _failed_failure(self, failure) -> None:
        self._failed(failure.value)

    def _failed(self, error: Exception) -> None:
        _log.info("relay to {what} failed: {why}", what=self.factory.description,
                  why=error)
        self.transport.loseConnection()


# --- what the HTTP relays (Kubernetes, apps) share ----------------------------------------


def no_delay(transport) -> None:
    """TCP_NODELAY where the transport (or the TCP under a TLS one) is TCP: a
    request or an answer written in pieces must not wait for a delayed ACK."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is None:
        return
    try:
        set_no_delay(True)
    except Exception:  # not a socket (a tunnel channel, a test transport)
        pass


def tune_transport(transport, clock=None, *, fast_tls: bool = True) -> None:
    """A relayed connection's transport: Nagle off; with ``fast_tls`` (a TLS
    transport after its handshake) TLS read and written in large pieces,
    else a plain TCP transport's writes go to the socket at once
    (``edgeaccess.tunnel.fasttls``)."""
    from edgeaccess.tunnel.fasttls import eager_tcp_writes, install_fast_tls

    no_delay(transport)
    if not (fast_tls and install_fast_tls(transport, clock)):
        eager_tcp_writes(transport)


class ProducerShim:
    """Pauses and resumes a transport for a consumer, but never stops it (a
    pooled or shared connection outlives the one it serves)."""

    def __init__(self, transport) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass
