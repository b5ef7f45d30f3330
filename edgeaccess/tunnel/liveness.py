"""One periodic check for the liveness of every tunnel of a proxy.

A proxy with 10,000 idle tunnels would otherwise keep 10,000 timers
(``DelayedCall``) and reschedule one every 3 ms. Here each tunnel only
stamps the time it last heard its peer, and one ``LoopingCall`` looks at
every stamp a few times per heartbeat interval (a coarse timing wheel): a
tunnel silent for :data:`MISSED_INTERVALS` intervals is dropped within a
quarter interval of that deadline.

A tunnel with open resumable channels is watched more closely besides
(:class:`BusyLivenessMonitor`): its agent probes every
:data:`PROBE_INTERVAL` seconds, so a cut or a black hole is found within
:data:`MISSED_INTERVALS` probes and the channels move to the next tunnel
long before their outage budget runs out.
"""

from __future__ import annotations

from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

_log = Logger()

#: Either side drops the tunnel after this many heartbeat intervals of silence.
MISSED_INTERVALS = 3
#: Checks per heartbeat interval (the drop comes at most 1/CHECKS late).
CHECKS_PER_INTERVAL = 4
#: Seconds between the agent's probes while resumable channels are open.
PROBE_INTERVAL = 2.0


class Watched(TypingProtocol):
    """What the monitor needs from a tunnel (hashable: kept in a dict)."""

    #: ``clock.seconds()`` when the peer was last heard.
    last_heard: float

    def silence_timeout(self, silent_for: float) -> None:
        """Drop the tunnel: nothing heard for ``silent_for`` seconds."""


class LivenessMonitor:
    """Drops watched tunnels that stay silent for ``missed`` heartbeat intervals.

    :param clock: the reactor's clock (the tunnels stamp ``clock.seconds()``).
    :param interval: the heartbeat interval the peers use, seconds.
    :param missed: silent intervals before a tunnel is dropped.
    :param checks: how many times per interval the stamps are looked at.
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        missed: int = MISSED_INTERVALS,
        checks: int = CHECKS_PER_INTERVAL,
    ) -> None:
        self.clock = clock
        self.interval = interval
        self.limit = missed * interval
        self._period = interval / checks
        # Keyed by the tunnel itself (hashed by identity): no int object per
        # entry, as id() keys would need (10,000 of them).
        self._watched: dict[Watched, None] = {}
        self._loop: LoopingCall | None = None

    def __len__(self) -> int:
        return len(self._watched)

    def watch(self, tunnel: Watched) -> None:
        """Start watching ``tunnel`` (its ``last_heard`` must be set)."""
        self._watched[tunnel] = None
        if self._loop is None:
            self._loop = LoopingCall(self.check)
            self._loop.clock = self.clock
            self._loop.start(self._period, now=False)

    def forget(self, tunnel: Watched) -> None:
        """Stop watching ``tunnel`` (it closed)."""
        self._watched.pop(tunnel, None)
        if not self._watched and self._loop is not None:
            if self._loop.running:
                self._loop.stop()
            self._loop = None

    def check(self) -> None:
        """Drop every watched tunnel silent for at least the limit (called periodically)."""
        now = self.clock.seconds()
        deadline = now - self.limit
        silent = [t for t in self._watched if t.last_heard <= deadline]
        for tunnel in silent:
            self._watched.pop(tunnel, None)
            try:
                tunnel.silence_timeout(now - tunnel.last_heard)
            except Exception:
                _log.failure("dropping a silent tunnel failed")
        if not self._watched and self._loop is not None and self._loop.running:
            self._loop.stop()
            self._loop = None


class BusyLivenessMonitor(LivenessMonitor):
    """A :class:`LivenessMonitor` for tunnels with open channels, whose agents
    probe every ``interval`` (the probe interval): a tunnel whose channels
    all closed (``busy`` false) is forgotten at the next check."""

    def check(self) -> None:
        for tunnel in [t for t in self._watched if not getattr(t, "busy", False)]:
            self._watched.pop(tunnel, None)
        super().check()
