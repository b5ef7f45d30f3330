"""The proxy side of the reverse tunnel: accepts agents and keeps a registry of them.

The peer's identity comes from the TLS client certificate (through the
``identity_for`` callable), never from a message: an agent may only register
under the name its certificate carries, and only send the commands meant
for agents.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import attrs

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IProtocolFactory, IReactorTime, ITransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeaccess.errors import AccessDenied, BadRequest
from edgeaccess.memory import share_instance_attributes
from edgeaccess.pki.x509ca import Identity
from edgeaccess.tls import shrink_tls_buffers
from edgeaccess.tunnel.connection import TunnelConnection
from edgeaccess.tunnel.interfaces import ITunnel, ITunnelRegistry
from edgeaccess.tunnel.liveness import PROBE_INTERVAL, BusyLivenessMonitor, LivenessMonitor
from edgeaccess.tunnel.mux import ChannelMux
from edgeaccess.tunnel.resume import DEFAULT_RESUME_BUDGET, SessionTable
from edgeaccess.tunnel.protocol import (
    ProtocolViolation,
    CONTROL_CAPABILITY,
    MAX_CONTROL_PIECE,
    AGENT_COMMANDS,
    AGENT_OPENABLE_KINDS,
    DEFAULT_WINDOW,
    FAST_DATA_CAPABILITY,
    PROTOCOL_VERSION,
    RESUME_CAPABILITY,
    RESUME_SESSION_PREFIX,
    ChannelState,
    ControlUpdate,
    Discover,
    Heartbeat,
    Hello,
    Inventory,
    Reconnect,
    ResumeChannels,
    check_session_id,
)

_log = Logger()

#: Identity kinds allowed to hold a tunnel: nodes and leaf clusters.
TUNNEL_IDENTITY_KINDS = frozenset({"node", "cluster"})

ServerChannelAcceptor = Callable[[Identity, str, str], "IProtocolFactory | Deferred[Any]"]


@implementer(ITunnel)
class ServerTunnelProtocol(TunnelConnection):
    """One agent's tunnel, on the proxy."""

    peer_commands = AGENT_COMMANDS
    peer_openable_kinds = AGENT_OPENABLE_KINDS
    initiator = False
    _local_name = "proxy"

    def __init__(self, factory: TunnelServerFactory) -> None:
        self.server = factory
        self.identity: Identity | None = None
        self.inventory: Inventory | None = None
        self.capabilities: tuple[str, ...] = ()
        # The multiplexer's settings are the factory's (_channel_settings).
        super().__init__(
            clock=factory.clock,
            heartbeat_interval=factory.heartbeat_interval,
            liveness=factory.liveness,
        )

    def _channel_settings(self) -> tuple[Any, int, int]:
        return (self._accept_from_agent, self.server.window, self.server.max_channels)

    def _resolve_identity(self) -> Identity:
        # Read at Hello, not in connectionMade: over TLS the peer certificate
        # exists only once the handshake is done, and Hello is the first box.
        try:
            identity = self.server.identity_for(self.transport)
        except Exception:
            _log.failure("could not read the identity of a tunnel peer")
            identity = None
        if identity is None or identity.kind not in TUNNEL_IDENTITY_KINDS:
            kind = getattr(identity, "kind", None)
            _log.warn("refused tunnel from a peer whose identity is {kind!r}", kind=kind)
            raise AccessDenied("only node and cluster identities may open a tunnel")
        # The kind and cluster are the same few strings for every tunnel: one
        # copy of each, not one per tunnel.
        identity = attrs.evolve(identity, kind=sys.intern(identity.kind),
                                cluster=sys.intern(identity.cluster))
        self.identity = identity
        return identity

    @property
    def peer_name(self) -> str:
        """The agent's identity (``node:NAME.CLUSTER``), made when logged."""
        identity = self.identity
        if identity is None:
            return self._peer_name
        return f"{identity.kind}:{identity.name}.{identity.cluster}"

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        try:
            self.server.forget(self)
            self.server.busy_liveness.forget(self)
            if self.inventory is not None:
                self.server.registry.unregister(self)
        finally:
            super().connectionLost(reason)
            mux = self._mux
            if mux is not None and mux._lost and self.identity is not None:
                # It ended with its tunnel (nothing held): nothing to resume.
                self.server.sessions.discard(self._session_key(), mux)

    def _accept_from_agent(self, kind: str, target: str) -> Any:
        if self.server.accept_channel is None or self.identity is None:
            raise AccessDenied(f"{kind} channels are not served here")
        return self.server.accept_channel(self.identity, kind, target)

    @Hello.responder
    def _hello(
        self, protocol_version: int, capabilities: list[str], inventory: str
    ) -> dict[str, Any]:
        if self.hello_done:
            raise BadRequest("Hello was already received")
        identity = self._resolve_identity()
        if protocol_version != PROTOCOL_VERSION:
            message = (
                f"tunnel protocol version {protocol_version} is not supported; "
                f"this proxy speaks version {PROTOCOL_VERSION}"
            )
            _log.warn("refused tunnel from {peer}: {message}", peer=self.peer_name, message=message)
            raise BadRequest(message)
        parsed = Inventory.from_json(inventory)
        if parsed.name != identity.name:
            _log.warn(
                "refused tunnel from {peer}: Hello names {claimed!r}",
                peer=self.peer_name,
                claimed=parsed.name,
            )
            raise AccessDenied(
                f"this certificate is for {identity.name!r}, not {parsed.name!r}"
            )
        self.hello_done = True
        self.inventory = _shared_strings(parsed, identity)
        # This end's own strings, not the ones decoded from the box: nothing
        # per tunnel for the same few names.
        offered = {c: c for c in self.offered_capabilities()}
        self.capabilities = tuple(offered[c] for c in capabilities[:64] if c in offered)
        if FAST_DATA_CAPABILITY in self.capabilities:
            self.use_fast_data()
        sessions = [c for c in capabilities[:64] if c.startswith(RESUME_SESSION_PREFIX)]
        resumed = self._start_session(sessions[0] if len(sessions) == 1 else None)
        _log.info("tunnel up from {peer}", peer=self.peer_name)
        # Registered after this answer is on its way (the answer is written
        # when this method returns): on_connect callbacks may open channels.
        self.clock.callLater(0, self._register)
        answer: dict[str, Any] = {
            "protocol_version": PROTOCOL_VERSION,
            "capabilities": [c for c in self.capabilities
                             if not c.startswith(RESUME_SESSION_PREFIX)],
            "heartbeat_interval": float(self.heartbeat_interval),
        }
        if self.resume_negotiated:
            answer["resumed"] = resumed
            answer["probe_interval"] = float(self.server.probe_interval)
        return answer

    # Read from the factory and the capabilities: nothing more per idle tunnel.
    @property
    def resume_budget(self) -> float:  # type: ignore[override]
        return self.server.resume_budget

    @property
    def resume_negotiated(self) -> bool:  # type: ignore[override]
        return RESUME_CAPABILITY in self.capabilities

    @property
    def probe_interval(self) -> float:  # type: ignore[override]
        return self.server.probe_interval

    def _session_key(self) -> tuple[str, str, str, str]:
        identity = self.identity
        assert identity is not None
        return (identity.kind, identity.cluster, identity.name, identity.uuid or "")

    def _start_session(self, offered: str | None) -> bool:
        """With resumption agreed: re-attach the agent's session if this
        proxy holds it for this very identity (True), else start it anew
        (its multiplexer is made with the first channel: an idle tunnel
        keeps none)."""
        if RESUME_CAPABILITY not in self.capabilities:
            return False
        if offered is None:
            # Offered resumption but named no session: nothing to resume to.
            self.capabilities = tuple(c for c in self.capabilities if c != RESUME_CAPABILITY)
            return False
        session = check_session_id(offered[len(RESUME_SESSION_PREFIX):])
        # Kept among the capabilities: no attribute more per idle tunnel.
        self.capabilities = (*self.capabilities, offered)
        held = self.server.sessions.adopt(self._session_key(), session, self)
        if held is not None:
            _log.info("{peer} resumes its session of {count} channels", peer=self.peer_name,
                      count=len(held.channels))
            self._adopt_mux(held)
            return True
        return False

    def _session_id(self) -> str | None:
        for capability in self.capabilities:
            if capability.startswith(RESUME_SESSION_PREFIX):
                return capability[len(RESUME_SESSION_PREFIX):]
        return None

    def _new_mux(self) -> ChannelMux:
        mux = super()._new_mux()
        session = self._session_id() if self.identity is not None else None
        if session is not None and not self._is_lost:
            mux.session_id = session
            mux.resumable = True
            self.server.sessions.register(self._session_key(), mux)
        return mux

    def resume_received(self, channels: list[ChannelState]) -> None:
        """The agent's account: answer with ours, then send again what it lacks."""
        if not self._resume_pending:
            raise ProtocolViolation("ResumeChannels without a session to resume")
        self._resume_pending = False
        mux = self.mux
        listed = {state.channel for state in channels}
        self.callRemote(ResumeChannels, channels=mux.states(only=listed))
        mux.resume(channels)
        _log.info("re-attached {count} channels of {peer}", count=len(mux.channels),
                  peer=self.peer_name)
        self._ensure_backpressure()
        self._channels_opened()

    def _detach_mux(self, mux: ChannelMux) -> bool:
        if not mux.session_id or self.identity is None:
            return False
        return self.server.sessions.detached(self._session_key(), mux)


    def _channels_opened(self) -> None:
        if self.resume_negotiated and self.busy:
            self.server.busy_liveness.watch(self)

    def _register(self) -> None:
        if self._is_lost or self._dropping:
            return
        self.server.registry.register(self)
        proxies = self.server.proxies()
        if proxies:
            self.send_discover(proxies)
        # The handshake's flights are long gone by now, and what registering
        # wrote (the control init, Discover) is encrypted and handed to TCP:
        # an idle tunnel need not keep the TLS buffers they grew (~5 KiB of
        # each of 10,000).
        shrink_tls_buffers(self.transport)

    @Heartbeat.responder
    def _heartbeat(self) -> dict[str, Any]:
        # Receiving it already counted as liveness (see TunnelConnection).
        return {}

    @staticmethod
    def _ignore(failure: Failure) -> None:
        return None

    def send_discover(self, proxies: list[str]) -> Deferred[Any]:
        """Tell the agent every proxy address of the cluster."""
        return self.call(Discover, proxies=list(proxies)).addErrback(self._ignore)

    @property
    def takes_control(self) -> bool:
        """Whether the agent asked for control pushes in Hello."""
        return CONTROL_CAPABILITY in self.capabilities

    def send_control(self, message: bytes) -> None:
        """Push one control message (in pieces of at most 48 KiB)."""
        if self._is_lost or self._dropping or self.transport is None:
            return
        # The same bytes go to every tunnel: serialized once, written to each.
        self.transport.write(control_boxes(message))

    def request_reconnect(self, delay: float = 0.0, reason: str = "proxy moving") -> Deferred[Any]:
        """Ask the agent to close this tunnel and dial again after ``delay`` seconds."""
        return self.call(Reconnect, delay=float(delay), reason=reason).addErrback(self._ignore)


