"""Contracts of the proxy: how a node name becomes a route.

A route is an endpoint (DESIGN.md, "A route is an endpoint"): the SSH
splice, the kube proxy and the app proxy only ``connect()`` what the router
answers, whether it is a TCP connection to a LAN node, a channel through a
node's reverse tunnel or a channel through a leaf cluster's tunnel.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IRouter(Interface):
    """Resolves ``NAME`` in ``CLUSTER`` to a connectable endpoint."""

    local_cluster = Attribute("Name of the cluster this proxy belongs to.")

    def route(cluster: str, name: str, kind: str = "ssh", source=None):  # -> IStreamClientEndpoint
        """An ``IStreamClientEndpoint`` reaching ``kind`` on node ``name``.

        ``source`` is the user's address (``"ip:port"``) when known: a
        tunnelled node (directly or in a leaf cluster) sees it as the
        connection's peer address.

        Looking the node up may need I/O, so errors surface either here or
        from the endpoint's ``connect()``: ``edgeaccess.errors.NotFound``
        ("node NAME not found in cluster CLUSTER"), ``NodeOffline``,
        ``ClusterOffline``, ``AccessDenied``.
        """

    def route_host(host: str, kind: str = "ssh", source=None):  # -> IStreamClientEndpoint
        """Route a host name as a client typed it (``ssh -J``'s target).

        ``NAME.CLUSTER``, ``NAME`` alone for the local cluster, and a dotted
        ``NAME`` whose suffix is no known cluster tried whole as a local
        node name. Errors as for :meth:`route`.
        """


class IRoutedEndpoint(Interface):
    """What the endpoints an ``IRouter`` answers tell about their route."""

    cluster = Attribute("Cluster the node is in.")
    name = Attribute("Node name as requested.")
    route_kind = Attribute(
        'How the node is reached once connected: "direct" (TCP), "agent" (a '
        'LAN node\'s agent port), "tunnel", "leaf", '
        "or None before resolution."
    )
    node = Attribute("The node record once resolved, else None.")
