"""MemoryBackend against the shared contract, plus what is its own."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from edgeaccess.backend.memory import MemoryBackend

from .contract import BackendContract, expiring_in


class TestMemoryBackend(BackendContract):
    """The in-memory twin passes the whole contract."""

    @pytest.fixture
    def backend(self, clock: Clock) -> MemoryBackend:
        return MemoryBackend(clock)


def test_results_are_available_without_running_the_reactor(clock: Clock) -> None:
    backend = MemoryBackend(clock)
    results: list[object] = []
    backend.put("/a", b"1").addCallback(results.append)
    backend.get("/a").addCallback(lambda item: results.append(item.value))
    assert results[1:] == [b"1"]
    assert results[0].key == "/a"


def test_expired_items_are_dropped_from_memory(clock: Clock) -> None:
    backend = MemoryBackend(clock)
    backend.put("/a", b"1", expiring_in(clock, 1))
    backend.put("/b", b"1")
    clock.advance(1)
    backend.get_range("")
    assert list(backend._items) == ["/b"]
    assert backend._sorted_keys == ["/b"]
