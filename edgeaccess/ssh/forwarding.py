"""``direct-tcpip`` channels that splice an SSH channel to a stream endpoint.

Conch's own forwarding channel buffers without limit, reopens the SSH window
whatever the consumer does and drops EOF (see DESIGN.md, "SSH with Conch").
:class:`DirectTCPIPChannel` fixes all three:

- SSH -> target: the channel is registered as a streaming producer on the
  target transport; while the target pauses it, no window is granted, so at
  most one window (2 MiB) plus the transport's own buffer is ever held.
- target -> SSH: when the client's window is used up Conch calls
  ``stopWriting``; the target transport is then paused until
  ``startWriting``.
- EOF is passed both ways (half-close), so ``scp`` and ``ssh host cat`` work.

The target is connected *before* the channel is confirmed, so a failure
reaches the client as a channel open failure with a readable message
(OpenSSH prints ``channel 0: open failed: connect failed: <message>``).
This needs a connection service that accepts a ``Deferred`` from
``lookupChannel``: :class:`ForwardingSSHConnection`.
"""

from __future__ import annotations

import struct

from twisted.conch.error import ConchError
from twisted.conch.ssh import common
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.connection import (
    MSG_CHANNEL_OPEN_CONFIRMATION,
    MSG_CHANNEL_OPEN_FAILURE,
    OPEN_ADMINISTRATIVELY_PROHIBITED,
    OPEN_CONNECT_FAILED,
    OPEN_UNKNOWN_CHANNEL_TYPE,
    SSHConnection,
)
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IPushProducer,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeaccess.errors import AccessDenied, BadRequest, EdgeError
from edgeaccess.ssh.transport import write_channel_data

_log = Logger()

#: Window and packet size offered to the peer (OpenSSH's defaults; Conch's
#: 128 KiB window costs ~40 % of upload speed).
WINDOW_SIZE = 2 * 1024 * 1024
MAX_PACKET = 32 * 1024


def parse_direct_tcpip(data: bytes) -> tuple[tuple[str, int], tuple[str, int]]:
    """Read a ``direct-tcpip`` open request: ``((host, port), (orig_host, orig_port))``.

    :raises BadRequest: if the request is malformed.
    """
    try:
        host, rest = common.getNS(data)
        (port,) = struct.unpack(">L", rest[:4])
        orig_host, rest = common.getNS(rest[4:])
        (orig_port,) = struct.unpack(">L", rest[:4])
        return (host.decode("utf-8"), port), (orig_host.decode("utf-8"), orig_port)
    except (struct.error, ValueError, UnicodeDecodeError):
        raise BadRequest("malformed direct-tcpip request")


def open_failure(reason: Failure, target: str = "") -> ConchError:
    """Turn why a target could not be reached into a channel open failure.

    Our own errors carry a message meant for the user; socket errors get a
    short description naming the target. Never a traceback or a secret.
    """
    error = reason.value
    if isinstance(error, ConchError):
        return error
    if isinstance(error, AccessDenied):
        return ConchError(str(error), OPEN_ADMINISTRATIVELY_PROHIBITED)
    if isinstance(error, EdgeError):
        return ConchError(str(error), OPEN_CONNECT_FAILED)
    where = f" to {target}" if target else ""
    if isinstance(error, ierror.ConnectionRefusedError):
        return ConchError(f"connection refused{where}", OPEN_CONNECT_FAILED)
    if isinstance(error, (ierror.TimeoutError, ierror.TCPTimedOutError)):
        return ConchError(f"connection timed out{where}", OPEN_CONNECT_FAILED)
    if isinstance(error, ierror.DNSLookupError):
        return ConchError(f"unknown host{where}", OPEN_CONNECT_FAILED)
    return ConchError(f"cannot connect{where}", OPEN_CONNECT_FAILED)


