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

For the tunnel's priority scheduler, :class:`ShortSendPath` keeps what TLS,
Twisted's TCP buffer and the kernel hold below it short (docs/architecture.md,
"Tunnel send scheduling"), and reports what the scheduler's bulk cap needs
(:meth:`ShortSendPath.sample`): the bytes the socket holds in flight and
unsent (``SIOCOUTQ``) and, from Linux's ``struct tcp_info``
(``getsockopt(IPPROTO_TCP, TCP_INFO)``, whose layout is append-only), the
delivery rate (``tcpi_delivery_rate``, Linux >= 4.9, at byte offset 160) and
the minimum RTT (``tcpi_min_rtt``, offset 148), with the bytes acknowledged
(``tcpi_bytes_acked``, offset 120). A kernel that returns a
shorter ``tcp_info`` (or no such call: not Linux) gives no sample, and the
tunnel sends as it did without the cap.

The code that reaches into Twisted's and pyOpenSSL's internals for this lives
in :mod:`edgeaccess.internals` (reaches ``fast-tls`` and ``eager-tcp``, checked
at start-up; where they do not fit, these functions leave the transport alone).

Measured effect: ``docs/performance.md``, "Tunnel data path, second round".
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from typing import Any

from twisted.internet.interfaces import IReactorTime

from edgeaccess import internals
from edgeaccess.internals import FLUSH_AT, READ_BATCH, TCP_READ_SIZE, WRITE_CHUNK
from edgeaccess.tunnel.scheduler import BulkCap, bulk_cap_enabled

__all__ = ["FLUSH_AT", "NOTSENT_LOWAT", "READ_BATCH", "TCP_READ_SIZE", "WRITE_CHUNK",
           "ShortSendPath", "eager_tcp_writes", "flush_gathered_writes", "install_fast_tls",
           "parse_tcp_info", "shorten_send_path"]

#: Unsent bytes the kernel keeps for a tunnel socket with priority on
#: (``TCP_NOTSENT_LOWAT``; ``EDGE_TUNNEL_NOTSENT_LOWAT`` overrides it).
#: Bytes sent but not yet acknowledged are not limited by it, so a fast
#: link keeps its throughput; on a slow one a keystroke waits behind at most
#: this much in the kernel (measured: docs/performance.md, "Unstable links").
NOTSENT_LOWAT = 4 * 1024
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)  # Linux >= 3.12


def install_fast_tls(transport: Any, clock: IReactorTime | None = None) -> bool:
    """Make ``transport`` (a ``TLSMemoryBIOProtocol`` after its handshake)
    read, write and reach TCP in large pieces.

    Returns whether it did (False: not such a transport, or its internals
    differ from the Twisted this was written for).
    """
    return internals.install_fast_tls(transport, clock)


def eager_tcp_writes(transport: Any) -> bool:
    """Large reads and eager writes on a Twisted TCP transport (see the module
    docstring). Returns whether ``transport`` was one."""
    return internals.eager_tcp_writes(transport)


def flush_gathered_writes(transport: Any) -> None:
    """Hand what a fast TLS transport gathered of small writes to TCP now."""
    internals.flush_gathered_writes(transport)


def notsent_lowat() -> int:
    """The ``TCP_NOTSENT_LOWAT`` tunnels use (0: the kernel's default)."""
    value = os.environ.get("EDGE_TUNNEL_NOTSENT_LOWAT")
    if value is None:
        return NOTSENT_LOWAT
    try:
        return max(0, int(value))
    except ValueError:
        return NOTSENT_LOWAT


_TCP_INFO = getattr(socket, "TCP_INFO", 11)
#: ``tcpi_bytes_acked`` (u64), ``tcpi_min_rtt`` (u32, microseconds) and
#: ``tcpi_delivery_rate`` (u64, bytes/s) in Linux's ``struct tcp_info``, and
#: the size that holds them.
_BYTES_ACKED_AT, _MIN_RTT_AT, _DELIVERY_RATE_AT, _TCP_INFO_NEEDED = 120, 148, 160, 168
_SIOCOUTQ = 0x5411  # TIOCOUTQ: bytes in flight (unacknowledged) and unsent


def parse_tcp_info(info: bytes) -> tuple[float, float, int] | None:
    """``(delivery rate in bytes/s, minimum RTT in seconds, bytes
    acknowledged)`` from a ``struct tcp_info``, or None if it is too short
    to hold them."""
    if len(info) < _TCP_INFO_NEEDED:
        return None
    (acked,) = struct.unpack_from("=Q", info, _BYTES_ACKED_AT)
    (min_rtt,) = struct.unpack_from("=I", info, _MIN_RTT_AT)
    (rate,) = struct.unpack_from("=Q", info, _DELIVERY_RATE_AT)
    return float(rate), min_rtt / 1e6, acked


