"""Many tunnels, one per proxy: the agent side of several proxies.

A node keeps one :class:`~edgeaccess.tunnel.agent.TunnelAgent` per proxy
address it learns of (the first from the proxy it joined through, the rest
from the proxies' ``Discover``), each with its own backoff, so that losing
one proxy loses no node (Teleport's agent pool, ``lib/reversetunnel``).

What a slot's life looks like::

    added (at once, or after a random delay: no herd when a proxy appears)
      -> agent running (connecting / connected / backing off, forever)
      -> removed: the agent is stopped and the slot forgotten, on every path
         (stop failing, stop while starting, pool stopping)

A proxy that leaves the list while its tunnel is the only live one keeps it
until another tunnel is up ("make before break"): a node that dialed a load
balancer's address and learns the proxies' own addresses never drops to
zero tunnels in between.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from edgeaccess.tunnel.agent import AgentTunnelProtocol, TunnelAgent
from edgeaccess.tunnel.backoff import UniformRandom
from edgeaccess.tunnel.protocol import MAX_PROXIES

_log = Logger()

TunnelListener = Callable[[str, AgentTunnelProtocol], None]


class _Slot:
    """One proxy address and the agent that keeps a tunnel to it."""

    def __init__(self, address: str, agent: TunnelAgent) -> None:
        self.address = address
        self.agent = agent
        self.start_call: IDelayedCall | None = None
        self.started = False
        #: Left the proxy list, but its tunnel is the only one up.
        self.retiring = False

    @property
    def tunnel(self) -> AgentTunnelProtocol | None:
        return self.agent.tunnel if self.started else None


class TunnelAgentPool(Service):
    """One tunnel agent per proxy address, reconciled with the proxies' list.

    :param make_agent: builds the (not started) agent for an address.
    :param clock: timers; :param rng: randomness for the start spread.
    :param spread: a proxy learnt of while a tunnel is up is dialed after a
        uniform random delay in ``[0, spread]`` seconds (10,000 nodes told
        of a new proxy at once do not all dial it in the same second).
    """

    def __init__(self, make_agent: Callable[[str], TunnelAgent], clock: IReactorTime,
                 rng: UniformRandom, *, spread: float = 3.0) -> None:
        self._make_agent = make_agent
        self.clock = clock
        self.rng = rng
        self.spread = spread
        self._slots: dict[str, _Slot] = {}
        #: Agents being stopped (removed slots): waited for by stopService.
        self._stopping: dict[Deferred[Any], None] = {}
        self._listeners: list[TunnelListener] = []
        self._waiters: list[Deferred[AgentTunnelProtocol]] = []

    # -- what the node reads ------------------------------------------------

    @property
    def addresses(self) -> list[str]:
        """Every proxy address with an agent, in the order they were added."""
        return list(self._slots)

    def agent(self, address: str) -> TunnelAgent | None:
        """The agent dialing ``address``, if any."""
        slot = self._slots.get(address)
        return slot.agent if slot is not None else None

    def tunnels(self) -> list[AgentTunnelProtocol]:
        """Every live tunnel."""
        return [s.tunnel for s in self._slots.values() if s.tunnel is not None]

    @property
    def tunnel(self) -> AgentTunnelProtocol | None:
        """One live tunnel (the oldest slot's), or None when none is up."""
        live = self.tunnels()
        return live[0] if live else None

    def when_connected(self) -> Deferred[AgentTunnelProtocol]:
        """A live tunnel now, or the next one to come up (fails if the pool stops)."""
        live = self.tunnel
        if live is not None:
            return succeed(live)
        waiter: Deferred[AgentTunnelProtocol] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def subscribe(self, listener: TunnelListener) -> Callable[[], None]:
        """Be told ``listener(address, tunnel)`` of every tunnel that comes up."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    # -- the list of proxies --------------------------------------------------

    def add(self, address: str) -> None:
        """Keep a tunnel to ``address`` too (no-op if there is one already)."""
        slot = self._slots.get(address)
        if slot is not None:
            slot.retiring = False
            return
        self._add(address, spread=self.tunnel is not None)

    def set_proxies(self, addresses: Iterable[str]) -> None:
        """Keep one tunnel to each of ``addresses`` and none to any other.

        An empty list changes nothing (a proxy that does not know its peers
        yet must not make the node drop the tunnels it has).
        """
        wanted = list(dict.fromkeys(addresses))[:MAX_PROXIES]
        if not wanted:
            return
        spread = self.tunnel is not None
        for address in wanted:
            slot = self._slots.get(address)
            if slot is None:
                self._add(address, spread=spread)
            elif slot.retiring:
                slot.retiring = False
        for address, slot in list(self._slots.items()):
            if address not in wanted:
                slot.retiring = True
        self._retire()

    def _add(self, address: str, *, spread: bool) -> None:
        if address in self._slots or len(self._slots) >= MAX_PROXIES:
            return
        slot = _Slot(address, self._make_agent(address))
        self._slots[address] = slot
        _log.info("tunnel agents: adding proxy {address}", address=address)
        if not self.running:
            return
        delay = self.rng.uniform(0.0, self.spread) if spread and self.spread > 0 else 0.0
        if delay > 0:
            slot.start_call = self.clock.callLater(delay, self._start_slot, slot)
        else:
            self._start_slot(slot)

    def _start_slot(self, slot: _Slot) -> None:
        slot.start_call = None
        if self._slots.get(slot.address) is not slot or not self.running:
            return
        slot.started = True
        slot.agent.startService()
        self._watch(slot)

    def _watch(self, slot: _Slot) -> None:
        def up(tunnel: AgentTunnelProtocol) -> None:
            if self._slots.get(slot.address) is not slot:
                return
            tunnel.when_lost().addCallback(lambda _: self._watch_again(slot))
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(tunnel)
            for listener in list(self._listeners):
                try:
                    listener(slot.address, tunnel)
                except Exception:
                    _log.failure("tunnel listener failed for {address}", address=slot.address)
            self._retire()

        # Fails (CancelledError) once the agent stops: the watch ends there.
        slot.agent.when_connected().addCallbacks(up, lambda _: None)

    def _watch_again(self, slot: _Slot) -> None:
        if self._slots.get(slot.address) is not slot:
            return
        if slot.retiring:
            # Out of the list and its tunnel is gone: nothing to keep.
            self._remove(slot)
            return
        self._watch(slot)

    def _retire(self) -> None:
        """Stop the slots out of the list, keeping a lone live tunnel until another is up."""
        retiring = [s for s in self._slots.values() if s.retiring]
        if not retiring:
            return
        kept_live = any(s.tunnel is not None for s in self._slots.values() if not s.retiring)
        for slot in retiring:
            if slot.tunnel is None or kept_live:
                self._remove(slot)

    def _remove(self, slot: _Slot) -> None:
        # The slot is forgotten first, whatever stopping the agent does.
        if self._slots.get(slot.address) is slot:
            del self._slots[slot.address]
        _log.info("tunnel agents: dropping proxy {address}", address=slot.address)
        self._stop_agent(slot)

    def _stop_agent(self, slot: _Slot) -> None:
        if slot.start_call is not None and slot.start_call.active():
            slot.start_call.cancel()
        slot.start_call = None
        if not slot.started:
            return
        slot.started = False
        try:
            stopping = slot.agent.stopService()
        except Exception:
            _log.failure("stopping the tunnel agent for {address}", address=slot.address)
            return
        if not isinstance(stopping, Deferred) or stopping.called:
            if isinstance(stopping, Deferred):
                stopping.addErrback(self._log_stop_failure, slot.address)
            return
        self._stopping[stopping] = None

        def done(result: object) -> None:
            self._stopping.pop(stopping, None)

        stopping.addErrback(self._log_stop_failure, slot.address)
        stopping.addBoth(done)

    @staticmethod
    def _log_stop_failure(failure: Any, address: str) -> None:
        _log.failure("stopping the tunnel agent for {address}", failure, address=address)

    # -- service --------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for slot in list(self._slots.values()):
            if not slot.started and slot.start_call is None:
                self._start_slot(slot)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        for slot in list(self._slots.values()):
            self._stop_agent(slot)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(CancelledError())
        pending = list(self._stopping)
        if not pending:
            return succeed(None)
        return DeferredList(pending, consumeErrors=True).addCallback(lambda _: None)
