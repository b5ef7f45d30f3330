"""Fewer Python calls per byte on the TLS and TCP transports that carry bulk data.

Twisted's TLS transport is written for many small connections; a tunnel or a
TLS-routed SSH stream moves gigabytes through one. Measured on the proxy of a
TLS-routed download (perf), half of its CPU was the interpreter: per 16 KiB
record a chain of ten calls, a zeroed 32 KiB buffer, a timer and three copies.
:func:`install_fast_tls` changes one transport instance (leaving any transport
it does not recognize alone, so a Twisted without these internals only loses
the speed-up):

* **reads**: every record that one TCP read completes is decrypted
  (``SSL_read`` straight into a process-wide buffer) and delivered to the
  protocol as one ``bytes`` (Twisted delivers each record on its own, from a
  fresh zeroed 32 KiB buffer);
* **writes**: one ``SSL_write`` encrypts a whole write (partial writes off)
  and its records leave in one TCP write, sent from a process-wide buffer
  (``BIO_read``) and copied only for what TCP does not take (Twisted slices
  16 KiB and sends each record on its own). Small writes are gathered, without
  the copy Twisted makes, until the read being delivered ends (when a fast
  transport's read caused them) or the next reactor turn; large ones go at once;
* **TCP** (:func:`eager_tcp_writes`): reads of up to 256 KiB, and a write that
  finds nothing queued goes to the socket at once instead of on the next
  reactor turn (which costs two ``epoll_ctl`` calls and a loop iteration a
  write); whatever the socket does not take is queued as before.

Measured effect: ``docs/performance.md``, "Tunnel data path, second round".
"""

from __future__ import annotations

from functools import partial
from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

_log = Logger()

try:  # pyOpenSSL's cffi bindings: records are decrypted and read straight into our buffers
    from OpenSSL._util import ffi as _ffi, lib as _lib
except ImportError:  # pragma: no cover - a pyOpenSSL without them keeps Twisted's I/O
    _ffi = _lib = None

#: Plaintext of one TLS record at most.
_RECORD = 16384
#: TLS 1.3 record overhead (header, content type, AEAD tag) is 22 bytes per
#: record; this bound leaves room for anything else OpenSSL queues.
_SLACK = 64
#: Decrypted bytes delivered in one ``dataReceived`` at most.
READ_BATCH = 256 * 1024
#: Buffered plaintext at which a write is encrypted at once rather than on
#: the next reactor turn.
FLUSH_AT = 32 * 1024
#: Encrypted bytes taken out of the send BIO per read.
WRITE_CHUNK = 256 * 1024 + 16 * 64
#: Bytes asked of the socket per read (Twisted's default is 64 KiB).
TCP_READ_SIZE = 256 * 1024

_TLS_INTERNALS = (
    "_tlsConnection", "_lostTLSConnection", "_bufferedWrite", "_tlsShutdownFinished",
    "_shutdownTLS", "_flushSendBIO", "_aborted", "_aggregator",
)
_TCP_INTERNALS = ("socket", "dataBuffer", "offset", "_tempDataLen", "_writeDisconnected")
_CONNECTION_INTERNALS = ("_ssl", "_from_ssl", "_raise_ssl_error")


class _SharedBuffers:
    """One read and one write buffer for the whole process, allocated at
    first use: the reactor runs one transport's I/O at a time, and each
    buffer's bytes are copied out before anything else can run (a buffer
    per transport would cost 512 KiB per tunnel that ever had a channel)."""

    def __init__(self) -> None:
        self.read = bytearray(READ_BATCH)
        self.read_view = memoryview(self.read)
        self.read_at = _ffi.from_buffer("char[]", self.read, require_writable=True)
        self.out = bytearray(WRITE_CHUNK)
        self.out_view = memoryview(self.out)
        self.out_at = _ffi.from_buffer("char[]", self.out, require_writable=True)


_buffers: _SharedBuffers | None = None


