"""The scheduler's bulk cap and its uncontended fast path.

While an interactive channel is open, bulk bytes in the tunnel socket (in
flight and unsent) are capped near the path's bandwidth-delay product, so a
keystroke never waits behind a bottleneck queue the copy filled. Here the
socket is a fake (:class:`FakeLink`: bytes drain at a fixed rate on a fake
clock, its figures are what ``TCP_INFO``/``SIOCOUTQ`` would say), so the cap's
arithmetic, its wake-ups and the throughput it leaves are checked exactly.
"""

from __future__ import annotations

import socket
import struct

import pytest
from twisted.internet.task import Clock

from edgeaccess.tunnel import fasttls
from edgeaccess.tunnel.scheduler import (
    BULK,
    CAP_FLOOR,
    CAP_GAIN,
    CAP_QUEUE_TIME,
    INTERACTIVE,
    PIECE_FLOOR,
    BulkCap,
    SendScheduler,
    bulk_cap_enabled,
)

from .test_scheduler import FakeChannel, tcp_pair

MAX_PIECE = 256 * 1024


class FakeLink:
    """A socket on a link of ``rate`` bytes/s and ``min_rtt`` seconds: what
    it holds drains at the rate; :meth:`sample` reports as the kernel would."""

    def __init__(self, clock: Clock, rate: float, min_rtt: float) -> None:
        self.clock = clock
        self.rate = rate
        self.min_rtt = min_rtt
        self._held = 0.0
        self._at = clock.seconds()
        self.delivered = 0.0
        self.samples = 0
        self.reports = True

    def _drain(self) -> None:
        now = self.clock.seconds()
        gone = min(self._held, (now - self._at) * self.rate)
        self._held -= gone
        self.delivered += gone
        self._at = now

    @property
    def held(self) -> int:
        self._drain()
        return int(self._held)

    def take(self, size: int) -> None:
        self._drain()
        self._held += size

    def sample(self) -> tuple[int, float, float] | None:
        self.samples += 1
        if not self.reports:
            return None
        return self.held, self.rate, self.min_rtt


class LinkChannel(FakeChannel):
    """A fake channel whose pieces go into ``link``."""

    def __init__(self, link: FakeLink, name: str, size: int, priority: str = BULK) -> None:
        super().__init__(name, size, priority)
        self.link = link

    def _send_piece(self, limit: int) -> int:
        size = super()._send_piece(limit)
        self.link.take(size)
        return size


def capped(rate: float, min_rtt: float) -> tuple[Clock, FakeLink, SendScheduler]:
    clock = Clock()
    link = FakeLink(clock, rate, min_rtt)
    scheduler = SendScheduler(MAX_PIECE, flush=lambda: None,
                              cap=BulkCap(link.sample, clock))
    return clock, link, scheduler


def open_interactive(scheduler: SendScheduler, channel: FakeChannel) -> None:
    channel.priority = INTERACTIVE
    scheduler.reclassed(channel)


SLOW = 125_000.0  # 1 Mbit/s
SLOW_RTT = 0.012  # one full segment's serialization: the lab's TCP RTT


def test_without_an_interactive_channel_bulk_is_not_capped() -> None:
    clock, link, scheduler = capped(SLOW, SLOW_RTT)
    bulk = LinkChannel(link, "bulk", 1_000_000)
    scheduler.ready(bulk)
    assert bulk.left == 0  # all went: nobody to keep the queue short for
    assert link.samples == 0  # and the socket was not even asked
    assert clock.getDelayedCalls() == []


def test_bulk_stops_at_the_cap_while_an_interactive_channel_is_open() -> None:
    clock, link, scheduler = capped(SLOW, SLOW_RTT)
    open_interactive(scheduler, FakeChannel("terminal", 0))
    bulk = LinkChannel(link, "bulk", 1_000_000)
    scheduler.ready(bulk)
    cap = max(CAP_FLOOR, CAP_GAIN * SLOW * SLOW_RTT, SLOW * CAP_QUEUE_TIME)
    assert cap == SLOW * CAP_QUEUE_TIME  # 2.5 KB: 20 ms of this link
    piece = max(PIECE_FLOOR, int(SLOW * 0.01))
    # Pieces of 10 ms worth, until the socket holds the cap.
    assert {size for _, size in bulk.log} == {piece}
    assert cap <= link.held < cap + piece
    assert scheduler.capping
    assert len(clock.getDelayedCalls()) == 1  # woken when a piece has drained


