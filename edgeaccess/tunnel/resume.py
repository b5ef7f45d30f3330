"""Resumable sessions: where a tunnel's channels wait for the next tunnel.

A session is one :class:`~edgeaccess.tunnel.mux.ChannelMux` that both ends
agreed may outlive its tunnel (``resume/1`` in ``Hello``). The agent names
it with a random id and offers it in the ``Hello`` of each new tunnel; the
proxy re-attaches it only to a tunnel whose certificate is the same peer's
(:class:`SessionTable` is keyed by the identity read from TLS), and only
when the id matches: another node can never take someone else's channels,
and a restarted agent (a new id) makes the proxy close the old session's
channels at once rather than at the end of the budget.

While detached, a session holds for each channel the bytes the peer may
not have received (at most its window), what its protocol wrote meanwhile
(producers paused) and what arrived and was not yet taken; past the outage
budget every channel closes with the reason ``tunnel outage exceeded Ns``.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Hashable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from edgeaccess.tunnel.liveness import PROBE_INTERVAL

if TYPE_CHECKING:
    from edgeaccess.tunnel.mux import ChannelMux

_log = Logger()

#: Default outage budget (seconds) of a resumable session.
DEFAULT_RESUME_BUDGET = 60.0


def new_session_id() -> str:
    """A fresh session id: 128 random bits as 32 hex digits."""
    return secrets.token_hex(16)


class ResumeSlot:
    """The agent's side: the one session of a :class:`TunnelAgent`, kept
    across its tunnels.

    :param clock: runs the budget timer.
    :param budget: seconds of outage the channels survive.
    """

    def __init__(self, clock: IReactorTime, budget: float = DEFAULT_RESUME_BUDGET) -> None:
        self.clock = clock
        self.budget = budget
        #: The detached session waiting for a tunnel, if any.
        self.mux: ChannelMux | None = None
        #: How often the tunnel probes while channels are open (the proxy says).
        self.probe_interval = PROBE_INTERVAL

    @property
    def waiting(self) -> bool:
        """Whether channels wait to be re-attached (the agent redials quickly)."""
        mux = self.mux
        return mux is not None and mux.detached and not mux._lost

    def take(self) -> ChannelMux | None:
        """The detached session for a new tunnel to carry (None: start a new one)."""
        return self.mux if self.waiting else None

    def detached(self, mux: ChannelMux) -> None:
        """``mux``'s tunnel is lost: keep it for the budget."""
        self.mux = mux
        mux.detach(self.clock, self.budget, self._expired)

    def _expired(self, mux: ChannelMux) -> None:
        if self.mux is mux:
            self.mux = None


class SessionTable:
    """The proxy's side: the latest session of each peer identity.

    :param clock: runs the budget timers.
    :param budget: seconds of outage a session's channels survive.
    """

    def __init__(self, clock: IReactorTime, budget: float = DEFAULT_RESUME_BUDGET) -> None:
        self.clock = clock
        self.budget = budget
        self._by_peer: dict[Hashable, ChannelMux] = {}

    def __len__(self) -> int:
        return len(self._by_peer)

    def detached_count(self) -> int:
        """Sessions waiting for their agent's next tunnel."""
        return sum(1 for mux in self._by_peer.values() if mux.detached)

    def adopt(self, peer: Hashable, session_id: str, tunnel: object) -> ChannelMux | None:
        """The session ``session_id`` of ``peer`` for its new ``tunnel``, if it
        is held here (taken from an older tunnel of the same peer that is
        still up: a black hole, or a new address, hides its end from us);
        None if not. A held session with another id is closed: its agent
        started afresh and lost those channels."""
        mux = self._by_peer.get(peer)
        if mux is None:
            return None
        if mux.session_id != session_id or mux._lost:
            del self._by_peer[peer]
            if not mux._lost and mux.detached:
                mux.expire("the node started a new tunnel session")
            return None
        owner = mux.wire
        if owner is not tunnel and hasattr(owner, "give_up_session"):
            _log.info("the newer tunnel of {peer} takes over its channels", peer=mux.peer_name)
            owner.give_up_session()
            mux.detach(self.clock, self.budget, self._expired_for(peer))
        return mux

    def register(self, peer: Hashable, mux: ChannelMux) -> None:
        """``mux`` is ``peer``'s current session."""
        previous = self._by_peer.get(peer)
        self._by_peer[peer] = mux
        if previous is not None and previous is not mux and previous.detached \
                and not previous._lost:
            previous.expire("the node started a new tunnel session")

    def discard(self, peer: Hashable, mux: ChannelMux) -> None:
        """``mux`` ended with its tunnel (nothing to resume): forget it."""
        if self._by_peer.get(peer) is mux:
            del self._by_peer[peer]

    def detached(self, peer: Hashable, mux: ChannelMux) -> bool:
        """``mux``'s tunnel is lost: keep it for the budget (False if it is
        not ``peer``'s current session: its channels are lost)."""
        if self._by_peer.get(peer) is not mux or mux._lost:
            return False
        mux.detach(self.clock, self.budget, self._expired_for(peer))
        return True

    def _expired_for(self, peer: Hashable):
        def expired(mux: ChannelMux) -> None:
            if self._by_peer.get(peer) is mux:
                del self._by_peer[peer]

        return expired
