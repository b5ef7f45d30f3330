"""The channel multiplexer: every channel of one tunnel, opened from either end.

Channel ids are split by parity (agent odd, proxy even) so both ends may
open channels at once; every event from the peer is checked against the
channel table, and anything impossible is a protocol violation.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IProtocol, IProtocolFactory
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
    ProtocolViolation,
    check_kind,
    check_priority,
    check_reason,
    check_source,
    check_target,
    check_window,
)

_log = Logger()


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

        def accepted(factory: IProtocolFactory) -> int:
            self._accepting.discard(channel_id)
            if self._lost:
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

        def acknowledged(_: object) -> None:
            self._closing.discard(channel_id)

        self.wire.send_close(channel_id, reason).addBoth(acknowledged)

    # -- the tunnel ------------------------------------------------------

    def pause_sending(self) -> None:
        """The tunnel's transport is full: pause every channel's producer."""
        self.sending_paused = True
        self.scheduler.pause()
        for channel in list(self._channels.values()):
            channel._update_producer()

    def resume_sending(self) -> None:
        """The tunnel's transport drained: send queued data, resume producers."""
        self.sending_paused = False
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

    def tunnel_lost(self, failure: Failure) -> None:
        """The tunnel is gone: every channel is lost."""
        self._lost = True
        channels = list(self._channels.values())
        self._channels.clear()
        self._closing.clear()
        for channel in channels:
            channel._tunnel_lost(failure)


def decode_remote_error(failure: Failure) -> Failure:
    """Turn an AMP-rebuilt EdgeError (bytes message) into one with a text message."""
    error = failure.value
    if isinstance(error, EdgeError) and isinstance(error.message, bytes):
        text = check_reason(error.message.decode("utf-8", "replace"))[:256]
        return Failure(type(error)(text))
    return failure
