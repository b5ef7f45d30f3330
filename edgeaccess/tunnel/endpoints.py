"""Endpoints over tunnel channels: how the router hands out a route to a tunnelled node.

``TunnelChannelEndpoint(tunnel, "ssh", "node-1:22").connect(factory)`` opens
a channel and connects the factory's protocol to it, exactly as a TCP
endpoint would; SSH splicing, the kube proxy and the app proxy need not know
the difference.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from zope.interface import implementer

from edgeaccess.errors import NodeOffline
from edgeaccess.tunnel.interfaces import ITunnel


@implementer(IStreamClientEndpoint)
class TunnelChannelEndpoint:
    """Connects to ``target`` through a channel of ``kind`` on ``tunnel``.

    :param tunnel: an :class:`~edgeaccess.tunnel.interfaces.ITunnel` (or
        None, for a node whose tunnel is down: connecting then fails with
        :class:`~edgeaccess.errors.NodeOffline`).
    :param source: the address (``"ip:port"``) of the user this connection
        is for; the far end's channel reports it as its peer (a node's audit
        events and certificate ``source-address`` checks). None: unknown.
    """

    def __init__(
        self, tunnel: ITunnel | None, kind: str, target: str, source: str | None = None
    ) -> None:
        self.tunnel = tunnel
        self.kind = kind
        self.target = target
        self.source = source

    def __repr__(self) -> str:
        return f"<TunnelChannelEndpoint {self.kind}:{self.target!r} via {self.tunnel!r}>"

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """Open the channel; fires with the connected protocol.

        Fails with AccessDenied or NotFound (the far end refused),
        BadRequest, or NodeOffline (no tunnel, or it closed meanwhile).
        """
        if self.tunnel is None:
            return fail(NodeOffline("the node's tunnel is not connected"))
        if self.source is None:
            return self.tunnel.connect_channel(self.kind, self.target, protocolFactory)
        return self.tunnel.connect_channel(
            self.kind, self.target, protocolFactory, source=self.source
        )
