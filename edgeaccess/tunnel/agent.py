"""The agent side of the reverse tunnel: dials the proxy and keeps the tunnel up.

:class:`AgentTunnelProtocol` is one tunnel (Hello, heartbeats, the proxy's
Discover and Reconnect). :class:`TunnelAgent` is the service that dials it
again and again, forever, as a declared state machine (the shape of
Twisted's ``ClientService``)::

    idle -> connecting -> connected -> waiting (backing off) -> connecting ...
            any state -> stopping -> stopped

Every change of state is one log line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol as TypingProtocol

from automat import TypeMachineBuilder, pep614
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeaccess.errors import BadRequest, NodeOffline
from edgeaccess.tunnel.backoff import UniformRandom, backoff_delay
from edgeaccess.tunnel.channels import ChannelAcceptor
from edgeaccess.tunnel.connection import TunnelConnection
from edgeaccess.tunnel.interfaces import ITunnel
from edgeaccess.tunnel.mux import ChannelMux
from edgeaccess.tunnel.resume import ResumeSlot, new_session_id
from edgeaccess.tunnel.protocol import (
    CONTROL_CAPABILITY,
    DEFAULT_WINDOW,
    FAST_DATA_CAPABILITY,
    PROTOCOL_VERSION,
    PROXY_COMMANDS,
    PROXY_OPENABLE_KINDS,
    RESUME_CAPABILITY,
    RESUME_SESSION_PREFIX,
    ChannelState,
    ControlUpdate,
    Discover,
    Heartbeat,
    Hello,
    Inventory,
    ProtocolViolation,
    Reconnect,
    ResumeChannels,
    check_delay,
    check_proxies,
    check_reason,
)

_log = Logger()

#: Longest wait before redialing while channels wait for a tunnel (seconds).
QUICK_REDIAL = 1.0
#: Why an agent's channels end when it stops (their sessions audit it).
STOPPING = "the node is stopping"
#: Largest control message an agent assembles from ControlUpdate pieces.
MAX_CONTROL_MESSAGE = 16 * 1024 * 1024


@implementer(ITunnel)
class AgentTunnelProtocol(TunnelConnection):
    """One tunnel, on the agent: says Hello, pings, obeys Discover and Reconnect.

    :ivar ready: fires with this protocol once the proxy accepted Hello;
        fails if it refused or the connection dropped first.
    :ivar requested_delay: set when the proxy asked us to reconnect.
    """

    peer_commands = PROXY_COMMANDS
    peer_openable_kinds = PROXY_OPENABLE_KINDS
    initiator = True
    # The peer is a proxy (mutual TLS): it may tell whose connection a channel carries.
    peer_asserts_source = True

    def __init__(
        self,
        *,
        clock: IReactorTime,
        inventory: Inventory,
        accept_channel: ChannelAcceptor | None = None,
        heartbeat_interval: float = 30.0,
        window: int = DEFAULT_WINDOW,
        max_channels: int = 1024,
        on_discover: Callable[[list[str]], None] | None = None,
        on_control: Callable[[bytes], None] | None = None,
        resume: ResumeSlot | None = None,
    ) -> None:
        super().__init__(
            clock=clock,
            accept_channel=accept_channel,
            heartbeat_interval=heartbeat_interval,
            window=window,
            max_channels=max_channels,
        )
        self._resume_slot = None
        if resume is not None:
            self.use_resume_slot(resume)
        self.inventory = inventory
        self._on_control = on_control
        self._control_pieces: list[bytes] = []
        self._control_size = 0
        self.identity = None
        self.requested_delay: float | None = None
        self.proxy_capabilities: tuple[str, ...] = ()
        self._on_discover = on_discover
        self.ready: Deferred[AgentTunnelProtocol] = Deferred(self._cancel_handshake)
        self.mux.local_name = inventory.name

    def use_resume_slot(self, slot: ResumeSlot) -> None:
        """Keep this tunnel's channels in ``slot`` across outages (and carry
        the session waiting there, if any). Before ``Hello`` only."""
        self._resume_slot = slot
        self.resume_budget = slot.budget
        self.probe_interval = slot.probe_interval
        waiting = slot.take()
        if waiting is not None:
            self._adopt_mux(waiting)

    #: Whether Hello goes out at connection (else :meth:`send_hello` is
    #: called later, e.g. once TLS says who the peer is).
    hello_at_connection = True

    def connectionMade(self) -> None:
        super().connectionMade()
        # Only the proxy's answer to our Hello gates the proxy's commands.
        self.hello_done = True
        self.mux.peer_name = f"proxy {self.transport.getPeer()}"
        if self.hello_at_connection:
            self.send_hello()

    def send_hello(self) -> None:
        """Say Hello (inventory, capabilities, the session to resume)."""
        self.call(
            Hello,
            protocol_version=PROTOCOL_VERSION,
            capabilities=self.offered_capabilities(),
            inventory=self.inventory.to_json(),
        ).addCallbacks(self._hello_answered, self._hello_refused)

    def _new_mux(self) -> ChannelMux:
        mux = super()._new_mux()
        if self.resume_budget > 0:
            mux.session_id = new_session_id()
        return mux

    def offered_capabilities(self) -> list[str]:
        """Control pushes only for an agent that takes them."""
        offered = super().offered_capabilities()
        if self._on_control is None:
            offered = [c for c in offered if c != CONTROL_CAPABILITY]
        if RESUME_CAPABILITY in offered:
            offered.append(RESUME_SESSION_PREFIX + (self.mux.session_id or ""))
        return offered

    @ControlUpdate.responder
    def _control_update(self, data: bytes, more: bool) -> dict[str, Any]:
        self._control_size += len(data)
        if self._control_size > MAX_CONTROL_MESSAGE:
            raise ProtocolViolation("control message too large")
        self._control_pieces.append(data)
        if not more:
            message = b"".join(self._control_pieces)
            self._control_pieces, self._control_size = [], 0
            if self._on_control is not None:
                try:
                    self._on_control(message)
                except Exception:
                    _log.failure("applying a control message from {peer} failed",
                                 peer=self.mux.peer_name)
        return {}

    def _hello_answered(self, answer: dict[str, Any]) -> None:
        if self.ready.called:
            return
        if answer["protocol_version"] != PROTOCOL_VERSION:
            message = (
                f"the proxy speaks tunnel protocol version {answer['protocol_version']}; "
                f"this agent speaks version {PROTOCOL_VERSION}"
            )
            self.violation(message)
            self.ready.errback(BadRequest(message))
            return
        interval = answer["heartbeat_interval"]
        if math.isfinite(interval) and 0.01 <= interval <= 3600.0:
            if interval != self.heartbeat_interval:
                self.heartbeat_interval = interval
                if self._liveness_call is not None and self._liveness_call.active():
                    self._liveness_call.cancel()
                self._schedule_liveness()
        self.proxy_capabilities = tuple(answer["capabilities"][:64])
        if self.fast_data_offered and FAST_DATA_CAPABILITY in self.proxy_capabilities:
            self.use_fast_data()
        self._start_session(answer)
        self.ready.callback(self)

    def _start_session(self, answer: dict[str, Any]) -> None:
        """Resume the waiting session, or give up its channels and start anew."""
        mux = self.mux
        resumable = self.resume_budget > 0 and RESUME_CAPABILITY in self.proxy_capabilities
        if resumable:
            self.resume_negotiated = True
            probe = answer.get("probe_interval")
            if isinstance(probe, float) and math.isfinite(probe) and 0.05 <= probe <= 60.0:
                self.probe_interval = probe
                if self._resume_slot is not None:
                    self._resume_slot.probe_interval = probe
        if self._resume_pending:
            if resumable and answer.get("resumed"):
                _log.info("re-attaching {count} channels on the tunnel to {peer}",
                          count=len(mux.channels), peer=mux.peer_name)
                self.callRemote(ResumeChannels, channels=mux.states())
                return
            self._resume_pending = False
            mux.expire("the proxy no longer holds the channels" if resumable
                       else "the proxy cannot resume channels")
            self._mux = None
            fresh = self.mux
            fresh.local_name, fresh.peer_name = mux.local_name, mux.peer_name
            mux = fresh
        mux.resumable = resumable

    def resume_received(self, channels: list[ChannelState]) -> None:
        """The proxy's account: re-attach and send again what it lacks."""
        if not self._resume_pending or not self.ready.called:
            raise ProtocolViolation("ResumeChannels without a session to resume")
        self._resume_pending = False
        mux = self.mux
        mux.resume(channels)
        _log.info("re-attached {count} channels on the tunnel to {peer}",
                  count=len(mux.channels), peer=mux.peer_name)
        self._ensure_backpressure()

    def _detach_mux(self, mux: ChannelMux) -> bool:
        slot = self._resume_slot
        if slot is None:
            return False
        slot.detached(mux)
        return True

    def _channels_opened(self) -> None:
        # Probe from now on (a cut is found in seconds, not heartbeats).
        if not self.busy or self._liveness_period <= self.probe_interval:
            return
        if self._liveness_call is not None and self._liveness_call.active():
            self._liveness_call.cancel()
            self._silent_intervals = 0
            self._schedule_liveness()

    def _hello_refused(self, failure: Failure) -> None:
        if self.ready.called:
            return
        _log.warn(
            "{peer} refused the tunnel: {reason}",
            peer=self.mux.peer_name,
            reason=failure.getErrorMessage(),
        )
        self._drop("Hello refused")
        self.ready.errback(failure)

    def _cancel_handshake(self, _: Deferred[Any]) -> None:
        self._drop("cancelled")

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        try:
            super().connectionLost(reason)
        finally:
            if not self.ready.called:
                self.ready.errback(NodeOffline("the tunnel closed during the handshake"))

    def interval_elapsed(self) -> None:
        if self.ready.called and not self._is_lost:
            self.call(Heartbeat).addErrback(lambda _: None)

    @Discover.responder
    def _discover(self, proxies: list[str]) -> dict[str, Any]:
        check_proxies(proxies)
        if self._on_discover is not None:
            try:
                self._on_discover(list(proxies))
            except Exception:
                _log.failure("Discover callback failed")
        return {}

    @Reconnect.responder
    def _reconnect(self, delay: float, reason: str) -> dict[str, Any]:
        self.requested_delay = check_delay(delay)
        _log.info(
            "{peer} asks us to reconnect in {delay} s: {reason}",
            peer=self.mux.peer_name,
            delay=delay,
            reason=check_reason(reason)[:200],
        )
        # After the answer (written when this method returns) is out.
        self.clock.callLater(0, self.disconnect, "reconnect requested by the proxy")
        return {}


