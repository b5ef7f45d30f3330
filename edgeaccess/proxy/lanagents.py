"""The proxy's route to the SSH, Kubernetes and app agents of LAN nodes.

A node in direct mode listens on its agent port
(:mod:`edgeaccess.node.lanagent`) and announces it in its heartbeat
(``agent: {address, inventory}`` in its node record). The proxy dials that
port when a user needs it and speaks the reverse tunnel's own protocol over
it: the node says ``Hello``, the proxy opens ``ssh``, ``kube`` and ``app``
channels, exactly as over a tunnel the node dialled.

Channels resume (``resume/1``, both ends' ``--resume-budget``): here the
proxy is the side that dials, so when a connection carrying open channels
is lost (a reset, or a black hole: the node's probes stop and the proxy's
busy-tunnel watch drops it) the pool redials the node at once, jittered,
backing off, until the session re-attaches or its budget is over; past the
budget the channels close with ``tunnel outage exceeded Ns``.

- :class:`LanAgentPool` keeps at most one connection per node: the first
  channel dials it (mutual TLS; the node's server certificate must be *this*
  node: kind ``node``, its uuid, EKU serverAuth, the address dialled in its
  SAN; the proxy presents its client certificate), later ones reuse it, and
  a connection that fails or closes is forgotten so the next channel dials
  again. Every waiter of a failed dial fails with ``NodeOffline``.
- :class:`LanAgent` is one LAN node's agent as the Kubernetes directory and
  the app index see a tunnel (``identity``, ``inventory``,
  ``connect_channel``), so the kube proxy and the app proxy route to it
  through a :class:`~edgeaccess.tunnel.endpoints.TunnelChannelEndpoint`
  as they do to a tunnel.
- :class:`LanAgentDirectory` lists them from the control cache's node
  records (kept current by the backend's watch; a record that expires or
  stops announcing its agent is dropped), with a tunnel registry's face
  (``connected``, ``lookup``, ``subscribe``); :class:`CombinedRegistry`
  puts it beside the tunnel registry.
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeaccess import tls
from edgeaccess.errors import AccessDenied, BadRequest, EdgeError, NodeOffline
from edgeaccess.node.lanagent import ALPN_AGENT
from edgeaccess.pki import x509ca
from edgeaccess.proxy.router import field, split_address, tcp_endpoint
from edgeaccess.tunnel.agent import QUICK_REDIAL
from edgeaccess.tunnel.backoff import backoff_delay
from edgeaccess.tunnel.endpoints import TunnelChannelEndpoint
from edgeaccess.tunnel.interfaces import ITunnel, ITunnelRegistry
from edgeaccess.tunnel.liveness import PROBE_INTERVAL
from edgeaccess.tunnel.protocol import Inventory
from edgeaccess.tunnel.server import ServerTunnelProtocol, TunnelServerFactory

_log = Logger()

NODES_PREFIX = "/nodes/"
#: Longest wait between redials of a node whose channels wait (seconds).
REDIAL_CAP = 2.0


class AgentPortRefused(NodeOffline):
    """Nothing listens at the node's agent port (its host refused the TCP
    connection): the node process is not running."""


class LanTunnelProtocol(ServerTunnelProtocol):
    """The proxy's end of a connection it dialled to a LAN node's agent port:
    a tunnel's proxy end that accepts only the node it dialled."""

    #: The uuid of the node dialled (set by the pool before connecting).
    expected_uuid: str | None = None
    #: Why the connection ended (the TLS check's reason, when it failed there).
    lost_reason: Failure | None = None

    def _resolve_identity(self):
        identity = super()._resolve_identity()
        if identity.kind != "node" or identity.uuid != self.expected_uuid:
            _log.warn("refused the agent at {peer}: it is {kind} {name} ({uuid}), not node "
                      "{expected}", peer=self.transport.getPeer(), kind=identity.kind,
                      name=identity.name, uuid=identity.uuid, expected=self.expected_uuid)
            raise AccessDenied("this is not the node the proxy dialled")
        return identity

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost_reason = reason
        super().connectionLost(reason)


