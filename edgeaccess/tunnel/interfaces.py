"""Contracts of the tunnel package, for the proxy router and the node service."""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ITunnel(Interface):
    """One connected reverse tunnel, as the proxy (or the agent) sees it."""

    identity = Attribute("The peer's identity (edgeaccess.pki.x509ca.Identity), proxy side.")
    inventory = Attribute("The agent's Inventory from Hello, proxy side (None before).")

    def connect_channel(kind, target, factory, source=None):  # type: ignore[no-untyped-def]
        """Open a channel and connect a protocol from ``factory``.

        ``source`` (a proxy's only) is the user's ``"ip:port"``: the far end's
        channel reports it as its peer address.

        :returns: Deferred firing with the protocol; failing with AccessDenied,
            NotFound, BadRequest or NodeOffline.
        """

    def disconnect(reason):  # type: ignore[no-untyped-def]
        """Close the tunnel."""

    def when_lost():  # type: ignore[no-untyped-def]
        """Deferred firing when the tunnel's connection is gone."""


class ITunnelRegistry(Interface):
    """The agents connected to this proxy, by cluster and node name or UUID."""

    def lookup(cluster, name_or_uuid):  # type: ignore[no-untyped-def]
        """The newest live ITunnel of that node in that cluster, or None."""

    def connected():  # type: ignore[no-untyped-def]
        """Every live ITunnel (a list)."""

    def subscribe(on_connect, on_disconnect):  # type: ignore[no-untyped-def]
        """Call ``on_connect(tunnel)`` / ``on_disconnect(tunnel)``; returns an unsubscribe callable."""


class IPrioritizedTransport(Interface):
    """A transport whose sends are scheduled by priority (a tunnel channel)."""

    priority = Attribute('"interactive" or "bulk" (edgeaccess.tunnel.scheduler).')

    def set_priority(priority):  # type: ignore[no-untyped-def]
        """Send this transport's data in ``priority`` from now on (the far end is told)."""
