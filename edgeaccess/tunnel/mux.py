"""The channel multiplexer: every channel of one tunnel, opened from either end.

Channel ids are split by parity (agent odd, proxy even) so both ends may
open channels at once; every event from the peer is checked against the
channel table, and anything impossible is a protocol violation.

A resumable multiplexer (both ends offered ``resume/1``) outlives its
tunnel: :meth:`ChannelMux.detach` keeps every channel (and those whose close
is not yet acknowledged, with the bytes the peer may lack) for the outage
budget; :meth:`ChannelMux.attach` puts it on the next tunnel and
:meth:`ChannelMux.resume` re-attaches each channel from the peer's account.
Past the budget :meth:`ChannelMux.expire` closes them all with the reason.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.error import ConnectError, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IProtocol, IProtocolFactory, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from edgeaccess.errors import AccessDenied, BadRequest, EdgeError, NodeOffline, NotFound
from edgeaccess.tunnel.channels import Channel, ChannelAcceptor, ChannelWire
from edgeaccess.tunnel.framing import MAX_FAST_FRAME
from edgeaccess.tunnel.scheduler import SendScheduler, priority_enabled
from edgeaccess.tunnel.protocol import (
    DEFAULT_WINDOW,
    MAX_CHANNEL_ID,
    MAX_FRAME,
    ChannelState,
    ProtocolViolation,
    check_kind,
    check_priority,
    check_reason,
    check_source,
    check_target,
    check_window,
)

_log = Logger()


class _DetachedWire:
    """The wire of a detached multiplexer: nothing goes out (the counts in
    each channel say what the peer must still get, once re-attached)."""

    def send_data(self, channel: int, data: bytes | memoryview) -> None:
        pass

    def send_window_adjust(self, channel: int, credit: int) -> None:
        pass

    def send_eof(self, channel: int) -> None:
        pass

    def send_priority(self, channel: int, priority: str) -> None:
        pass  # a class set while detached stays this end's own

    def send_close(self, channel: int, reason: str) -> Deferred[Any]:
        return succeed(False)

    def send_open(self, channel: int, kind: str, target: str, window: int,
                  source: str | None = None) -> Deferred[int]:
        return fail(NodeOffline("the tunnel is down"))

    def violation(self, reason: str) -> None:
        pass


DETACHED_WIRE = _DetachedWire()


class ChannelMux:
    """All channels of one tunnel.

    :param wire: the tunnel connection (sends boxes, closes on violations).
    :param initiator: True on the agent (its channel ids are odd), False on
        the proxy (even ids), so both ends may open channels without clashing.
    :param accept: decides every OpenChannel from the peer (kind and target).
    :param peer_openable_kinds: channel kinds the peer may open at all.
    :param peer_may_assert_source: whether the peer may name the user a
        channel is opened for (``source``): true only when the peer is a
        proxy; a source from anyone else refuses the channel.
    :param window: our receive window per channel.
    :param max_channels: channels open at once (memory <= channels * window).
    :param scheduler: the send order of the channels (default: priority on
        unless ``EDGE_TUNNEL_PRIORITY=off``; see :mod:`edgeaccess.tunnel.scheduler`).
    """

    #: The largest data frame accepted (raised when fast frames are on).
    max_frame_in = MAX_FRAME
    #: The largest data frame sent (raised when fast frames are on).
    max_frame_out = MAX_FRAME

    def __init__(
        self,
        wire: ChannelWire,
        *,
        initiator: bool,
        accept: ChannelAcceptor | None,
        peer_openable_kinds: frozenset[str],
        window: int = DEFAULT_WINDOW,
        max_channels: int = 1024,
        local_name: str = "local",
        peer_name: str = "peer",
        peer_may_assert_source: bool = False,
        scheduler: SendScheduler | None = None,
    ) -> None:
        self.wire = wire
        if scheduler is None:
            scheduler = SendScheduler(MAX_FAST_FRAME, enabled=priority_enabled())
        self.scheduler = scheduler
        self.window = check_window(window)
        self.max_channels = max_channels
        self.local_name = local_name
        self.peer_name = peer_name
        self.sending_paused = False
        self._transport_paused = False
        #: Channels outlive the tunnel (both ends offered resume/1).
        self.resumable = False
        #: The resumable session this multiplexer is (the agent's random id).
        self.session_id: str | None = None
        #: True from a tunnel's loss until the channels are re-attached.
        self.detached = False
        #: ``clock.seconds()`` when the outage began (None: attached).
        self.detached_since: float | None = None
        self._expiry: IDelayedCall | None = None
        self._on_expired: Callable[[ChannelMux], None] | None = None
        #: Bumped at every detach: an accept decided for a lost tunnel is void.
        self._generation = 0
        #: Channels closed by us, kept until the peer acknowledges the close
        #: (resumable only: the close and the bytes before it may be lost).
        self._closing_channels: dict[int, Channel] = {}
        #: The channels held when the current tunnel attached: only they are
        #: reconciled by resume() (those opened on the new tunnel meanwhile
        #: are new to both ends).
        self._resumable_ids: set[int] = set()
        self._accept = accept
        self._peer_openable_kinds = peer_openable_kinds
        self._peer_may_assert_source = peer_may_assert_source
        self._next_id = 1 if initiator else 2
        self._peer_parity = 0 if initiator else 1
        self._channels: dict[int, Channel] = {}
        self._closing: set[int] = set()
        self._accepting: set[int] = set()
        self._lost = False

    @property
    def channels(self) -> dict[int, Channel]:
        """Open channels by id (read-only use)."""
        return self._channels

    # -- opening from this side -------------------------------------------

    def connect_channel(
        self, kind: str, target: str, factory: IProtocolFactory, source: str | None = None
    ) -> Deferred[IProtocol]:
        """Open a channel and connect a protocol from ``factory`` to it.

        :param source: the address (``"ip:port"``) of the user the channel is
            for, told to the far end (proxies only; None: unknown).
        """
        try:
            check_kind(kind)
            check_target(target)
            check_source(source)
        except BadRequest as error:
            return fail(error)
        if self._lost:
            return fail(NodeOffline("the tunnel is closed"))
        if len(self._channels) + len(self._accepting) >= self.max_channels:
            return fail(BadRequest("too many channels on this tunnel"))
        if self._next_id > MAX_CHANNEL_ID:
            return fail(NodeOffline("channel ids exhausted; the tunnel must reconnect"))
        channel_id, self._next_id = self._next_id, self._next_id + 2
        channel = Channel(self, channel_id, kind, target, recv_window=self.window, peer_window=0)
        self._channels[channel_id] = channel
        result: Deferred[IProtocol] = Deferred(lambda d: None)
        channel._open_result = result

        def opened(peer_window: int) -> None:
            channel._open_result = None
            if channel._closed:
                return
            if not 1 <= peer_window <= 2**31:
                self.wire.violation(f"invalid window {peer_window} in OpenChannel answer")
                return
            channel._peer_window = channel._send_credit = peer_window
            if result.called:  # cancelled by the caller meanwhile
                channel.abortConnection()
                return
            protocol = factory.buildProtocol(channel.getPeer())
            if protocol is None:
                channel.abortConnection()
                result.errback(ConnectError(string="the factory refused the channel"))
                return
            channel._attach(protocol)
            result.callback(protocol)
            channel._deliver()

        def refused(failure: Failure) -> None:
            channel._open_result = None
            if self._channels.get(channel_id) is channel:
                del self._channels[channel_id]
            channel._closed = True
            if not result.called:
                result.errback(failure)

        if source is None:
            opening = self.wire.send_open(channel_id, kind, target, self.window)
        else:
            opening = self.wire.send_open(channel_id, kind, target, self.window, source)
        opening.addCallbacks(opened, refused)
        return result

    # -- events from the peer ----------------------------------------------

    def open_received(
        self, channel_id: int, kind: str, target: str, window: int, source: str | None = None
    ) -> Deferred[int]:
        """The peer asks to open a channel; fires with our window or fails (refused).

        ``source`` (the user's ``"ip:port"``) is accepted only from a peer
        that may assert it (a proxy); the channel's ``getPeer()`` reports it.
        """
        if (
            channel_id % 2 != self._peer_parity
            or channel_id in self._channels
            or channel_id in self._closing
            or channel_id in self._accepting
        ):
            raise ProtocolViolation(f"OpenChannel with invalid or reused id {channel_id}")
        check_kind(kind)
        if kind not in self._peer_openable_kinds or self._accept is None:
            raise AccessDenied(f"{kind} channels may not be opened from this side")
        check_target(target)
        check_window(window)
        if source is not None:
            if not self._peer_may_assert_source:
                _log.warn("refused a {kind} channel from {peer}: only a proxy may assert "
                          "a source address", kind=kind, peer=self.peer_name)
                raise AccessDenied("only a proxy may assert a channel's source address")
            check_source(source)
        if self._lost:
            raise NodeOffline("the tunnel is closed")
        if len(self._channels) + len(self._accepting) >= self.max_channels:
            raise BadRequest("too many channels on this tunnel")
        self._accepting.add(channel_id)
        generation = self._generation

        def accepted(factory: IProtocolFactory) -> int:
            self._accepting.discard(channel_id)
            if self._lost or generation != self._generation:
                raise NodeOffline("the tunnel is closed")
            channel = Channel(
                self, channel_id, kind, target, recv_window=self.window, peer_window=window,
                source=source,
            )
            protocol = factory.buildProtocol(channel.getPeer())
            if protocol is None:
                raise AccessDenied("channel refused")
            self._channels[channel_id] = channel
            channel._attach(protocol)
            return self.window

        def refused(failure: Failure) -> Failure:
            self._accepting.discard(channel_id)
            if failure.check(AccessDenied, NotFound, BadRequest, NodeOffline):
                _log.info(
                    "refused {kind} channel to {target!r} from {peer}: {reason}",
                    kind=kind, target=target, peer=self.peer_name, reason=failure.value,
                )
                return failure
            _log.failure("deciding a {kind} channel failed", failure, kind=kind)
            return Failure(AccessDenied("channel refused"))

        assert self._accept is not None
        # A failure while attaching the channel (a broken factory) refuses
        # this channel only; it never takes the whole tunnel down.
        return maybeDeferred(self._accept, kind, target).addCallback(accepted).addErrback(refused)

    def _known(self, channel_id: int) -> Channel | None:
        channel = self._channels.get(channel_id)
        if channel is None and channel_id not in self._closing:
            raise ProtocolViolation(f"no channel {channel_id}")
        return channel

    def data_received(self, channel_id: int, data: bytes) -> None:
        """A Data box (or fast data frame) arrived."""
        if len(data) > self.max_frame_in:
            raise ProtocolViolation(f"data frame of {len(data)} bytes")
        channel = self._known(channel_id)
        if channel is not None:
            channel._data_received(data)

    def window_adjust_received(self, channel_id: int, credit: int) -> None:
        """A WindowAdjust box arrived."""
        channel = self._known(channel_id)
        if channel is not None:
            channel._window_adjust(credit)

    def eof_received(self, channel_id: int) -> None:
        """An EndOfFile box arrived."""
        channel = self._known(channel_id)
        if channel is not None:
            channel._eof_from_peer()

    def priority_received(self, channel_id: int, priority: str) -> None:
        """A ChannelPriority box arrived: send our data on that channel as
        the peer classed it (it sees what the channel carries, e.g. a PTY)."""
        check_priority(priority)
        channel = self._known(channel_id)
        if channel is not None:
            channel.set_priority(priority, tell_peer=False)

    def close_received(self, channel_id: int, reason: str) -> None:
        """A CloseChannel box arrived (unknown ids are ignored: closes may cross)."""
        self._closing_channels.pop(channel_id, None)
        channel = self._channels.pop(channel_id, None)
        if channel is not None:
            channel._remote_closed(check_reason(reason))

    def _local_close(self, channel: Channel, reason: str) -> None:
        if self._channels.get(channel.id) is channel:
            del self._channels[channel.id]
        if self._lost or channel._open_result is not None:
            return
        channel_id = channel.id
        self._closing.add(channel_id)
        if self.resumable:
            channel.close_reason = reason
            self._closing_channels[channel_id] = channel
            if not self.detached:
                self._send_close(channel)
            return

        def acknowledged(_: object) -> None:
            self._closing.discard(channel_id)

        self.wire.send_close(channel_id, reason).addBoth(acknowledged)

    def _send_close(self, channel: Channel) -> None:
        generation = self._generation

        def answered(acknowledged: object) -> None:
            # False: the tunnel failed first; the close is sent again once
            # the channel is re-attached (or expires with the session).
            if acknowledged is False or generation != self._generation:
                return
            if self._closing_channels.get(channel.id) is channel:
                del self._closing_channels[channel.id]
                channel._retained.clear()
                channel._retained_size = 0
            self._closing.discard(channel.id)

        self.wire.send_close(channel.id, channel.close_reason or "done").addBoth(answered)

    # -- the tunnel ------------------------------------------------------

    def pause_sending(self) -> None:
        """The tunnel's transport is full: pause every channel's producer."""
        self._transport_paused = True
        self.sending_paused = True
        self.scheduler.pause()
        for channel in list(self._channels.values()):
            channel._update_producer()

    def resume_sending(self) -> None:
        """The tunnel's transport drained: send queued data, resume producers."""
        self._transport_paused = False
        self.sending_paused = self.detached
        if self.detached:
            return
        scheduler = self.scheduler
        if not scheduler.enabled:
            scheduler.paused = False
            for channel in list(self._channels.values()):
                channel._flush()
            return
        # Highest priority first: the scheduler picks from every queue,
        # then producers that the full transport paused may write again.
        scheduler.resume()
        for channel in list(self._channels.values()):
            if not self.sending_paused:
                channel._sent_all()

    # -- resumption ------------------------------------------------------

    @property
    def held(self) -> bool:
        """Whether there is anything to re-attach (open or closing channels)."""
        return bool(self._channels or self._closing_channels)

    def detach(
        self,
        clock: IReactorTime,
        budget: float,
        on_expired: Callable[[ChannelMux], None] | None = None,
    ) -> None:
        """The tunnel is lost; keep every channel for ``budget`` seconds of
        outage (counted from the first loss since the last re-attach)."""
        self.detached = True
        self.sending_paused = True
        self._transport_paused = False
        self.scheduler.pause()
        self.wire = DETACHED_WIRE
        self._generation += 1
        self._accepting.clear()
        now = clock.seconds()
        if self.detached_since is None:
            self.detached_since = now
        self._on_expired = on_expired
        for channel_id, channel in list(self._channels.items()):
            if channel._open_result is not None:
                # Opened by us and unanswered: it fails (the peer may hold
                # it; it closes it once it sees we do not).
                del self._channels[channel_id]
                channel._closed = True
                channel._detach()
            else:
                channel._update_producer()
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        left = max(0.0, self.detached_since + budget - now)
        self._expiry = clock.callLater(left, self.expire, f"tunnel outage exceeded {budget:g}s")

    def attach(self, wire: ChannelWire) -> None:
        """A new tunnel carries this multiplexer; nothing is sent on the
        session's channels until :meth:`resume` (the budget still runs)."""
        self.wire = wire
        self._resumable_ids = {*self._channels, *self._closing_channels}

    def states(self, only: set[int] | None = None) -> list[ChannelState]:
        """Our account of every channel to re-attach (or of those in ``only``)."""
        found = [*self._channels.values(), *self._closing_channels.values()]
        wanted = self._resumable_ids if only is None else self._resumable_ids & only
        return [c.state() for c in found if c.id in wanted]

    def resume(self, peer_states: list[ChannelState]) -> None:
        """Re-attach every channel the peer still holds from its account;
        close (locally) those it no longer holds. Sending starts again."""
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        self.detached = False
        self.detached_since = None
        self.sending_paused = self._transport_paused
        peer = {state.channel: state for state in peer_states}
        resumable, self._resumable_ids = self._resumable_ids, set()
        for channel_id, channel in list(self._closing_channels.items()):
            if channel_id not in resumable:
                continue
            state = peer.get(channel_id)
            if state is None:
                # The peer has it closed (our close arrived; its answer did not).
                del self._closing_channels[channel_id]
                self._closing.discard(channel_id)
                continue
            try:
                channel._resume_from(state)
            except ProtocolViolation as lie:
                _log.warn("closing {channel} of {peer}: {reason}", channel=channel,
                          peer=self.peer_name, reason=lie)
                channel.close_reason = "resume refused"
            self._send_close(channel)
        for channel_id, channel in list(self._channels.items()):
            if channel_id not in resumable:
                continue
            state = peer.get(channel_id)
            if state is None:
                del self._channels[channel_id]
                channel._expire("the peer no longer holds the channel")
                continue
            try:
                channel._resume_from(state)
            except ProtocolViolation as lie:
                _log.warn("closing {channel} of {peer}: {reason}", channel=channel,
                          peer=self.peer_name, reason=lie)
                del self._channels[channel_id]
                channel._expire(f"resume refused: {lie}")
                self._closing.add(channel_id)
                self._send_close_refused(channel_id)
        # What was written meanwhile goes out through the scheduler, after
        # the bytes sent again above.
        for channel in list(self._channels.values()):
            channel._flush()
            channel._maybe_grant()
        self.resume_sending()

    def close_all(self, reason: str) -> None:
        """End every open channel now, telling the peer ``reason`` (a
        deliberate end, e.g. the proxy stopping: not an outage to wait out)."""
        for channel in list(self._channels.values()):
            channel._finish_local_close(reason, Failure(ConnectionLost(reason)))

    def _send_close_refused(self, channel_id: int) -> None:
        def answered(_: object) -> None:
            self._closing.discard(channel_id)

        self.wire.send_close(channel_id, "resume refused").addBoth(answered)

    def expire(self, reason: str) -> None:
        """The outage outlasted the budget: close every channel with ``reason``."""
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        self._lost = True
        channels = [*self._channels.values(), *self._closing_channels.values()]
        self._channels.clear()
        self._closing_channels.clear()
        self._closing.clear()
        if channels:
            _log.warn("closing {count} channels of {peer}: {reason}", count=len(channels),
                      peer=self.peer_name, reason=reason)
        for channel in channels:
            channel._expire(reason)
        on_expired, self._on_expired = self._on_expired, None
        if on_expired is not None:
            on_expired(self)

    def tunnel_lost(self, failure: Failure) -> None:
        """The tunnel is gone: every channel is lost."""
        self._lost = True
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        channels = list(self._channels.values())
        self._channels.clear()
        self._closing.clear()
        self._closing_channels.clear()
        for channel in channels:
            channel._tunnel_lost(failure)


def decode_remote_error(failure: Failure) -> Failure:
    """Turn an AMP-rebuilt EdgeError (bytes message) into one with a text message."""
    error = failure.value
    if isinstance(error, EdgeError) and isinstance(error.message, bytes):
        text = check_reason(error.message.decode("utf-8", "replace"))[:256]
        return Failure(type(error)(text))
    return failure
