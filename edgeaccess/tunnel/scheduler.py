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
    "BULK_QUANTUM",
    "INTERACTIVE",
    "INTERACTIVE_BURST",
    "GROW_AFTER",
    "MIN_PIECE",
    "PRIORITIES",
    "SendScheduler",
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


def priority_enabled(environ: dict[str, str] | None = None) -> bool:
    """Whether tunnels schedule by priority (``EDGE_TUNNEL_PRIORITY``, default on).

    ``off``, ``0``, ``no`` or ``false`` selects the previous behaviour, for
    benchmarks that compare both in one run.
    """
    value = (os.environ if environ is None else environ).get(PRIORITY_ENV, "on")
    return value.strip().lower() not in ("off", "0", "no", "false")


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
    :param flush: called when priority is on, once at least ``min_piece``
        bytes were sent since the last call (small frames share the
        transport's own write), so that what was written reaches the TCP
        socket (and the transport can push back) before the next piece is
        chosen.
    :param enabled: False: every channel flushes as soon as it can (the old order).
    """

    def __init__(self, max_piece: int, *, flush=None, enabled: bool = True,
                 quantum: int = BULK_QUANTUM, interactive_burst: int = INTERACTIVE_BURST,
                 min_piece: int = MIN_PIECE) -> None:
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

    # -- the transport -------------------------------------------------------

    def set_flush(self, flush) -> None:
        """Call ``flush`` from now on (see the constructor)."""
        self._flush = flush

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
            sent = self._send(channel, self.max_piece)
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
            if channel._deficit <= 0:
                # Alone, a bulk channel sends whole frames (nobody to share with).
                channel._deficit += self.quantum if len(bulk) > 1 else self.max_piece
            sent = self._send(channel, min(channel._deficit, self.max_piece))
            channel._deficit -= sent
            if not channel._sendable():
                bulk.popleft()
                self._leave(channel)
            elif channel._deficit <= 0 or sent == 0:
                bulk.rotate(-1)
            return True
        return False

    def _send(self, channel: Schedulable, limit: int) -> int:
        sent = channel._send_piece(min(limit, self._piece))
        if self._flush is not None:
            # Flushed once a piece's worth is written: small frames (a request,
            # an answer, a keystroke) share the TLS write the transport makes
            # at the end of the reactor iteration, as they did before the
            # scheduler (a flush and a kernel check each cost ~40 us of proxy
            # CPU per small request); bulk pieces are never smaller, so each
            # still reaches TCP before the next one is chosen.
            self._unflushed += sent
            if self._unflushed >= self.min_piece:
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
