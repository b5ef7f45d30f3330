"""Channels: multiplexing, flow control, half-close, backpressure, endpoints."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from edgeaccess.errors import AccessDenied, NodeOffline, NotFound
from edgeaccess.tunnel.endpoints import TunnelChannelEndpoint
from edgeaccess.tunnel.protocol import MAX_FRAME

from .support import Acceptor, Collecting, PlainRecorder, Recorder, connected_pair

WINDOW = 64 * 1024


def open_channel(tunnel: Any, pump: Any, kind: str = "ssh", target: str = "node-1:22", factory: Any = None) -> Any:
    factory = factory or Collecting()
    results: list[Any] = []
    TunnelChannelEndpoint(tunnel, kind, target).connect(factory).addBoth(results.append)
    pump.flush()
    assert results, "connect did not complete"
    return results[0]


def pair(**kwargs: Any) -> tuple:
    acceptor = kwargs.pop("acceptor", None) or Acceptor()
    agent, server, pump, factory = connected_pair(accept_channel=acceptor, **kwargs)
    return agent, server, pump, acceptor


def test_channel_is_a_full_transport() -> None:
    agent, server, pump, acceptor = pair()
    proxy_end = open_channel(server, pump)
    for interface in (ITransport, IPushProducer, IConsumer):
        verifyObject(interface, proxy_end.transport)
    peer = proxy_end.transport.getPeer()
    assert (peer.kind, peer.target) == ("ssh", "node-1:22")


def test_several_channels_carry_their_own_bytes_both_ways() -> None:
    agent, server, pump, acceptor = pair()
    proxy_ends = [open_channel(server, pump, target=f"t{i}") for i in range(3)]
    assert acceptor.requests == [("ssh", "t0"), ("ssh", "t1"), ("ssh", "t2")]
    for i, end in enumerate(proxy_ends):
        end.transport.write(b"to agent %d" % i)
    for i, node_end in enumerate(acceptor.protocols):
        node_end.transport.write(b"to proxy %d" % i)
    pump.flush()
    for i in range(3):
        assert bytes(acceptor.protocols[i].received) == b"to agent %d" % i
        assert bytes(proxy_ends[i].received) == b"to proxy %d" % i


def test_agent_may_open_an_auth_channel_to_the_proxy() -> None:
    server_acceptor = Acceptor()
    agent, server, pump, factory = connected_pair(
        server_factory=None, accept_channel=Acceptor()
    )
    factory.accept_channel = server_acceptor
    agent_end = open_channel(agent, pump, kind="auth", target="")
    agent_end.transport.write(b"GET /v1/ping")
    pump.flush()
    assert bytes(server_acceptor.protocols[0].received) == b"GET /v1/ping"
    assert agent_end.transport.id % 2 == 1  # agent ids are odd


@pytest.mark.parametrize(
    "side, kind, error",
    [("server", "auth", AccessDenied), ("agent", "ssh", AccessDenied), ("server", "ssh", NotFound)],
)
def test_refused_channels_fail_the_connect(side: str, kind: str, error: type) -> None:
    agent, server, pump, acceptor = pair(acceptor=Acceptor(targets=("only-this",)))
    opener = server if side == "server" else agent
    failure = open_channel(opener, pump, kind=kind, target="other")
    assert failure.check(error)
    assert isinstance(str(failure.value), str)
    assert not server.mux.channels and not agent.mux.channels
    # The tunnel itself survives a refusal.
    assert open_channel(server, pump, target="only-this").transport is not None


def test_connect_without_a_tunnel_fails_with_node_offline() -> None:
    results: list[Any] = []
    TunnelChannelEndpoint(None, "ssh", "x").connect(Collecting()).addErrback(results.append)
    assert results[0].check(NodeOffline)


def test_window_is_never_exceeded_while_the_consumer_is_paused() -> None:
    agent, server, pump, acceptor = pair(
        window=WINDOW, acceptor=Acceptor(lambda: Recorder(pause_on_connect=True))
    )
    server.mux.window = WINDOW
    proxy_end = open_channel(server, pump)
    node_end = acceptor.protocols[0]
    payload = bytes(range(256)) * 4096  # 1 MiB
    proxy_end.transport.write(payload)
    node_channel = node_end.transport
    for _ in range(5):
        pump.flush()
        assert node_channel.buffered_incoming <= WINDOW
    assert node_channel.buffered_incoming == WINDOW
    assert len(node_end.received) == 0
    assert proxy_end.transport.buffered_outgoing == len(payload) - WINDOW
    # Resuming delivers everything, in order, a window at a time.
    node_channel.resumeProducing()
    pump.flush()
    assert bytes(node_end.received) == payload
    assert proxy_end.transport.buffered_outgoing == 0


def test_stalled_channel_does_not_block_others() -> None:
    paused_first = iter([True, False])
    agent, server, pump, acceptor = pair(
        window=WINDOW, acceptor=Acceptor(lambda: Recorder(pause_on_connect=next(paused_first)))
    )
    stalled = open_channel(server, pump, target="slow")
    flowing = open_channel(server, pump, target="fast")
    stalled.transport.write(b"s" * (2 * 1024 * 1024))
    flowing.transport.write(b"f" * (2 * 1024 * 1024))
    pump.flush()
    slow_end, fast_end = acceptor.protocols
    assert len(fast_end.received) == 2 * 1024 * 1024
    assert len(slow_end.received) == 0
    assert slow_end.transport.buffered_incoming == WINDOW


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


def test_writer_is_paused_when_credit_runs_out_and_resumed_when_granted() -> None:
    agent, server, pump, acceptor = pair(
        window=WINDOW, acceptor=Acceptor(lambda: Recorder(pause_on_connect=True))
    )
    proxy_end = open_channel(server, pump)
    producer = Producer()
    proxy_end.transport.registerProducer(producer, True)
    proxy_end.transport.write(b"x" * (WINDOW + 70 * 1024))
    pump.flush()
    assert producer.events == ["pause"]
    acceptor.protocols[0].transport.resumeProducing()
    pump.flush()
    assert producer.events == ["pause", "resume"]
    assert len(acceptor.protocols[0].received) == WINDOW + 70 * 1024


def test_paused_tunnel_transport_pauses_every_channel_writer() -> None:
    agent, server, pump, acceptor = pair()
    ends = [open_channel(server, pump, target=f"t{i}") for i in range(2)]
    producers = [Producer(), Producer()]
    for end, producer in zip(ends, producers):
        end.transport.registerProducer(producer, True)
    server.transport.producer.pauseProducing()  # the TLS transport is full
    assert [p.events for p in producers] == [["pause"], ["pause"]]
    ends[0].transport.write(b"queued")
    pump.flush()
    assert acceptor.protocols[0].received == b""
    server.transport.producer.resumeProducing()
    pump.flush()
    assert [p.events for p in producers] == [["pause", "resume"], ["pause", "resume"]]
    assert acceptor.protocols[0].received == b"queued"


def test_pull_producer_is_drained_through_the_channel() -> None:
    agent, server, pump, acceptor = pair()
    proxy_end = open_channel(server, pump)
    chunks = [b"a" * 1000, b"b" * 1000, b"c" * 1000]

    class Pull:
        def resumeProducing(self) -> None:
            if chunks:
                proxy_end.transport.write(chunks.pop(0))

        def stopProducing(self) -> None:
            pass

    proxy_end.transport.registerProducer(Pull(), False)
    pump.flush()
    assert acceptor.protocols[0].received == b"a" * 1000 + b"b" * 1000 + b"c" * 1000


def test_peer_sending_beyond_its_window_closes_the_tunnel() -> None:
    agent, server, pump, acceptor = pair(
        window=WINDOW, acceptor=Acceptor(lambda: Recorder(pause_on_connect=True))
    )
    proxy_end = open_channel(server, pump)
    channel_id = proxy_end.transport.id
    # A hostile proxy ignores the credit it was given.
    for _ in range(WINDOW // MAX_FRAME + 2):
        server.send_data(channel_id, b"x" * MAX_FRAME)
    pump.flush()
    assert agent.when_lost().called
    assert "exceeded the window" in agent.closed_reason
    assert proxy_end.lost_reason.check(ConnectionLost)


def test_half_close_both_directions() -> None:
    agent, server, pump, acceptor = pair()
    proxy_end = open_channel(server, pump)
    node_end = acceptor.protocols[0]
    proxy_end.transport.write(b"input")
    proxy_end.transport.loseWriteConnection()
    pump.flush()
    assert node_end.received == b"input"
    assert node_end.events == ["connected", "read-closed"]
    assert proxy_end.events == ["connected", "write-closed"]
    # The other direction still flows after EOF (like `ssh host cat`).
    node_end.transport.write(b"output")
    pump.flush()
    assert proxy_end.received == b"output"
    node_end.transport.loseWriteConnection()
    pump.flush()
    assert proxy_end.events == ["connected", "write-closed", "read-closed", "lost"]
    assert node_end.events == ["connected", "read-closed", "write-closed", "lost"]
    assert proxy_end.lost_reason.check(ConnectionDone)
    assert node_end.lost_reason.check(ConnectionDone)
    assert not server.mux.channels and not agent.mux.channels
    pump.flush()
    assert not server.mux._closing and not agent.mux._closing


def test_eof_closes_a_protocol_that_is_not_half_closeable() -> None:
    agent, server, pump, acceptor = pair(acceptor=Acceptor(PlainRecorder))
    proxy_end = open_channel(server, pump)
    proxy_end.transport.write(b"bye")
    proxy_end.transport.loseWriteConnection()
    pump.flush()
    node_end = acceptor.protocols[0]
    assert node_end.received == b"bye"
    assert node_end.lost_reason.check(ConnectionDone)
    assert proxy_end.events[-1] == "lost"


def test_lose_connection_flushes_beyond_the_window_then_closes() -> None:
    agent, server, pump, acceptor = pair(window=WINDOW)
    proxy_end = open_channel(server, pump)
    payload = b"z" * (5 * WINDOW + 3)
    proxy_end.transport.write(payload)
    proxy_end.transport.loseConnection()
    pump.flush()
    node_end = acceptor.protocols[0]
    assert node_end.received == payload
    assert node_end.lost_reason.check(ConnectionDone)
    assert proxy_end.lost_reason.check(ConnectionDone)


def test_abort_from_the_peer_is_seen_as_connection_lost() -> None:
    agent, server, pump, acceptor = pair()
    proxy_end = open_channel(server, pump)
    acceptor.protocols[0].transport.abortConnection()
    pump.flush()
    assert proxy_end.lost_reason.check(ConnectionLost)
    assert "aborted" in str(proxy_end.lost_reason.value)


def test_closes_that_cross_are_harmless() -> None:
    agent, server, pump, acceptor = pair()
    proxy_end = open_channel(server, pump)
    proxy_end.transport.loseConnection()
    acceptor.protocols[0].transport.loseConnection()
    pump.flush()
    assert not agent.when_lost().called
    assert proxy_end.events[-1] == "lost" and acceptor.protocols[0].events[-1] == "lost"
    assert not server.mux._closing and not agent.mux._closing


def test_data_in_flight_after_a_local_close_is_ignored() -> None:
    agent, server, pump, acceptor = pair()
    proxy_end = open_channel(server, pump)
    acceptor.protocols[0].transport.write(b"late")
    proxy_end.transport.loseConnection()
    pump.flush()
    assert not server.when_lost().called
    assert proxy_end.received == b""


def test_losing_the_tunnel_loses_every_channel_and_pending_open() -> None:
    agent, server, pump, acceptor = pair()
    ends = [open_channel(server, pump, target=f"t{i}") for i in range(2)]
    pending: list[Any] = []
    TunnelChannelEndpoint(server, "ssh", "late").connect(Collecting()).addBoth(pending.append)
    agent.transport.loseConnection()
    pump.flush()
    for end in ends + acceptor.protocols:
        assert end.lost_reason.check(ConnectionLost)
    assert pending[0].check(NodeOffline)


class Exploding(Protocol):
    def dataReceived(self, data: bytes) -> None:
        raise RuntimeError("application bug")


def test_exception_in_a_channel_protocol_closes_only_that_channel() -> None:
    makers = iter([Exploding, Recorder])
    agent, server, pump, acceptor = pair(acceptor=Acceptor(lambda: next(makers)()))
    bad = open_channel(server, pump, target="bad")
    good = open_channel(server, pump, target="good")
    bad.transport.write(b"boom")
    good.transport.write(b"fine")
    pump.flush()
    assert bad.lost_reason is not None
    assert acceptor.protocols[1].received == b"fine"
    assert not agent.when_lost().called


def test_cancelled_connect_closes_the_channel_when_it_opens() -> None:
    agent, server, pump, acceptor = pair()
    results: list[Any] = []
    d = TunnelChannelEndpoint(server, "ssh", "x").connect(Collecting())
    d.addErrback(results.append)
    d.cancel()
    pump.flush()
    assert results and acceptor.protocols[0].events[-1] == "lost"
    assert not server.mux.channels and not agent.mux.channels


def test_memory_is_bounded_by_the_window_per_channel() -> None:
    clock = MemoryReactorClock()
    agent, server, pump, acceptor = pair(
        clock=clock, window=WINDOW, acceptor=Acceptor(lambda: Recorder(pause_on_connect=True))
    )
    ends = [open_channel(server, pump, target=f"t{i}") for i in range(4)]
    for end in ends:
        end.transport.write(b"m" * (10 * WINDOW))
    pump.flush()
    total = sum(p.transport.buffered_incoming for p in acceptor.protocols)
    assert total == 4 * WINDOW


def test_an_idle_tunnel_registers_no_producer_until_its_first_channel() -> None:
    agent, server, pump, acceptor = pair()
    assert server.transport.producer is None and agent.transport.producer is None
    open_channel(server, pump)
    assert server.transport.producer is not None and agent.transport.producer is not None


def test_closing_the_tunnel_releases_the_transport_producer() -> None:
    # TLSMemoryBIOProtocol only shuts TLS down once the producer is gone.
    agent, server, pump, acceptor = pair()
    open_channel(server, pump)
    assert server.transport.producer is not None
    server.disconnect("test")
    assert server.transport.producer is None
    pump.flush()
    assert agent.when_lost().called and server.when_lost().called
