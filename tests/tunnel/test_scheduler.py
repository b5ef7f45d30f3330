"""The tunnel's send scheduler: interactive first, bulk shared fairly, flow control intact.

Each test fills the channels' queues while the tunnel's transport is paused
(as a full TLS/TCP transport does), resumes it, and reads the order in which
frames reach the far end. With priority off (``EDGE_TUNNEL_PRIORITY=off``)
the order is the old one, and the ordering tests here fail (the last test
shows it).
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from edgeaccess import internals
from edgeaccess.tunnel import fasttls
from edgeaccess.tunnel.scheduler import (
    BULK,
    BULK_QUANTUM,
    GROW_AFTER,
    INTERACTIVE,
    INTERACTIVE_BURST,
    MIN_PIECE,
    SendScheduler,
    prioritize,
    priority_enabled,
)

from .support import Acceptor, connected_pair
from .test_channels import open_channel

WINDOW = 1024 * 1024


@pytest.fixture(autouse=True)
def _priority_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_TUNNEL_PRIORITY", raising=False)


class Tunnel:
    """A proxy and an agent in memory with ``count`` channels opened by the proxy."""

    def __init__(self, count: int, window: int = WINDOW) -> None:
        self.acceptor = Acceptor()
        self.agent, self.server, self.pump, _ = connected_pair(
            accept_channel=self.acceptor, window=window)
        self.server._mux_settings = (None, window, 1024)
        self.ends = [open_channel(self.server, self.pump, target=f"t{i}") for i in range(count)]
        self.channels = [end.transport for end in self.ends]
        self.ids = [channel.id for channel in self.channels]
        #: (channel index, bytes) as frames reach the agent, in order.
        self.arrivals: list[tuple[int, int]] = []
        original = self.agent.mux.data_received

        def spy(channel_id: int, data: bytes) -> None:
            self.arrivals.append((self.ids.index(channel_id), len(data)))
            original(channel_id, data)

        self.agent.mux.data_received = spy

    @property
    def received(self) -> list[bytes]:
        return [bytes(p.received) for p in self.acceptor.protocols]

    def pause(self) -> None:
        self.server.transport.producer.pauseProducing()  # the TLS transport is full

    def resume(self) -> None:
        self.server.transport.producer.resumeProducing()
        self.pump.flush()

    def runs(self) -> list[tuple[int, int]]:
        """Arrivals with consecutive pieces of one channel merged."""
        merged: list[tuple[int, int]] = []
        for index, size in self.arrivals:
            if merged and merged[-1][0] == index:
                merged[-1] = (index, merged[-1][1] + size)
            else:
                merged.append((index, size))
        return merged


def test_interactive_frames_overtake_queued_bulk() -> None:
    tunnel = Tunnel(3)
    bulk_a, bulk_b, terminal = tunnel.channels
    terminal.set_priority(INTERACTIVE)
    tunnel.pause()
    bulk_a.write(b"a" * 300_000)
    bulk_b.write(b"b" * 300_000)
    terminal.write(b"keystroke echo")
    tunnel.resume()
    assert tunnel.arrivals[0] == (2, len(b"keystroke echo"))
    assert tunnel.received == [b"a" * 300_000, b"b" * 300_000, b"keystroke echo"]


def test_an_interactive_write_goes_ahead_of_bulk_written_before_it() -> None:
    # Written while the transport was full, whatever the order of the writes.
    tunnel = Tunnel(2)
    bulk, terminal = tunnel.channels
    prioritize(terminal)
    tunnel.pause()
    bulk.write(b"x" * 100_000)
    terminal.write(b"1")
    bulk.write(b"y" * 100_000)
    terminal.write(b"2")
    tunnel.resume()
    assert tunnel.runs()[0] == (1, 2)
    assert tunnel.received == [b"x" * 100_000 + b"y" * 100_000, b"12"]


def test_bulk_channels_share_fairly() -> None:
    tunnel = Tunnel(3)
    tunnel.pause()
    for index, channel in enumerate(tunnel.channels):
        channel.write(bytes([65 + index]) * 400_000)
    tunnel.resume()
    sent = [0, 0, 0]
    for index, size in tunnel.arrivals:
        sent[index] += size
        if sum(sent) >= 600_000:
            break
    # Deficit round-robin: no channel ever more than one quantum ahead.
    assert max(sent) - min(sent) <= BULK_QUANTUM
    turns = [index for index, _ in tunnel.runs()[:9]]
    assert turns == [0, 1, 2] * 3
    assert tunnel.received == [bytes([65 + i]) * 400_000 for i in range(3)]


def test_bulk_channels_share_bytes_fairly_whatever_their_write_sizes() -> None:
    tunnel = Tunnel(2)
    tunnel.pause()
    small, large = tunnel.channels
    for _ in range(500):
        small.write(b"s" * 700)  # many small writes
    large.write(b"L" * 350_000)  # one large one
    tunnel.resume()
    sent = [0, 0]
    for index, size in tunnel.arrivals:
        sent[index] += size
        if sum(sent) >= 300_000:
            break
    assert abs(sent[0] - sent[1]) <= BULK_QUANTUM


def test_a_lone_bulk_channel_sends_whole_frames() -> None:
    tunnel = Tunnel(1)
    tunnel.channels[0].write(b"z" * 600_000)
    tunnel.pump.flush()
    assert max(size for _, size in tunnel.arrivals) > BULK_QUANTUM
    assert tunnel.received == [b"z" * 600_000]


def test_a_backlogged_terminal_shares_with_bulk_past_its_burst() -> None:
    # `cat` of a large file in a terminal must not starve a copy.
    tunnel = Tunnel(2)
    bulk, terminal = tunnel.channels
    terminal.set_priority(INTERACTIVE)
    tunnel.pause()
    terminal.write(b"t" * 600_000)
    bulk.write(b"b" * 600_000)
    tunnel.resume()
    first = tunnel.runs()[0]
    assert first[0] == 1 and INTERACTIVE_BURST <= first[1] < INTERACTIVE_BURST + 256 * 1024
    before_terminal_done = 0
    terminal_left = 600_000
    for index, size in tunnel.arrivals:
        if index == 1:
            terminal_left -= size
            if terminal_left == 0:
                break
        else:
            before_terminal_done += size
    assert before_terminal_done > 100_000  # the copy moved while the terminal was busy
    assert tunnel.received == [b"b" * 600_000, b"t" * 600_000]
    # Drained, it is interactive again: the next write goes first.
    tunnel.pause()
    bulk.write(b"c" * 100_000)
    terminal.write(b"prompt$ ")
    tunnel.arrivals.clear()
    tunnel.resume()
    assert tunnel.arrivals[0] == (1, 8)


def test_pieces_shrink_while_the_transport_pushes_back_and_grow_again() -> None:
    tunnel = Tunnel(1)
    scheduler = tunnel.server.mux.scheduler
    tunnel.pause()
    assert scheduler.piece == MIN_PIECE
    tunnel.channels[0].write(b"p" * 500_000)
    tunnel.resume()
    sizes = [size for _, size in tunnel.arrivals]
    # In memory the transport takes everything: small pieces until it has
    # taken GROW_AFTER bytes, then they double up to whole frames.
    small = GROW_AFTER // MIN_PIECE
    assert sizes[:small] == [MIN_PIECE] * small
    assert sizes[small] == 2 * MIN_PIECE and sizes[small + 1] == 4 * MIN_PIECE
    assert max(sizes) > 64 * 1024 and sum(sizes) == 500_000


def test_a_channel_without_credit_does_not_block_the_others() -> None:
    tunnel = Tunnel(2, window=64 * 1024)
    stalled, other = tunnel.channels
    tunnel.acceptor.protocols[0].transport.pauseProducing()  # its reader stops
    stalled.write(b"s" * 200_000)
    tunnel.pump.flush()
    assert stalled.send_credit == 0 and stalled.buffered_outgoing > 0
    tunnel.pause()
    other.write(b"o" * 150_000)
    tunnel.resume()
    assert tunnel.received[1] == b"o" * 150_000
    assert tunnel.acceptor.protocols[0].transport.buffered_incoming == 64 * 1024
    # The stalled reader resumes: the rest flows, exactly once and in order.
    tunnel.acceptor.protocols[0].transport.resumeProducing()
    tunnel.pump.flush()
    assert tunnel.received[0] == b"s" * 200_000


def test_the_window_is_never_exceeded_and_nothing_deadlocks_across_pauses() -> None:
    tunnel = Tunnel(3, window=64 * 1024)
    payloads = [bytes([i]) * 333_333 for i in range(3)]
    tunnel.channels[2].set_priority(INTERACTIVE)
    for channel, payload in zip(tunnel.channels, payloads):
        channel.write(payload)
    for _ in range(40):  # the transport fills and drains over and over
        tunnel.pause()
        tunnel.pump.flush()
        tunnel.resume()
    assert tunnel.received == payloads
    for channel in tunnel.channels:
        assert channel.buffered_outgoing == 0
        assert 0 < channel.send_credit <= 64 * 1024
    assert tunnel.server.mux.scheduler.queued == 0


def test_a_channel_closing_with_queued_data_sends_it_then_closes() -> None:
    tunnel = Tunnel(2)
    closing, other = tunnel.channels
    tunnel.pause()
    closing.write(b"last words" * 10_000)
    closing.loseConnection()
    other.write(b"other" * 10_000)
    tunnel.resume()
    assert tunnel.received == [b"last words" * 10_000, b"other" * 10_000]
    assert "lost" in tunnel.acceptor.protocols[0].events
    assert tunnel.server.mux.scheduler.queued == 0


def test_an_aborted_channel_leaves_the_queue_and_the_others_flow() -> None:
    tunnel = Tunnel(3)
    tunnel.channels[1].set_priority(INTERACTIVE)
    tunnel.pause()
    for channel in tunnel.channels:
        channel.write(b"q" * 100_000)
    tunnel.channels[1].abortConnection()
    assert tunnel.server.mux.scheduler.queued == 2
    tunnel.resume()
    assert tunnel.received[0] == tunnel.received[2] == b"q" * 100_000
    assert tunnel.received[1] == b""
    assert tunnel.server.mux.scheduler.queued == 0


def test_half_close_waits_for_the_queue() -> None:
    tunnel = Tunnel(2)
    tunnel.channels[1].set_priority(INTERACTIVE)
    tunnel.pause()
    tunnel.channels[0].write(b"data" * 20_000)
    tunnel.channels[0].loseWriteConnection()
    tunnel.channels[1].write(b"x")
    tunnel.resume()
    assert tunnel.received[0] == b"data" * 20_000
    assert "read-closed" in tunnel.acceptor.protocols[0].events


def test_the_far_end_is_told_a_channel_s_priority() -> None:
    # The node sees the PTY request; the proxy then sends keystrokes first too.
    tunnel = Tunnel(2)
    node_end = tunnel.acceptor.protocols[1].transport
    assert tunnel.channels[1].priority == BULK
    prioritize(node_end)
    tunnel.pump.flush()
    assert node_end.priority == INTERACTIVE
    assert tunnel.channels[1].priority == INTERACTIVE
    assert tunnel.channels[0].priority == BULK
    tunnel.pause()
    tunnel.channels[0].write(b"b" * 100_000)
    tunnel.channels[1].write(b"k")
    tunnel.resume()
    assert tunnel.arrivals[0] == (1, 1)


def test_an_unknown_priority_from_the_peer_closes_the_tunnel() -> None:
    tunnel = Tunnel(1)
    tunnel.agent._send(__import__("twisted.protocols.amp", fromlist=["AmpBox"]).AmpBox(
        _command=b"ChannelPriority", channel=b"%d" % tunnel.ids[0], priority=b"urgent"))
    tunnel.pump.flush()
    assert tunnel.server.closed_reason is not None
    assert "priority" in tunnel.server.closed_reason


def test_priority_is_not_sent_to_a_peer_that_does_not_know_it() -> None:
    tunnel = Tunnel(1)
    tunnel.agent.proxy_capabilities = tuple(
        c for c in tunnel.agent.proxy_capabilities if c != "priority/1")
    node_end = tunnel.acceptor.protocols[0].transport
    node_end.set_priority(INTERACTIVE)
    tunnel.pump.flush()
    assert node_end.priority == INTERACTIVE
    assert tunnel.channels[0].priority == BULK
    assert tunnel.server.closed_reason is None


def test_other_transports_are_left_alone() -> None:
    assert prioritize(object()) is False
    with pytest.raises(ValueError):
        Tunnel(1).channels[0].set_priority("urgent")


def test_priority_off_restores_the_old_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_TUNNEL_PRIORITY", "off")
    assert not priority_enabled()
    tunnel = Tunnel(2)
    assert not tunnel.server.mux.scheduler.enabled
    bulk, terminal = tunnel.channels
    terminal.set_priority(INTERACTIVE)
    tunnel.pause()
    bulk.write(b"a" * 300_000)
    terminal.write(b"k")
    tunnel.resume()
    # The old way: bulk written first goes first, the keystroke waits behind it.
    assert tunnel.runs()[0] == (0, 300_000)
    assert tunnel.received == [b"a" * 300_000, b"k"]


# -- the scheduler alone ---------------------------------------------------------------------


class FakeChannel:
    def __init__(self, name: str, size: int, priority: str = BULK) -> None:
        self.name = name
        self.left = size
        self.priority = priority
        self._scheduled = False
        self._deficit = 0
        self._burst = 0
        self.log: list[tuple[str, int]] = []
        self.drained = 0

    def _sendable(self) -> bool:
        return self.left > 0

    def _send_piece(self, limit: int) -> int:
        size = min(limit, self.left)
        self.left -= size
        self.log.append((self.name, size))
        return size

    def _sent_all(self) -> None:
        self.drained += 1


def test_scheduler_pieces_follow_the_transport() -> None:
    log: list[tuple[str, int]] = []
    flushes: list[int] = []
    scheduler = SendScheduler(256 * 1024, flush=lambda: flushes.append(1))
    channel = FakeChannel("a", 100_000)
    channel.log = log

    refuse_at = {3}

    def send_piece(limit: int) -> int:
        size = FakeChannel._send_piece(channel, limit)
        if len(log) in refuse_at:
            scheduler.pause()  # the kernel refused part of this piece
        return size

    channel.left = 400_000
    channel._send_piece = send_piece  # type: ignore[method-assign]
    scheduler.pause()
    scheduler.ready(channel)
    assert log == []  # paused: queued only
    scheduler.resume()
    # A slow link: small pieces, each run of them ends in a push-back.
    assert [size for _, size in log] == [MIN_PIECE] * 3
    assert scheduler.piece == MIN_PIECE and len(flushes) == 3
    # A fast one: past GROW_AFTER taken at once, pieces double; a short
    # push-back then only halves them.
    refuse_at.add(3 + GROW_AFTER // MIN_PIECE + 3)
    scheduler.resume()
    sizes = [size for _, size in log[3:]]
    grown = GROW_AFTER // MIN_PIECE
    assert sizes[:grown] == [MIN_PIECE] * grown
    assert sizes[grown:grown + 3] == [2 * MIN_PIECE, 4 * MIN_PIECE, 8 * MIN_PIECE]
    assert scheduler.piece == 4 * MIN_PIECE  # halved at the push-back
    scheduler.resume()
    assert channel.left == 0 and channel.drained == 1


# -- the send path below the scheduler (real sockets) ----------------------------------------


def tcp_pair() -> tuple[Any, socket.socket, Any]:
    """A Twisted TCP transport on one end of a loopback TCP connection (the
    socket option under test exists only on TCP sockets)."""
    from twisted.internet import tcp
    from twisted.internet.testing import MemoryReactorClock

    from .test_fasttls import _Sink

    listener = socket.create_server(("127.0.0.1", 0))
    try:
        ours = socket.create_connection(listener.getsockname(), timeout=10)
        theirs, _ = listener.accept()
    finally:
        listener.close()
    ours.setblocking(False)
    theirs.settimeout(10)
    reactor = MemoryReactorClock()
    connection = tcp.Connection(ours, _Sink(), reactor)
    connection.connected = True
    connection.protocol.makeConnection(connection)
    return connection, theirs, reactor


def test_short_send_path_sets_notsent_lowat_and_pauses_when_the_socket_refuses() -> None:
    class Membrane:
        events: list[str] = []

        def pauseProducing(self) -> None:
            self.events.append("pause")

        def resumeProducing(self) -> None:
            self.events.append("resume")

        def stopProducing(self) -> None:
            pass

    connection, theirs, reactor = tcp_pair()
    try:
        tls_like = type("TLS", (), {"transport": connection})()
        assert fasttls.eager_tcp_writes(connection)
        path = fasttls.shorten_send_path(tls_like)
        assert path.applied == {"notsent_lowat": True, "send_limit": True, "unsent_check": True,
                                "link_sample": True}
        value = connection.socket.getsockopt(socket.IPPROTO_TCP, fasttls._TCP_NOTSENT_LOWAT)
        assert value == fasttls.NOTSENT_LOWAT
        producer = Membrane()
        connection.registerProducer(producer, True)
        connection.write(b"small")
        assert producer.events == []  # taken by the socket at once: no pause
        connection.write(b"x" * (16 * 1024 * 1024))  # more than the socket takes
        assert producer.events == ["pause"]  # at once, not past 256 KiB queued
        received = 0
        while connection.dataBuffer or connection._tempDataLen:
            received += len(theirs.recv(1 << 20))
            connection.doWrite()
        assert producer.events == ["pause", "resume"]
    finally:
        connection.socket.close()
        theirs.close()


def test_short_send_path_falls_back_without_the_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(internals, "_TCP_INTERNALS", internals._TCP_INTERNALS + ("_gone",))
    internals.reset("tcp-send-limit")
    try:
        connection, theirs, reactor = tcp_pair()
        try:
            tls_like = type("TLS", (), {"transport": connection})()
            assert fasttls.shorten_send_path(tls_like).applied == {
                "notsent_lowat": True, "send_limit": False, "unsent_check": False,
                "link_sample": True}
            assert "_isSendBufferFull" not in vars(connection)
        finally:
            connection.socket.close()
            theirs.close()
    finally:
        internals.reset("tcp-send-limit")


def test_notsent_lowat_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_TUNNEL_NOTSENT_LOWAT", "0")
    assert fasttls.notsent_lowat() == 0
    monkeypatch.setenv("EDGE_TUNNEL_NOTSENT_LOWAT", "32768")
    assert fasttls.notsent_lowat() == 32768
    monkeypatch.setenv("EDGE_TUNNEL_NOTSENT_LOWAT", "lots")
    assert fasttls.notsent_lowat() == fasttls.NOTSENT_LOWAT




def test_the_kernel_s_unsent_bytes_pause_the_transport_until_it_is_writable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel appends to its last segment past TCP_NOTSENT_LOWAT: what it
    # holds unsent is asked after each piece, and at the limit the transport
    # waits for writability as if its own buffer were full.
    events: list[str] = []

    class Producer:
        def pauseProducing(self) -> None:
            events.append("pause")

        def resumeProducing(self) -> None:
            events.append("resume")

        def stopProducing(self) -> None:
            pass

    connection, theirs, reactor = tcp_pair()
    try:
        tls_like = type("TLS", (), {"transport": connection})()
        path = fasttls.shorten_send_path(tls_like)
        connection.registerProducer(Producer(), True)
        unsent = {"bytes": 0}
        monkeypatch.setattr(fasttls, "_unsent", lambda fd: unsent["bytes"])
        path.after_write()
        assert events == []  # nothing unsent: keep sending
        unsent["bytes"] = fasttls.NOTSENT_LOWAT
        path.after_write()
        assert events == ["pause"] and connection in reactor.getWriters()
        path.after_write()
        assert events == ["pause"]  # paused once
        connection.doWrite()  # the socket is writable again
        assert events == ["pause", "resume"] and connection not in reactor.getWriters()
    finally:
        connection.socket.close()
        theirs.close()


def test_a_lost_tunnel_s_send_path_is_not_kept_by_its_channels() -> None:
    # A detached (resumable) session outlives its connection: its scheduler
    # must not keep the dead connection and transport alive.
    tunnel = Tunnel(1)
    scheduler = tunnel.server.mux.scheduler
    tunnel.server.transport.loseConnection()
    tunnel.pump.flush()
    assert tunnel.server._is_lost
    assert scheduler._flush is None


def test_small_frames_share_a_flush_and_bulk_pieces_get_one_each() -> None:
    """A flush (TLS record handed to TCP, the kernel's unsent bytes checked)
    costs ~40 us per small request: small frames wait for the transport's own
    write at the end of the reactor iteration, until a piece's worth is due."""
    flushes: list[int] = []
    scheduler = SendScheduler(256 * 1024, flush=lambda: flushes.append(1))
    answers = [FakeChannel(f"answer{n}", 300, priority=INTERACTIVE) for n in range(10)]
    for channel in answers:
        scheduler.ready(channel)
    assert all(channel.left == 0 for channel in answers)
    assert flushes == []  # 3,000 bytes of small frames: no flush of their own
    scheduler.ready(FakeChannel("more", 2_000))
    assert flushes == []  # past MIN_PIECE in all, but nobody waits: no order to keep
    # While other channels wait, small frames get a flush per piece's worth.
    scheduler.pause()
    waiting = [FakeChannel(f"answer{n}", 300, priority=INTERACTIVE) for n in range(20)]
    for channel in waiting:
        scheduler.ready(channel)
    scheduler.resume()
    assert all(channel.left == 0 for channel in waiting)
    assert 1 <= len(flushes) <= 20 * 300 // MIN_PIECE + 1  # not one per frame
    flushes.clear()
    scheduler.pause()  # a slow link: MIN_PIECE pieces, each flushed
    bulk = FakeChannel("bulk", 5 * MIN_PIECE)
    scheduler.ready(bulk)
    for _ in range(5):
        scheduler.resume()
        scheduler.pause()
    assert [size for _, size in bulk.log] == [MIN_PIECE] * 5 and len(flushes) == 5