@implementer(IHalfCloseableProtocol)
class _TargetProtocol(Protocol):
    """The protocol on the target's connection: hands everything to the channel."""

    def __init__(self, channel: DirectTCPIPChannel) -> None:
        self._channel = channel

    def connectionMade(self) -> None:
        self._channel._target_connected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._channel._target_data(data)

    def readConnectionLost(self) -> None:
        self._channel._target_eof()

    def writeConnectionLost(self) -> None:
        self._channel._target_write_closed()

    def connectionLost(self, reason: Failure = None) -> None:
        self._channel._target_lost(reason)


class _TargetFactory(Factory):
    def __init__(self, channel: DirectTCPIPChannel) -> None:
        self._channel = channel

    def buildProtocol(self, addr) -> _TargetProtocol:
        return _TargetProtocol(self._channel)


@implementer(IPushProducer)
class DirectTCPIPChannel(SSHChannel):
    """A ``direct-tcpip`` channel spliced to a connected target transport.

    Build it with :func:`open_direct_tcpip`; it is also the streaming
    producer registered on the target transport (``pauseProducing`` stops
    granting SSH window).
    """

    name = b"direct-tcpip"

    def __init__(
        self,
        *,
        target_description: str = "",
        window_size: int = WINDOW_SIZE,
        max_packet: int = MAX_PACKET,
        **kwargs,
    ) -> None:
        self._window_size = window_size
        self._target = None
        self._target_paused_us = False  # the target's buffer is full
        self._registered = False  # registered as the target's producer
        super().__init__(localWindow=window_size, localMaxPacket=max_packet, **kwargs)
        self.target_description = target_description
        self._opened = False
        self._early: list[bytes] = []  # target bytes before the channel is open
        self._remote_full = False  # the client's window is used up
        self._target_reading = True
        self._eof_received = False  # the client sent EOF
        self._eof_pending = False  # the target sent EOF; ours waits for the buffer
        self._eof_sent = False
        self._target_gone = False
        #: bytes carried each way, for the caller's log line
        self.bytes_to_target = 0
        self.bytes_from_target = 0

    # Conch's SSHConnection reopens the window on every data packet once it is
    # half used, whatever the consumer does; that is the only place it reads
    # ``localWindowSize``. Reporting 0 while the target has paused us makes it
    # grant nothing; resumeProducing grants what was held back.
    @property
    def localWindowSize(self) -> int:
        return 0 if self._target_paused_us else self._window_size

    @localWindowSize.setter
    def localWindowSize(self, value: int) -> None:
        self._window_size = value

    # -- the target side --------------------------------------------------

    def _target_connected(self, transport) -> None:
        self._target = transport
        transport.registerProducer(self, True)
        self._registered = True
        # Nothing may flow before the client knows the channel.
        self._set_target_reading()

    def _target_data(self, data: bytes) -> None:
        self.bytes_from_target += len(data)
        if not self._opened:
            self._early.append(data)
            return
        if self.localClosed:
            return
        write_channel_data(self, data)

    def _target_eof(self) -> None:
        if self._eof_sent or self._eof_pending:
            return
        self._eof_pending = True
        self._flush_eof()
        self._maybe_finish()

    def _target_write_closed(self) -> None:
        self._maybe_finish()

    def _target_lost(self, reason: Failure | None) -> None:
        self._target_gone = True
        self._target = None
        self._registered = False
        _log.debug(
            "target {target} disconnected: {reason}",
            target=self.target_description,
            reason=reason.getErrorMessage() if reason is not None else "",
        )
        if not self._opened or self.localClosed:
            return
        if not self._eof_sent:
            self._eof_pending = True
        self.loseConnection()

    def _set_target_reading(self) -> None:
        want = self._opened and not self._remote_full and not self.localClosed
        if self._target is None or want == self._target_reading:
            return
        self._target_reading = want
        if want:
            self._target.resumeProducing()
        else:
            self._target.pauseProducing()

    def _maybe_finish(self) -> None:
        """Both directions ended: close the target (the channel follows)."""
        if self._eof_sent and self._eof_received:
            self._close_target()

    def _close_target(self) -> None:
        # A transport whose streaming producer is paused resumes it after
        # flushing instead of closing: unregister first.
        if self._target is not None:
            self._unregister()
            self._target.loseConnection()

    def _unregister(self) -> None:
        if self._registered and self._target is not None:
            self._registered = False
            self._target.unregisterProducer()

    # -- IPushProducer, called by the target transport --------------------

    def pauseProducing(self) -> None:
        """The target cannot take more: stop granting SSH window."""
        self._target_paused_us = True

    def resumeProducing(self) -> None:
        """The target drained its buffer: grant the window held back."""
        self._target_paused_us = False
        self._grant_window()

    def stopProducing(self) -> None:
        """The target transport is going away; ``connectionLost`` follows."""

    def _grant_window(self) -> None:
        if self.localClosed or self._eof_received or self.conn is None:
            return
        if self.id is None or not self._opened:
            return
        if self.localWindowLeft < self._window_size // 2:
            self.conn.adjustWindow(self, self._window_size - self.localWindowLeft)

    # -- the SSH side ------------------------------------------------------

    def channelOpen(self, specificData: bytes) -> None:
        self._opened = True
        early, self._early = self._early, []
        if early:
            self.write(b"".join(early))
        if self._target_gone:
            if not self._eof_sent:
                self._eof_pending = True
            self.loseConnection()
            return
        self._set_target_reading()

    def dataReceived(self, data: bytes) -> None:
        if self._target is None:
            return
        self.bytes_to_target += len(data)
        self._target.write(data)

    def eofReceived(self) -> None:
        self._eof_received = True
        target = self._target
        if target is None:
            return
        self._unregister()
        half_close = getattr(target, "loseWriteConnection", None)
        if half_close is None:
            target.loseConnection()
        else:
            half_close()
        self._maybe_finish()

    def closeReceived(self) -> None:
        # The client reads nothing more: drop what waits for its window.
        self.buf = b""
        self.extBuf = []
        self._eof_pending = False
        self.loseConnection()

    def closed(self) -> None:
        self._remote_full = True
        self._close_target()
        _log.info(
            "splice to {target} closed: {sent} bytes sent, {received} received",
            target=self.target_description,
            sent=self.bytes_to_target,
            received=self.bytes_from_target,
        )

    def stopWriting(self) -> None:
        self._remote_full = True
        self._set_target_reading()

    def startWriting(self) -> None:
        self._remote_full = False
        self._set_target_reading()

    def addWindowBytes(self, data: int) -> None:
        super().addWindowBytes(data)
        self._flush_eof()
        self._maybe_finish()

    def loseConnection(self) -> None:
        self.closing = 1
        if not self.buf and not self.extBuf:
            self._flush_eof()
            self.conn.sendClose(self)

    def _flush_eof(self) -> None:
        if self._eof_pending and not self.buf and self._opened and not self.localClosed:
            self._eof_pending = False
            self._eof_sent = True
            self.conn.sendEOF(self)


