"""The LAN nodes' push stream: server side lines, client side redial and watchdog."""

from __future__ import annotations

import random

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from edgeaccess.controlplane import state as cstate
from edgeaccess.controlplane.stream import PING_INTERVAL, ControlStreamClient, WatchStreams

from .support import ProxyWorld, resolve


def lines(request) -> list[dict]:
    return [cstate.decode(line) for line in b"".join(request.written).split(b"\n") if line]


def test_a_stream_starts_with_init_then_updates_and_pings_until_the_node_hangs_up():
    world = ProxyWorld()
    streams = WatchStreams(world.control.publisher, world.clock)
    request = DummyRequest([b"v1", b"watch"])
    done = streams.serve(request, "n1")
    resolve(world.auth.create_lock({"user": "alice"}))
    world.clock.advance(PING_INTERVAL)
    assert [m["type"] for m in lines(request)] == ["init", "update", "ping"]
    assert world.control.publisher.sink_count() == 1
    request.processingFailed(Exception("the node went away"))  # fires notifyFinish
    assert done.called and world.control.publisher.sink_count() == 0
    streams.stop()


class Opener:
    """Stands for ClusterClient.stream_lines: records each stream it opens."""

    def __init__(self) -> None:
        self.streams: list[tuple[Deferred, object]] = []

    def __call__(self, on_line) -> Deferred:
        d: Deferred = Deferred()
        self.streams.append((d, on_line))
        return d


def test_the_client_applies_messages_redials_with_backoff_and_drops_a_silent_stream():
    clock = Clock()
    opener, applied = Opener(), []
    client = ControlStreamClient(opener, applied.append, clock, rng=random.Random(3))
    client.startService()
    (first, on_line), = opener.streams
    on_line(cstate.encode(cstate.init_message(cstate.empty_state())))
    assert client.connected and [m["type"] for m in applied] == ["init"]
    first.errback(ConnectionError("reset"))  # the proxy went away
    assert not client.connected
    clock.advance(1.0)  # the first redial waits at most 1 s
    assert len(opener.streams) == 2
    second, on_line = opener.streams[1]
    on_line(cstate.encode({"type": "ping"}))
    clock.advance(PING_INTERVAL * 3)  # heard something: kept
    assert not second.called
    clock.advance(PING_INTERVAL * 3)  # three silent intervals: dropped
    assert second.called
    clock.advance(2.0)
    assert len(opener.streams) == 3
    client.stopService()
    assert opener.streams[2][0].called  # stopping cancels the open stream
