"""Every reach into the internals of Twisted, pyOpenSSL, CPython and glibc.

Speed and memory at scale led us past public APIs in a few places; each such
*reach* is declared here with a probe of the shape it expects, and its code
lives here too, behind thin call sites elsewhere:

- ``tls-buffers``: pyOpenSSL's memory BIOs of a connection
  (:func:`shrink_tls_buffers`). Off: idle TLS connections keep their
  handshake-sized buffers.
- ``fast-tls``: Twisted's TLS transport internals and pyOpenSSL's ``SSL *``
  (:func:`install_fast_tls`). Off: Twisted's TLS I/O, one record per delivery.
- ``eager-tcp``: Twisted's TCP write buffer (:func:`send_if_idle`,
  :func:`eager_tcp_writes`). Off: writes wait for the next reactor turn.
- ``tcp-send-limit``: Twisted's TCP write-buffer test (``_isSendBufferFull``,
  :func:`limit_tcp_send_buffer`) and its paused-producer state
  (``producerPaused``, resumed by ``doWrite``: :func:`pause_until_writable`).
  Off: a tunnel's producer is paused only past Twisted's ``bufferSize`` (bytes
  queued there and in the kernel cannot be reordered by the tunnel's priority
  scheduler).
- ``amp-lean-init``: what ``amp.AMP.__init__`` sets (:func:`init_amp`). Off:
  ``amp.AMP.__init__`` itself (~0.5 KB more a tunnel). (The read-through
  ``_transportPeer``/``_transportHost`` of
  :class:`~edgeaccess.tunnel.connection.TunnelConnection` shadow two AMP
  attributes; they need no probe: they answer what AMP stored, live.)
- ``conch-transport``: Conch's private key set-up and key exchange state, under
  our SSH packet layer (:func:`conch_keys_replaceable`, :func:`conch_may_send`,
  :func:`conch_key_exchange_idle`; the ``_keySetup`` override is in
  :mod:`edgeaccess.ssh.transport`). Off: Conch's own packet layer, offering only
  its ciphers (aes-ctr with HMAC, no AES-GCM).
- ``cpython-shared-keys``: CPython's key-sharing instance dicts
  (:func:`share_instance_attributes`). Off: nothing is entered up front.
- ``glibc-malloc``: ``malloc_trim`` and ``mallopt`` through ctypes
  (:func:`malloc_trim`, :func:`mallopt`). Off: no trimming, glibc's default
  thresholds.
- ``conch-session``: Conch privates that the SSH session
  (``SSHSession._session``, ``_shellOrCommand``), certificate userauth
  (``_cbFinishedAuth``, ``_ebCheckKey``) and SFTP (``_absPath``, ``_getAttrs``)
  code override or call where they are (they are that code's core). No stock
  path: :func:`self_check` raises :class:`InternalsMismatch`.
- ``http-bad-request``: Twisted's answer to a malformed HTTP request
  (:func:`answer_bad_requests`). Off: Twisted's bare 400 (no JSON error body).
- ``conch-host-cert``: Conch's client ECDH reply handler and its key set-up
  (:class:`HostCertificateClientMixin`, for the web terminal's client to a
  node with a host certificate). Off: web terminals are refused.
- ``cpython-tls-route``: CPython's ``_ssl`` context (``_SSLContext``,
  ``_wrap_bio``, ``_set_alpn_protocols``) and ``_socket`` in the TLS-routing
  ``ProxyCommand`` (:func:`tls_route_stock_argument`). Its code cannot live
  here: :mod:`edgeaccess.client.tlsroute` runs standalone (``python -I -S``,
  nothing of the package importable), so one marked block there holds it; the
  probe here drives that block to a ClientHello in memory. Off: ``edge``
  writes ``--stock`` into the ``ProxyCommand`` (``ssl`` and ``socket`` only,
  ~10 ms more CPU a start); the script also takes ``ssl``'s context by itself
  when the private context API differs at run time.

:func:`self_check` runs every probe; ``edgeproxy`` and ``edgenode`` call it
at start-up. A reach whose probe fails is switched off: its call sites take
the stock code path, and one warning says which reach and why. A reach that
was never probed is probed at its first use. ``conch-session`` has no stock
path (the session code is built on those methods): its failure stops the
daemon with the reason rather than breaking sessions later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import inspect
import sys
from functools import cached_property, partial
from typing import Any, Callable, Iterable

from OpenSSL import __version__ as _pyopenssl_version
from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

try:  # pyOpenSSL's cffi bindings (private): OpenSSL's functions, called directly
    from OpenSSL._util import ffi as _ffi, lib as _lib
except ImportError:  # pragma: no cover - the probes report it
    _ffi = _lib = None

_log = Logger()


class InternalsMismatch(RuntimeError):
    """A reach without a stock path found a shape it was not written for."""


# -- the registry ---------------------------------------------------------------------------


class _Reach:
    __slots__ = ("name", "fallback", "probe", "required")

    def __init__(self, name: str, fallback: str, probe: Callable[[], str | None],
                 required: bool) -> None:
        self.name = name
        self.fallback = fallback
        self.probe = probe
        self.required = required


_REACHES: dict[str, _Reach] = {}
#: name -> None (shape as expected: in use) or the reason it is off.
_state: dict[str, str | None] = {}


def _reach(name: str, fallback: str, *, required: bool = False):
    def register(probe: Callable[[], str | None]) -> Callable[[], str | None]:
        _REACHES[name] = _Reach(name, fallback, probe, required)
        return probe
    return register


def reaches() -> list[str]:
    """The names of every reach."""
    return list(_REACHES)


def _probe(name: str) -> str | None:
    reach = _REACHES[name]
    try:
        reason = reach.probe()
    except Exception as error:  # a probe that trips over a changed shape
        reason = f"{type(error).__name__}: {error}"
    _state[name] = reason
    if reason is not None:
        _log.warn("internals: {reach} off ({reason}); {fallback}",
                  reach=name, reason=reason, fallback=reach.fallback)
    return reason


def self_check() -> dict[str, bool]:
    """Probe every reach not probed yet; return which are in use.

    Raises :class:`InternalsMismatch` when a required reach does not fit.
    """
    for name in _REACHES:
        if name not in _state:
            _probe(name)
    broken = [f"{name}: {_state[name]}" for name, reach in _REACHES.items()
              if reach.required and _state[name] is not None]
    if broken:
        raise InternalsMismatch(
            "this Twisted/pyOpenSSL does not have the internals edgeaccess needs ("
            + "; ".join(broken) + "): install the versions setup.cfg declares")
    return {name: _state[name] is None for name in _REACHES}


def available(name: str) -> bool:
    """Whether reach ``name`` is in use (probed at first use)."""
    try:
        return _state[name] is None
    except KeyError:
        return _probe(name) is None


def switch_off(name: str, reason: str) -> None:
    """Take the stock path for ``name`` from now on (tests; an operator's
    workaround), with the usual warning."""
    if name not in _REACHES:
        raise KeyError(name)
    if _state.get(name, "unprobed") is None or name not in _state:
        _state[name] = reason
        _log.warn("internals: {reach} off ({reason}); {fallback}",
                  reach=name, reason=reason, fallback=_REACHES[name].fallback)


def reset(name: str | None = None) -> None:
    """Forget probe results (tests): the next use probes again."""
    if name is None:
        _state.clear()
    else:
        _state.pop(name, None)


def _missing(obj: Any, names: Iterable[str]) -> list[str]:
    return [name for name in names if not hasattr(obj, name)]


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _probe_tls_transport() -> tuple[Any, Any]:
    """A client TLS transport after ``makeConnection`` (its ClientHello
    written to a string transport) and its pyOpenSSL connection."""
    from twisted.internet import ssl
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import MemoryReactorClock, StringTransport
    from twisted.protocols.tls import TLSMemoryBIOFactory

    factory = TLSMemoryBIOFactory(ssl.CertificateOptions(), True,
                                  Factory.forProtocol(Protocol), clock=MemoryReactorClock())
    transport = factory.buildProtocol(None)
    transport.makeConnection(StringTransport())
    return transport, getattr(transport, "_tlsConnection", None)


# -- tls-buffers: idle TLS connections give back their handshake-sized BIOs -----------------

#: pyOpenSSL releases whose memory-BIO ownership was checked (lower bound
#: included, upper excluded): ``Connection.__init__`` makes both BIOs with
#: ``BIO_new`` and no ``ffi.gc`` ("SSL_free will take care of them"), hands
#: them to ``SSL_set_bio`` and never frees them itself. A newer pyOpenSSL
#: keeps working, without the shrinking, until it is checked again
#: (tests/test_internals.py reads its source, and frees swapped BIOs under
#: glibc's heap checks).
PYOPENSSL_CHECKED = ((26, 1), (27, 0))
_BIO_FUNCTIONS = ("BIO_new", "BIO_s_mem", "BIO_free", "BIO_get_mem_data", "SSL_set_bio")


def _plain_pointer_type() -> type:
    """The type cffi gives a pointer that owns nothing (no ``ffi.gc``)."""
    return type(_ffi.cast("void *", 0))


@_reach("tls-buffers", "idle TLS connections keep their handshake-sized buffers")
def _probe_tls_buffers() -> str | None:
    if _lib is None:
        return "pyOpenSSL has no cffi bindings"
    low, high = PYOPENSSL_CHECKED
    if not low <= _release(_pyopenssl_version)[:2] < high:
        return f"pyOpenSSL {_pyopenssl_version} is outside the checked range"
    missing = _missing(_lib, _BIO_FUNCTIONS)
    if missing:
        return f"OpenSSL bindings without {', '.join(missing)}"
    transport, connection = _probe_tls_transport()
    missing = _missing(transport, ("_tlsConnection", "_handshakeDone", "_lostTLSConnection"))
    missing += _missing(connection, ("_ssl", "_into_ssl", "_from_ssl",
                                     "_alpn_select_callback_args"))
    if missing:
        return f"TLS transport without {', '.join(missing)}"
    return _bio_ownership_problem(connection)


def _bio_ownership_problem(connection: Any) -> str | None:
    """Why swapping ``connection``'s BIOs would not be safe, or None: the
    ``SSL *`` must be freed by pyOpenSSL (``ffi.gc``) and the BIOs must not
    be (plain pointers, freed by ``SSL_free``)."""
    plain = _plain_pointer_type()
    if type(connection._ssl) is plain:
        return "the SSL object is not owned by pyOpenSSL"
    if type(connection._into_ssl) is not plain or type(connection._from_ssl) is not plain:
        return "pyOpenSSL owns the memory BIOs itself"
    return None


def shrink_tls_buffers(transport: Any) -> bool:
    """Replace the memory BIOs of an established TLS connection by empty ones
    (see :func:`edgeaccess.tls.shrink_tls_buffers`). Returns whether it did."""
    if not available("tls-buffers"):
        return False
    connection = getattr(transport, "_tlsConnection", None)
    if connection is None or not getattr(transport, "_handshakeDone", False):
        return False
    if getattr(transport, "_lostTLSConnection", False) or getattr(transport, "disconnecting", False):
        return False
    if getattr(connection, "_alpn_select_callback_args", None) is not None:
        connection._alpn_select_callback_args = None
    ssl_handle = getattr(connection, "_ssl", None)
    into, out = getattr(connection, "_into_ssl", None), getattr(connection, "_from_ssl", None)
    if ssl_handle is None or into is None or out is None:
        return False  # a socket-backed connection
    if _bio_ownership_problem(connection) is not None:
        return False  # checked on every connection: a double free is never risked
    pending = _ffi.new("char **")
    if _lib.BIO_get_mem_data(into, pending) != 0 or _lib.BIO_get_mem_data(out, pending) != 0:
        return False
    new_into = _lib.BIO_new(_lib.BIO_s_mem())
    if new_into == _ffi.NULL:
        return False
    new_out = _lib.BIO_new(_lib.BIO_s_mem())
    if new_out == _ffi.NULL:
        _lib.BIO_free(new_into)
        return False
    # SSL_set_bio frees the old pair; pyOpenSSL reads and writes through
    # these two attributes (it frees neither itself: SSL_free does).
    _lib.SSL_set_bio(ssl_handle, new_into, new_out)
    connection._into_ssl, connection._from_ssl = new_into, new_out
    return True


# -- fast-tls: batched TLS reads and writes on Twisted's TLS transport ----------------------

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
    "_shutdownTLS", "_flushSendBIO", "_flushReceiveBIO", "_write", "_aborted", "_aggregator",
    "_handshakeDone", "_appSendBuffer", "_unbufferPendingWrites",
)
_CONNECTION_INTERNALS = ("_ssl", "_from_ssl", "_into_ssl", "_raise_ssl_error",
                         "_handle_bio_errors")
_TLS_FUNCTIONS = ("SSL_read", "SSL_write", "SSL_get_error", "SSL_ERROR_WANT_READ",
                  "BIO_read", "BIO_write", "SSL_clear_mode", "SSL_MODE_ENABLE_PARTIAL_WRITE")


@_reach("fast-tls", "Twisted's TLS I/O is kept (one record per delivery)")
def _probe_fast_tls() -> str | None:
    if _lib is None:
        return "pyOpenSSL has no cffi bindings"
    missing = _missing(_lib, _TLS_FUNCTIONS)
    if missing:
        return f"OpenSSL bindings without {', '.join(missing)}"
    transport, connection = _probe_tls_transport()
    missing = _missing(transport, _TLS_INTERNALS) + _missing(connection, _CONNECTION_INTERNALS)
    missing += _missing(getattr(transport, "_aggregator", None), ("flush",))
    missing += _missing(getattr(transport, "factory", None), ("_clock",))
    if missing:
        return f"TLS transport without {', '.join(missing)}"
    source = inspect.getsource(TLSMemoryBIOProtocol.dataReceived)
    for expected in ("bio_write", "_handshakeDone", "_appSendBuffer", "_flushReceiveBIO"):
        if expected not in source:
            return f"TLSMemoryBIOProtocol.dataReceived no longer uses {expected}"
    return None


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
    """The body of :func:`edgeaccess.tunnel.fasttls.install_fast_tls`."""
    if not isinstance(transport, TLSMemoryBIOProtocol):
        return False
    if "_fast_tls" in vars(transport):
        return True
    if not available("fast-tls"):
        return False
    connection = getattr(transport, "_tlsConnection", None)
    if (
        not all(hasattr(transport, name) for name in _TLS_INTERNALS)
        or not all(hasattr(connection, name) for name in _CONNECTION_INTERNALS)
    ):
        return False  # this instance is not what the probe saw (a test double)
    if clock is None:
        clock = transport.factory._clock
    transport._fast_tls = True
    # pyOpenSSL turns on partial writes (SSL_write returns after one
    # record); over a memory BIO a write never blocks, so one call may
    # encrypt a whole buffer.
    _lib.SSL_clear_mode(connection._ssl, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
    transport._write = partial(_large_write, transport)
    transport.dataReceived = partial(_data_received, transport)
    aggregator = _Aggregator(partial(TLSMemoryBIOProtocol.write, transport), clock)
    aggregator.flush_previous(transport._aggregator)
    transport._aggregator = aggregator
    transport.write = aggregator.write
    transport._flushReceiveBIO = partial(_flush_receive_bio, transport)
    eager_tcp_writes(transport.transport)
    return True


class _Aggregator:
    """Twisted's ``_AggregateSmallWrites`` without its copies: gathers small
    writes until the read being delivered ends (see :class:`_ReadScope`) or
    the next reactor turn, encrypts large ones at once.

    With ``per_turn`` (a transport many connections write to: a tunnel, see
    :func:`gather_for_the_turn`) only writes made during its own read leave
    when that read ends; what other connections' reads write waits for the
    end of the reactor turn, so the requests of one turn share one record
    and one ``send()``."""

    __slots__ = ("_write", "_clock", "_buffer", "_size", "_scheduled", "per_turn")

    def __init__(self, write: Any, clock: IReactorTime) -> None:
        self._write = write
        self._clock = clock
        self._buffer: list[bytes] = []
        self._size = 0
        self._scheduled: Any = None
        self.per_turn = False

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
        elif _reading.active and (not self.per_turn or _reading.reader is self):
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
    """Whether a fast transport is delivering a read (``reader``: the
    aggregator of the outermost one), and the aggregators that gathered small
    writes meanwhile: one reactor thread, so one scope."""

    __slots__ = ("active", "pending", "reader")

    def __init__(self) -> None:
        self.active = 0
        self.pending: set[_Aggregator] = set()
        self.reader: _Aggregator | None = None

    def end(self) -> None:
        self.active -= 1
        if not self.active:
            self.reader = None
        while not self.active and self.pending:
            pending, self.pending = self.pending, set()
            for aggregator in pending:
                aggregator.flush()


_reading = _ReadScope()


def _data_received(tls: Any, data: bytes) -> None:
    # TLSMemoryBIOProtocol.dataReceived after the handshake, with the bytes
    # handed to the receive BIO by BIO_write itself (pyOpenSSL's bio_write
    # raises for what a memory BIO never refuses).
    if not tls._handshakeDone:
        TLSMemoryBIOProtocol.dataReceived(tls, data)
        return
    connection = tls._tlsConnection
    if _lib.BIO_write(connection._into_ssl, data, len(data)) != len(data):
        connection._handle_bio_errors(connection._into_ssl, -1)
    if tls._appSendBuffer:
        tls._unbufferPendingWrites()
    tls._flushReceiveBIO()


def _ssl_write(connection: Any, data: bytes | memoryview) -> int:
    # pyOpenSSL's Connection.send without its per-call checks: SSL_write, and
    # only a failure goes through pyOpenSSL's error handling.
    result = _lib.SSL_write(connection._ssl, _ffi.from_buffer(data), len(data))
    if result <= 0:
        connection._raise_ssl_error(connection._ssl, result)
    return result


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
            done += _ssl_write(connection, view[done:] if done else data)
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
        if _lib.SSL_get_error(ssl, result) == _lib.SSL_ERROR_WANT_READ:
            break  # all of it read (without pyOpenSSL raising and catching)
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
    # TLSMemoryBIOProtocol._flushSendBIO (an alert, a session ticket: usually
    # nothing), without pyOpenSSL raising when there is nothing.
    _flush_send_bio(tls, connection, 0)


def _deliver(tls: Any, view: memoryview, filled: int) -> None:
    # A copy, made before the protocol runs: the buffer is shared.
    if tls._aborted:
        return
    if not _reading.active:
        _reading.reader = tls._aggregator
    _reading.active += 1
    try:
        ProtocolWrapper.dataReceived(tls, bytes(view[:filled]))
    finally:
        _reading.end()


# -- eager-tcp: a write that finds nothing queued goes to the socket at once ----------------

_TCP_INTERNALS = ("dataBuffer", "offset", "_tempDataLen", "_writeDisconnected",
                  "connected", "disconnecting")


@_reach("eager-tcp", "TCP writes wait for the next reactor turn")
def _probe_eager_tcp() -> str | None:
    from twisted.internet.testing import MemoryReactor

    probe = FileDescriptor(reactor=MemoryReactor())
    missing = _missing(probe, _TCP_INTERNALS)
    if missing:
        return f"FileDescriptor without {', '.join(missing)}"
    if not isinstance(probe.dataBuffer, bytes) or not isinstance(probe._tempDataLen, int):
        return "FileDescriptor's write buffer changed shape"
    return None


def send_if_idle(tcp: Any, data: bytes | memoryview) -> int:
    """Send ``data`` on ``tcp`` (a Twisted TCP transport) at once if nothing
    is queued; return how many bytes went (the caller queues the rest)."""
    if (
        data
        and tcp.connected
        and not tcp.disconnecting
        and not getattr(tcp, "_writeDisconnected", True)
        and not tcp._tempDataLen
        and len(tcp.dataBuffer) == tcp.offset
    ):
        try:
            return tcp.socket.send(data)
        except OSError:
            return 0  # EAGAIN, or an error the reactor's doWrite will report
    return 0


def eager_tcp_writes(transport: Any) -> bool:
    """The body of :func:`edgeaccess.tunnel.fasttls.eager_tcp_writes`."""
    if not isinstance(transport, FileDescriptor) or getattr(transport, "TLS", True):
        return False
    if not all(hasattr(transport, name) for name in _TCP_INTERNALS + ("socket",)):
        return False
    if "_eager" in vars(transport):
        return True
    if not available("eager-tcp"):
        return False
    transport._eager = True
    transport.bufferSize = TCP_READ_SIZE
    transport.write = partial(_eager_write, transport)
    return True


def tcp_send_now_possible(transport: Any) -> bool:
    """Whether :func:`send_if_idle` may be used on ``transport`` (a plain
    Twisted TCP transport, and the reach in use)."""
    return (
        getattr(transport, "socket", None) is not None
        and getattr(transport, "TLS", True) is False
        and available("eager-tcp")
    )


def _eager_write(tcp: Any, data: bytes | memoryview) -> None:
    # ``data`` may be a view of a shared buffer: what is not sent at once is
    # copied before it is queued.
    sent = send_if_idle(tcp, data)
    if sent == len(data):
        return
    if sent:
        data = data[sent:]
    FileDescriptor.write(tcp, data if type(data) is bytes else bytes(data))


def gather_for_the_turn(tls: Any) -> bool:
    """Have a fast TLS transport (:func:`install_fast_tls`) that many
    connections write to keep the small writes of other connections' reads
    until the end of the reactor turn (see :class:`_Aggregator`); returns
    whether it is such a transport."""
    if "_fast_tls" not in vars(tls):
        return False
    tls._aggregator.per_turn = True
    return True


def flush_gathered_writes(tls: Any) -> None:
    """Encrypt and hand to TCP what a fast TLS transport's aggregator holds
    (nothing for any other transport)."""
    if "_fast_tls" in vars(tls):
        tls._aggregator.flush()


# -- tcp-send-limit: pause a transport's producer as soon as the socket refuses --------------


@_reach("tcp-send-limit", "a tunnel's producer pauses only past Twisted's bufferSize")
def _probe_tcp_send_limit() -> str | None:
    from twisted.internet.testing import MemoryReactor

    probe = FileDescriptor(reactor=MemoryReactor())
    missing = _missing(probe, _TCP_INTERNALS + _TCP_PRODUCER_INTERNALS)
    if missing:
        return f"FileDescriptor without {', '.join(missing)}"
    if "_isSendBufferFull" not in inspect.getsource(FileDescriptor._maybePauseProducer):
        return "FileDescriptor._maybePauseProducer no longer asks _isSendBufferFull"
    if "producerPaused" not in inspect.getsource(FileDescriptor.doWrite):
        return "FileDescriptor.doWrite no longer resumes a paused producer"
    return None


_TCP_PRODUCER_INTERNALS = ("_isSendBufferFull", "_maybePauseProducer", "producerPaused",
                           "streamingProducer", "producer", "startWriting")


def pause_until_writable_possible(tcp: Any) -> bool:
    """Whether :func:`pause_until_writable` may be used on ``tcp``."""
    return (
        isinstance(tcp, FileDescriptor)
        and all(hasattr(tcp, name) for name in _TCP_INTERNALS + _TCP_PRODUCER_INTERNALS)
        and available("tcp-send-limit")
    )


def pause_until_writable(tcp: Any) -> bool:
    """Pause ``tcp``'s streaming producer as a full write buffer does, until
    the socket is writable again (Twisted's ``doWrite`` then resumes it, as
    after draining its buffer). Returns whether it paused."""
    producer = tcp.producer
    if producer is None or not tcp.streamingProducer or tcp.producerPaused:
        return False
    if not tcp.connected or tcp.disconnecting:
        return False
    tcp.producerPaused = True
    producer.pauseProducing()
    tcp.startWriting()
    return True


def limit_tcp_send_buffer(tcp: Any, limit: int) -> bool:
    """Treat ``tcp``'s write buffer (a Twisted TCP transport's) as full past
    ``limit`` queued bytes, so its streaming producer is paused as soon as
    the socket refuses more than that (and resumed when it drained), while
    reads keep their size (Twisted's ``bufferSize`` sets both). Returns
    whether it did."""
    if not isinstance(tcp, FileDescriptor) or getattr(tcp, "TLS", True):
        return False
    if not all(hasattr(tcp, name) for name in _TCP_INTERNALS):
        return False
    if not available("tcp-send-limit"):
        return False
    tcp._isSendBufferFull = partial(_send_buffer_full, tcp, limit)
    return True


def _send_buffer_full(tcp: Any, limit: int) -> bool:
    return len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen > limit


# -- amp-lean-init: a tunnel's AMP without file descriptor passing state --------------------

#: What ``amp.AMP.__init__`` sets (Twisted 26.10): the dispatcher's and the
#: parser's state, and that of passing file descriptors over UNIX sockets.
AMP_INIT_ATTRIBUTES = frozenset({
    "_ampInitialized", "boxReceiver", "locator", "_outstandingRequests",
    "_descriptors", "_getDescriptor", "_receivingDescriptorCounter",
    "_sendingDescriptorCounter",
})


@_reach("amp-lean-init", "tunnels run amp.AMP.__init__ (~0.5 KB more each)")
def _probe_amp_init() -> str | None:
    stock = set(vars(amp.AMP()))
    if stock != AMP_INIT_ATTRIBUTES:
        return f"amp.AMP.__init__ sets {sorted(stock ^ AMP_INIT_ATTRIBUTES)} differently"
    dispatcher = amp.BoxDispatcher(None)
    if set(vars(dispatcher)) != {"_outstandingRequests", "locator"}:
        return "amp.BoxDispatcher.__init__ changed"
    return None


def init_amp(protocol: amp.AMP) -> None:
    """``amp.AMP.__init__(protocol)`` (box receiver and locator: itself),
    without the state of file descriptor passing (UNIX sockets only, never
    over a tunnel) when AMP is the one this was written for."""
    if not available("amp-lean-init"):
        amp.AMP.__init__(protocol)
        return
    protocol._ampInitialized = True
    amp.BoxDispatcher.__init__(protocol, protocol)
    protocol.boxReceiver = protocol


# -- conch-transport: our packet layer under Conch's key exchange ---------------------------

_CONCH_TRANSPORT_NAMES = (
    "_keySetup", "_keyExchangeState", "_KEY_EXCHANGE_NONE", "_allowedKeyExchangeMessageType",
    "outgoingPacketSequence", "incomingPacketSequence", "getPacket", "dispatchMessage",
    "sendExtInfo",
)


@_reach("conch-transport", "SSH keeps Conch's packet layer (aes-ctr with HMAC, no AES-GCM)")
def _probe_conch_transport() -> str | None:
    from twisted.conch.ssh.transport import SSHCiphers, SSHServerTransport

    probe = SSHServerTransport()
    missing = _missing(probe, _CONCH_TRANSPORT_NAMES)
    if missing:
        return f"SSH transport without {', '.join(missing)}"
    if list(inspect.signature(SSHServerTransport._keySetup).parameters) != [
            "self", "sharedSecret", "exchangeHash"]:
        return "Conch's _keySetup takes other arguments"
    if list(inspect.signature(SSHCiphers.setKeys).parameters) != [
            "self", "outIV", "outKey", "inIV", "inKey", "outInteg", "inInteg"]:
        return "Conch's SSHCiphers.setKeys takes other arguments"
    return None


def conch_keys_replaceable() -> bool:
    """Whether our ciphers may replace Conch's at key set-up."""
    return available("conch-transport")


def conch_may_send(transport: Any, message_type: int) -> bool:
    """Whether Conch would send ``message_type`` now (not held back by a key
    exchange under way)."""
    return (transport._keyExchangeState == transport._KEY_EXCHANGE_NONE
            or transport._allowedKeyExchangeMessageType(message_type))


def conch_key_exchange_idle(transport: Any) -> bool:
    """Whether no key exchange is under way on ``transport``."""
    return transport._keyExchangeState == transport._KEY_EXCHANGE_NONE


# -- conch-session: Conch privates the session, userauth and SFTP code build on -------------


@_reach("conch-session", "none", required=True)
def _probe_conch_session() -> str | None:
    from twisted.conch.ssh.session import SSHSession
    from twisted.conch.ssh.userauth import SSHUserAuthServer
    from twisted.conch.unix import SFTPServerForUnixConchUser

    problems = []
    if not isinstance(inspect.getattr_static(SSHSession, "_session", None), cached_property):
        problems.append("SSHSession._session is not a cached property")
    problems += [f"SSHSession.{n} missing" for n in _missing(SSHSession, ("_shellOrCommand",))]
    problems += [f"SSHUserAuthServer.{n} missing"
                 for n in _missing(SSHUserAuthServer, ("_cbFinishedAuth", "_ebCheckKey"))]
    problems += [f"SFTPServerForUnixConchUser.{n} missing"
                 for n in _missing(SFTPServerForUnixConchUser, ("_absPath", "_getAttrs"))]
    return "; ".join(problems) or None


# -- cpython-tls-route: _ssl's private context and _socket in the TLS-routing ProxyCommand --


#: What tlsroute.py uses of ``_socket``.
TLS_ROUTE_SOCKET_NAMES = ("socket", "getaddrinfo", "inet_pton", "AF_INET", "AF_INET6",
                          "SOCK_STREAM", "IPPROTO_TCP", "TCP_NODELAY")
TLS_ROUTE_SOCKET_METHODS = ("settimeout", "connect", "setsockopt", "recv", "recv_into",
                            "sendall", "close")


@_reach("cpython-tls-route",
        "the TLS-routing ProxyCommand uses ssl and socket (--stock: a slower start)")
def _probe_tls_route() -> str | None:
    if sys.implementation.name != "cpython":
        return f"{sys.implementation.name} is not CPython"
    import _socket
    import _ssl

    from edgeaccess.client import tlsroute

    missing = [n for n in TLS_ROUTE_SOCKET_NAMES if not hasattr(_socket, n)]
    missing += [f"socket.{n}" for n in TLS_ROUTE_SOCKET_METHODS
                if not hasattr(_socket.socket, n)]
    missing += [n for n in ("PROTO_TLSv1_3", "MemoryBIO", "SSLWantReadError",
                            "SSLZeroReturnError") if not hasattr(_ssl, n)]
    if missing:
        return "_socket/_ssl lack " + ", ".join(missing)
    # The script's own private client: a ClientHello with our name and ALPN.
    incoming, outgoing = _ssl.MemoryBIO(), _ssl.MemoryBIO()

    def setup(context: Any) -> None:
        context.minimum_version = _ssl.PROTO_TLSv1_3

    try:
        client = tlsroute._private_client(setup, "edge-probe/1", "probe.invalid",
                                          incoming, outgoing)
        client.do_handshake()
    except _ssl.SSLWantReadError:
        hello = outgoing.read()
        if b"probe.invalid" not in hello or b"edge-probe/1" not in hello:
            return "the ClientHello lacks the server name or the ALPN"
        return None
    except (AttributeError, TypeError, ValueError) as error:
        return f"_ssl's private context API differs: {error}"
    return "the handshake did not wait for the server"


def tls_route_stock_argument() -> list[str]:
    """What the TLS-routing ``ProxyCommand`` gets appended: ``--stock``
    when the ``cpython-tls-route`` reach is off."""
    return [] if available("cpython-tls-route") else ["--stock"]


# -- cpython-shared-keys: instances of a class share one table of attribute names -----------


@_reach("cpython-shared-keys", "attribute names are not entered up front")
def _probe_shared_keys() -> str | None:
    if sys.implementation.name != "cpython":
        return f"{sys.implementation.name} is not CPython"

    class Probe:
        pass

    names = [f"name{i}" for i in range(20)]
    instances = [Probe(), Probe()]
    for instance in instances:
        for name in names:
            setattr(instance, name, None)
    # A dict sharing its keys holds only values: well under a plain one.
    if sys.getsizeof(vars(instances[1])) >= sys.getsizeof(dict.fromkeys(names)):
        return "instance dicts do not share their keys"
    return None


def share_instance_attributes(cls: type, names: Iterable[str]) -> None:
    """The body of :func:`edgeaccess.memory.share_instance_attributes`."""
    if not available("cpython-shared-keys"):
        return
    probe = cls.__new__(cls)
    for name in names:
        if hasattr(getattr(cls, name, None), "__set__"):
            continue
        object.__setattr__(probe, name, None)
    del probe


# -- glibc-malloc: malloc_trim and mallopt through ctypes -----------------------------------


def _libc_function(name: str, argtypes: list, restype: Any) -> Callable[..., int] | None:
    """A glibc function by name, or None where the C library has none (musl, macOS)."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        function = getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = restype
    return function


_libc: dict[str, Callable[..., int] | None] = {}


@_reach("glibc-malloc", "freed heap pages are not trimmed; default allocator thresholds")
def _probe_glibc_malloc() -> str | None:
    _libc["malloc_trim"] = _libc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
    _libc["mallopt"] = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    missing = [name for name, function in _libc.items() if function is None]
    if missing:
        return f"the C library has no {', '.join(missing)}"
    return None


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None."""
    return _libc.get("malloc_trim") if available("glibc-malloc") else None


def mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None."""
    return _libc.get("mallopt") if available("glibc-malloc") else None


# -- http-bad-request: Twisted's bare 400 for a malformed request ---------------------------

@_reach("http-bad-request", "a malformed HTTP request gets Twisted's bare 400 (no JSON body)")
def _probe_http_bad_request() -> str | None:
    from twisted.web.http import HTTPChannel

    method = getattr(HTTPChannel, "_respondToBadRequestAndDisconnect", None)
    if method is None:
        return "HTTPChannel has no _respondToBadRequestAndDisconnect"
    if list(inspect.signature(method).parameters) != ["self"]:
        return "HTTPChannel._respondToBadRequestAndDisconnect takes other arguments"
    return None


def answer_bad_requests(channel_class: type, answer: Callable[[Any], None]) -> None:
    """Have ``channel_class`` (an ``HTTPChannel``) call ``answer(channel)`` where
    Twisted answers a malformed request (request line, header, chunk coding)
    with a bare ``400 Bad Request`` and closes; the stock answer while the
    reach is off."""
    from twisted.web.http import HTTPChannel

    stock = getattr(HTTPChannel, "_respondToBadRequestAndDisconnect", None)

    def respond(channel: Any) -> None:
        if available("http-bad-request") or stock is None:
            answer(channel)
        else:
            stock(channel)

    channel_class._respondToBadRequestAndDisconnect = respond


__all__ = [
    "InternalsMismatch", "available", "reaches", "reset", "self_check", "switch_off",
    "shrink_tls_buffers", "install_fast_tls", "eager_tcp_writes", "send_if_idle",
    "gather_for_the_turn",
    "tcp_send_now_possible", "init_amp", "conch_keys_replaceable", "conch_may_send",
    "conch_key_exchange_idle", "share_instance_attributes", "malloc_trim", "mallopt",
    "answer_bad_requests",
]


# -- conch-host-cert: a Conch client talking to a server with a host certificate ------------
#
# Conch's client verifies the key exchange signature with
# ``keys.Key.fromString(host_key_blob)``, which rejects certificate blobs
# (``ssh-ed25519-cert-v01@openssh.com``): a Conch client cannot talk to a
# server that proves itself with a host certificate, i.e. to our nodes (the
# web terminal, edgeaccess.web.sshclient). The only place to change that is
# the client's ECDH reply handler, ``SSHClientTransport._ssh_KEX_ECDH_REPLY``,
# and the private helpers it uses (Twisted 24.7 - 26.10).

_ECDH_CLIENT_NEEDS = ("_ssh_KEX_ECDH_REPLY", "_generateECSharedSecret", "_encodeECPublicKey",
                      "_keySetup")


@_reach("conch-host-cert", "web terminals are refused (Conch's client cannot check a node's "
        "host certificate)")
def _probe_conch_host_cert() -> str | None:
    from twisted.conch.ssh import _kex
    from twisted.conch.ssh.transport import SSHClientTransport

    missing = _missing(SSHClientTransport, _ECDH_CLIENT_NEEDS) + _missing(
        _kex, ["getHashProcessor"])
    if missing:
        return f"Conch's client lacks {', '.join(missing)}"
    source = inspect.getsource(SSHClientTransport._ssh_KEX_ECDH_REPLY)
    for expected in ("self.ecPriv", "self._encodeECPublicKey(self.ecPub)", "_keySetup",
                     "self.verifyHostKey(hostKey"):
        if expected not in source:
            return f"_ssh_KEX_ECDH_REPLY no longer uses {expected}"
    return None


class HostCertificateClientMixin:
    """For a subclass of ``SSHClientTransport`` whose ``verifyHostKey(blob,
    fingerprint)`` fires with the Conch ``Key`` that signs for ``blob``
    (the public key inside a host certificate it has checked), or fails.

    Only ECDH key exchanges (curve25519) come here: set
    ``supportedKeyExchanges`` accordingly. Use it only when
    ``available("conch-host-cert")``.
    """

    def _ssh_KEX_ECDH_REPLY(self, packet):  # noqa: N802  (Conch's name)
        from twisted.conch.ssh import _kex
        from twisted.conch.ssh.common import NS, getNS
        from twisted.conch.ssh.transport import (
            DISCONNECT_HOST_KEY_NOT_VERIFIABLE,
            DISCONNECT_KEY_EXCHANGE_FAILED,
        )

        host_blob, server_public, signature, _ = getNS(packet, 3)
        d = self.verifyHostKey(host_blob, b"")

        def verified(signing_key):
            shared = self._generateECSharedSecret(self.ecPriv, server_public)
            h = _kex.getHashProcessor(self.kexAlg)()
            for part in (self.ourVersionString, self.otherVersionString,
                         self.ourKexInitPayload, self.otherKexInitPayload, host_blob,
                         self._encodeECPublicKey(self.ecPub), server_public):
                h.update(NS(part))
            h.update(shared)
            exchange_hash = h.digest()
            if not signing_key.verify(signature, exchange_hash):
                self.sendDisconnect(DISCONNECT_KEY_EXCHANGE_FAILED, b"bad signature")
                return
            self._keySetup(shared, exchange_hash)

        def refused(failure):
            _log.info("host key refused: {reason}", reason=failure.getErrorMessage())
            self.sendDisconnect(DISCONNECT_HOST_KEY_NOT_VERIFIABLE,
                                b"host certificate not trusted")

        d.addCallbacks(verified, refused)
        return d
