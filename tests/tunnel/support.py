"""In-memory tunnels for the tests: iosim pumps, a memory endpoint, recording protocols."""

from __future__ import annotations

import random
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocolFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from edgeaccess.errors import NotFound
from edgeaccess.pki.x509ca import Identity
from edgeaccess.tunnel.agent import AgentTunnelProtocol
from edgeaccess.tunnel.protocol import Inventory
from edgeaccess.tunnel.server import ServerTunnelProtocol, TunnelServerFactory

NODE = Identity(kind="node", name="node-1", cluster="root", uuid="uuid-1")


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """Records everything that happens to it, as events and received bytes."""

    def __init__(self, pause_on_connect: bool = False) -> None:
        self.pause_on_connect = pause_on_connect
        self.received = bytearray()
        self.events: list[str] = []
        self.lost_reason: Failure | None = None

    def connectionMade(self) -> None:
        self.events.append("connected")
        if self.pause_on_connect:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.events.append("read-closed")

    def writeConnectionLost(self) -> None:
        self.events.append("write-closed")

    def connectionLost(self, reason: Failure) -> None:
        self.events.append("lost")
        self.lost_reason = reason


class PlainRecorder(Protocol):
    """Like Recorder but not half-closeable (as most protocols are)."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost_reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:
        self.lost_reason = reason


class Acceptor:
    """An accept_channel callback that records every protocol it hands out."""

    def __init__(self, make: Callable[[], Protocol] = Recorder, targets: tuple = ()) -> None:
        self.make = make
        self.targets = targets
        self.protocols: list[Any] = []
        self.requests: list[tuple[str, str]] = []

    def __call__(self, *args: Any) -> IProtocolFactory:
        kind, target = args[-2], args[-1]
        self.requests.append((kind, target))
        if self.targets and target not in self.targets:
            raise NotFound(f"no {target}")

        def build() -> Protocol:
            protocol = self.make()
            self.protocols.append(protocol)
            return protocol

        return Factory.forProtocol(build)


class Collecting(Factory):
    """A factory building a given protocol class, remembering them."""

    def __init__(self, make: Callable[[], Protocol] = Recorder) -> None:
        self.make = make
        self.built: list[Any] = []

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = self.make()
        self.built.append(protocol)
        return protocol


def make_server_factory(clock: MemoryReactorClock, identity: Identity = NODE, **kwargs: Any) -> TunnelServerFactory:
    return TunnelServerFactory(clock=clock, identity_for=lambda transport: identity, **kwargs)


class Pumps:
    """All live iosim pumps of a test; flushes them together."""

    def __init__(self) -> None:
        self.pumps: list[iosim.IOPump] = []

    def flush(self) -> None:
        for _ in range(50):
            moved = False
            for pump in list(self.pumps):
                moved = pump.flush(advanceClock=False) or moved
            if not moved:
                return


class MemoryEndpoint:
    """An IStreamClientEndpoint connecting in memory to a server factory."""

    def __init__(self, server_factory: Any, pumps: Pumps, clock: MemoryReactorClock, refuse: bool = False) -> None:
        self.server_factory = server_factory
        self.pumps = pumps
        self.clock = clock
        self.refuse = refuse
        self.connects = 0
        self.servers: list[Any] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        self.connects += 1
        if self.refuse:
            return fail(ConnectionRefusedError("refused in memory"))
        server = self.server_factory.buildProtocol(None)
        if server is None:
            return fail(ConnectionRefusedError("server not accepting"))
        client = factory.buildProtocol(None)
        self.servers.append(server)
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            greet=False,
            clock=self.clock,
        )
        self.pumps.pumps.append(pump)
        return succeed(client)


def connected_pair(
    clock: MemoryReactorClock | None = None,
    *,
    server_factory: TunnelServerFactory | None = None,
    inventory: Inventory | None = None,
    **agent_kwargs: Any,
) -> tuple[AgentTunnelProtocol, ServerTunnelProtocol, iosim.IOPump, TunnelServerFactory]:
    """An agent and a proxy tunnel joined in memory, Hello done."""
    clock = clock or MemoryReactorClock()
    server_factory = server_factory or make_server_factory(clock)
    agent = AgentTunnelProtocol(
        clock=clock, inventory=inventory or Inventory(name="node-1"), **agent_kwargs
    )
    server = server_factory.buildProtocol(None)
    pump = iosim.connect(
        server, iosim.makeFakeServer(server), agent, iosim.makeFakeClient(agent), greet=False, clock=clock
    )
    pump.flush(advanceClock=False)
    clock.advance(0)  # registration happens just after the Hello answer
    pump.flush(advanceClock=False)
    return agent, server, pump, server_factory


class TopRandom:
    """A 'random' source that always draws the upper bound (worst case)."""

    def uniform(self, a: float, b: float) -> float:
        return b


def seeded() -> random.Random:
    return random.Random(4)
