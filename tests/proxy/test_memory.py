"""Memory of many idle connections (the heap trimmer, shared attribute tables)
and the allocator settings of the streaming daemons."""

from __future__ import annotations

import platform
import sys

import pytest
from twisted.internet import tcp
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from edgeaccess import memory


def test_the_trimmer_trims_once_per_interval_while_running() -> None:
    clock = Clock()
    calls: list[float] = []
    trimmer = memory.HeapTrimmer(clock, interval=10.0, trim=lambda: calls.append(clock.seconds()) or True)

    trimmer.startService()
    clock.advance(9.9)
    assert calls == []
    clock.pump([0.1, 10.0, 10.0])
    assert calls == [10.0, 20.0, 30.0]

    trimmer.stopService()
    clock.advance(100.0)
    assert len(calls) == 3 and trimmer.trims == 3


def test_a_failing_trim_is_logged_and_the_timer_goes_on() -> None:
    clock = Clock()
    outcomes = [RuntimeError("boom"), True]

    def trim() -> bool:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    trimmer = memory.HeapTrimmer(clock, interval=5.0, trim=trim)
    trimmer.startService()
    with capturedLogs() as events:
        clock.advance(5.0)
    assert any(e.get("log_failure") is not None for e in events)
    clock.advance(5.0)
    assert trimmer.trims == 1 and outcomes == []
    trimmer.stopService()


def test_a_slow_trim_says_how_long_it_took() -> None:
    clock = Clock()
    ticks = iter([1.0, 1.2])
    trimmer = memory.HeapTrimmer(clock, interval=1.0, trim=lambda: True,
                                 monotonic=lambda: next(ticks))
    trimmer.startService()
    with capturedLogs() as events:
        clock.advance(1.0)
    assert [e["ms"] for e in events if "ms" in e] == [200.0]
    trimmer.stopService()


def test_tcp_server_connections_share_their_attribute_names():
    class BurstServer(tcp.Server):
        """A class of its own: a fresh attribute table, as at proxy start."""

    memory.share_instance_attributes(BurstServer, memory.TCP_SERVER_ATTRIBUTES)
    made = []
    for _ in range(60):  # accepted in a burst: each sets what __init__ sets
        connection = BurstServer.__new__(BurstServer)
        for name in memory.TCP_SERVER_ATTRIBUTES[:13]:
            setattr(connection, name, None)
        made.append(connection)
    for connection in made:  # then each writes for the first time
        connection.dataBuffer, connection.offset = b"", 0

    assert max(sys.getsizeof(vars(c)) for c in made) < 600


# -- allocator settings of the streaming daemons ------------------------------------


def test_both_thresholds_are_set_to_fixed_values() -> None:
    calls: list[tuple[int, int]] = []

    def mallopt(parameter: int, value: int) -> int:
        calls.append((parameter, value))
        return 1

    assert memory.tune_for_streaming(mallopt) is True
    assert calls == [(memory.M_MMAP_THRESHOLD, 1024 * 1024),
                     (memory.M_TRIM_THRESHOLD, 4 * 1024 * 1024)]


def test_a_refusal_is_reported_not_raised() -> None:
    assert memory.tune_for_streaming(lambda parameter, value: 0) is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_them() -> None:
    assert memory.tune_for_streaming() is True