def test_a_keystroke_passes_the_cap() -> None:
    clock, link, scheduler = capped(SLOW, SLOW_RTT)
    terminal = LinkChannel(link, "terminal", 0)
    open_interactive(scheduler, terminal)
    bulk = LinkChannel(link, "bulk", 1_000_000)
    scheduler.ready(bulk)
    held = link.held
    terminal.left = 1
    scheduler.ready(terminal)
    assert terminal.log == [("terminal", 1)] and terminal.left == 0
    # Behind it: at most the cap and one piece, ~30 ms at 1 Mbit/s.
    assert held / SLOW < 0.035


def test_the_cap_keeps_a_slow_link_busy_and_wakes_only_while_bulk_waits() -> None:
    clock, link, scheduler = capped(SLOW, SLOW_RTT)
    open_interactive(scheduler, FakeChannel("terminal", 0))
    size = int(SLOW * 2)  # two seconds of the link
    bulk = LinkChannel(link, "bulk", size)
    scheduler.ready(bulk)
    wakes = 0
    while bulk.left and clock.seconds() < 10:
        calls = clock.getDelayedCalls()
        assert len(calls) == 1  # one timer, never more
        clock.advance(calls[0].getTime() - clock.seconds())
        wakes += 1
        assert link.held < 2 * CAP_FLOOR + 2 * PIECE_FLOOR  # the queue stays short
    assert bulk.left == 0
    # All of it left within ~5% of the link's time for it (the link never idles long).
    assert clock.seconds() <= 2.0 * 1.05
    assert clock.getDelayedCalls() == []  # nothing waits: no timer
    assert wakes < 2.0 / 0.002


def test_under_the_cap_each_bulk_piece_reaches_the_socket_before_the_next_check() -> None:
    # The TLS transport gathers small writes until a flush: a piece the
    # socket has not seen would not count against the cap.
    clock = Clock()
    link = FakeLink(clock, SLOW, SLOW_RTT)
    gathered: list[int] = []

    def flush() -> None:
        link.take(sum(gathered))
        gathered.clear()

    scheduler = SendScheduler(MAX_PIECE, flush=flush, cap=BulkCap(link.sample, clock))
    open_interactive(scheduler, FakeChannel("terminal", 0))
    bulk = FakeChannel("bulk", 1_000_000)
    original = bulk._send_piece

    def send_piece(limit: int) -> int:
        size = original(limit)
        gathered.append(size)
        return size

    bulk._send_piece = send_piece  # type: ignore[method-assign]
    scheduler.ready(bulk)
    assert gathered == []
    assert link.held < SLOW * CAP_QUEUE_TIME + 2 * PIECE_FLOOR


def test_a_fast_link_never_meets_the_cap() -> None:
    # Loopback's figures: ~10 GB/s, a 5 us minimum RTT.
    clock, link, scheduler = capped(10e9, 5e-6)
    open_interactive(scheduler, FakeChannel("terminal", 0))
    bulk = LinkChannel(link, "bulk", 4 * 1024 * 1024)
    scheduler.ready(bulk)
    assert bulk.left == 0
    assert {size for _, size in bulk.log} == {MAX_PIECE}  # whole frames
    assert clock.getDelayedCalls() == []


def test_a_long_path_keeps_about_its_bdp_in_flight() -> None:
    # 10 Mbit/s, 100 ms: BDP 125 KB; the cap is CAP_GAIN times that.
    clock, link, scheduler = capped(1_250_000.0, 0.1)
    open_interactive(scheduler, FakeChannel("terminal", 0))
    bulk = LinkChannel(link, "bulk", 1_000_000)
    scheduler.ready(bulk)
    assert CAP_GAIN * 125_000 <= link.held < CAP_GAIN * 125_000 + 12_500 + 1


def test_no_sample_no_cap() -> None:
    clock, link, scheduler = capped(SLOW, SLOW_RTT)
    link.reports = False  # no tcp_info here
    open_interactive(scheduler, FakeChannel("terminal", 0))
    bulk = LinkChannel(link, "bulk", 1_000_000)
    scheduler.ready(bulk)
    assert bulk.left == 0 and clock.getDelayedCalls() == []


def test_nothing_delivered_yet_means_no_estimate_and_no_cap() -> None:
    clock, link, scheduler = capped(0.0, 0.0)
    open_interactive(scheduler, FakeChannel("terminal", 0))
    bulk = LinkChannel(link, "bulk", 300_000)
    scheduler.ready(bulk)
    assert bulk.left == 0


