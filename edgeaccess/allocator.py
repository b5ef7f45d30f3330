"""glibc allocator settings for the daemons that stream bulk data.

A proxy or node relaying a download allocates and frees buffers of 128-256
KiB many times a second (a socket read, the records one read decrypts, a
TLS write). With glibc's defaults the heap top then shrinks and grows back
around each of them (the trim threshold follows the largest freed buffer),
and every regrowth faults its pages in again: measured on the proxy of a
TLS-routed 1 GiB download, page faults and page clearing were ~10 % of its
CPU, and the proxy took 2.7 CPU-seconds per GiB instead of 2.1.

:func:`tune_for_streaming` serves blocks below 1 MiB from the heap and keeps
up to 4 MiB free at its top (fixed values: glibc then stops adapting them).
What an idle process holds beyond that is returned by the periodic
``malloc_trim`` of :class:`edgeaccess.memory.HeapTrimmer` where it runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from twisted.logger import Logger

_log = Logger()

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: Blocks at least this large get their own mapping (glibc's default: 128 KiB, adaptive).
MMAP_THRESHOLD = 1024 * 1024
#: Free bytes kept at the heap's top before it shrinks (default: 128 KiB, adaptive).
TRIM_THRESHOLD = 4 * 1024 * 1024


def _mallopt():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def tune_for_streaming(mallopt=None) -> bool:
    """Apply the settings above; False where the C library has no ``mallopt``
    or refuses them (nothing changes then: only speed is at stake)."""
    mallopt = mallopt if mallopt is not None else _mallopt()
    if mallopt is None:
        return False
    done = (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    if not done:
        _log.info("the C library refused the streaming allocator settings")
    return done
