"""Which channel's data goes next onto a tunnel: interactive first, bulk shared fairly.

Every channel of a tunnel queues what its protocol writes; the scheduler
decides, whenever the tunnel's transport can take more, which channel's
bytes go next:

* **interactive** channels (a PTY session, a web terminal, ``kubectl exec
  -it``) are served first, round-robin among themselves;
* **bulk** channels (scp, sftp, port forwarding, downloads, app and kube
  bodies) share what is left by deficit round-robin (Shreedhar and Varghese,
  1995): each turn a channel may send up to :data:`BULK_QUANTUM` more bytes,
  so channels share bytes fairly whatever their write sizes.

An interactive channel that stays backlogged past :data:`INTERACTIVE_BURST`
bytes (``cat`` of a large file in a terminal) is served as bulk until its
queue drains, so a noisy terminal cannot starve a copy.

Priority only helps if the queue *below* the scheduler is short: bytes
already handed to TLS and TCP cannot be reordered. The tunnel therefore
keeps its TCP socket's unsent bytes small and is paused by its transport as
soon as the kernel refuses anything or holds its unsent share
(:class:`edgeaccess.tunnel.fasttls.ShortSendPath`), and the
scheduler sends small pieces (:data:`MIN_PIECE`) while the transport pushes
back, growing them up to a full frame only once the transport has taken
:data:`GROW_AFTER` bytes without pushing back: on loopback, where the
kernel takes everything, frames stay large; on a slow link a keystroke
waits behind one small piece, the kernel's unsent allowance and the link's
own queue.

While an interactive channel is open, that is not short enough on a slow
link: the kernel sends what congestion control allows, and BBR (this
machine's default) keeps about twice the path's bandwidth-delay product
in flight, one BDP of it in the bottleneck's queue in front of every
keystroke. :class:`BulkCap` therefore caps the *bulk* bytes the socket
holds, in flight and unsent (``SIOCOUTQ``), near the path's BDP estimated
from ``TCP_INFO`` (:data:`CAP_GAIN` x delivery rate x minimum RTT, and at
least :data:`CAP_QUEUE_TIME` worth at the delivery rate, so that a fast
link never notices), and sizes bulk pieces to :data:`PIECE_TIME` worth of
bytes (at least :data:`PIECE_FLOOR`); interactive bytes pass the cap.
While the cap holds bulk back, a short timer (only then, only while bulk
bytes wait) wakes the scheduler when a piece's worth should have drained;
otherwise it is checked only before a bulk piece is chosen. The socket's
figures come from :meth:`edgeaccess.tunnel.fasttls.ShortSendPath.sample`;
where they are missing (not Linux, an old kernel's shorter ``tcp_info``),
there is no cap and the send path is as before.

A channel that writes while no other channel waits and the transport is not
pushing back (and, for bulk, no cap applies) is sent at once, without
queueing: the scheduler's cost on an uncontended tunnel (an app's small
requests) is one check.

With ``enabled=False`` (``EDGE_TUNNEL_PRIORITY=off``) channels send as they
did before this module existed: each channel flushes its whole queue the
moment it can, in the order channels became ready. Benchmarks use it as the
baseline of the same run.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Protocol as TypingProtocol

__all__ = [
    "BULK",
    "BulkCap",
    "CAP_FLOOR",
    "CAP_GAIN",
    "CAP_QUEUE_TIME",
    "PIECE_FLOOR",
    "PIECE_TIME",
    "BULK_QUANTUM",
    "INTERACTIVE",
    "INTERACTIVE_BURST",
    "GROW_AFTER",
    "MIN_PIECE",
    "PRIORITIES",
    "SendScheduler",
    "bulk_cap_enabled",
    "prioritize",
    "priority_enabled",
]

#: Channel priorities.
INTERACTIVE = "interactive"
BULK = "bulk"
PRIORITIES = (INTERACTIVE, BULK)

#: Bytes a bulk channel may send per round-robin turn.
BULK_QUANTUM = 16 * 1024
#: Backlogged bytes after which an interactive channel is served as bulk.
INTERACTIVE_BURST = 64 * 1024
#: The smallest piece sent while the transport pushes back.
MIN_PIECE = 4 * 1024
#: Bytes the transport must take without pushing back before pieces grow:
#: right after the transport drained, a slow link's kernel takes its unsent
#: allowance at once too, which says nothing about the link's speed.
GROW_AFTER = 64 * 1024

#: The environment variable that turns priority (and the short send path) off.
PRIORITY_ENV = "EDGE_TUNNEL_PRIORITY"
#: The environment variable that turns the bulk cap off (priority stays on).
BULK_CAP_ENV = "EDGE_TUNNEL_BULK_CAP"

#: The bulk cap, a multiple of the path's bandwidth-delay product: enough
#: to keep the link busy (a capped sender's delivery rate times its RTT
#: grows it by this factor each round trip while the link has room).
CAP_GAIN = 1.25
#: ...and at least this much time's worth of bytes at the delivery rate (a
#: fast link's cap is megabytes, never reached; 1 Mbit/s: 2.5 KB).
CAP_QUEUE_TIME = 0.02
#: ...and never below this.
CAP_FLOOR = 2 * 1024
#: Bulk pieces while the cap applies: this much time's worth of bytes...
PIECE_TIME = 0.01
#: ...and at least this many.
PIECE_FLOOR = 1024
#: Delivery-rate samples kept (the estimate is their maximum: a capped,
#: application-limited sender's samples are often low).
RATE_SAMPLES = 16
#: The rate estimate is at most this many times the bytes the peer
#: acknowledged per second while bulk waited (over at least
#: :data:`ACKED_WINDOW` seconds): a sender limited by its peer's window (a
#: TCP-splitting middlebox in front of a slow link: the peer acknowledges
#: at once, then reads at the link's rate) sees loopback-fast delivery
#: samples; the headroom lets a cap that limits the throughput grow.
ACKED_HEADROOM = 2.0
ACKED_WINDOW = 0.2
#: Bounds of the wake-up while the cap holds bulk bytes back (seconds).
WAKE_MIN, WAKE_MAX = 0.002, 0.05


def priority_enabled(environ: dict[str, str] | None = None) -> bool:
    """Whether tunnels schedule by priority (``EDGE_TUNNEL_PRIORITY``, default on).

    ``off``, ``0``, ``no`` or ``false`` selects the previous behaviour, for
    benchmarks that compare both in one run.
    """
    value = (os.environ if environ is None else environ).get(PRIORITY_ENV, "on")
    return value.strip().lower() not in ("off", "0", "no", "false")


def bulk_cap_enabled(environ: dict[str, str] | None = None) -> bool:
    """Whether tunnels cap bulk bytes near the path's BDP while an
    interactive channel is open (``EDGE_TUNNEL_BULK_CAP``, default on;
    ``off`` for benchmarks comparing both)."""
    value = (os.environ if environ is None else environ).get(BULK_CAP_ENV, "on")
    return value.strip().lower() not in ("off", "0", "no", "false")


class BulkCap:
    """How many more bulk bytes a tunnel socket may take now (see the module docstring).

    :param sample: returns the socket's ``(bytes in flight + unsent,
        delivery rate in bytes/s, minimum RTT in seconds[, bytes
        acknowledged so far])``, or None when it cannot tell (a fake in tests).
    :param clock: for the wake-up while the cap holds (``callLater``).
    :param limit_unsent: called with the bytes the socket may keep unsent
        while the cap applies (a piece's worth) and with None when it ends.
    """

    def __init__(self, sample, clock, *, gain: float = CAP_GAIN,
                 queue_time: float = CAP_QUEUE_TIME, floor: int = CAP_FLOOR,
                 piece_time: float = PIECE_TIME, piece_floor: int = PIECE_FLOOR,
                 limit_unsent=None) -> None:
        self._sample = sample
        self._limit_unsent = limit_unsent
        self.unsent = None  # what limit_unsent was last told
        self.clock = clock
        self.gain = gain
        self.queue_time = queue_time
        self.floor = floor
        self.piece_time = piece_time
        self.piece_floor = piece_floor
        self._rates: deque[float] = deque(maxlen=RATE_SAMPLES)
        self._acked: deque[tuple[float, int]] = deque()  # (when, bytes acknowledged)
        #: The last figures (for tests and logs): cap, piece, rate, bytes held.
        self.cap = floor
        self.piece = 0
        self.rate = 0.0
        self.held = 0

    def room(self) -> int | None:
        """Bulk bytes the socket may take now (<= 0: none), or None if it
        cannot tell (no cap)."""
        sample = self._sample()
        if sample is None:
            return None
        held, rate, min_rtt = sample[:3]
        if rate > 0:
            self._rates.append(rate)
        rate = max(self._rates, default=0.0)
        if rate <= 0:
            return None  # nothing delivered yet: no estimate, no cap
        if len(sample) > 3:
            rate = min(rate, self._acked_bound(sample[3]))
        self.rate = rate
        self.held = held
        self.cap = cap = int(max(self.floor, self.gain * rate * min_rtt,
                                 rate * self.queue_time))
        self.piece = max(self.piece_floor, int(rate * self.piece_time))
        self.limit_unsent(self.piece)
        return cap - held

    def limit_unsent(self, limit: int | None) -> None:
        """Tell the socket how much it may keep unsent (None: its default)."""
        if limit != self.unsent and self._limit_unsent is not None:
            self.unsent = limit
            self._limit_unsent(limit)

    def _acked_bound(self, acked: int) -> float:
        """:data:`ACKED_HEADROOM` x the acknowledged bytes per second since
        bulk began waiting (infinite until :data:`ACKED_WINDOW` has passed)."""
        now = self.clock.seconds()
        window = self._acked
        if window and now - window[-1][0] > 4 * WAKE_MAX:
            window.clear()  # bulk did not wait meanwhile: the link may have idled
        window.append((now, acked))
        while len(window) > 2 and now - window[1][0] >= 5 * ACKED_WINDOW:
            window.popleft()
        since, then = window[0]
        if now - since < ACKED_WINDOW:
            return float("inf")
        return ACKED_HEADROOM * (acked - then) / (now - since)

    def wait(self, excess: int) -> float:
        """Seconds until ``excess`` bytes over the cap and a piece have drained."""
        rate = self.rate
        if rate <= 0:
            return WAKE_MAX
        return min(WAKE_MAX, max(WAKE_MIN, (excess + self.piece) / rate))


def prioritize(transport: object, priority: str = INTERACTIVE) -> bool:
    """Class what ``transport`` carries as ``priority`` if it is a tunnel
    channel (:class:`~edgeaccess.tunnel.interfaces.IPrioritizedTransport`);
    any other transport (TCP to a LAN node) is left alone. Returns whether
    it was one.

    Called where a session is seen to be interactive: the node's SSH server
    on ``pty-req`` (for ``ssh -J`` and web terminals alike), the kube proxy
    on ``exec``/``attach`` with a TTY.
    """
    from edgeaccess.tunnel.interfaces import IPrioritizedTransport

    if not IPrioritizedTransport.providedBy(transport):
        return False
    transport.set_priority(priority)  # type: ignore[attr-defined]
    return True


class Schedulable(TypingProtocol):
    """What the scheduler needs of a channel (:class:`~edgeaccess.tunnel.channels.Channel`)."""

    priority: str
    #: Set by the scheduler: whether the channel is in one of its queues.
    _scheduled: bool
    #: Deficit round-robin state (bulk) / backlogged bytes (interactive).
    _deficit: int
    _burst: int

    def _sendable(self) -> bool:
        """Whether the channel has queued bytes and credit to send some."""

    def _send_piece(self, limit: int) -> int:
        """Send at most ``limit`` bytes (one frame); return how many went."""

    def _sent_all(self) -> None:
        """The channel's queue drained (or it cannot send): end of file, close, producer."""


class SendScheduler:
    """The send order of one tunnel's channels.

    :param max_piece: the largest frame payload (the wire's limit).
    :param flush: called when priority is on after each piece of at least
        ``min_piece`` bytes (and after each bulk piece under the cap; small
        frames share the transport's own write, or, while other channels
        wait, a flush per ``min_piece`` of them), so that what was written
        reaches the TCP socket (and the transport can push back) before the
        next piece is chosen.
    :param enabled: False: every channel flushes as soon as it can (the old order).
    :param cap: a :class:`BulkCap` for the tunnel's socket (None: no cap;
        :meth:`set_flush` sets it with the send path).
    """

    def __init__(self, max_piece: int, *, flush=None, enabled: bool = True,
                 quantum: int = BULK_QUANTUM, interactive_burst: int = INTERACTIVE_BURST,
                 min_piece: int = MIN_PIECE, cap: BulkCap | None = None) -> None:
        self.enabled = enabled
        self.max_piece = max_piece
        self.quantum = quantum
        self.interactive_burst = interactive_burst
        self.min_piece = min(min_piece, max_piece)
        self.paused = False
        self._flush = flush
        self._piece = max_piece
        self._taken = 0  # bytes sent since the transport last pushed back
        self._unflushed = 0  # bytes sent since the last flush
        self._interactive: deque[Schedulable] = deque()
        self._bulk: deque[Schedulable] = deque()
        self._pumping = False
        self._cap = cap
        self._capped_piece = max_piece  # bulk pieces while the cap applies
        self._wake = None  # the timer while the cap holds bulk back
        #: Open channels classed interactive (the cap applies while there are).
        self._interactive_open: set[Schedulable] = set()

    # -- the transport -------------------------------------------------------

    def set_flush(self, flush, cap: BulkCap | None = None) -> None:
        """Call ``flush`` from now on (see the constructor), and cap bulk
        bytes with ``cap`` (None: no cap): the send path of a new transport."""
        self._flush = flush
        self._cap = cap
        self._cancel_wake()

    @property
    def capping(self) -> bool:
        """Whether bulk bytes are capped now (a cap, and an interactive channel open)."""
        return self._cap is not None and bool(self._interactive_open)

    def _discard_interactive(self, channel: Schedulable) -> None:
        interactive = self._interactive_open
        if channel in interactive:
            interactive.discard(channel)
            if not interactive and self._cap is not None:
                self._cap.limit_unsent(None)  # no cap: the default unsent allowance

    def _cancel_wake(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None and wake.active():
            wake.cancel()

    def _woken(self) -> None:
        self._wake = None
        self.pump()

    def pause(self) -> None:
        """The transport is full: send nothing until :meth:`resume`; pieces shrink."""
        self.paused = True
        if self._taken < GROW_AFTER:
            self._piece = self.min_piece
        else:  # a fast link that filled up for a moment: keep large pieces
            self._piece = max(self.min_piece, self._piece // 2)
        self._taken = 0

    def resume(self) -> None:
        """The transport drained: send what is queued, by priority."""
        self.paused = False
        self.pump()

    @property
    def piece(self) -> int:
        """The largest piece the next pick may send."""
        return self._piece

    @property
    def queued(self) -> int:
        """Channels waiting to send."""
        return len(self._interactive) + len(self._bulk)

    # -- channels ------------------------------------------------------------

    def ready(self, channel: Schedulable) -> None:
        """``channel`` has something to send (and credit): queue it and send
        what the transport takes now."""
        if not self.enabled:
            # The old path: the whole queue, now, whatever else waits.
            while not self.paused and channel._sendable():
                channel._send_piece(self.max_piece)
            return
        if (not channel._scheduled and not self._pumping and not self.paused
                and not self._interactive and not self._bulk
                and (channel.priority == INTERACTIVE or not self.capping)):
            # Nobody else waits and the transport takes it: no queue.
            self._pumping = True
            try:
                while channel._sendable():
                    self._send(channel, self.max_piece, contended=False)
                    if self.paused:
                        break
            finally:
                self._pumping = False
            if not channel._sendable():
                # All sent (the channel's _flush does what follows); what
                # another channel queued meanwhile goes now.
                if self._interactive or self._bulk:
                    self.pump()
                return
        if not channel._scheduled:
            channel._scheduled = True
            if channel.priority == INTERACTIVE:
                channel._burst = 0
                self._interactive.append(channel)
            else:
                channel._deficit = 0
                self._bulk.append(channel)
        self.pump()

    def reclassed(self, channel: Schedulable) -> None:
        """``channel`` changed priority: move it if it waits in a queue."""
        if channel.priority == INTERACTIVE:
            self._interactive_open.add(channel)
        else:
            self._discard_interactive(channel)
        if not channel._scheduled:
            return
        for queue in (self._interactive, self._bulk):
            try:
                queue.remove(channel)
            except ValueError:
                continue
        channel._scheduled = False
        self.ready(channel)

    def forget(self, channel: Schedulable) -> None:
        """``channel`` closed: drop it from the queues."""
        self._discard_interactive(channel)
        if channel._scheduled:
            channel._scheduled = False
            for queue in (self._interactive, self._bulk):
                try:
                    queue.remove(channel)
                except ValueError:
                    pass

    def pump(self) -> None:
        """Send pieces, highest priority first, until the transport pushes
        back or nothing is left."""
        if self._pumping or not self.enabled:
            return
        self._pumping = True
        try:
            while not self.paused and self._send_next():
                pass
        finally:
            self._pumping = False

    # -- choosing ------------------------------------------------------------

    def _send_next(self) -> bool:
        interactive = self._interactive
        while interactive:
            channel = interactive.popleft()
            if not channel._sendable():
                self._leave(channel)
                continue
            sent = self._send(channel, self.max_piece, contended=bool(interactive or self._bulk))
            channel._burst += sent
            if not channel._sendable():
                self._leave(channel)
            elif channel._burst > self.interactive_burst:
                # Backlogged too long: shares with bulk until its queue drains.
                channel._deficit = 0
                self._bulk.append(channel)
            else:
                interactive.append(channel)
            return True
        bulk = self._bulk
        while bulk:
            channel = bulk[0]
            if not channel._sendable():
                bulk.popleft()
                self._leave(channel)
                continue
            limit = self.max_piece
            capped = self._interactive_open and self._cap is not None
            if capped:
                if self._wake is not None or self._bulk_held():
                    return False
                limit = self._capped_piece
            if channel._deficit <= 0:
                # Alone, a bulk channel sends whole frames (nobody to share with).
                channel._deficit += self.quantum if len(bulk) > 1 else self.max_piece
            sent = self._send(channel, min(channel._deficit, limit),
                              contended=len(bulk) > 1 or bool(self._interactive))
            if capped and self._unflushed and self._flush is not None:
                # The next check must see this piece in the socket.
                self._unflushed = 0
                self._flush()
            channel._deficit -= sent
            if not channel._sendable():
                bulk.popleft()
                self._leave(channel)
            elif channel._deficit <= 0 or sent == 0:
                bulk.rotate(-1)
            return True
        return False

    def _bulk_held(self) -> bool:
        """Whether the cap holds bulk back now (then a wake-up is due)."""
        cap = self._cap
        room = cap.room()
        if room is None:
            self._capped_piece = self.max_piece
            return False
        self._capped_piece = min(self.max_piece, cap.piece)
        if room > 0:
            return False
        self._wake = cap.clock.callLater(cap.wait(-room), self._woken)
        return True

    def _send(self, channel: Schedulable, limit: int, contended: bool = True) -> int:
        sent = channel._send_piece(min(limit, self._piece))
        if self._flush is not None:
            # A bulk-sized piece is flushed at once, so that it reaches TCP
            # (and the transport can push back) before the next one is
            # chosen. Small frames (a request, an answer, a keystroke) share
            # the TLS write the transport makes at the end of the reactor
            # turn, as they did before the scheduler (a flush and a kernel
            # check cost ~40 us of proxy CPU per small request); only while
            # other channels wait, where the order matters, do they get a
            # flush once a piece's worth of them is written.
            self._unflushed += sent
            if sent >= self.min_piece or (contended and self._unflushed >= self.min_piece):
                self._unflushed = 0
                self._flush()
        if not self.paused:
            self._taken += sent
            if self._taken >= GROW_AFTER and self._piece < self.max_piece:
                # The transport keeps taking everything: larger pieces.
                self._piece = min(self.max_piece, self._piece * 2)
        return sent

    def _leave(self, channel: Schedulable) -> None:
        channel._scheduled = False
        channel._deficit = 0
        channel._burst = 0
        channel._sent_all()