class _Agent(TypingProtocol):
    def start(self) -> None:
        "Start dialing."

    def stop(self) -> Deferred[None]:
        "Stop dialing and close the tunnel; fires when it is closed."

    def when_connected(self) -> Deferred[AgentTunnelProtocol]:
        "The live tunnel, now or when it comes."

    def _connected(self, tunnel: AgentTunnelProtocol) -> None:
        "The proxy accepted our Hello."

    def _connect_failed(self, failure: Failure) -> None:
        "Dialing or the handshake failed."

    def _disconnected(self, tunnel: AgentTunnelProtocol) -> None:
        "The live tunnel closed."

    def _retry(self) -> None:
        "The wait is over."


@dataclass
class _AgentCore:
    endpoint_factory: Callable[[], IStreamClientEndpoint]
    protocol_factory: Callable[[], AgentTunnelProtocol]
    clock: IReactorTime
    rng: UniformRandom
    base: float
    cap: float
    name: str
    #: True while channels wait for a tunnel: redial within a second (jittered).
    quick_redial: Callable[[], bool] = lambda: False
    failures: int = 0
    state: str = "idle"
    last_delay: float | None = None
    stop_waiters: list[Deferred[None]] = field(default_factory=list)
    connect_waiters: list[Deferred[AgentTunnelProtocol]] = field(default_factory=list)
    current: AgentTunnelProtocol | None = None

    def enter(self, state: str, **details: Any) -> None:
        self.state = state
        extra = "".join(f", {key} {value}" for key, value in details.items())
        _log.info("tunnel agent {name}: {state}{extra}", name=self.name, state=state, extra=extra)

    def finish_stopping(self) -> None:
        self.current = None
        self.enter("stopped")
        waiters, self.stop_waiters = self.stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        connecting, self.connect_waiters = self.connect_waiters, []
        for waiter in connecting:
            waiter.errback(CancelledError())