#: What a proxy tunnel sets: its own attributes first, then the idle
#: tunnel's, then the rarer ones (past 30 CPython shares no more names).
SERVER_TUNNEL_ATTRIBUTES = (
    "server", "identity", "inventory", "capabilities", *TunnelConnection.INSTANCE_ATTRIBUTES
)
# At import, before any burst of agents makes tunnels in bulk: each idle
# tunnel then keeps only its values (see edgeaccess.memory).
share_instance_attributes(ServerTunnelProtocol, SERVER_TUNNEL_ATTRIBUTES)


_last_control: tuple[bytes, bytes] = (b"", b"")


def control_boxes(message: bytes) -> bytes:
    """The serialized ``ControlUpdate`` boxes carrying ``message`` (the last
    message's are kept: a broadcast serializes once for 10,000 tunnels)."""
    global _last_control
    if _last_control[0] is message or _last_control[0] == message:
        return _last_control[1]
    view = memoryview(message)
    boxes = []
    for start in range(0, max(len(view), 1), MAX_CONTROL_PIECE):
        more = start + MAX_CONTROL_PIECE < len(view)
        boxes.append(amp.AmpBox(_command=ControlUpdate.commandName,
                                data=bytes(view[start:start + MAX_CONTROL_PIECE]),
                                more=b"True" if more else b"False").serialize())
    _last_control = (message, b"".join(boxes))
    return _last_control[1]


