"""The AMP connection under a tunnel, shared by the agent and the proxy sides.

It carries the channel multiplexer, checks every incoming box (size, which
commands this peer may send, arguments), keeps the liveness timer, and
relays whole-connection backpressure from the TLS transport to the channels.
A peer that breaks the protocol gets one log line and a closed tunnel; no
exception ever leaves ``dataReceived``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeaccess import internals
from edgeaccess.errors import NodeOffline
from edgeaccess.tunnel.channels import ChannelAcceptor
from edgeaccess.tunnel.framing import (
    FRAME_DATA,
    MAX_FAST_FRAME,
    FramedBoxReader,
    data_frame,
    window_adjust_frame,
)
from edgeaccess.tunnel.liveness import MISSED_INTERVALS, PROBE_INTERVAL, LivenessMonitor
from edgeaccess.tunnel.mux import ChannelMux, decode_remote_error
from edgeaccess.tunnel.protocol import (
    CAPABILITIES,
    DEFAULT_WINDOW,
    FAST_DATA_CAPABILITY,
    MAX_BOX_BYTES,
    MAX_BOX_KEYS,
    MAX_FRAME,
    RESUME_CAPABILITY,
    ChannelState,
    PRIORITY_CAPABILITY,
    ChannelPriority,
    CloseChannel,
    Data,
    EndOfFile,
    OpenChannel,
    ProtocolViolation,
    ResumeChannels,
    WindowAdjust,
    check_channel_id,
)
from edgeaccess.tunnel.fasttls import (
    flush_gathered_writes,
    install_fast_tls,
    shorten_send_path,
)
from edgeaccess.tunnel.scheduler import SendScheduler, priority_enabled

_log = Logger()

__all__ = ["MISSED_INTERVALS", "TunnelConnection"]

_HEARTBEAT = b"Heartbeat"


class _TransportAddress:
    """A read-through stand-in for an address AMP stores at connection
    (``_transportPeer``, ``_transportHost``): what it stores is dropped, the
    address is asked of the transport when read."""

    __slots__ = ("_getter",)

    def __init__(self, getter: str) -> None:
        self._getter = getter

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        transport = instance.__dict__.get("transport")
        if transport is None:
            return None
        try:
            return getattr(transport, self._getter)()
        except Exception:  # a closed or test transport: only a log line needs it
            return None

    def __set__(self, instance: Any, value: Any) -> None:
        pass


@implementer(IPushProducer)
class _SendBackpressure:
    """Registered on the TLS transport: its pause/resume reach every channel."""

    __slots__ = ("_mux",)

    def __init__(self, mux: ChannelMux) -> None:
        self._mux = mux

    def pauseProducing(self) -> None:
        self._mux.pause_sending()

    def resumeProducing(self) -> None:
        self._mux.resume_sending()

    def stopProducing(self) -> None:
        pass


class TunnelConnection(FramedBoxReader, amp.AMP):
    """Base of :class:`AgentTunnelProtocol` and :class:`ServerTunnelProtocol`.

    Subclasses set :attr:`peer_commands` (what the peer may send),
    :attr:`peer_openable_kinds` and :attr:`initiator`.
    Data and WindowAdjust travel as fast frames (:mod:`edgeaccess.tunnel.framing`)
    once both ends offered :data:`FAST_DATA_CAPABILITY`; set
    :attr:`fast_data_offered` to False before the connection is made to
    keep AMP ``Data`` boxes.
    """

    peer_commands: frozenset[bytes] = frozenset()
    peer_openable_kinds: frozenset[str] = frozenset()
    initiator = False
    #: Whether the peer may assert a channel's ``source`` (only a proxy may).
    peer_asserts_source = False
    #: Whether this end offers fast data frames in ``Hello``.
    fast_data_offered = True
    #: Whether Data and WindowAdjust are written as fast frames (both offered).
    _fast_out = False
    #: The channel multiplexer, made with the first channel (see :attr:`mux`).
    _mux: ChannelMux | None = None
    #: ``(accept_channel, window, max_channels)`` of the multiplexer.
    _mux_settings: tuple[ChannelAcceptor | None, int, int] = (None, DEFAULT_WINDOW, 1024)
    #: Names in log lines (and the multiplexer's), until it exists.
    _local_name = "local"
    _peer_name = "peer"
    # Class-level defaults of state an idle tunnel never changes: Python
    # shares one key table among a class's instances only up to 30 instance
    # attributes; past that every tunnel gets a dict of its own (~1.3 KB of
    # each of 10,000 idle tunnels).
    hello_done = False
    closed_reason: str | None = None
    _dropping = False
    _is_lost = False
    _producer_registered = False
    # The timer of a tunnel without a shared LivenessMonitor (the agent's).
    _heard = False
    _silent_intervals = 0
    _liveness_call: IDelayedCall | None = None
    _lost_waiters: list[Deferred[None]] | None = None
    #: Seconds of outage channels survive (0: this end offers no resumption).
    resume_budget = 0.0
    #: Seconds between probes while resumable channels are open (agent).
    probe_interval = PROBE_INTERVAL
    #: Both ends offered resumption on this tunnel.
    resume_negotiated = False
    #: A resumed session's accounts are not exchanged yet (nothing is sent
    #: on its channels meanwhile).
    _resume_pending = False
    #: The period the agent's own liveness timer runs with now.
    _liveness_period = 0.0
    #: AMP keeps the transport's addresses only for its log lines: read when
    #: asked instead of kept (two address objects per tunnel).
    _transportPeer = _TransportAddress("getPeer")
    _transportHost = _TransportAddress("getHost")
    #: The attributes a live tunnel sets: an idle one's (AMP's, the
    #: parser's, this class's), then a busy one's, for
    #: :func:`edgeaccess.memory.share_instance_attributes`. A closing
    #: tunnel's are left out: CPython shares at most 30 names per class.
    INSTANCE_ATTRIBUTES = (
        "_ampInitialized", "_outstandingRequests", "locator", "boxReceiver", "clock",
        "_liveness", "last_heard", "heartbeat_interval", "_box_keys", "_box_bytes",
        "transport", "boxSender", "state", "MAX_LENGTH", "_currentBox", "_currentKey",
        "hello_done", "fast_frames_in", "_fast_out", "_counter",
        "_peer_name", "_chunks", "_pending", "_needed", "_mux", "_producer_registered",
    )

    def __init__(
        self,
        *,
        clock: IReactorTime,
        accept_channel: ChannelAcceptor | None = None,
        heartbeat_interval: float = 30.0,
        window: int = DEFAULT_WINDOW,
        max_channels: int = 1024,
        liveness: LivenessMonitor | None = None,
    ) -> None:
        # amp.AMP.__init__ without the state of file descriptor passing
        # (UNIX sockets only, never over a tunnel): ~0.5 KB and four entries
        # of the shared attribute table per tunnel.
        internals.init_amp(self)
        self.clock = clock
        # A shared monitor (the proxy's, for all its tunnels) or, without
        # one, this connection's own timer (the agent's: it pings too).
        self._liveness = liveness
        self.last_heard = 0.0
        self.heartbeat_interval = heartbeat_interval
        if (accept_channel, window, max_channels) != self._mux_settings:
            self._mux_settings = (accept_channel, window, max_channels)
        self._box_keys = 0
        self._box_bytes = 0

    # -- the public face ----------------------------------------------------

    def offered_capabilities(self) -> list[str]:
        """The capabilities this end announces in ``Hello``."""
        offered = list(CAPABILITIES)
        if not self.fast_data_offered:
            offered.remove(FAST_DATA_CAPABILITY)
        if self.resume_budget <= 0:
            offered.remove(RESUME_CAPABILITY)
        return offered

    def use_fast_data(self) -> None:
        """Both ends offered fast data: read and write Data and WindowAdjust as
        fast frames from now on.

        Called while handling ``Hello``: the proxy, before its answer is
        written and before it has any channel; the agent, when the answer
        arrives (the proxy reads frames from then on). Boxes and frames share
        one ordered stream, so nothing in flight is misread.
        """
        self.fast_frames_in = True
        self._fast_out = True
        if self._mux is not None:
            self._mux.max_frame_in = MAX_FAST_FRAME
            self._mux.max_frame_out = MAX_FAST_FRAME

    @property
    def mux(self) -> ChannelMux:
        """The channel multiplexer, made when first needed: an idle tunnel
        (most of a proxy's 10,000) never opens a channel, and the empty
        multiplexer is ~0.7 KB."""
        mux = self._mux
        if mux is None:
            mux = self._mux = self._new_mux()
        return mux

    def _adopt_mux(self, mux: ChannelMux) -> None:
        """Carry a detached session's multiplexer (its channels wait for
        :meth:`resume_received`)."""
        self._mux = mux
        mux.attach(self)
        # The scheduler hands gathered writes to this tunnel's socket now.
        mux.scheduler.set_flush(self._flush_writes)
        mux.max_frame_in = mux.max_frame_out = MAX_FAST_FRAME if self._fast_out else MAX_FRAME
        self._resume_pending = True

    def give_up_session(self) -> None:
        """A newer tunnel of the same peer takes this one's session: close
        this tunnel without touching the session's channels."""
        mux, self._mux = self._mux, None
        if mux is not None and self._producer_registered and self.transport is not None:
            self._producer_registered = False
            self.transport.unregisterProducer()
        self._drop("replaced by a newer tunnel of the same session")

    @property
    def busy(self) -> bool:
        """Whether resumable channels are open (the tunnel is probed often)."""
        mux = self._mux
        return mux is not None and mux.resumable and mux.held

    def _detach_mux(self, mux: ChannelMux) -> bool:
        """The tunnel is lost: keep ``mux``'s channels for the next tunnel?
        (True if kept; the subclass knows where sessions wait.)"""
        return False

    def resume_received(self, channels: list[ChannelState]) -> None:
        """The peer's account of a resumed session's channels (subclasses)."""
        raise ProtocolViolation("ResumeChannels without a session to resume")

    def _channels_opened(self) -> None:
        """A channel opened: a resumable tunnel is probed from now on."""

    def _channel_settings(self) -> tuple[ChannelAcceptor | None, int, int]:
        """``(accept_channel, window, max_channels)`` for the multiplexer."""
        return self._mux_settings

    def _new_mux(self) -> ChannelMux:
        accept, window, max_channels = self._channel_settings()
        scheduler = SendScheduler(MAX_FAST_FRAME, enabled=priority_enabled(),
                                  flush=self._flush_writes)
        mux = ChannelMux(
            self,
            initiator=self.initiator,
            accept=accept,
            peer_openable_kinds=self.peer_openable_kinds,
            peer_may_assert_source=self.peer_asserts_source,
            window=window,
            max_channels=max_channels,
            local_name=self._local_name,
            peer_name=self.peer_name,
            scheduler=scheduler,
        )
        if self._fast_out:
            mux.max_frame_in = MAX_FAST_FRAME
            mux.max_frame_out = MAX_FAST_FRAME
        if self._is_lost:
            mux.tunnel_lost(Failure(ConnectionLost("the tunnel closed")))
        return mux

    @property
    def peer_name(self) -> str:
        """Who is at the other end, for log lines."""
        return self._mux.peer_name if self._mux is not None else self._peer_name

    @peer_name.setter
    def peer_name(self, name: str) -> None:
        self._peer_name = name
        if self._mux is not None:
            self._mux.peer_name = name

    def connect_channel(
        self, kind: str, target: str, factory: IProtocolFactory, source: str | None = None
    ) -> Deferred[IProtocol]:
        """Open a channel of ``kind`` to ``target`` and connect ``factory`` to it.

        :param source: the user's address (``"ip:port"``) the channel is for;
            the far end reports it as the channel's peer (None: unknown).
        """
        opening = self.mux.connect_channel(kind, target, factory, source=source)
        self._channels_opened()
        return opening

    def disconnect(self, reason: str = "closing") -> None:
        """Close the tunnel (flushing what is queued)."""
        if self.transport is not None and not self._is_lost:
            _log.info("closing tunnel with {peer}: {reason}", peer=self.peer_name, reason=reason)
            self.closed_reason = reason
            self._release_transport()
            self.transport.loseConnection()

    def when_lost(self) -> Deferred[None]:
        """Fire when the tunnel's connection is lost."""
        if self._is_lost:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        if self._lost_waiters is None:
            self._lost_waiters = []
        self._lost_waiters.append(waiter)
        return waiter

    # -- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        # Many small AMP boxes (window credits, short interactive writes):
        # without NODELAY they wait on Nagle and delayed ACKs. Measured:
        # download through a tunnel 80 -> 122 MiB/s, echo p99 4.4 -> 2.0 ms.
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            try:
                no_delay(True)
            except (AttributeError, OSError):
                pass
        self._schedule_liveness()

    def _ensure_backpressure(self) -> None:
        # Registered with the first channel, not at connection: an idle
        # tunnel has nothing to pause, and the registration (a producer and
        # its membrane on the TLS and TCP transports) costs ~1 KB a tunnel.
        if self._producer_registered or self._is_lost or self._dropping:
            return
        if self.closed_reason is not None or self.transport is None:
            return
        register = getattr(self.transport, "registerProducer", None)
        if register is not None:
            register(_SendBackpressure(self.mux), True)
            self._producer_registered = True
            # Also with the first channel: bulk data is what the fast TLS
            # I/O is for, and an idle tunnel keeps the stock methods (and
            # no 256 KiB read buffer).
            install_fast_tls(self.transport, self.clock)
            # Many channels write to a tunnel: the small frames that one
            # reactor turn's reads of other connections cause (requests,
            # answers) leave together at its end, one record and send().
            internals.gather_for_the_turn(self.transport)
            if self.mux.scheduler.enabled:
                # What TLS and TCP hold cannot be reordered: keep it short
                # so the scheduler's order is the order on the wire.
                path = shorten_send_path(self.transport)
                self.mux.scheduler.set_flush(path.after_write, cap=path.bulk_cap(self.clock))

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._is_lost = True
        if self._liveness is not None:
            self._liveness.forget(self)
        if self._liveness_call is not None and self._liveness_call.active():
            self._liveness_call.cancel()
        self._liveness_call = None
        mux = self._mux
        if mux is not None:
            # The send path of this connection's transport: a detached
            # session must not keep the dead transport alive through it.
            mux.scheduler.set_flush(None)
            if not (mux.resumable and mux.held and not mux._lost and self._detach_mux(mux)):
                mux.tunnel_lost(Failure(ConnectionLost("the tunnel closed")))
            else:
                _log.info("tunnel with {peer} lost; {count} channels wait for the next one",
                          peer=self.peer_name, count=len(mux.channels))
        try:
            super().connectionLost(reason)
        finally:
            waiters, self._lost_waiters = self._lost_waiters or [], None
            for waiter in waiters:
                waiter.callback(None)

    # -- liveness --------------------------------------------------------------

    def _schedule_liveness(self) -> None:
        if self._is_lost:
            return
        if self._liveness is not None:
            self.last_heard = self.clock.seconds()
            self._liveness.watch(self)
            return
        period = self.probe_interval if self.busy else self.heartbeat_interval
        self._liveness_period = period
        self._liveness_call = self.clock.callLater(period, self._liveness_tick)

    def _liveness_tick(self) -> None:
        self._liveness_call = None
        if self._heard:
            self._heard, self._silent_intervals = False, 0
        else:
            self._silent_intervals += 1
            if self._silent_intervals >= MISSED_INTERVALS:
                _log.warn(
                    "dropping tunnel with {peer}: nothing heard for {seconds} s",
                    peer=self.peer_name,
                    seconds=round(self._silent_intervals * self._liveness_period, 1),
                )
                self._drop("heartbeat timeout")
                return
        self.interval_elapsed()
        self._schedule_liveness()

    def silence_timeout(self, silent_for: float) -> None:
        """The shared liveness monitor found this tunnel silent too long: drop it."""
        if self._is_lost or self._dropping:
            return
        _log.warn(
            "dropping tunnel with {peer}: nothing heard for {seconds} s",
            peer=self.peer_name,
            seconds=round(silent_for, 1),
        )
        self._drop("heartbeat timeout")

    def interval_elapsed(self) -> None:
        """Called every heartbeat interval while the tunnel is alive (agents ping).

        Only with a timer of its own: a tunnel watched by a shared
        :class:`LivenessMonitor` gets no such call.
        """

    # -- receiving: every guard is here ----------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._dropping:
            return
        if self._liveness is not None:
            self.last_heard = self.clock.seconds()
        else:
            self._heard = True
        try:
            self.feed(data)
        except ProtocolViolation as violation:
            self.violation(str(violation))
        except Exception:
            _log.failure("unexpected error in tunnel with {peer}", peer=self.peer_name)
            self.violation("internal error")

    def proto_init(self, string: bytes) -> str:
        self._box_keys = 0
        self._box_bytes = 0
        return super().proto_init(string)

    def proto_key(self, string: bytes) -> str:
        if string:
            self._box_keys += 1
            if self._box_keys > MAX_BOX_KEYS:
                raise ProtocolViolation("box with too many keys")
        return super().proto_key(string)

    def proto_value(self, string: bytes) -> str:
        self._box_bytes += len(string)
        if self._box_bytes > MAX_BOX_BYTES:
            raise ProtocolViolation("oversized box")
        return super().proto_value(string)

    def lengthLimitExceeded(self, length: int) -> None:
        self.violation(f"key of {length} bytes")

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        if self._dropping:
            return
        if box.get(amp.COMMAND) == _HEARTBEAT and self._heartbeat_fast(box):
            return
        if amp.ANSWER in box or amp.ERROR in box:
            self._answer_received(box)
            return
        if amp.COMMAND not in box:
            raise ProtocolViolation("box without a command or an answer")
        # Anything raised from here is a fault of ours: dataReceived logs it
        # with its traceback (and the fuzz tests fail on it).
        super().ampBoxReceived(box)

    def _answer_received(self, box: amp.AmpBox) -> None:
        """An answer or error box (AMP reads ``_answer`` first, then
        ``_error``): it must answer a question we asked."""
        if amp.ANSWER not in box and (amp.ERROR_CODE not in box
                                      or amp.ERROR_DESCRIPTION not in box):
            raise ProtocolViolation("malformed error box")
        try:
            # AMP's dispatcher pops the question by tag before anything else
            # (the answer's parsing runs in the caller's Deferred).
            super().ampBoxReceived(box)
        except KeyError:
            raise ProtocolViolation("answer to no question") from None

    def _heartbeat_fast(self, box: amp.AmpBox) -> bool:
        """Answer a well-formed Heartbeat from an accepted peer without the
        command machinery (it is most of an idle tunnel's work); anything
        else about it takes the normal, checked path."""
        if not self.hello_done or _HEARTBEAT not in self.peer_commands:
            return False
        tag = box.get(amp.ASK)
        if len(box) != (2 if tag is not None else 1):
            return False
        if tag is not None:
            self._send(amp.AmpBox(_answer=tag))
        return True

    def dispatchCommand(self, box: amp.AmpBox) -> Deferred[Any]:
        name = box[amp.COMMAND]
        if name not in self.peer_commands:
            return _as_deferred(
                self._refuse(box, f"command {name[:64]!r} is not allowed from this peer")
            )
        if not self.hello_done and name != b"Hello":
            return _as_deferred(self._refuse(box, f"command {name[:64]!r} before Hello"))
        return super().dispatchCommand(box).addErrback(self._dispatch_failed, box)

    def _answerReceived(self, box: amp.AmpBox) -> None:
        super()._answerReceived(box)
        self._forget_answered()

    def _errorReceived(self, box: amp.AmpBox) -> None:
        super()._errorReceived(box)
        self._forget_answered()

    def _forget_answered(self) -> None:
        # A dict emptied by pop keeps its table: 160 bytes more than a new
        # one in each of 10,000 tunnels that once asked a question
        # (Discover), for nothing.
        if not self._outstandingRequests:
            self._outstandingRequests = {}

    def _dispatch_failed(self, failure: Failure, box: amp.AmpBox) -> Failure | None:
        if failure.check(amp.RemoteAmpError):
            if failure.value.fatal:
                self._release_transport()  # AMP's QuitBox will loseConnection
            return failure
        if failure.check(ProtocolViolation):
            reason = str(failure.value)
        else:
            _log.failure("error handling {command!r} from {peer}", failure,
                         command=box[amp.COMMAND][:64], peer=self.peer_name)
            reason = f"malformed {box[amp.COMMAND][:64]!r} box ({failure.type.__name__})"
        return self._refuse(box, reason)

    def _refuse(self, box: amp.AmpBox, reason: str) -> Failure | None:
        _log.warn("closing tunnel with {peer}: {reason}", peer=self.peer_name, reason=reason)
        self.closed_reason = reason
        if amp.ASK in box:
            # A fatal error goes out as a QuitBox: answer, then close.
            self._stop_reading()
            self._release_transport()
            return Failure(amp.RemoteAmpError(b"PROTOCOL_ERROR", reason, fatal=True))
        self._drop(reason)
        return None

    def violation(self, reason: str) -> None:
        """The peer broke the protocol: log one line and close the tunnel now."""
        if self._dropping:
            return
        _log.warn("closing tunnel with {peer}: {reason}", peer=self.peer_name, reason=reason)
        self.closed_reason = reason
        self._drop(reason)

    def _stop_reading(self) -> None:
        self._dropping = True
        # Stops IntNStringReceiver's parsing loop after the current box.
        self.paused = True

    def _release_transport(self) -> None:
        # TLSMemoryBIOProtocol.loseConnection waits for the registered
        # producer to unregister before it shuts TLS down: without this a
        # closing tunnel would hang until the peer goes away.
        if self._producer_registered and self.transport is not None:
            self._producer_registered = False
            self.transport.unregisterProducer()

    def _drop(self, reason: str) -> None:
        self._stop_reading()
        self.closed_reason = self.closed_reason or reason
        transport = self.transport
        if transport is None:
            return
        self._release_transport()
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            transport.loseConnection()

    # -- the data commands ----------------------------------------------------

    @OpenChannel.responder
    def _open_channel(
        self, channel: int, kind: str, target: str, window: int, source: str | None = None
    ) -> Deferred[dict]:
        check_channel_id(channel)
        self._ensure_backpressure()
        opening = self.mux.open_received(channel, kind, target, window, source)
        self._channels_opened()
        return opening.addCallback(lambda our_window: {"window": our_window})

    @ResumeChannels.responder
    def _resume_channels(self, channels: list[ChannelState]) -> dict:
        self.resume_received(channels)
        return {}

    @CloseChannel.responder
    def _close_channel(self, channel: int, reason: str) -> dict:
        check_channel_id(channel)
        self.mux.close_received(channel, reason)
        return {}

    @Data.responder
    def _data(self, channel: int, data: bytes) -> dict:
        self.mux.data_received(check_channel_id(channel), data)
        return {}

    @WindowAdjust.responder
    def _window_adjust(self, channel: int, credit: int) -> dict:
        self.mux.window_adjust_received(check_channel_id(channel), credit)
        return {}

    @ChannelPriority.responder
    def _channel_priority(self, channel: int, priority: str) -> dict:
        self.mux.priority_received(check_channel_id(channel), priority)
        return {}

    @EndOfFile.responder
    def _end_of_file(self, channel: int) -> dict:
        self.mux.eof_received(check_channel_id(channel))
        return {}

    def fast_frame_received(self, kind: int, channel: int, value: int, payload: bytes) -> None:
        check_channel_id(channel)
        if kind == FRAME_DATA:
            self.mux.data_received(channel, payload)
        else:
            self.mux.window_adjust_received(channel, value)

    # -- ChannelWire: sending -------------------------------------------------

    def _send(self, box: amp.AmpBox) -> None:
        if self.transport is None or self._is_lost:
            return
        self.boxSender.sendBox(box)

    def send_data(self, channel: int, data: bytes | memoryview) -> None:
        if self._fast_out:
            if self.transport is not None and not self._is_lost:
                self.transport.write(data_frame(channel, data))
            return
        # Built by hand: the hot path skips Command argument machinery.
        self._send(amp.AmpBox(_command=b"Data", channel=b"%d" % channel, data=bytes(data)))

    def send_window_adjust(self, channel: int, credit: int) -> None:
        if self._fast_out:
            if self.transport is not None and not self._is_lost:
                self.transport.write(window_adjust_frame(channel, credit))
            return
        self._send(
            amp.AmpBox(_command=b"WindowAdjust", channel=b"%d" % channel, credit=b"%d" % credit)
        )

    def send_eof(self, channel: int) -> None:
        self._send(amp.AmpBox(_command=b"EndOfFile", channel=b"%d" % channel))

    def send_priority(self, channel: int, priority: str) -> None:
        if PRIORITY_CAPABILITY in self._agreed_capabilities():
            self._send(amp.AmpBox(_command=b"ChannelPriority", channel=b"%d" % channel,
                                  priority=priority.encode("ascii")))

    def _agreed_capabilities(self) -> tuple[str, ...]:
        """What both ends offered in ``Hello`` (the proxy's ``capabilities``,
        the agent's ``proxy_capabilities``: the proxy answers with the
        intersection)."""
        return getattr(self, "capabilities", None) or getattr(self, "proxy_capabilities", ())

    def _flush_writes(self) -> None:
        """Hand small writes gathered by the fast TLS transport to TCP now
        (the scheduler's pieces reach the socket one by one)."""
        if self.transport is not None and not self._is_lost:
            flush_gathered_writes(self.transport)

    def send_close(self, channel: int, reason: str) -> Deferred[bool]:
        return self.call(CloseChannel, channel=channel, reason=reason).addCallbacks(
            lambda _: True, lambda _: False)

    def send_open(
        self, channel: int, kind: str, target: str, window: int, source: str | None = None
    ) -> Deferred[int]:
        self._ensure_backpressure()
        # A None source is left out of the box (peers without it interoperate).
        return self.call(
            OpenChannel, channel=channel, kind=kind, target=target, window=window, source=source
        ).addCallback(lambda answer: answer["window"])

    def call(self, command: type[amp.Command], **arguments: Any) -> Deferred[Any]:
        """``callRemote`` whose EdgeError failures carry text messages."""
        if self.transport is None or self._is_lost:
            return fail(NodeOffline("the tunnel is closed"))
        return self.callRemote(command, **arguments).addErrback(decode_remote_error)


def _as_deferred(result: Failure | None) -> Deferred[Any]:
    return fail(result) if result is not None else succeed(None)
