"""Memory of many idle connections: freed heap pages, shared attribute tables.

A burst of TLS handshakes (thousands of agents dialing in after a proxy
restart) allocates and frees tens of MiB of short-lived OpenSSL state; glibc
keeps the freed pages in the process until ``malloc_trim`` returns the
whole free pages inside the heap. :class:`HeapTrimmer` does that
periodically, so the resident size of a proxy with idle tunnels follows
what the tunnels hold, not the peak of the last burst.

CPython (3.11+) shares one table of attribute names among the instances
of a class, so each instance stores only its values (8 bytes each). Names
join that table only while few instances exist: once a burst has created
a few dozen instances, an attribute first set after that (Twisted's TCP
transport sets ``dataBuffer`` and ``offset`` at its first write) gives every
instance a dict of its own, ~0.6 KB more per connection.
:func:`share_instance_attributes` enters the names up front.

Both lean on the platform (CPython's key-sharing dicts, glibc's allocator
through ctypes): that code is in :mod:`edgeaccess.internals`, which checks
at start-up that it fits and otherwise leaves the defaults alone.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from twisted.application import service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from edgeaccess import internals

_log = Logger()

#: How often :class:`HeapTrimmer` trims by default, seconds.
DEFAULT_TRIM_INTERVAL = 10.0


#: Every attribute a Twisted TCP server connection sets in its life (the
#: first 15 on every connection, the rest once it writes with a producer
#: or closes).
TCP_SERVER_ATTRIBUTES = (
    "reactor", "_tempDataBuffer", "_tempDataLen", "socket", "fileno", "protocol", "server",
    "client", "sessionno", "hostname", "logstr", "repstr", "connected", "dataBuffer",
    "offset", "producer", "streamingProducer", "producerPaused", "disconnecting",
    "disconnected", "_writeDisconnecting", "_writeDisconnected", "_aborting",
)


def share_instance_attributes(cls: type, names: Iterable[str]) -> None:
    """Enter ``names`` in the attribute table CPython shares among the
    instances of ``cls`` (call it before instances are made in bulk).

    A throwaway instance (made without ``__init__``) sets each name; names
    that are data descriptors of ``cls`` are skipped. Nothing is done where
    the interpreter shares no table (the ``cpython-shared-keys`` reach of
    :mod:`edgeaccess.internals`).
    """
    internals.share_instance_attributes(cls, names)


def share_tcp_server_attributes() -> None:
    """:func:`share_instance_attributes` for Twisted's TCP server connections."""
    from twisted.internet import tcp

    share_instance_attributes(tcp.Server, TCP_SERVER_ATTRIBUTES)


def trim_supported() -> bool:
    """Whether this process's C library can give freed heap memory back."""
    return internals.malloc_trim() is not None


def trim_heap() -> bool:
    """Return the heap's free pages to the system; True if any were released."""
    malloc_trim = internals.malloc_trim()
    if malloc_trim is None:
        return False
    return bool(malloc_trim(0))


class HeapTrimmer(service.Service):
    """Calls :func:`trim_heap` every ``interval`` seconds while running.

    :param clock: the reactor's clock.
    :param trim: what to call (default :func:`trim_heap`; tests pass their own).
    :param monotonic: a CPU-cheap timer for the log of slow trims.
    """

    name = "heap-trimmer"

    def __init__(
        self,
        clock: IReactorTime,
        interval: float = DEFAULT_TRIM_INTERVAL,
        trim: Callable[[], bool] = trim_heap,
        monotonic: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.clock = clock
        self.interval = interval
        self._trim = trim
        self._monotonic = monotonic
        self._loop: LoopingCall | None = None
        self.trims = 0

    def startService(self) -> None:
        super().startService()
        if self._trim is trim_heap and not trim_supported():
            return
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def tick(self) -> None:
        """Trim once (called periodically)."""
        started = self._monotonic()
        try:
            self._trim()
        except Exception:
            _log.failure("trimming the heap failed")
            return
        self.trims += 1
        took = self._monotonic() - started
        if took > 0.05:
            _log.info("heap trim took {ms} ms", ms=round(took * 1000, 1))


# -- allocator settings of the daemons that stream bulk data ------------------------------

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks at least this large get their own mapping (glibc's default: 128 KiB, adaptive).
STREAMING_MMAP_THRESHOLD = 1024 * 1024
#: Free bytes kept at the heap's top before it shrinks (default: 128 KiB, adaptive).
STREAMING_TRIM_THRESHOLD = 4 * 1024 * 1024


def tune_for_streaming(mallopt: Callable[[int, int], int] | None = None) -> bool:
    """Fixed allocation thresholds for a proxy or node relaying bulk data.

    A relay allocates and frees buffers of 128-256 KiB many times a second
    (a socket read, the records one read decrypts, a TLS write). With glibc's
    adaptive defaults the heap top shrinks and grows back around each of
    them, and every regrowth faults its pages in again: on the proxy of a
    TLS-routed 1 GiB download page faults and page clearing were ~10 % of
    its CPU (2.7 instead of 2.1 CPU-seconds per GiB). Here blocks below
    1 MiB come from the heap and up to 4 MiB stay free at its top; what an
    idle process holds beyond what it uses goes back with the periodic
    ``malloc_trim`` of :class:`HeapTrimmer`.

    Returns False where the C library has no ``mallopt`` or refuses (only
    speed is at stake then). glibc's functions are reached through ctypes
    (the ``glibc-malloc`` reach of :mod:`edgeaccess.internals`).
    """
    if mallopt is None:
        mallopt = internals.mallopt()
    if mallopt is None:
        return False
    done = (mallopt(M_MMAP_THRESHOLD, STREAMING_MMAP_THRESHOLD) == 1
            and mallopt(M_TRIM_THRESHOLD, STREAMING_TRIM_THRESHOLD) == 1)
    if not done:
        _log.info("the C library refused the streaming allocator settings")
    return done