class ShortSendPath:
    """Keeps what a tunnel's TLS transport holds below its scheduler short.

    * The TCP socket's unsent bytes are limited to about :func:`notsent_lowat`:
      ``TCP_NOTSENT_LOWAT`` (set through the socket API on
      ``transport.getHandle()``) makes the socket writable again only below
      it; but the kernel appends to the last queued segment without that
      check (up to 64 KiB with segmentation offload, measured: ~37 KiB taken
      per wake-up on the link lab), so after each piece :meth:`after_write`
      asks the kernel what it holds unsent (``SIOCOUTQNSD``) and, at the
      limit, pauses the transport's producer until the socket is writable
      (:func:`edgeaccess.internals.pause_until_writable`).
    * The transport's producer is paused as soon as the socket refuses
      anything (:func:`edgeaccess.internals.limit_tcp_send_buffer`), not
      past Twisted's 256 KiB.

    So data waits in the channels' queues, where priority applies.
    :attr:`applied` says which parts took effect (each falls back alone).
    """

    __slots__ = ("_tls", "_tcp", "_fd", "_sock", "_lowat", "_unsent_limit", "applied")

    def __init__(self, transport: Any) -> None:
        self._tls = transport
        self._tcp = tcp = getattr(transport, "transport", None)
        self._fd = -1
        self._sock = None
        self._lowat = self._unsent_limit = lowat = notsent_lowat()
        self.applied = {"notsent_lowat": False, "send_limit": False, "unsent_check": False,
                        "link_sample": False}
        handle = getattr(tcp, "getHandle", None)
        if lowat and handle is not None:
            try:
                sock = handle()
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, lowat)
                self.applied["notsent_lowat"] = True
                fd = sock.fileno()
                _unsent(fd)  # Linux: SIOCOUTQNSD
                self._fd = fd
                self.applied["unsent_check"] = internals.pause_until_writable_possible(tcp)
                self._sock = sock
                self.applied["link_sample"] = self.sample() is not None
            except (AttributeError, OSError, TypeError, ValueError):
                pass  # not a TCP socket (a test transport), or not Linux
        if tcp is not None:
            self.applied["send_limit"] = internals.limit_tcp_send_buffer(tcp, 0)

    def after_write(self) -> None:
        """A piece was written: hand it to TCP now, and pause the transport
        if the kernel already holds its share unsent."""
        tls = self._tls
        internals.flush_gathered_writes(tls)
        if self.applied["unsent_check"]:
            try:
                unsent = _unsent(self._fd)
            except OSError:
                return
            if unsent >= self._unsent_limit:
                internals.pause_until_writable(self._tcp)

    def limit_unsent(self, limit: int | None) -> None:
        """Keep at most ``limit`` bytes unsent (None: :func:`notsent_lowat`),
        never more than that: the scheduler's cap sizes it by the link's
        rate while an interactive channel is open."""
        limit = self._lowat if limit is None else max(1, min(self._lowat, limit))
        if limit == self._unsent_limit or self._sock is None or not self._lowat:
            return
        try:
            self._sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, limit)
        except OSError:
            return
        self._unsent_limit = limit

    def sample(self) -> tuple[int, float, float, int] | None:
        """``(bytes in flight + unsent, delivery rate in bytes/s, minimum RTT
        in seconds, bytes acknowledged)`` of the socket, or None if it cannot
        tell (see the module docstring)."""
        sock = self._sock
        if sock is None:
            return None
        try:
            parsed = parse_tcp_info(sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO,
                                                    _TCP_INFO_NEEDED))
            if parsed is None:
                return None
            held = struct.unpack("i", fcntl.ioctl(self._fd, _SIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            return None
        return held, parsed[0], parsed[1], parsed[2]

    def bulk_cap(self, clock: IReactorTime) -> BulkCap | None:
        """The scheduler's :class:`~edgeaccess.tunnel.scheduler.BulkCap` for
        this socket (None: no ``tcp_info`` here, or ``EDGE_TUNNEL_BULK_CAP=off``)."""
        if not self.applied["link_sample"] or not bulk_cap_enabled():
            return None
        return BulkCap(self.sample, clock, limit_unsent=self.limit_unsent)



_SIOCOUTQNSD = 0x894B


def _unsent(fd: int) -> int:
    """Bytes the kernel holds for the socket ``fd`` not yet sent (Linux)."""
    return struct.unpack("i", fcntl.ioctl(fd, _SIOCOUTQNSD, b"\0\0\0\0"))[0]


def shorten_send_path(transport: Any) -> ShortSendPath:
    """A :class:`ShortSendPath` for ``transport`` (see there)."""
    return ShortSendPath(transport)