def _shared_strings(inventory: Inventory, identity: Identity) -> Inventory:
    """``inventory`` holding the identity's name and one copy of each label
    string among all tunnels (a fleet repeats the same few labels), not
    strings of its own decoded from each Hello."""
    labels = {sys.intern(key): sys.intern(value) for key, value in inventory.labels.items()}
    return attrs.evolve(inventory, name=identity.name, labels=labels)


@implementer(ITunnelRegistry)
class TunnelRegistry:
    """Connected agents by (cluster, name) and (cluster, uuid); newest wins."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], ServerTunnelProtocol] = {}
        # Keyed by the tunnel itself (hashed by identity): no int object
        # per entry, as id() keys would need.
        self._tunnels: dict[ServerTunnelProtocol, None] = {}
        self._subscribers: list[tuple[Callable[[Any], None], Callable[[Any], None]]] = []

    @staticmethod
    def _keys(tunnel: ServerTunnelProtocol) -> list[tuple[str, str]]:
        identity = tunnel.identity
        assert identity is not None
        keys = [(identity.cluster, identity.name)]
        if identity.uuid:
            keys.append((identity.cluster, identity.uuid))
        return keys

    def register(self, tunnel: ServerTunnelProtocol) -> None:
        """Record a tunnel whose Hello was accepted."""
        for key in self._keys(tunnel):
            previous = self._by_key.get(key)
            if previous is not None and previous is not tunnel:
                _log.info("newer tunnel replaces the old one for {key}", key="/".join(key))
            self._by_key[key] = tunnel
        self._tunnels[tunnel] = None
        for on_connect, _ in list(self._subscribers):
            _call_safely(on_connect, tunnel)

    def unregister(self, tunnel: ServerTunnelProtocol) -> None:
        """Forget a tunnel that closed (keys now held by a newer tunnel stay)."""
        if tunnel not in self._tunnels:
            return
        del self._tunnels[tunnel]
        for key in self._keys(tunnel):
            if self._by_key.get(key) is tunnel:
                del self._by_key[key]
        for _, on_disconnect in list(self._subscribers):
            _call_safely(on_disconnect, tunnel)

    def lookup(self, cluster: str, name_or_uuid: str) -> ServerTunnelProtocol | None:
        """The live tunnel of node ``name_or_uuid`` in ``cluster``, or None."""
        return self._by_key.get((cluster, name_or_uuid))

    def connected(self) -> list[ServerTunnelProtocol]:
        """Every live tunnel."""
        return list(self._tunnels)

    def subscribe(
        self, on_connect: Callable[[Any], None], on_disconnect: Callable[[Any], None]
    ) -> Callable[[], None]:
        """Be told of every tunnel that comes up or goes; returns an unsubscribe callable."""
        entry = (on_connect, on_disconnect)
        self._subscribers.append(entry)
        return lambda: self._subscribers.remove(entry)


class LiveTunnelNodes:
    """The node records of the nodes whose tunnel is up here (``AuthServer.live_nodes``).

    While its tunnel is up, a node is listed from the registry, in memory:
    no backend record has to be rewritten for each of 10,000 tunnels to keep
    them listed.
    """

    def __init__(self, registry: TunnelRegistry, cluster: str) -> None:
        self._registry = registry
        self._cluster = cluster

    @staticmethod
    def _record(tunnel: ServerTunnelProtocol) -> dict[str, Any] | None:
        identity = tunnel.identity
        if identity is None or identity.kind != "node" or not identity.uuid:
            return None
        labels = tunnel.inventory.labels if tunnel.inventory is not None else {}
        return {"name": identity.name, "uuid": identity.uuid, "address": "tunnel",
                "labels": dict(labels)}

    def records(self) -> list[dict[str, Any]]:
        """One record per node with a live tunnel."""
        found = (self._record(t) for t in self._registry.connected())
        return [record for record in found if record is not None]

    def find(self, name_or_uuid: str) -> list[dict[str, Any]]:
        """The record of the node named ``name_or_uuid`` (or with that uuid), if its tunnel is up."""
        tunnel = self._registry.lookup(self._cluster, name_or_uuid)
        record = self._record(tunnel) if tunnel is not None else None
        return [record] if record is not None else []


def _call_safely(callback: Callable[[Any], None], tunnel: ServerTunnelProtocol) -> None:
    try:
        callback(tunnel)
    except Exception:
        _log.failure("tunnel registry subscriber {callback!r} failed", callback=callback)


class TunnelServerFactory(Factory):
    """Builds :class:`ServerTunnelProtocol` for each agent that connects.

    :param clock: timers for heartbeats.
    :param identity_for: reads the peer Identity from the transport (the lead
        passes one that reads the X.509 client certificate).
    :param registry: where connected agents are listed.
    :param accept_channel: decides channels the agent opens (kind ``auth``).
    :param proxies: returns every proxy address, sent to agents with Discover.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        identity_for: Callable[[ITransport], Identity | None],
        registry: TunnelRegistry | None = None,
        accept_channel: ServerChannelAcceptor | None = None,
        heartbeat_interval: float = 30.0,
        window: int = DEFAULT_WINDOW,
        max_channels: int = 1024,
        proxies: Callable[[], list[str]] | None = None,
        resume_budget: float = DEFAULT_RESUME_BUDGET,
        probe_interval: float = PROBE_INTERVAL,
    ) -> None:
        self.clock = clock
        self.identity_for = identity_for
        self.registry = registry if registry is not None else TunnelRegistry()
        self.accept_channel = accept_channel
        self.heartbeat_interval = heartbeat_interval
        self.window = window
        self.max_channels = max_channels
        self.proxies = proxies or (lambda: [])
        self.accepting = True
        #: Drops agents silent for 3 intervals: one check for every tunnel.
        self.liveness = LivenessMonitor(clock, heartbeat_interval)
        #: Seconds of outage an agent's channels survive (0: no resumption).
        self.resume_budget = resume_budget
        #: How often agents probe while channels are open, and the closer
        #: watch on those tunnels (a cut or black hole found in seconds).
        self.probe_interval = probe_interval
        self.busy_liveness = BusyLivenessMonitor(clock, probe_interval)
        #: Agents' sessions, attached or waiting for their next tunnel.
        self.sessions = SessionTable(clock, resume_budget)
        self._live: dict[ServerTunnelProtocol, None] = {}

    def buildProtocol(self, addr: IAddress) -> ServerTunnelProtocol | None:
        if not self.accepting:
            return None
        tunnel = ServerTunnelProtocol(self)
        self._live[tunnel] = None
        return tunnel

    def forget(self, tunnel: ServerTunnelProtocol) -> None:
        """A tunnel's connection is gone (called by the tunnel)."""
        self._live.pop(tunnel, None)

    def announce_proxies(self) -> None:
        """Send the current proxy list to every connected agent."""
        proxies = self.proxies()
        for tunnel in self.registry.connected():
            tunnel.send_discover(proxies)

    def shutdown(
        self, delay: float = 0.0, reason: str = "proxy shutting down", timeout: float = 10.0,
        spread: float = 0.0,
    ) -> Deferred[None]:
        """Stop accepting, ask every agent to reconnect elsewhere, close what remains.

        The agents' waits are staggered: the i-th of n tunnels is told to come
        back after ``delay + spread * i / n`` seconds, so that they do not
        all return at once. Fires once every tunnel is closed (agents close
        on Reconnect; the rest are closed after ``timeout`` seconds).
        """
        self.accepting = False
        tunnels = list(self._live)
        if not tunnels:
            return succeed(None)
        _log.info("asking {count} agents to reconnect: {reason}", count=len(tunnels), reason=reason)
        for index, tunnel in enumerate(tunnels):
            if tunnel.hello_done:
                tunnel.request_reconnect(delay + spread * index / len(tunnels), reason)
            else:
                tunnel.disconnect(reason)

        def force() -> None:
            for tunnel in list(self._live):
                tunnel.disconnect("shutdown timeout")

        forcing = self.clock.callLater(timeout, force)
        done: Deferred[Any] = DeferredList([t.when_lost() for t in tunnels])

        def finished(_: object) -> None:
            if forcing.active():
                forcing.cancel()

        return done.addCallback(finished)