class _OneProtocolFactory(Factory):
    def __init__(self, build: Callable[[], AgentTunnelProtocol]) -> None:
        self._build = build

    def buildProtocol(self, addr: IAddress) -> AgentTunnelProtocol:
        return self._build()


def _make_machine() -> Callable[[_AgentCore], _Agent]:
    machine = TypeMachineBuilder(_Agent, _AgentCore)

    def attempt(c: _Agent, s: _AgentCore) -> Deferred[Any]:
        s.enter("connecting")
        try:
            endpoint = s.endpoint_factory()
            connecting: Deferred[Any] = endpoint.connect(_OneProtocolFactory(s.protocol_factory))
        except Exception:
            connecting = fail()
        connecting.addCallback(lambda tunnel: tunnel.ready)
        connecting.addCallbacks(c._connected, c._connect_failed)
        return connecting

    def wait(c: _Agent, s: _AgentCore, cause: Any = None) -> IDelayedCall:
        requested = getattr(cause, "requested_delay", None)
        if requested is not None:
            delay = requested
            s.enter("waiting", delay=f"{delay:.1f} s as the proxy asked")
        else:
            delay = backoff_delay(s.failures, s.rng, s.base, s.cap)
            if s.quick_redial():
                delay = min(delay, s.rng.uniform(0.1, QUICK_REDIAL))
            else:
                # Quick redials (bounded by the outage budget) do not grow the
                # backoff: past the budget the agent still comes back within
                # seconds of the link, and the proxy learns its channels ended.
                s.failures += 1
            reason = cause.getErrorMessage() if isinstance(cause, Failure) else "tunnel lost"
            s.enter("waiting", attempt=s.failures, delay=f"{delay:.1f} s", after=reason)
        s.last_delay = delay
        s.current = None
        return s.clock.callLater(delay, c._retry)

    def remember(c: _Agent, s: _AgentCore, tunnel: AgentTunnelProtocol) -> AgentTunnelProtocol:
        s.failures = 0
        s.current = tunnel
        s.enter("connected", proxy=tunnel.mux.peer_name)
        tunnel.when_lost().addCallback(lambda _: c._disconnected(tunnel))
        waiters, s.connect_waiters = s.connect_waiters, []
        for waiter in waiters:
            waiter.callback(tunnel)
        return tunnel

    Idle = machine.state("Idle")
    Connecting = machine.state("Connecting", attempt)
    Connected = machine.state("Connected", remember)
    Waiting = machine.state("Waiting", wait)
    Stopping = machine.state("Stopping")
    Stopped = machine.state("Stopped")

    Idle.upon(_Agent.start).to(Connecting).returns(None)
    Stopped.upon(_Agent.start).to(Connecting).returns(None)
    Connecting.upon(_Agent.start).loop().returns(None)
    Connected.upon(_Agent.start).loop().returns(None)
    Waiting.upon(_Agent.start).loop().returns(None)
    Stopping.upon(_Agent.start).loop().returns(None)

    Connecting.upon(_Agent._connected).to(Connected).returns(None)
    Connecting.upon(_Agent._connect_failed).to(Waiting).returns(None)
    # A handshake that fails also loses its connection: _connect_failed decides.
    Connecting.upon(_Agent._disconnected).loop().returns(None)
    Connected.upon(_Agent._disconnected).to(Waiting).returns(None)
    Waiting.upon(_Agent._retry).to(Connecting).returns(None)

    @pep614(Idle.upon(_Agent.stop).to(Stopped))
    @pep614(Stopped.upon(_Agent.stop).loop())
    def stopped_already(c: _Agent, s: _AgentCore) -> Deferred[None]:
        return succeed(None)

    @pep614(Connecting.upon(_Agent.stop).to(Stopping))
    def stop_connecting(c: _Agent, s: _AgentCore, attempt: Deferred[Any]) -> Deferred[None]:
        s.enter("stopping")
        waiter: Deferred[None] = Deferred()
        s.stop_waiters.append(waiter)
        attempt.cancel()
        return waiter

    @pep614(Connected.upon(_Agent.stop).to(Stopping))
    def stop_connected(
        c: _Agent, s: _AgentCore, tunnel: AgentTunnelProtocol
    ) -> Deferred[None]:
        s.enter("stopping")
        waiter: Deferred[None] = Deferred()
        s.stop_waiters.append(waiter)
        tunnel.disconnect("agent stopping")
        return waiter

    @pep614(Waiting.upon(_Agent.stop).to(Stopped))
    def stop_waiting(c: _Agent, s: _AgentCore, retry: IDelayedCall) -> Deferred[None]:
        retry.cancel()
        s.finish_stopping()
        return succeed(None)

    @pep614(Stopping.upon(_Agent.stop).loop())
    def stop_stopping(c: _Agent, s: _AgentCore) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        s.stop_waiters.append(waiter)
        return waiter

    @pep614(Stopping.upon(_Agent._connect_failed).to(Stopped))
    @pep614(Stopping.upon(_Agent._disconnected).to(Stopped))
    def stopped(c: _Agent, s: _AgentCore, cause: Any = None) -> None:
        s.finish_stopping()

    @pep614(Stopping.upon(_Agent._connected).to(Stopping))
    def connected_while_stopping(
        c: _Agent, s: _AgentCore, tunnel: AgentTunnelProtocol
    ) -> None:
        tunnel.disconnect("agent stopping")

    @pep614(Connected.upon(_Agent.when_connected).loop())
    def already_connected(
        c: _Agent, s: _AgentCore, tunnel: AgentTunnelProtocol
    ) -> Deferred[AgentTunnelProtocol]:
        return succeed(tunnel)

    @pep614(Idle.upon(_Agent.when_connected).loop())
    @pep614(Connecting.upon(_Agent.when_connected, nodata=True).loop())
    @pep614(Waiting.upon(_Agent.when_connected, nodata=True).loop())
    def await_connection(c: _Agent, s: _AgentCore) -> Deferred[AgentTunnelProtocol]:
        waiter: Deferred[AgentTunnelProtocol] = Deferred()
        s.connect_waiters.append(waiter)
        return waiter

    @pep614(Stopping.upon(_Agent.when_connected).loop())
    @pep614(Stopped.upon(_Agent.when_connected).loop())
    def not_connecting(c: _Agent, s: _AgentCore) -> Deferred[AgentTunnelProtocol]:
        return fail(CancelledError())

    return machine.build()