def _shared() -> _SharedBuffers:
    global _buffers
    if _buffers is None:
        _buffers = _SharedBuffers()
    return _buffers


def install_fast_tls(transport: Any, clock: IReactorTime | None = None) -> bool:
    """Make ``transport`` (a ``TLSMemoryBIOProtocol`` after its handshake)
    read, write and reach TCP in large pieces.

    Returns whether it did (False: not such a transport, or its internals
    differ from the Twisted this was written for).
    """
    if not isinstance(transport, TLSMemoryBIOProtocol):
        return False
    if "_fast_tls" in vars(transport):
        return True
    connection = getattr(transport, "_tlsConnection", None)
    if (
        _lib is None
        or not all(hasattr(transport, name) for name in _TLS_INTERNALS)
        or not all(hasattr(connection, name) for name in _CONNECTION_INTERNALS)
    ):
        _log.info("TLS transport without the expected internals: Twisted's TLS I/O kept")
        return False
    if clock is None:
        clock = transport.factory._clock
    transport._fast_tls = True
    # pyOpenSSL turns on partial writes (SSL_write returns after one
    # record); over a memory BIO a write never blocks, so one call may
    # encrypt a whole buffer.
    _lib.SSL_clear_mode(connection._ssl, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
    transport._write = partial(_large_write, transport)
    aggregator = _Aggregator(partial(TLSMemoryBIOProtocol.write, transport), clock)
    aggregator.flush_previous(transport._aggregator)
    transport._aggregator = aggregator
    transport.write = aggregator.write
    transport._flushReceiveBIO = partial(_flush_receive_bio, transport)
    eager_tcp_writes(transport.transport)
    return True


def eager_tcp_writes(transport: Any) -> bool:
    """Large reads and eager writes on a Twisted TCP transport (see the module
    docstring). Returns whether ``transport`` was one."""
    if not isinstance(transport, FileDescriptor) or getattr(transport, "TLS", True):
        return False
    if not all(hasattr(transport, name) for name in _TCP_INTERNALS):
        return False
    if "_eager" in vars(transport):
        return True
    transport._eager = True
    transport.bufferSize = TCP_READ_SIZE
    transport.write = partial(_eager_write, transport)
    return True


def _eager_write(tcp: Any, data: bytes | memoryview) -> None:
    # ``data`` may be a view of a shared buffer: what is not sent at once is
    # copied before it is queued.
    if (
        data
        and tcp.connected
        and not tcp.disconnecting
        and not tcp._writeDisconnected
        and not tcp._tempDataLen
        and len(tcp.dataBuffer) == tcp.offset
    ):
        try:
            sent = tcp.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error the reactor's doWrite will report
        if sent == len(data):
            return
        if sent:
            data = data[sent:]
    FileDescriptor.write(tcp, data if type(data) is bytes else bytes(data))


class _Aggregator:
    """Twisted's ``_AggregateSmallWrites`` without its copies: gathers small
    writes until the read being delivered ends (see :class:`_ReadScope`) or
    the next reactor turn, encrypts large ones at once."""

    __slots__ = ("_write", "_clock", "_buffer", "_size", "_scheduled")

    def __init__(self, write: Any, clock: IReactorTime) -> None:
        self._write = write
        self._clock = clock
        self._buffer: list[bytes] = []
        self._size = 0
        self._scheduled: Any = None

    def flush_previous(self, previous: Any) -> None:
        """Take over what Twisted's aggregator still holds (order kept)."""
        flush = getattr(previous, "flush", None)
        if flush is not None:
            flush()

    def write(self, data: bytes) -> None:
        if type(data) is not bytes:
            data = bytes(data)  # the caller may reuse a mutable buffer
        self._buffer.append(data)
        self._size += len(data)
        if self._size >= FLUSH_AT:
            self.flush()
        elif _reading.active:
            # Written while a fast transport delivers a read: flushed when
            # that delivery ends, with whatever else it writes (no timer).
            _reading.pending.add(self)
        elif self._scheduled is None:
            self._scheduled = self._clock.callLater(0, self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._scheduled = None
        self.flush()

    def flush(self) -> None:
        buffer = self._buffer
        if not buffer:
            return
        data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
        self._buffer = []
        self._size = 0
        self._write(data)

    def close(self) -> None:
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        self.flush()


class _ReadScope:
    """Whether a fast transport is delivering a read, and the aggregators
    that gathered small writes meanwhile: one reactor thread, so one scope."""

    __slots__ = ("active", "pending")

    def __init__(self) -> None:
        self.active = 0
        self.pending: set[_Aggregator] = set()

    def end(self) -> None:
        self.active -= 1
        while not self.active and self.pending:
            pending, self.pending = self.pending, set()
            for aggregator in pending:
                aggregator.flush()


_reading = _ReadScope()


def _large_write(tls: Any, data: bytes) -> None:
    # Same contract as TLSMemoryBIOProtocol._write (called for buffered
    # writes too): what OpenSSL cannot take now is buffered, errors end TLS.
    # All the records of ``data`` are encrypted by one send() (partial
    # writes are off) and leave the send BIO in one TCP write.
    if tls._lostTLSConnection:
        return
    connection = tls._tlsConnection
    view = memoryview(data)
    total = len(data)
    done = 0
    try:
        while done < total:
            done += connection.send(view[done:] if done else data)
    except WantReadError:
        tls._bufferedWrite(bytes(view[done:]))
    except Error:
        _flush_send_bio(tls, connection, done)
        tls._tlsShutdownFinished(Failure())
        return
    _flush_send_bio(tls, connection, done)


def _flush_send_bio(tls: Any, connection: Any, sent: int) -> None:
    # Every record in the send BIO, read into the shared buffer and sent
    # from there (copied only for what TCP does not take at once).
    buffers = _shared()
    bio = connection._from_ssl
    tcp = tls.transport
    eager = "_eager" in vars(tcp)
    while True:
        size = _lib.BIO_read(bio, buffers.out_at, WRITE_CHUNK)
        if size <= 0:
            return
        out = buffers.out_view[:size]
        if eager:
            _eager_write(tcp, out)
        else:
            tcp.write(bytes(out))
        if size < WRITE_CHUNK:
            return


def _flush_receive_bio(tls: Any) -> None:
    # TLSMemoryBIOProtocol._flushReceiveBIO, delivering what one call
    # decrypts as one piece. Data read before a close alert or an error is
    # delivered before the close is handled, as Twisted does.
    connection = tls._tlsConnection
    ssl = connection._ssl
    buffers = _shared()
    limit = READ_BATCH - _RECORD
    filled = 0
    closed_cleanly = False
    failure: Failure | None = None
    while not tls._lostTLSConnection:
        if filled > limit:
            _deliver(tls, buffers.read_view, filled)
            filled = 0
            continue
        result = _lib.SSL_read(ssl, buffers.read_at + filled, _RECORD)
        if result > 0:
            filled += result
            continue
        try:
            connection._raise_ssl_error(ssl, result)
        except WantReadError:
            pass
        except ZeroReturnError:
            closed_cleanly = True
        except Error:
            failure = Failure()
        break
    if filled and not tls._lostTLSConnection:
        _deliver(tls, buffers.read_view, filled)
    if closed_cleanly:
        tls._shutdownTLS()
        tls._tlsShutdownFinished(None)
    elif failure is not None:
        tls._tlsShutdownFinished(failure)
    tls._flushSendBIO()


def _deliver(tls: Any, view: memoryview, filled: int) -> None:
    # A copy, made before the protocol runs: the buffer is shared.
    if tls._aborted:
        return
    _reading.active += 1
    try:
        ProtocolWrapper.dataReceived(tls, bytes(view[:filled]))
    finally:
        _reading.end()