def test_the_rate_estimate_is_the_recent_maximum() -> None:
    # A capped sender's delivery-rate samples are often application-limited:
    # one low sample must not shrink the cap.
    rates = [SLOW, SLOW / 4]
    cap = BulkCap(lambda: (0, rates.pop(0), SLOW_RTT), Clock())
    cap.room()
    cap.room()
    assert cap.rate == SLOW and cap.cap == int(SLOW * CAP_QUEUE_TIME)


def test_the_cap_ends_with_the_last_interactive_channel() -> None:
    clock, link, scheduler = capped(SLOW, SLOW_RTT)
    terminal = FakeChannel("terminal", 0)
    open_interactive(scheduler, terminal)
    bulk = LinkChannel(link, "bulk", 1_000_000)
    scheduler.ready(bulk)
    assert bulk.left > 0
    scheduler.forget(terminal)  # the session closed
    assert not scheduler.capping
    clock.advance(1.0)  # the pending wake-up sends the rest uncapped
    assert bulk.left == 0 and clock.getDelayedCalls() == []


def test_a_new_send_path_cancels_the_wake_up() -> None:
    clock, link, scheduler = capped(SLOW, SLOW_RTT)
    open_interactive(scheduler, FakeChannel("terminal", 0))
    bulk = LinkChannel(link, "bulk", 1_000_000)
    scheduler.ready(bulk)
    assert clock.getDelayedCalls()
    scheduler.set_flush(None)  # the tunnel was lost
    assert clock.getDelayedCalls() == []


def test_the_cap_can_be_turned_off() -> None:
    assert bulk_cap_enabled({})
    assert not bulk_cap_enabled({"EDGE_TUNNEL_BULK_CAP": "off"})


# -- the fast path -----------------------------------------------------------------------------


def test_an_uncontended_write_is_not_queued() -> None:
    scheduler = SendScheduler(MAX_PIECE, flush=lambda: None)
    seen: list[int] = []
    channel = FakeChannel("request", 300)
    original = channel._send_piece

    def send_piece(limit: int) -> int:
        seen.append(scheduler.queued)
        return original(limit)

    channel._send_piece = send_piece  # type: ignore[method-assign]
    scheduler.ready(channel)
    assert channel.left == 0 and seen == [0]  # sent straight from ready()
    assert not channel._scheduled and channel.drained == 0  # _flush's caller finishes


def test_a_write_beside_queued_data_still_waits_its_turn() -> None:
    scheduler = SendScheduler(MAX_PIECE, flush=lambda: None)
    log: list[tuple[str, int]] = []
    scheduler.pause()
    bulk = FakeChannel("bulk", 600_000)
    bulk.log = log
    scheduler.ready(bulk)
    terminal = FakeChannel("terminal", 10, priority=INTERACTIVE)
    terminal.log = log
    scheduler.ready(terminal)
    assert log == []  # paused: both queued, no fast path
    scheduler.resume()
    assert log[0] == ("terminal", 10)


def test_an_uncontended_write_the_transport_refuses_waits_in_the_queue() -> None:
    scheduler = SendScheduler(MAX_PIECE, flush=lambda: None)
    channel = FakeChannel("bulk", 3 * MAX_PIECE)
    original = channel._send_piece

    def send_piece(limit: int) -> int:
        size = original(limit)
        scheduler.pause()  # the kernel refused part of it
        return size

    channel._send_piece = send_piece  # type: ignore[method-assign]
    scheduler.ready(channel)
    assert channel.left == 2 * MAX_PIECE and channel._scheduled
    channel._send_piece = original  # type: ignore[method-assign]
    scheduler.resume()
    assert channel.left == 0 and channel.drained == 1


# -- tcp_info ----------------------------------------------------------------------------------


def test_parse_tcp_info_reads_the_documented_offsets() -> None:
    info = bytearray(232)
    struct.pack_into("=I", info, 148, 12_345)  # tcpi_min_rtt, us
    struct.pack_into("=Q", info, 160, 125_000)  # tcpi_delivery_rate, bytes/s
    struct.pack_into("=Q", info, 120, 987_654_321)  # tcpi_bytes_acked
    assert fasttls.parse_tcp_info(bytes(info)) == (125_000.0, 0.012345, 987_654_321)
    # An older kernel's shorter struct: no figures, no cap.
    assert fasttls.parse_tcp_info(bytes(info[:160])) is None


