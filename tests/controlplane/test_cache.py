"""The proxy's cache: a first full read, then the watch; a gap means a re-read."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from twisted.internet.task import Clock

from edgeaccess.backend.memory import MemoryBackend
from edgeaccess.errors import EdgeError
from edgeaccess.controlplane.cache import ControlCache


def started(backend, clock, **kwargs) -> tuple[ControlCache, list]:
    cache = ControlCache(backend, clock, ["/roles/", "/locks/"], **kwargs)
    heard: list = []
    cache.subscribe(lambda key, item: heard.append((key, None if item is None else item.value)))
    cache.startService()
    return cache, heard


def test_the_first_read_then_every_change_is_served_from_memory():
    clock = Clock()
    backend = MemoryBackend(clock)
    backend.put("/roles/a", b"1")
    backend.put("/users/x", b"not cached")
    cache, heard = started(backend, clock)
    assert cache.ready and heard == [("/roles/a", b"1")]
    backend.put("/roles/b", b"2")
    backend.delete("/roles/a")
    assert [i.key for i in cache.get_range("/roles/")] == ["/roles/b"]
    assert cache.get("/users/x") is None and not cache.covers("/users/")
    assert heard[1:] == [("/roles/b", b"2"), ("/roles/a", None)]


def test_a_gap_makes_the_cache_reread_and_tell_only_what_differs():
    clock = Clock()
    backend = MemoryBackend(clock)
    backend.put("/roles/a", b"1")
    backend.put("/roles/b", b"1")
    cache, heard = started(backend, clock)
    heard.clear()
    generation = cache.generation
    cache._watcher.close("simulated gap")  # e.g. a lost PostgreSQL connection
    assert cache.generation == generation + 1
    assert heard == []  # the re-read found nothing new: listeners hear nothing
    backend.put("/roles/b", b"2")
    assert heard == [("/roles/b", b"2")]


def test_writes_missed_during_the_gap_arrive_with_the_reread():
    clock = Clock()
    backend = MemoryBackend(clock)
    cache, heard = started(backend, clock, retry_delay=1.0)
    broken = cache._watcher
    original = backend.watch
    def unavailable(*args, **kwargs):
        raise EdgeError("the backend is down")

    backend.watch = unavailable
    broken.close("connection lost")
    backend.put("/locks/l1", b"missed")  # nobody watching
    backend.watch = original
    clock.advance(1.0)  # the retry
    assert cache.get("/locks/l1").value == b"missed"
    assert ("/locks/l1", b"missed") in heard


def test_expired_items_are_invisible_and_the_safety_net_rereads():
    clock = Clock()
    clock.advance(1_700_000_000)
    backend = MemoryBackend(clock)
    soon = datetime.fromtimestamp(clock.seconds(), timezone.utc) + timedelta(seconds=5)
    backend.put("/locks/l1", b"x", soon)
    cache, _ = started(backend, clock, resync_interval=60)
    assert cache.get("/locks/l1") is not None
    clock.advance(5)
    assert cache.get("/locks/l1") is None and cache.get_range("/locks/") == []
    generation = cache.generation
    clock.advance(60)
    assert cache.generation == generation + 1
