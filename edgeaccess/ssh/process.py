"""A faster, flow-controlled replacement for Conch's session process protocol.

Conch's ``SSHSessionProcessProtocol`` gets the child's output 8 KiB at a time
(``fdesc.readFromFD``), sends one SSH packet per read, buffers without limit
when the client's window is exhausted, and its session channel re-grants the
client's window as soon as data arrives, whether or not the child reads its
stdin.  :class:`SessionProcessProtocol` keeps the same constructor and outward
behaviour (output as channel data, stderr as extended data, EOF once both
pipes close, ``exit-status``/``exit-signal``, close) and adds:

* large reads: the child's pipes are enlarged to 1 MiB (``F_SETPIPE_SZ``) and
  read 64 KiB at a time, so the channel writes full 32 KiB packets;
* reads straight into packets: with
  :class:`edgeaccess.ssh.transport.EdgeServerTransport`, stdout and stderr are
  read (``os.readv``) into the data slots of the packets that carry them, up
  to :data:`READS_PER_TURN` reads per reactor turn, sealed in place and
  written at once, bypassing ``outReceived``/``errReceived`` (unless an
  instance replaces them, as session recording does);
* download backpressure: output is only handed to the channel within the
  client's remaining window; when it is exhausted the child's pipes are no
  longer read (the child then blocks on write) until the window reopens;
* upload backpressure: while the child's stdin buffer is over its limit the
  session channel grants no more window, so the client stops sending;
* a 2 MiB receive window (Conch's default is 128 KiB, OpenSSH uses 2 MiB).

How a session channel uses it (this is all the session code must do):

1. create ``SessionProcessProtocol(self)`` where Conch would create
   ``SSHSessionProcessProtocol(self)`` (``SSHSession._shellOrCommand``), give it
   to ``spawnProcess`` and keep it as ``self.client``;
2. nothing else is required.  On ``connectionMade`` the protocol raises the
   channel's window to :data:`WINDOW_SIZE` if it is smaller, and, if the
   channel class does not override ``startWriting``, installs an instance
   hook so that ``SSHChannel.addWindowBytes`` resumes it.  A channel class that
   does override ``startWriting``/``stopWriting`` must call
   ``self.client.resumeProducing()`` from ``startWriting``.  Creating the
   channel with ``localWindow=WINDOW_SIZE`` avoids one WINDOW_ADJUST message.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections import deque
from typing import Callable

from twisted.conch.ssh import connection
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.session import SSHSessionProcessProtocol as _ConchProcessProtocol
from twisted.internet import interfaces, process
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeaccess.ssh.transport import write_channel_data

_log = Logger()

#: Bytes read from the child's stdout/stderr per read (Twisted reads 8 KiB).
READ_SIZE = 64 * 1024
#: Pipe capacity requested for the child's pipes (Linux's default is 64 KiB;
#: 1 MiB is the unprivileged maximum, /proc/sys/fs/pipe-max-size).
PIPE_SIZE = 1024 * 1024
#: Reads of ``READ_SIZE`` per reactor turn when output goes straight into
#: packets (stops early once a read comes up short).
READS_PER_TURN = 8
#: The session channel's receive window (OpenSSH's CHAN_SES_WINDOW_DEFAULT).
WINDOW_SIZE = 2 * 1024 * 1024
#: Packet size to accept on a session channel (OpenSSH's CHAN_SES_PACKET_DEFAULT).
MAX_PACKET = 32 * 1024

_pack_recipient = struct.Struct(">L").pack
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux only


def _enlarge_pipe(fd: int) -> None:
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # not a pipe (pty), not Linux, or over the system limit: keep it


@implementer(interfaces.IPushProducer)
class _StdinWindowGate:
    """
    Registered as the producer of the child's stdin: while the stdin buffer is
    over its limit, the session channel grants the client no more window.

    Conch's ``SSHConnection.ssh_CHANNEL_DATA`` re-grants window whenever
    ``localWindowLeft < localWindowSize // 2``; a ``localWindowSize`` of 0
    makes that test false, so the window drains and the client stops.
    """

    def __init__(self, session: SSHChannel, stdin, window_size: int) -> None:
        self._session = session
        self._stdin = stdin
        self._window_size = window_size

    def pauseProducing(self) -> None:  # noqa: N802
        self._session.localWindowSize = 0

    def resumeProducing(self) -> None:  # noqa: N802
        if self._stdin.disconnecting:
            # stdin is being closed (client EOF): FileDescriptor only closes
            # once its producer unregisters, so step aside.
            self._stdin.unregisterProducer()
        session = self._session
        session.localWindowSize = self._window_size
        left = session.localWindowLeft
        if left < self._window_size // 2 and not session.localClosed:
            session.conn.adjustWindow(session, self._window_size - left)

    def stopProducing(self) -> None:  # noqa: N802
        # The child closed its stdin: further input is discarded by the
        # process transport, so let the client keep sending (as sshd does).
        self.resumeProducing()


@implementer(interfaces.ITransport, interfaces.IPushProducer)
class SessionProcessProtocol(_ConchProcessProtocol):
    """
    Connects a child process (or subsystem) to an SSH session channel, with
    large reads and flow control in both directions.

    :param session: the session channel (an ``SSHChannel``, usually an
        ``SSHSession`` subclass).
    :param read_size: bytes per read from the child's stdout/stderr.
    :param reads_per_turn: reads per reactor turn, when the transport can
        read straight into packets (``read_data_packets``).
    :param window_size: the receive window the channel advertises.
    """

    def __init__(
        self,
        session: SSHChannel,
        *,
        read_size: int = READ_SIZE,
        reads_per_turn: int = READS_PER_TURN,
        window_size: int = WINDOW_SIZE,
    ) -> None:
        super().__init__(session)
        self._read_size = read_size
        self._reads_per_turn = reads_per_turn
        self._window_size = window_size
        # Output not yet within the client's window: (None | ext type, data).
        self._pending: deque[tuple[int | None, bytes]] = deque()
        self._after_drain: list[Callable[[], object]] = []
        self._reading_paused = False

    # -- IProcessProtocol ---------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        session = self.session
        self._widen_window()
        self._install_large_reads()
        stdin = self._stdin_writer()
        if stdin is not None:
            stdin.registerProducer(_StdinWindowGate(session, stdin, self._window_size), True)
        if type(session).startWriting is SSHChannel.startWriting:
            # SSHChannel.addWindowBytes calls startWriting() (a no-op hook)
            # when the client's window reopens: route it to us.
            session.startWriting = self.resumeProducing
        if session.buf:
            # Input that arrived before the process existed (SSHSession
            # keeps it in .buf).
            data, session.buf = session.buf, b""
            self.transport.write(data)
        else:
            session.buf = b""

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self._send(None, data)

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        self._send(connection.EXTENDED_DATA_STDERR, data)

    def outConnectionLost(self) -> None:  # noqa: N802
        """Send EOF once stdout and stderr are closed and their data sent."""
        if self.lostOutOrErrFlag:
            self._when_drained(lambda: self.session.conn.sendEOF(self.session))
        else:
            self.lostOutOrErrFlag = True

    def processEnded(self, reason: Failure | None = None) -> None:  # noqa: N802
        """Send exit-status/exit-signal and close, after pending output."""
        self._when_drained(lambda: _ConchProcessProtocol.processEnded(self, reason))

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        # Subsystems (wrapped protocols) end here rather than in processEnded.
        self._when_drained(lambda: _ConchProcessProtocol.connectionLost(self, reason))

    # -- ITransport (used by subsystems such as SFTP) -----------------------

    def write(self, data: bytes) -> None:
        """Send ``data`` as channel data, within the client's window."""
        self._send(None, data)

    def writeSequence(self, seq: list[bytes]) -> None:  # noqa: N802
        self._send(None, b"".join(seq))

    # -- IPushProducer, driven by the session channel -----------------------

    def pauseProducing(self) -> None:  # noqa: N802
        """Stop reading the child's output."""
        if not self._reading_paused:
            self._reading_paused = True
            pause = getattr(self.transport, "pauseProducing", None)
            if pause is not None:
                pause()

    def resumeProducing(self) -> None:  # noqa: N802
        """The client's window reopened: send pending output, then read on."""
        self._flush()

    def stopProducing(self) -> None:  # noqa: N802
        self._pending.clear()
        self._after_drain.clear()
        if self.transport is not None:
            self.transport.loseConnection()

    # -- internals ------------------------------------------------------------

    def _widen_window(self) -> None:
        session = self.session
        extra = self._window_size - session.localWindowSize
        if extra > 0:
            session.localWindowSize = self._window_size
            session.conn.adjustWindow(session, extra)

    def _stdin_writer(self):
        """The file descriptor object that writes the child's input, if any."""
        transport = self.transport
        if isinstance(transport, process.PTYProcess):
            return transport
        writer = getattr(transport, "pipes", {}).get(0)
        return writer if isinstance(writer, process.ProcessWriter) else None

    def _install_large_reads(self) -> None:
        transport = self.transport
        if isinstance(transport, process.PTYProcess):
            transport.doRead = self._reader(  # type: ignore[method-assign]
                transport.fileno(), lambda data: self.childDataReceived(1, data), 1
            )
            return
        for name, pipe in getattr(transport, "pipes", {}).items():
            if isinstance(pipe, process.ProcessReader):
                stream = name if name in _HOOKS else None
                pipe.doRead = self._reader(pipe.fileno(), pipe.dataReceived, stream)
                _enlarge_pipe(pipe.fileno())
            elif isinstance(pipe, process.ProcessWriter):
                _enlarge_pipe(pipe.fileno())

    def _reader(
        self, fd: int, deliver: Callable[[bytes], None], stream: int | None
    ) -> Callable[[], object]:
        """
        A ``doRead`` for the child's ``stream`` (1 stdout, 2 stderr, None
        other): straight into the packets when :meth:`_read_direct` can,
        otherwise like ``fdesc.readFromFD`` with our read size.
        """
        size = self._read_size

        def do_read() -> object:
            if self._reading_paused:
                return None
            try:
                if stream is not None:
                    sent = self._read_direct(fd, stream)
                    if sent is not None:
                        return None if sent else CONNECTION_DONE
                data = os.read(fd, size)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                return CONNECTION_LOST
            if not data:
                return CONNECTION_DONE
            deliver(data)
            return None

        return do_read

    def _read_direct(self, fd: int, stream: int) -> int | None:
        """
        Read the child's output straight into sealed packets (the transport's
        ``read_data_packets``): up to ``reads_per_turn`` reads of
        ``read_size`` within the client's window, one write.  None (nothing
        read) when that path is not open: no such transport, a key exchange
        under way, output queued or buffered, the channel closing, an
        ``outReceived``/``errReceived`` replaced (session recording tees it).
        """
        session = self.session
        window = session.remoteWindowLeft
        if self._pending or session.buf or session.localClosed or window <= 0:
            return None
        hook = _HOOKS[stream]
        if hook in self.__dict__ or getattr(type(self), hook) is not _DEFAULT_HOOKS[stream]:
            return None
        conn = session.conn
        read = getattr(conn.transport, "read_data_packets", None)
        if read is None:
            return None
        prefix = _pack_recipient(conn.channelsToRemoteChannel[session])
        if stream == 1:
            message_type = connection.MSG_CHANNEL_DATA
        else:
            message_type = connection.MSG_CHANNEL_EXTENDED_DATA
            prefix += _pack_recipient(connection.EXTENDED_DATA_STDERR)
        sent = read(
            fd,
            message_type,
            prefix,
            min(window, self._read_size * self._reads_per_turn),
            session.remoteMaxPacket,
            self._read_size,
        )
        if sent:
            session.remoteWindowLeft = window - sent
            if window <= sent:
                # Window used up: stop reading until addWindowBytes calls
                # startWriting (our resumeProducing).
                session.areWriting = False
                self.pauseProducing()
        return sent

    def _send(self, kind: int | None, data: bytes) -> None:
        if not data:
            return
        self._pending.append((kind, data))
        if len(self._pending) == 1:
            self._flush()
        else:
            self.pauseProducing()

    def _flush(self) -> None:
        session = self.session
        pending = self._pending
        while pending:
            window = session.remoteWindowLeft
            if window <= 0:
                break
            kind, data = pending[0]
            if len(data) > window:
                pending[0] = (kind, data[window:])
                data = data[:window]
            else:
                pending.popleft()
            if kind is None:
                self._write_data(data)
            else:
                session.writeExtended(kind, data)
        if pending:
            # Make SSHChannel.addWindowBytes call startWriting() for us.
            session.areWriting = False
            self.pauseProducing()
            return
        if self._after_drain:
            actions, self._after_drain = self._after_drain, []
            for action in actions:
                action()
        if self._reading_paused:
            self._reading_paused = False
            resume = getattr(self.transport, "resumeProducing", None)
            if resume is not None:
                resume()

    def _write_data(self, data: bytes) -> None:
        """``session.write(data)`` with all its packets sealed and written at
        once where the transport can (:func:`write_channel_data`)."""
        write_channel_data(self.session, data)

    def _when_drained(self, action: Callable[[], object]) -> None:
        if self._pending:
            self._after_drain.append(action)
        else:
            action()



# Child stream -> the protocol hook its data would go through.
_HOOKS = {1: "outReceived", 2: "errReceived"}
_DEFAULT_HOOKS = {
    1: SessionProcessProtocol.outReceived,
    2: SessionProcessProtocol.errReceived,
}