def test_a_real_socket_s_sample() -> None:
    connection, theirs, reactor = tcp_pair()
    try:
        tls_like = type("TLS", (), {"transport": connection})()
        path = fasttls.shorten_send_path(tls_like)
        assert path.applied["link_sample"]
        connection.socket.send(b"x" * 50_000)
        received = 0
        while received < 50_000:
            received += len(theirs.recv(65536))
        held, rate, min_rtt, acked = path.sample()
        assert held >= 0 and rate > 0 and 0 < min_rtt < 1.0 and acked >= 50_000
        cap = path.bulk_cap(reactor)
        assert isinstance(cap, BulkCap)
        assert cap.room() > 10 * 1024 * 1024  # loopback: the cap is never reached
    finally:
        connection.socket.close()
        theirs.close()


def test_the_cap_is_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_TUNNEL_BULK_CAP", "off")
    connection, theirs, reactor = tcp_pair()
    try:
        tls_like = type("TLS", (), {"transport": connection})()
        assert fasttls.shorten_send_path(tls_like).bulk_cap(reactor) is None
    finally:
        connection.socket.close()
        theirs.close()



def test_the_unsent_allowance_follows_the_rate_while_the_cap_applies() -> None:
    clock = Clock()
    link = FakeLink(clock, SLOW, SLOW_RTT)
    told: list[int | None] = []
    scheduler = SendScheduler(MAX_PIECE, flush=lambda: None,
                              cap=BulkCap(link.sample, clock, limit_unsent=told.append))
    terminal = FakeChannel("terminal", 0)
    open_interactive(scheduler, terminal)
    scheduler.ready(LinkChannel(link, "bulk", 100_000))
    assert told == [int(SLOW * 0.01)]  # 10 ms of the link, told once
    scheduler.forget(terminal)
    assert told == [int(SLOW * 0.01), None]  # the default again


def test_short_send_path_limits_unsent_bytes_on_the_socket() -> None:
    connection, theirs, reactor = tcp_pair()
    try:
        tls_like = type("TLS", (), {"transport": connection})()
        path = fasttls.shorten_send_path(tls_like)
        sock = connection.socket

        def lowat() -> int:
            return sock.getsockopt(socket.IPPROTO_TCP, fasttls._TCP_NOTSENT_LOWAT)

        assert lowat() == fasttls.NOTSENT_LOWAT
        path.limit_unsent(1250)
        assert lowat() == 1250
        path.limit_unsent(1_000_000)  # never above the configured allowance
        assert lowat() == fasttls.NOTSENT_LOWAT
        path.limit_unsent(1250)
        path.limit_unsent(None)
        assert lowat() == fasttls.NOTSENT_LOWAT
    finally:
        connection.socket.close()
        theirs.close()


class SplitLink(FakeLink):
    """A sender whose peer (a TCP-splitting relay) acknowledges at once and
    then reads at the link's rate: its delivery-rate samples are loopback's,
    its acknowledged bytes grow at the link's rate."""

    def sample(self) -> tuple[int, float, float, int] | None:
        held = self.held
        return held, 10e9, 20e-6, int(self.delivered)


def test_a_window_limited_sender_s_cap_follows_what_is_acknowledged() -> None:
    clock = Clock()
    link = SplitLink(clock, SLOW, SLOW_RTT)
    cap = BulkCap(link.sample, clock)
    scheduler = SendScheduler(MAX_PIECE, flush=lambda: None, cap=cap)
    open_interactive(scheduler, FakeChannel("terminal", 0))
    bulk = LinkChannel(link, "bulk", 10_000_000)
    original = bulk._send_piece

    def send_piece(limit: int) -> int:
        size = original(limit)
        if link.held >= 4096:
            scheduler.pause()  # the socket's unsent allowance is full
        return size

    bulk._send_piece = send_piece  # type: ignore[method-assign]
    scheduler.ready(bulk)
    held = []
    while clock.seconds() < 6.0:
        if scheduler.paused and link.held < 4096:
            scheduler.resume()  # writable again
        calls = clock.getDelayedCalls()
        if calls:
            clock.advance(max(0.002, calls[0].getTime() - clock.seconds()))
        else:
            clock.advance(0.001)
        held.append(link.held)
    # After the first window the estimate is about twice the link's rate, not 10 GB/s.
    assert cap.rate <= 2 * SLOW * 1.2
    late = held[2 * len(held) // 3:]  # past the first frame's burst (256 KiB, 2 s)
    assert max(late) < 2.2 * SLOW * CAP_QUEUE_TIME + 2 * PIECE_FLOOR
    # ...and the link stays busy.
    assert link.delivered >= 0.9 * SLOW * 6.0