class _DialFactory(Factory):
    """Builds the protocol of one dial: the pool's tunnel server end, for the
    node it must be."""

    def __init__(self, server: TunnelServerFactory, uuid: str) -> None:
        self.server = server
        self.uuid = uuid
        self.protocol_made: LanTunnelProtocol | None = None

    def buildProtocol(self, addr) -> LanTunnelProtocol:
        protocol = LanTunnelProtocol(self.server)
        protocol.expected_uuid = self.uuid
        self.protocol_made = protocol
        return protocol


def _server_identity(transport) -> x509ca.Identity | None:
    """The identity of the server certificate a LAN agent presented (the
    handshake already checked chain, kind, cluster, EKU and address)."""
    cert = tls.peer_certificate(transport)
    if cert is None:
        return None
    try:
        return x509ca.identity_from_certificate(cert)
    except ValueError:
        return None


class LanAgentPool:
    """One connection per LAN node's agent port, dialled on demand.

    :param reactor: TCP connections and timers.
    :param cluster: this proxy's cluster (the nodes' certificates must say it).
    :param ca_certs: ``() -> [certificate]``, the cluster CA(s).
    :param credentials: ``() -> (key, client_certificate)``: the proxy's
        client certificate (kind ``proxy``, EKU clientAuth).
    :param connect_timeout: seconds for TCP, TLS and ``Hello`` together.
    :param endpoint_for: ``(host, port) -> endpoint`` (tests: in memory);
        default TLS over TCP as described in the module docstring.
    :param identity_for: ``(transport) -> Identity | None``, who the
        connected agent is; default: its verified server certificate's
        identity, if of this cluster.
    :param resume_budget: seconds open channels outlive a lost connection
        (``--resume-budget``; 0: they end with it).
    :param probe_interval: the node's probes while channels are open (a
        connection silent for 3 of them is dropped: a black hole).
    :param redial_timeout: seconds for each redial of a node whose channels
        wait (default: the shorter of ``connect_timeout`` and 5 s: a dial
        into a link that is still down gives up soon and tries again).
    :param rng: the redials' jitter.
    """

    def __init__(self, *, reactor, cluster: str, ca_certs: Callable[[], list],
                 credentials: Callable[[], tuple], connect_timeout: float = 10.0,
                 heartbeat_interval: float = 30.0, endpoint_for=None,
                 identity_for=None, resume_budget: float = 0.0,
                 probe_interval: float = PROBE_INTERVAL, redial_timeout: float | None = None,
                 rng: random.Random | None = None) -> None:
        self.reactor = reactor
        self.cluster = cluster
        self._ca_certs = ca_certs
        self._credentials = credentials
        self.connect_timeout = connect_timeout
        self.redial_timeout = redial_timeout if redial_timeout is not None \
            else min(connect_timeout, 5.0)
        self.rng = rng or random.SystemRandom()
        self._endpoint_for = endpoint_for or self._tls_endpoint
        # The tunnel server's parts: no channels from the node (accept_channel
        # None), nothing to Discover, the heartbeat answered, silence dropped,
        # sessions kept by the node's identity (its server certificate).
        self.factory = TunnelServerFactory(
            clock=reactor, identity_for=identity_for or self._identity_for,
            heartbeat_interval=heartbeat_interval, max_channels=1024,
            resume_budget=resume_budget, probe_interval=probe_interval)
        self.factory.registry.subscribe(self._up, self._down)
        self._connections: dict[str, LanTunnelProtocol] = {}
        self._pending: dict[str, list[Deferred]] = {}
        self._dialled: dict[str, LanTunnelProtocol] = {}
        self._timers: dict[str, Any] = {}
        #: The agent address each node was last dialled at.
        self._addresses: dict[str, str] = {}
        #: Sessions whose connection was lost, by node: redialled for.
        self.waiting: dict[str, Any] = {}
        self._redials: dict[str, Any] = {}
        #: Nodes whose connection this proxy closes on purpose (no redial).
        self._closing: dict[str, str] = {}

    def _identity_for(self, transport) -> x509ca.Identity | None:
        identity = _server_identity(transport)
        if identity is None or identity.cluster != self.cluster:
            return None
        return identity

    def _tls_endpoint(self, host: str, port: int):
        key, cert = self._credentials()
        options = tls.client_options(host, self._ca_certs(), cluster=self.cluster, key=key,
                                     cert=cert, alpn=[ALPN_AGENT], kinds=("node",))
        return wrapClientTLS(options, tcp_endpoint(self.reactor, host, port,
                                                   self.connect_timeout))

    def connections(self) -> list[LanTunnelProtocol]:
        """The live connections."""
        return list(self._connections.values())

    def current(self, uuid: str) -> LanTunnelProtocol | None:
        """The live connection to node ``uuid``, if there is one."""
        return self._connections.get(uuid)

    def connection(self, uuid: str, address: str,
                   timeout: float | None = None) -> Deferred[LanTunnelProtocol]:
        """The connection to node ``uuid``'s agent at ``address`` (dialled if
        there is none, giving up after ``timeout`` seconds, default
        ``connect_timeout``); fails with NodeOffline when it cannot be made."""
        current = self._connections.get(uuid)
        if current is not None and not current._is_lost:
            return succeed(current)
        waiter: Deferred[LanTunnelProtocol] = Deferred()
        waiters = self._pending.get(uuid)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._pending[uuid] = [waiter]
        try:
            host, port = split_address(address, 0)
            if not port:
                raise BadRequest(f"the agent address {address!r} names no port")
            self._addresses[uuid] = address
            self._dial(uuid, host, port, timeout or self.connect_timeout)
        except EdgeError as e:
            self._failed(uuid, e)
        return waiter

    def endpoint(self, node, kind: str = "ssh", source: str | None = None):
        """An endpoint for a ``kind`` channel to the node of record ``node``
        through its agent port, or None if the record announces no agent
        (the node runs with ``--agent-listen off``, or predates it)."""
        agent = field(node, "agent")
        address = agent.get("address") if isinstance(agent, dict) else None
        uuid, name = field(node, "uuid"), field(node, "name")
        if not isinstance(address, str) or not address or not uuid or not name:
            return None
        identity = x509ca.Identity(kind="node", name=name, cluster=self.cluster, uuid=uuid)
        lan_agent = LanAgent(self, identity, Inventory(name=name), address, None)
        return TunnelChannelEndpoint(lan_agent, kind, uuid, source=source)

    def _dial(self, uuid: str, host: str, port: int, timeout: float) -> None:
        factory = _DialFactory(self.factory, uuid)
        connecting = self._endpoint_for(host, port).connect(factory)
        self._timers[uuid] = self.reactor.callLater(
            timeout, self._timed_out, uuid, factory, connecting, timeout)

        def connected(protocol) -> None:
            if uuid not in self._pending or protocol._is_lost:
                protocol.disconnect("given up")
                return
            self._dialled[uuid] = protocol
            protocol.when_lost().addCallback(lambda _: self._lost_before_up(uuid, protocol))

        def refused(failure: Failure) -> None:
            error = AgentPortRefused if failure.check(ConnectionRefusedError) else NodeOffline
            self._failed(uuid, error(
                f"the agent of node {uuid} at {host}:{port} is unreachable: "
                f"{failure.getErrorMessage()}"))

        connecting.addCallbacks(connected, refused)

    def _timed_out(self, uuid: str, factory: _DialFactory, connecting: Deferred,
                   timeout: float) -> None:
        self._timers.pop(uuid, None)
        if uuid not in self._pending:
            return
        self._dialled.pop(uuid, None)
        self._failed(uuid, NodeOffline(f"the agent of node {uuid} did not answer in "
                                       f"{timeout:g}s"))
        protocol = factory.protocol_made
        if protocol is not None and not protocol._is_lost:
            protocol.disconnect("no Hello in time")
        if not connecting.called:
            connecting.cancel()

    def _lost_before_up(self, uuid: str, protocol: LanTunnelProtocol) -> None:
        if self._dialled.get(uuid) is not protocol:
            return  # it came up (or was given up) before it went
        del self._dialled[uuid]
        reason = protocol.lost_reason
        why = reason.getErrorMessage() if reason is not None else "connection closed"
        self._failed(uuid, NodeOffline(f"the agent of node {uuid} refused or dropped the "
                                       f"connection: {why}"))

    def _failed(self, uuid: str, error: Exception) -> None:
        timer = self._timers.pop(uuid, None)
        if timer is not None and timer.active():
            timer.cancel()
        waiters = self._pending.pop(uuid, None)
        if waiters is None:
            return
        _log.info("LAN agent of node {uuid}: {error}", uuid=uuid, error=error)
        for waiter in waiters:
            waiter.errback(error)

    def _up(self, tunnel) -> None:
        uuid = tunnel.identity.uuid
        if self._dialled.get(uuid) is not tunnel:
            tunnel.disconnect("not a connection this proxy is waiting for")
            return
        del self._dialled[uuid]
        timer = self._timers.pop(uuid, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._connections[uuid] = tunnel
        _log.info("connected to the agent of node {name} ({uuid}) at {addr}",
                  name=tunnel.identity.name, uuid=uuid, addr=tunnel.transport.getPeer())
        tunnel.when_lost().addCallback(lambda _: self._lost(uuid, tunnel))
        for waiter in self._pending.pop(uuid, []):
            waiter.callback(tunnel)

    def _down(self, tunnel) -> None:
        uuid = tunnel.identity.uuid
        if self._connections.get(uuid) is tunnel:
            del self._connections[uuid]
            _log.info("connection to the agent of node {name} ({uuid}) closed",
                      name=tunnel.identity.name, uuid=uuid)

    # -- resumption: the proxy redials --------------------------------------

    def _lost(self, uuid: str, tunnel: LanTunnelProtocol) -> None:
        """A live connection is gone: if its channels wait (the session is
        detached), dial the node again until they are back or expire."""
        reason = self._closing.pop(uuid, None)
        mux = tunnel._mux
        if mux is None or mux._lost or not mux.detached:
            return
        if reason is not None:
            mux.expire(reason)
            return
        self.waiting[uuid] = mux
        _log.info("the connection to the agent of node {name} ({uuid}) was lost with "
                  "{count} channels open; redialing it for {budget:g} s",
                  name=tunnel.identity.name, uuid=uuid, count=len(mux.channels),
                  budget=self.factory.resume_budget)
        if uuid not in self._redials:
            self._schedule_redial(uuid, mux, 0)

    def _session_waits(self, uuid: str, mux) -> bool:
        if self.waiting.get(uuid) is mux and mux.detached and not mux._lost:
            return True
        if self.waiting.get(uuid) is mux:
            del self.waiting[uuid]
        return False

    def _schedule_redial(self, uuid: str, mux, attempt: int) -> None:
        if not self._session_waits(uuid, mux):
            return
        # The first at once (jittered: many nodes of one cut switch), then
        # backing off, never more than REDIAL_CAP apart.
        delay = self.rng.uniform(0.05, QUICK_REDIAL) if attempt == 0 else \
            max(0.2, backoff_delay(attempt, self.rng, 0.5, REDIAL_CAP))
        self._redials[uuid] = self.reactor.callLater(delay, self._redial, uuid, mux, attempt)

    def _redial(self, uuid: str, mux, attempt: int) -> None:
        self._redials.pop(uuid, None)
        if not self._session_waits(uuid, mux):
            return
        address = self._addresses[uuid]
        _log.info("redialing the agent of node {uuid} at {addr} (attempt {n}) for its "
                  "{count} waiting channels", uuid=uuid, addr=address, n=attempt + 1,
                  count=len(mux.channels))

        def failed(failure: Failure) -> None:
            if failure.check(AgentPortRefused) and self._session_waits(uuid, mux):
                # The node's host answers and nothing listens: the node
                # process is gone, and the channels (in its memory) with it.
                del self.waiting[uuid]
                mux.expire("the node's agent port refused the connection (node stopped)")
                return
            self._schedule_redial(uuid, mux, attempt + 1)

        def connected(tunnel) -> None:
            if tunnel._mux is mux:
                # Re-attached in its Hello (lost again: it waits again).
                self.waiting.pop(uuid, None)
            elif self._session_waits(uuid, mux):
                self._schedule_redial(uuid, mux, attempt + 1)

        self.connection(uuid, address, timeout=self.redial_timeout).addCallbacks(
            connected, failed)

    def close(self, uuid: str | None = None, reason: str = "closing",
              idle_only: bool = False) -> None:
        """Close the connection to one node (or to all): its channels end
        with ``reason``, nothing is redialled. ``idle_only``: only a
        connection without open channels (users' sessions go on)."""
        if idle_only:
            for key, tunnel in list(self._connections.items()):
                held = tunnel._mux is not None and tunnel._mux.held
                if (uuid is None or key == uuid) and not held and key not in self.waiting:
                    self._closing[key] = reason
                    tunnel.disconnect(reason)
            return
        for key, call in list(self._redials.items()):
            if uuid is None or key == uuid:
                del self._redials[key]
                call.cancel()
        for key, mux in list(self.waiting.items()):
            if uuid is None or key == uuid:
                del self.waiting[key]
                if not mux._lost:
                    mux.expire(reason)
        for key, tunnel in list(self._connections.items()):
            if uuid is None or key == uuid:
                self._closing[key] = reason
                if tunnel._mux is not None:
                    # Told to the node before the connection goes: its
                    # sessions end now, with the reason, rather than waiting
                    # out the budget as after a cut.
                    tunnel._mux.close_all(reason)
                tunnel.disconnect(reason)


@implementer(ITunnel)
class LanAgent:
    """One LAN node's agent, with a tunnel's face for the kube directory and
    the app index: its channels go through the pool's connection."""

    def __init__(self, pool: LanAgentPool, identity: x509ca.Identity, inventory: Inventory,
                 address: str, expires: float | None) -> None:
        self.pool = pool
        self.identity = identity
        self.inventory = inventory
        self.address = address
        self.expires = expires

    def __repr__(self) -> str:
        return f"<LanAgent {self.identity.name} at {self.address}>"

    def connect_channel(self, kind: str, target: str, factory: IProtocolFactory,
                        source: str | None = None) -> Deferred:
        """Open a channel on the connection to this node (dialled if needed)."""
        connecting = self.pool.connection(self.identity.uuid, self.address)

        def opened(tunnel):
            return tunnel.connect_channel(kind, target, factory, source=source)

        return connecting.addCallback(opened)

    def disconnect(self, reason: str) -> None:
        self.pool.close(self.identity.uuid, reason)

    def when_lost(self) -> Deferred:
        connection = self.pool.current(self.identity.uuid)
        return connection.when_lost() if connection is not None else succeed(None)


@implementer(ITunnelRegistry)
class LanAgentDirectory(Service):
    """The LAN nodes' agents, from the control cache's node records.

    :param cache: the proxy's :class:`~edgeaccess.controlplane.cache.ControlCache`.
    :param sweep_interval: seconds between checks for records that expired
        (expiry is no watch event).
    """

    def __init__(self, cache, pool: LanAgentPool, clock, *, sweep_interval: float = 5.0) -> None:
        self.cache = cache
        self.pool = pool
        self.clock = clock
        self.cluster = pool.cluster
        self._agents: dict[str, LanAgent] = {}
        self._subscribers: list[tuple[Callable, Callable]] = []
        self._sweep = LoopingCall(self.sweep)
        self._sweep.clock = clock
        self._sweep_interval = sweep_interval
        self._unsubscribe: Callable[[], None] | None = None

    def startService(self) -> None:
        super().startService()
        self._unsubscribe = self.cache.subscribe(self._changed)
        for item in self.cache.get_range(NODES_PREFIX):
            self._changed(item.key, item)
        self._sweep.start(self._sweep_interval, now=False)

    def stopService(self):
        super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._sweep.running:
            self._sweep.stop()
        self.pool.close(reason="proxy shutting down")

    # -- the feed -------------------------------------------------------------

    def _changed(self, key: str, item) -> None:
        if not key.startswith(NODES_PREFIX):
            return
        uuid = key[len(NODES_PREFIX):]
        agent = self._parse(uuid, item) if item is not None else None
        current = self._agents.get(uuid)
        if agent is None:
            if current is not None:
                self._remove(uuid)
            return
        if current is not None and (current.inventory, current.address) == \
                (agent.inventory, agent.address):
            current.expires = agent.expires
            return
        if current is not None:
            self._remove(uuid)
        self._agents[uuid] = agent
        _log.info("LAN agent of node {name} at {addr}: Kubernetes {kube}, apps {apps}",
                  name=agent.identity.name, addr=agent.address,
                  kube=", ".join(agent.inventory.kube_clusters) or "none",
                  apps=", ".join(a.name for a in agent.inventory.apps) or "none")
        for on_connect, _ in list(self._subscribers):
            _call_safely(on_connect, agent)

    def _parse(self, uuid: str, item) -> LanAgent | None:
        try:
            record = json.loads(item.value)
            agent = record.get("agent") if isinstance(record, dict) else None
            if agent is None:
                return None
            if record.get("uuid") != uuid or not isinstance(agent, dict):
                raise BadRequest("malformed node record")
            inventory = Inventory.from_json(json.dumps(agent.get("inventory")))
            address = agent.get("address")
            if not isinstance(address, str) or inventory.name != record.get("name"):
                raise BadRequest("malformed agent announcement")
            split_address(address, 0)
        except (ValueError, TypeError, EdgeError) as e:
            _log.warn("ignoring the agent announced in node record {uuid}: {error}",
                      uuid=uuid, error=e)
            return None
        identity = x509ca.Identity(kind="node", name=inventory.name, cluster=self.cluster,
                                   uuid=uuid)
        expires = item.expires.timestamp() if item.expires is not None else None
        return LanAgent(self.pool, identity, inventory, address, expires)

    def _remove(self, uuid: str) -> None:
        agent = self._agents.pop(uuid)
        # Users' sessions on the connection go on (the node's certificate
        # still says who it is); an idle connection goes.
        self.pool.close(uuid, "the node no longer announces this agent", idle_only=True)
        for _, on_disconnect in list(self._subscribers):
            _call_safely(on_disconnect, agent)

    def sweep(self) -> None:
        """Forget agents whose node record expired (the node went quiet)."""
        now = self.clock.seconds()
        for uuid, agent in list(self._agents.items()):
            if agent.expires is not None and agent.expires <= now:
                _log.info("LAN agent of node {name}: its record expired",
                          name=agent.identity.name)
                self._remove(uuid)

    # -- a registry's face ----------------------------------------------------

    def connected(self) -> list[LanAgent]:
        """Every LAN agent currently announced (its record not expired)."""
        now = self.clock.seconds()
        return [a for a in self._agents.values() if a.expires is None or a.expires > now]

    def lookup(self, cluster: str, name_or_uuid: str) -> LanAgent | None:
        if cluster != self.cluster:
            return None
        for agent in self.connected():
            if name_or_uuid in (agent.identity.uuid, agent.identity.name):
                return agent
        return None

    def subscribe(self, on_connect, on_disconnect) -> Callable[[], None]:
        entry = (on_connect, on_disconnect)
        self._subscribers.append(entry)
        return lambda: self._subscribers.remove(entry)


@implementer(ITunnelRegistry)
class CombinedRegistry:
    """Several registries read as one (the tunnel registry and the LAN agents)."""

    def __init__(self, *registries: Any) -> None:
        self.registries = registries

    def connected(self) -> list:
        return [entry for registry in self.registries for entry in registry.connected()]

    def lookup(self, cluster: str, name_or_uuid: str):
        for registry in self.registries:
            found = registry.lookup(cluster, name_or_uuid)
            if found is not None:
                return found
        return None

    def subscribe(self, on_connect, on_disconnect) -> Callable[[], None]:
        undo = [r.subscribe(on_connect, on_disconnect) for r in self.registries]

        def unsubscribe() -> None:
            for step in undo:
                step()

        return unsubscribe


def _call_safely(callback: Callable, agent: LanAgent) -> None:
    try:
        callback(agent)
    except Exception:
        _log.failure("LAN agent subscriber {callback!r} failed", callback=callback)