def open_direct_tcpip(
    endpoint: IStreamClientEndpoint,
    *,
    remote_window: int,
    remote_max_packet: int,
    avatar=None,
    target_description: str = "",
    window_size: int = WINDOW_SIZE,
    max_packet: int = MAX_PACKET,
) -> Deferred:
    """Connect ``endpoint`` and return a ``Deferred[DirectTCPIPChannel]``.

    Return it from an avatar's ``lookupChannel`` under a
    :class:`ForwardingSSHConnection`: the channel is confirmed once the
    target is connected; a failure becomes a channel open failure
    (``ConchError(message, reason_code)``, see :func:`open_failure`).
    Cancelling the Deferred cancels the connection attempt.

    :param endpoint: where to splice to (TCP for a node's port forwarding or
        a LAN node, a tunnel channel, ...).
    :param remote_window: the window the client offered in its open request.
    :param remote_max_packet: the client's maximum packet size.
    :param target_description: names the target in messages and logs.
    """
    channel = DirectTCPIPChannel(
        target_description=target_description,
        window_size=window_size,
        max_packet=max_packet,
        remoteWindow=remote_window,
        remoteMaxPacket=remote_max_packet,
        avatar=avatar,
    )

    def failed(reason: Failure):
        if reason.check(CancelledError):
            return reason
        raise open_failure(reason, target_description)

    connecting = endpoint.connect(_TargetFactory(channel))
    connecting.addCallbacks(lambda _protocol: channel, failed)
    return connecting


