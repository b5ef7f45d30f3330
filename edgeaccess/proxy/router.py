"""The proxy's router: ``NAME.CLUSTER`` -> an ``IStreamClientEndpoint``.

- a node that listens (address ``host:port``) and announces an agent port
  is reached through a channel of the proxy's connection to that port
  (``agent_lookup``: resumable across a broken connection), else over TCP
  (no agent announced, ``--agent-listen off``, an older node, or the agent
  port unreachable);
- a node that dials in (address ``"tunnel"``) is reached through a channel
  of its reverse tunnel (``tunnel_lookup``);
- a node of a leaf cluster is reached through the leaf's router
  (``leaf_lookup``), which itself chains through the leaf's tunnel.

Looking a node up is asynchronous (backend), so :meth:`Router.route`
answers at once with a :class:`RoutedEndpoint` that resolves when it is
connected; lookup errors (``NotFound``, ``NodeOffline`` ...) come out of
``connect()``.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.internet import error as ierror
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeaccess.errors import BadRequest, NodeOffline, NotFound
from edgeaccess.proxy.interfaces import IRoutedEndpoint, IRouter

_log = Logger()

#: Port of the node SSH service when a node's address names none.
NODE_SSH_PORT = 3022
#: The address a node that dials in is registered with.
TUNNEL_ADDRESS = "tunnel"

ROUTE_DIRECT = "direct"
ROUTE_AGENT = "agent"
ROUTE_TUNNEL = "tunnel"
ROUTE_LEAF = "leaf"


def field(record: Any, name: str, default: Any = None) -> Any:
    """Read ``name`` from a node record (an object or a mapping)."""
    if isinstance(record, dict):
        return record.get(name, default)
    return getattr(record, name, default)


def split_address(address: str, default_port: int = NODE_SSH_PORT) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``"host"`` -> ``(host, port)``.

    :raises BadRequest: for a malformed address or port.
    """
    address = address.strip()
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise BadRequest(f"malformed address {address!r}")
        port_text = rest[1:]
    elif address.count(":") == 1:
        host, port_text = address.split(":")
    else:
        host, port_text = address, ""  # a bare name or a bare IPv6 address
    if not host:
        raise BadRequest(f"malformed address {address!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadRequest(f"malformed port in address {address!r}")
    return host, int(port_text)


def tcp_endpoint(reactor, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """A TCP client endpoint for an IP literal or a host name."""
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


@attrs.frozen
class Route:
    """Where a node is and how to get there."""

    kind: str  # ROUTE_DIRECT, ROUTE_AGENT, ROUTE_TUNNEL or ROUTE_LEAF
    cluster: str
    name: str
    node: Any
    endpoint: IStreamClientEndpoint
    #: ROUTE_AGENT: the plain TCP endpoint, if the agent port cannot be reached.
    fallback: IStreamClientEndpoint | None = None


@implementer(IStreamClientEndpoint, IRoutedEndpoint)
class RoutedEndpoint:
    """An endpoint that resolves its node when connected.

    After resolution, :attr:`route_kind` and :attr:`node` say where it went
    (for the caller's log line).
    """

    def __init__(self, resolve: Callable[[], Deferred], cluster: str, name: str) -> None:
        self._resolve = resolve
        self.cluster = cluster
        self.name = name
        self.route_kind: str | None = None
        self.node: Any = None

    def connect(self, protocol_factory) -> Deferred:
        """Resolve the node, then connect the route's endpoint."""

        def resolved(route: Route) -> Deferred:
            self.route_kind = route.kind
            self.node = route.node
            self.cluster = route.cluster
            self.name = route.name
            connecting = route.endpoint.connect(protocol_factory)
            if route.kind == ROUTE_AGENT and route.fallback is not None:
                connecting.addErrback(self._agent_failed, route, protocol_factory)
            elif route.kind == ROUTE_DIRECT:
                connecting.addErrback(self._direct_failed)
            return connecting

        return maybeDeferred(self._resolve).addCallback(resolved)

    def _agent_failed(self, reason: Failure, route: Route, protocol_factory):
        if not reason.check(NodeOffline):
            return reason  # the node refused the channel: no detour
        _log.warn(
            "node {node}.{cluster}: its agent port cannot be reached ({reason}); "
            "SSH over plain TCP",
            node=self.name, cluster=self.cluster, reason=reason.getErrorMessage(),
        )
        self.route_kind = ROUTE_DIRECT
        return route.fallback.connect(protocol_factory).addErrback(self._direct_failed)

    def _direct_failed(self, reason: Failure):
        if reason.check(ierror.ConnectError):
            _log.info(
                "node {node}.{cluster} unreachable: {reason}",
                node=self.name,
                cluster=self.cluster,
                reason=reason.getErrorMessage(),
            )
            raise NodeOffline(f"node {self.name}.{self.cluster} is offline")
        return reason


@implementer(IRouter)
class Router:
    """Resolves nodes of the local cluster and hands leaf clusters over.

    :param local_cluster: this proxy's cluster name.
    :param node_lookup: ``node_lookup(name_or_uuid) -> Deferred[record | None]``;
        a record has ``name``, ``uuid``, ``address`` (``"host:port"`` or
        ``"tunnel"``) and ``labels``.
    :param tunnel_lookup: ``tunnel_lookup(cluster, node) ->
        IStreamClientEndpoint`` for nodes behind a reverse tunnel (raises
        or fails with ``NodeOffline`` when the node has no tunnel). For a
        kind other than ``"ssh"`` it is called with ``kind=`` as well, and
        with ``source=`` when the user's address is known.
    :param leaf_lookup: ``leaf_lookup(cluster) -> router | None`` for
        trusted leaf clusters; only the leaf router's ``route(cluster, name,
        kind)`` is used (it chains through the leaf's tunnel; ``source=``
        is passed when known).
    :param reactor: used for TCP connections to nodes that listen.
    :param agent_lookup: ``agent_lookup(node, source=None) ->
        IStreamClientEndpoint | None``: an ``ssh`` channel through the agent
        port the node record announces (None: it announces none, TCP).
    """

    def __init__(
        self,
        local_cluster: str,
        node_lookup: Callable[[str], Deferred],
        tunnel_lookup: Callable[..., IStreamClientEndpoint] | None = None,
        leaf_lookup: Callable[[str], Any] | None = None,
        reactor: Any = None,
        connect_timeout: float = 10.0,
        agent_lookup: Callable[..., IStreamClientEndpoint | None] | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.local_cluster = local_cluster
        self._node_lookup = node_lookup
        self._tunnel_lookup = tunnel_lookup
        self._leaf_lookup = leaf_lookup
        self._agent_lookup = agent_lookup
        self._reactor = reactor
        self._connect_timeout = connect_timeout

    def route(
        self, cluster: str, name: str, kind: str = "ssh", source: str | None = None
    ) -> RoutedEndpoint:
        """See :meth:`IRouter.route`.

        :param source: the user's address (``"ip:port"``), passed on to a
            tunnelled node (its channel's peer address) or to a leaf cluster.
        """
        if not name:
            raise BadRequest("no node name given")
        if cluster.lower() == self.local_cluster.lower():
            return RoutedEndpoint(
                lambda: self._resolve_local([name], kind, source), self.local_cluster, name
            )
        leaf = self._leaf(cluster)
        if leaf is None:
            raise NotFound(f"cluster {cluster} not found")

        def through_leaf() -> Route:
            extra = {} if source is None else {"source": source}
            return Route(ROUTE_LEAF, cluster, name, None, leaf.route(cluster, name, kind, **extra))

        return RoutedEndpoint(through_leaf, cluster, name)

    def route_host(
        self, host: str, kind: str = "ssh", source: str | None = None
    ) -> RoutedEndpoint:
        """Route a host name as a client typed it.

        ``NAME.CLUSTER`` names a node of this or a leaf cluster; ``NAME``
        alone a node of this cluster; a dotted name whose suffix is no known
        cluster (``web.prod``) is tried whole as a node of this cluster.
        """
        host = host.strip().rstrip(".")
        if not host:
            raise BadRequest("no node name given")
        suffix = "." + self.local_cluster.lower()
        if host.lower().endswith(suffix) and len(host) > len(suffix):
            # "web.prod" in cluster "prod" could also be a node named "web.prod".
            names = [host[: -len(suffix)], host]
            return RoutedEndpoint(
                lambda: self._resolve_local(names, kind, source), self.local_cluster, names[0]
            )
        position = host.find(".")
        while position != -1:
            name, cluster = host[:position], host[position + 1 :]
            if self._leaf(cluster) is not None:
                return self.route(cluster, name, kind, source)
            position = host.find(".", position + 1)
        return self.route(self.local_cluster, host, kind, source)

    def _leaf(self, cluster: str):
        if self._leaf_lookup is None or not cluster:
            return None
        return self._leaf_lookup(cluster)

    def _resolve_local(self, names: list[str], kind: str, source: str | None = None) -> Deferred:
        """Try each candidate name in turn; the first one's NotFound wins."""

        def attempt(index: int) -> Deferred:
            looking = maybeDeferred(self._node_lookup, names[index])
            return looking.addCallback(found, index)

        def found(node, index: int):
            if node is None:
                if index + 1 < len(names):
                    return attempt(index + 1)
                raise NotFound(
                    f"node {names[0]} not found in cluster {self.local_cluster}"
                )
            return self._route_to(node, kind, source)

        return attempt(0)

    def _route_to(self, node, kind: str, source: str | None = None) -> Route:
        name = field(node, "name")
        address = field(node, "address") or ""
        if address == TUNNEL_ADDRESS:
            if self._tunnel_lookup is None:
                raise NodeOffline(f"node {name}.{self.local_cluster} is offline")
            extra: dict[str, Any] = {} if kind == "ssh" else {"kind": kind}
            if source is not None:
                extra["source"] = source
            endpoint = self._tunnel_lookup(self.local_cluster, node, **extra)
            return Route(ROUTE_TUNNEL, self.local_cluster, name, node, endpoint)
        if kind != "ssh":
            raise NodeOffline(
                f"node {name}.{self.local_cluster} serves {kind} only through a tunnel"
            )
        # The client's port is ignored: a node's SSH service is where the
        # node said it is (its port, else 3022).
        host, port = split_address(address)
        endpoint = tcp_endpoint(self._reactor, host, port, self._connect_timeout)
        through_agent = None
        if self._agent_lookup is not None:
            extra = {} if source is None else {"source": source}
            through_agent = self._agent_lookup(node, **extra)
        if through_agent is not None:
            return Route(ROUTE_AGENT, self.local_cluster, name, node, through_agent,
                         fallback=endpoint)
        return Route(ROUTE_DIRECT, self.local_cluster, name, node, endpoint)
