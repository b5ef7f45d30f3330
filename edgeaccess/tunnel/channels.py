"""Channels multiplexed over one tunnel, with per-channel credit flow control.

A :class:`Channel` is a complete Twisted transport (``ITransport``,
``IPushProducer``, ``IConsumer``, plus half-close), like magic-wormhole's
dilation subchannel: a protocol connected to it cannot tell it from TCP.

Flow control works like SSH: the receiver announces a window (bytes it will
hold); the sender may have at most that many unacknowledged bytes in flight;
the receiver grants credit back (``WindowAdjust``) only for bytes its protocol
actually took while not paused. So a stalled consumer stalls only its own
channel, and memory per channel is bounded by the window whatever the peer
does: a peer that sends beyond its credit breaks the protocol and the whole
tunnel is closed.

The multiplexer (:mod:`edgeaccess.tunnel.mux`) knows nothing of AMP: it talks to the tunnel through
the small :class:`ChannelWire` interface, so it can be driven by tests alone.

Resumable channels (both ends offered ``resume/1``): each end counts the
bytes it sent and received per direction and keeps what it sent until the
peer's credit acknowledges it (so at most a window of it). When the tunnel
is lost the channel stays, detached: its protocol sees nothing, its writes
queue (producers paused). On the next tunnel the ends exchange their counts
(:class:`~edgeaccess.tunnel.protocol.ChannelState`) and each sends again
from the offset the other received: no byte lost, repeated or reordered.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Protocol as TypingProtocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    ITransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeaccess.errors import NodeOffline
from edgeaccess.tunnel.interfaces import IPrioritizedTransport
from edgeaccess.tunnel.protocol import ChannelState, ProtocolViolation, parse_source
from edgeaccess.tunnel.scheduler import BULK, PRIORITIES

if TYPE_CHECKING:
    from edgeaccess.tunnel.mux import ChannelMux

_log = Logger()

#: A writer whose channel holds more than this many unsent bytes is paused.
HIGH_WATER = 64 * 1024

#: Decides an incoming OpenChannel: returns a protocol factory (or a Deferred
#: of one), or raises AccessDenied / NotFound.
ChannelAcceptor = Callable[[str, str], "IProtocolFactory | Deferred[IProtocolFactory]"]


class ChannelWire(TypingProtocol):
    """What the multiplexer needs from the tunnel connection under it."""

    def send_data(self, channel: int, data: bytes | memoryview) -> None: ...
    def send_window_adjust(self, channel: int, credit: int) -> None: ...
    def send_eof(self, channel: int) -> None: ...
    def send_priority(self, channel: int, priority: str) -> None: ...
    def send_close(self, channel: int, reason: str) -> Deferred[Any]:
        """Fires True once the peer answered, False if the tunnel failed first."""
    def send_open(
        self, channel: int, kind: str, target: str, window: int, source: str | None = None
    ) -> Deferred[int]: ...
    def violation(self, reason: str) -> None: ...


@implementer(IAddress)
@attrs.frozen
class TunnelAddress:
    """The address of one end of a channel: which tunnel peer, kind, target, id.

    ``source`` is the user's address (``"ip:port"``) the proxy asserted when
    it opened the channel, or None when unknown.
    """

    peer: str
    kind: str
    target: str
    channel: int
    source: str | None = None

    # Code written for TCP reads ``.host`` and ``.port`` (logs, SSH_CLIENT,
    # an SSH certificate's source-address): they are the source's when the
    # proxy gave one. Without it, "tunnel" is never a valid IP, so
    # address-based checks refuse rather than pass.
    @property
    def host(self) -> str:
        if self.source is None:
            return "tunnel"
        return parse_source(self.source)[0]

    @property
    def port(self) -> int:
        if self.source is None:
            return self.channel
        return parse_source(self.source)[1]


@implementer(ITransport, IPushProducer, IConsumer, IPrioritizedTransport)
class Channel:
    """One channel: a transport for the protocol on this end.

    States (flags rather than a machine, as each direction closes on its
    own): opening (no protocol yet) -> open -> write side shut and/or EOF
    received -> closed. Created only by :class:`ChannelMux`.

    :attr:`priority` (``"interactive"`` or ``"bulk"``) is the class the
    tunnel's :class:`~edgeaccess.tunnel.scheduler.SendScheduler` sends this
    channel's data in; :meth:`set_priority` changes it (and tells the peer).
    """

    #: The send class (:data:`~edgeaccess.tunnel.scheduler.PRIORITIES`).
    priority = BULK
    # The scheduler's per-channel state (see SendScheduler).
    _scheduled = False
    _deficit = 0
    _burst = 0

    def __init__(
        self,
        mux: ChannelMux,
        channel_id: int,
        kind: str,
        target: str,
        *,
        recv_window: int,
        peer_window: int,
        source: str | None = None,
    ) -> None:
        self._mux = mux
        self.id = channel_id
        self.kind = kind
        self.target = target
        #: The user's address the opening proxy asserted (accepting side), or None.
        self.source = source
        self.protocol: IProtocol | None = None
        self.connected = False
        self.disconnecting = False
        # sending
        self._peer_window = peer_window
        self._send_credit = peer_window
        self._outgoing: deque[bytes | memoryview] = deque()
        self._outgoing_size = 0
        self._sent_total = 0
        self._write_shut = False
        self._eof_sent = False
        self._close_after_flush = False
        self._producer: Any = None
        self._streaming = False
        self._producer_paused = False
        self._pulling = False
        # receiving
        self._recv_window = recv_window
        self._recv_allowed = recv_window
        self._grant_threshold = max(1, recv_window // 4)
        self._unacked = 0
        self._incoming: deque[bytes] = deque()
        self._incoming_size = 0
        self._paused = False
        self._delivering = False
        self._eof_received = False
        self._eof_delivered = False
        self._remote_close: Failure | None = None
        self._closed = False
        # set while an OpenChannel we sent is unanswered
        self._open_result: Deferred[IProtocol] | None = None
        # resumption: what was sent and not yet acknowledged by credit
        # (offsets [_granted_in, _sent_total)), and the counts both ends
        # exchange to re-attach (see ChannelState)
        self._retained: deque[bytes | memoryview] = deque()
        self._retained_size = 0
        self._granted_in = 0
        self._received_total = 0
        self._granted_out = 0
        #: The reason our CloseChannel gave (sent again on a new tunnel).
        self.close_reason: str | None = None
        #: Why a resumable channel was lost (its outage outlasted the budget,
        #: the peer no longer held it...): audited as the session's end.
        self.lost_reason: str | None = None

    def __repr__(self) -> str:
        return f"<Channel {self.id} {self.kind}:{self.target!r}>"

    # -- ITransport ------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue ``data``; it is sent as the peer grants credit."""
        if not isinstance(data, bytes):
            raise TypeError("data must be bytes")
        if self._write_shut or self._closed or not data:
            return
        self._outgoing.append(data)
        self._outgoing_size += len(data)
        self._flush()

    def writeSequence(self, data: list[bytes]) -> None:
        """Queue several byte strings."""
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Send what is queued, then close the channel in both directions."""
        if self._closed or self._close_after_flush:
            return
        self.disconnecting = True
        self._write_shut = True
        self._close_after_flush = True
        self._flush()

    def abortConnection(self) -> None:
        """Close the channel now, dropping whatever is queued."""
        self._outgoing.clear()
        self._outgoing_size = 0
        self._finish_local_close("aborted", Failure(ConnectionAborted()))

    def loseWriteConnection(self) -> None:
        """Half-close: send EndOfFile once the queue is drained; reading goes on."""
        if self._closed or self._write_shut:
            return
        self._write_shut = True
        self._flush()

    def getPeer(self) -> TunnelAddress:
        """The far end of this channel (the user's address when the proxy gave one)."""
        return TunnelAddress(self._mux.peer_name, self.kind, self.target, self.id, self.source)

    def getHost(self) -> TunnelAddress:
        """This end of the channel."""
        return TunnelAddress(self._mux.local_name, self.kind, self.target, self.id)

    def logPrefix(self) -> str:
        return f"channel-{self.id}"

    # -- IPushProducer (the protocol on this end pauses our deliveries) ----

    def pauseProducing(self) -> None:
        """Stop delivering data; no credit is granted while paused."""
        self._paused = True

    def resumeProducing(self) -> None:
        """Deliver what is buffered and grant credit for it."""
        self._paused = False
        self._deliver()

    def stopProducing(self) -> None:
        """Abort the channel (like a TCP transport)."""
        self.abortConnection()

    # -- IConsumer (a producer feeding our write side) --------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Register a producer, paused while the peer's credit is exhausted."""
        if self._producer is not None:
            raise RuntimeError(f"producer {self._producer!r} already registered")
        if self._closed:
            producer.stopProducing()
            return
        self._producer = producer
        self._streaming = bool(streaming)
        self._producer_paused = False
        self._update_producer()

    def unregisterProducer(self) -> None:
        """Forget the producer."""
        self._producer = None

    # -- sending ---------------------------------------------------------

    def _can_send(self) -> bool:
        return self._send_credit > 0 and not self._mux.sending_paused

    def _sendable(self) -> bool:
        """Queued bytes and credit for some of them (the scheduler asks)."""
        return (
            bool(self._outgoing) and self._send_credit > 0
            and not self._closed and self._remote_close is None
        )

    def _flush(self) -> None:
        if self._closed or self._remote_close is not None:
            return
        if self._mux.detached:
            # Nothing goes out until the channel is re-attached: not even the
            # end of file or the close, which must follow the data.
            self._update_producer()
            return
        if self._outgoing and self._send_credit > 0:
            # The tunnel's scheduler sends it now or, behind higher
            # priorities or a full transport, later (then it calls _sent_all).
            self._mux.scheduler.ready(self)
            if self._scheduled or self._closed:
                return
        self._sent_all()

    def _send_piece(self, limit: int) -> int:
        """Send one frame of at most ``limit`` bytes from the queue; return its size."""
        chunk = self._outgoing[0]
        size = min(len(chunk), self._send_credit, self._mux.max_frame_out, limit)
        if size <= 0:
            return 0
        if size == len(chunk):
            self._outgoing.popleft()
            piece = chunk
        else:
            # Views keep large writes from being copied per frame (the
            # wire copies each piece once, into its frame or box).
            view = memoryview(chunk)
            self._outgoing[0] = view[size:]
            piece = view[:size]
        self._outgoing_size -= size
        self._send_credit -= size
        self._sent_total += size
        if self._mux.resumable:
            self._retained.append(piece)
            self._retained_size += size
        self._mux.wire.send_data(self.id, piece)
        return size

    def _sent_all(self) -> None:
        """What follows sending: close or end of file once drained, the producer."""
        if self._closed or self._remote_close is not None:
            return
        if self._mux.detached:
            self._update_producer()
            return
        if not self._outgoing:
            if self._close_after_flush:
                self._finish_local_close("done", Failure(ConnectionDone()))
                return
            if self._write_shut and not self._eof_sent:
                self._eof_sent = True
                self._mux.wire.send_eof(self.id)
                if IHalfCloseableProtocol.providedBy(self.protocol):
                    self._call_protocol(self.protocol.writeConnectionLost)
                self._maybe_both_shut()
                return
        self._update_producer()

    def set_priority(self, priority: str, *, tell_peer: bool = True) -> None:
        """Send this channel's data as ``priority`` (``"interactive"`` or
        ``"bulk"``) from now on; the peer is told too (it classes its own
        sends on this channel the same way), if it understands it."""
        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}")
        if priority == self.priority or self._closed:
            return
        self.priority = priority
        _log.info("{channel} of {peer} is sent as {priority}", channel=self,
                  peer=self._mux.peer_name, priority=priority)
        self._mux.scheduler.reclassed(self)
        if tell_peer:
            self._mux.wire.send_priority(self.id, priority)

    def _update_producer(self) -> None:
        producer = self._producer
        if producer is None or self._closed:
            return
        if self._streaming:
            want_pause = self._mux.sending_paused or self._outgoing_size >= HIGH_WATER
            if want_pause and not self._producer_paused:
                self._producer_paused = True
                producer.pauseProducing()
            elif not want_pause and self._producer_paused:
                self._producer_paused = False
                producer.resumeProducing()
            return
        # A pull producer is asked for more whenever the queue is empty and
        # credit remains; the loop stops as soon as it makes no progress.
        if self._pulling:
            return
        self._pulling = True
        try:
            while (
                self._producer is producer
                and not self._outgoing
                and self._can_send()
                and not self._write_shut
            ):
                before = self._sent_total
                producer.resumeProducing()
                if self._sent_total == before:
                    break
        finally:
            self._pulling = False

    def _window_adjust(self, credit: int) -> None:
        if credit <= 0 or self._send_credit + credit > self._peer_window:
            raise ProtocolViolation(f"invalid window adjust {credit} on channel {self.id}")
        self._send_credit += credit
        self._granted_in += credit
        if self._retained_size:
            self._forget_retained(credit)
        self._flush()

    def _forget_retained(self, count: int) -> None:
        """The peer acknowledged ``count`` more bytes: drop them."""
        retained = self._retained
        while count > 0 and retained:
            piece = retained[0]
            if len(piece) <= count:
                retained.popleft()
                count -= len(piece)
                self._retained_size -= len(piece)
            else:
                retained[0] = memoryview(piece)[count:]
                self._retained_size -= count
                count = 0

    # -- receiving -------------------------------------------------------

    def _data_received(self, data: bytes) -> None:
        if self._eof_received:
            raise ProtocolViolation(f"data after end of file on channel {self.id}")
        if len(data) > self._recv_allowed:
            raise ProtocolViolation(f"peer exceeded the window of channel {self.id}")
        self._recv_allowed -= len(data)
        self._received_total += len(data)
        if self._closed:
            return
        self._incoming.append(data)
        self._incoming_size += len(data)
        self._deliver()

    def _eof_from_peer(self) -> None:
        if self._eof_received:
            raise ProtocolViolation(f"second end of file on channel {self.id}")
        self._eof_received = True
        self._deliver()

    def _deliver(self) -> None:
        if self._delivering or self.protocol is None or self._closed:
            return
        self._delivering = True
        try:
            while self._incoming and not self._paused and not self._closed:
                data = self._incoming.popleft()
                self._incoming_size -= len(data)
                self._unacked += len(data)
                self._call_protocol(self.protocol.dataReceived, data)
            if self._incoming or self._paused or self._closed:
                return
            if self._eof_received and not self._eof_delivered:
                self._eof_delivered = True
                if IHalfCloseableProtocol.providedBy(self.protocol):
                    self._call_protocol(self.protocol.readConnectionLost)
                    self._maybe_both_shut()
                else:
                    self.loseConnection()
            if self._remote_close is not None:
                self._connection_lost(self._remote_close)
        finally:
            self._delivering = False
        self._maybe_grant()

    def _maybe_grant(self) -> None:
        if self._paused or self._closed or self._eof_received or self._remote_close:
            return
        if self._mux.detached:
            return  # granted once re-attached (the peer may not hold the channel)
        if self._unacked >= self._grant_threshold:
            credit, self._unacked = self._unacked, 0
            self._recv_allowed += credit
            self._granted_out += credit
            self._mux.wire.send_window_adjust(self.id, credit)

    # -- closing ---------------------------------------------------------

    def _maybe_both_shut(self) -> None:
        if self._eof_sent and self._eof_delivered and not self._closed:
            self._finish_local_close("done", Failure(ConnectionDone()))

    def _finish_local_close(self, reason: str, failure: Failure) -> None:
        if self._closed:
            return
        if reason == "aborted":
            self._retained.clear()
            self._retained_size = 0
        if self._remote_close is None:
            self._mux._local_close(self, reason)
        self._connection_lost(failure)

    def _remote_closed(self, reason: str) -> None:
        """The peer closed the channel: deliver what is buffered, then connectionLost."""
        if reason in ("", "done"):
            self._remote_close = Failure(ConnectionDone())
        else:
            self._remote_close = Failure(ConnectionLost(f"closed by peer: {reason}"))
        self._write_shut = True
        self.disconnecting = True
        self._outgoing.clear()
        self._outgoing_size = 0
        if self.protocol is None:
            self._connection_lost(self._remote_close)
        else:
            self._deliver()

    def _tunnel_lost(self, failure: Failure) -> None:
        self._incoming.clear()
        self._remote_close = failure
        if self._open_result is not None and not self._open_result.called:
            self._open_result.errback(NodeOffline("the tunnel closed before the channel opened"))
        self._connection_lost(failure)

    def _connection_lost(self, failure: Failure) -> None:
        if self._closed:
            return
        self._closed = True
        self.connected = False
        self.disconnecting = True
        self._outgoing.clear()
        self._outgoing_size = 0
        self._incoming.clear()
        self._incoming_size = 0
        self._mux.scheduler.forget(self)
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.stopProducing()
            except Exception:
                _log.failure("producer of {channel} failed to stop", channel=self)
        if self.protocol is not None:
            try:
                self.protocol.connectionLost(failure)
            except Exception:
                _log.failure("connectionLost of {channel} failed", channel=self)

    def _attach(self, protocol: IProtocol) -> None:
        self.protocol = protocol
        self.connected = True
        self._call_protocol(protocol.makeConnection, self)

    def _call_protocol(self, method: Callable[..., object], *args: object) -> None:
        # An exception in the application protocol closes its channel (as
        # on TCP), never the tunnel that carries everybody else's channels.
        try:
            method(*args)
        except Exception:
            _log.failure("protocol of {channel} failed; closing the channel", channel=self)
            self.abortConnection()

    # -- resumption ------------------------------------------------------

    def _detach(self) -> None:
        """The tunnel is gone but the channel stays: a pending open fails."""
        if self._open_result is not None and not self._open_result.called:
            self._open_result.errback(NodeOffline("the tunnel closed before the channel opened"))

    def state(self) -> ChannelState:
        """This end's account of the channel, for the peer to resume from."""
        return ChannelState(self.id, self._received_total, self._granted_out,
                            self._eof_received)

    def _resume_from(self, peer: ChannelState) -> None:
        """Re-attached: send again what ``peer`` has not received, then carry on.

        :raises ProtocolViolation: if the peer's account cannot be true (it
            acknowledges more than was sent, or asks for bytes it had
            acknowledged before and that are gone); the caller closes the
            channel.
        """
        if peer.received > self._sent_total:
            raise ProtocolViolation(
                f"channel {self.id}: the peer claims {peer.received} bytes received, "
                f"{self._sent_total} were sent")
        if peer.granted < self._granted_in:
            raise ProtocolViolation(
                f"channel {self.id}: the peer resumes from offset {peer.granted}, bytes up to "
                f"{self._granted_in} were acknowledged and are no longer held")
        if peer.eof and not self._eof_sent:
            raise ProtocolViolation(f"channel {self.id}: the peer claims an end of file "
                                    f"that was never sent")
        if peer.granted > self._granted_in:
            self._forget_retained(peer.granted - self._granted_in)
            self._granted_in = peer.granted
        self._send_credit = self._peer_window + self._granted_in - self._sent_total
        skip = peer.received - self._granted_in
        max_frame = self._mux.max_frame_out
        send = self._mux.wire.send_data
        for piece in list(self._retained):
            if skip >= len(piece):
                skip -= len(piece)
                continue
            view = memoryview(piece)[skip:]
            skip = 0
            for start in range(0, len(view), max_frame):
                send(self.id, view[start:start + max_frame])
        if self._eof_sent and not peer.eof and self._remote_close is None:
            self._mux.wire.send_eof(self.id)

    def _expire(self, reason: str) -> None:
        """The outage outlasted the budget: close the channel with ``reason``."""
        self._retained.clear()
        self._retained_size = 0
        self.lost_reason = reason
        if self._open_result is not None and not self._open_result.called:
            self._open_result.errback(NodeOffline(reason))
        self._connection_lost(Failure(ConnectionLost(reason)))

    @property
    def retained(self) -> int:
        """Bytes sent and kept until the peer acknowledges them (resumable channels)."""
        return self._retained_size

    # -- accounting for tests and statistics ------------------------------

    @property
    def buffered_incoming(self) -> int:
        """Bytes received and not yet delivered to the protocol."""
        return self._incoming_size

    @property
    def buffered_outgoing(self) -> int:
        """Bytes written by the protocol and not yet sent."""
        return self._outgoing_size

    @property
    def send_credit(self) -> int:
        """Bytes this end may still send before the peer grants more."""
        return self._send_credit