class AsyncChannelOpenMixin:
    """Let ``lookupChannel`` answer with a ``Deferred`` (mix into an SSHConnection).

    Conch confirms a channel as soon as ``getChannel`` returns; a forwarding
    channel must first reach its target so that a failure can still be
    reported as an open failure. Channels returned directly are confirmed
    at once, exactly as Conch does.
    """

    def serviceStarted(self) -> None:
        self._pending_opens: set[Deferred] = set()
        super().serviceStarted()

    def serviceStopped(self) -> None:
        pending, self._pending_opens = self._pending_opens, set()
        for opening in list(pending):
            opening.cancel()
        super().serviceStopped()

    def getChannel(self, channelType, windowSize, maxPacket, data):
        if hasattr(self.transport, "avatar"):
            chan = self.transport.avatar.lookupChannel(
                channelType, windowSize, maxPacket, data
            )
            if chan is None:
                raise ConchError("unknown channel", OPEN_UNKNOWN_CHANNEL_TYPE)
            return chan
        return super().getChannel(channelType, windowSize, maxPacket, data)

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        channel_type, rest = common.getNS(packet)
        sender, window, max_packet = struct.unpack(">3L", rest[:12])
        data = rest[12:]
        try:
            result = self.getChannel(channel_type, window, max_packet, data)
        except Exception:
            self._refuse_open(sender, Failure())
            return
        if not isinstance(result, Deferred):
            self._confirm_open(sender, result, data)
            return
        pending = getattr(self, "_pending_opens", set())
        pending.add(result)

        def done(outcome):
            pending.discard(result)
            return outcome

        result.addBoth(done)
        result.addCallbacks(
            lambda chan: self._confirm_open(sender, chan, data),
            lambda reason: self._refuse_open(sender, reason),
        )

    def _confirm_open(self, sender: int, channel: SSHChannel, data: bytes) -> None:
        channel.conn = self
        local = self.localChannelID
        self.localChannelID += 1
        channel.id = local
        self.channels[local] = channel
        self.channelsToRemoteChannel[channel] = sender
        self.localToRemoteChannel[local] = sender
        self.transport.sendPacket(
            MSG_CHANNEL_OPEN_CONFIRMATION,
            struct.pack(
                ">4L", sender, local, channel.localWindowSize, channel.localMaxPacket
            )
            + channel.specificData,
        )
        channel.channelOpen(data)

    def _refuse_open(self, sender: int, reason: Failure) -> None:
        if reason.check(CancelledError):
            return  # the connection is gone: nobody to answer
        error = reason.value
        if isinstance(error, ConchError):
            text, code = error.args[0], error.args[1]
            if isinstance(text, int):  # Conch accepts both orders (#3657)
                text, code = code, text
        elif isinstance(error, EdgeError):
            text, code = str(error), OPEN_CONNECT_FAILED
        else:
            _log.failure("channel open failed", reason)
            text, code = "unknown failure", OPEN_CONNECT_FAILED
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self.transport.sendPacket(
            MSG_CHANNEL_OPEN_FAILURE,
            struct.pack(">2L", sender, code)
            + common.NS(str(text).encode("utf-8"))
            + common.NS(b""),
        )


class ForwardingSSHConnection(AsyncChannelOpenMixin, SSHConnection):
    """``ssh-connection`` service whose avatars may open channels asynchronously."""