_AgentMachine = _make_machine()


class TunnelAgent(Service):
    """Keeps one reverse tunnel to a proxy up, forever.

    :param endpoint_factory: returns the endpoint to dial for each attempt
        (TLS 1.3 with the node's certificate in production, memory in tests).
    :param inventory: what Hello announces.
    :param clock: timers; :param rng: randomness for the backoff jitter.
    :param accept_channel: decides every channel the proxy opens.
    :param on_discover: told the proxy list the proxy sends.
    :param on_control: given each control message the proxy pushes (bytes
        of JSON, :mod:`edgeaccess.controlplane.state`).
    """

    def __init__(
        self,
        *,
        endpoint_factory: Callable[[], IStreamClientEndpoint],
        inventory: Inventory,
        clock: IReactorTime,
        rng: UniformRandom,
        accept_channel: ChannelAcceptor | None = None,
        heartbeat_interval: float = 30.0,
        window: int = DEFAULT_WINDOW,
        max_channels: int = 1024,
        on_discover: Callable[[list[str]], None] | None = None,
        on_control: Callable[[bytes], None] | None = None,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        resume_budget: float = 0.0,
    ) -> None:
        #: The session whose channels outlive each tunnel (None: no resumption).
        self.resume = ResumeSlot(clock, resume_budget) if resume_budget > 0 else None

        def build() -> AgentTunnelProtocol:
            return AgentTunnelProtocol(
                clock=clock,
                inventory=inventory,
                accept_channel=accept_channel,
                heartbeat_interval=heartbeat_interval,
                window=window,
                max_channels=max_channels,
                on_discover=on_discover,
                on_control=on_control,
                resume=self.resume,
            )

        resume = self.resume
        self._core = _AgentCore(
            endpoint_factory=endpoint_factory,
            protocol_factory=build,
            clock=clock,
            rng=rng,
            base=backoff_base,
            cap=backoff_cap,
            name=inventory.name,
            quick_redial=(lambda: resume.waiting) if resume is not None else (lambda: False),
        )
        self._machine = _AgentMachine(self._core)

    @property
    def state(self) -> str:
        """``idle``, ``connecting``, ``connected``, ``waiting``, ``stopping`` or ``stopped``."""
        return self._core.state

    @property
    def tunnel(self) -> AgentTunnelProtocol | None:
        """The live tunnel, if connected."""
        return self._core.current

    @property
    def last_delay(self) -> float | None:
        """The last wait chosen before redialing (seconds)."""
        return self._core.last_delay

    def when_connected(self) -> Deferred[AgentTunnelProtocol]:
        """The live tunnel, now or once connected (fails if the agent stops)."""
        return self._machine.when_connected()

    def startService(self) -> None:
        super().startService()
        self._machine.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        resume = self.resume
        tunnel = self._core.current
        if resume is not None and tunnel is not None and tunnel._mux is not None:
            # Stopping is no outage: the peer must not hold our channels for
            # its budget either (a disabled trust cuts its sessions at once),
            # so each is closed on the wire before the tunnel goes.
            for channel in list(tunnel._mux.channels.values()):
                channel.lost_reason = STOPPING
                channel.abortConnection()
        stopping = self._machine.stop()
        if resume is None:
            return stopping

        def end_the_session(result: object) -> object:
            # Stopping is no outage: the channels end now, not after the budget.
            mux = resume.mux
            if mux is not None and not mux._lost:
                mux.expire(STOPPING)
            return result

        return stopping.addBoth(end_the_session)
