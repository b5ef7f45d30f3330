"""The behaviour every IBackend must show, whatever stores the bytes.

A driver's test module subclasses :class:`BackendContract` and provides a
``backend`` fixture built on the ``clock`` fixture (``tests/backend/
conftest.py``): expiry is decided by that fake clock, so tests move time
with ``clock.advance``. Adding PostgreSQL later is one more subclass with
its own fixture.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from edgeaccess.backend.interfaces import CompareFailed, IBackend, Item
from edgeaccess.backend.watch import WatchClosed
from edgeaccess.errors import AlreadyExists, BadRequest, EdgeError, NotFound


def expiring_in(clock: Clock, seconds: float) -> datetime:
    """An aware UTC datetime ``seconds`` after the fake clock's now."""
    return datetime.fromtimestamp(clock.seconds(), timezone.utc) + timedelta(seconds=seconds)


async def keys_under(backend, prefix: str, limit: int | None = None) -> list[str]:
    """The keys ``get_range`` returns, in its order."""
    return [item.key for item in await backend.get_range(prefix, limit)]


async def put_all(backend, *keys: str) -> None:
    """Store each key with its own name as value."""
    for key in keys:
        await backend.put(key, key.encode("utf-8"))


class BackendContract:
    """Contract tests; subclasses provide the ``backend`` fixture."""

    def test_provides_the_interface(self, backend) -> None:
        assert verifyObject(IBackend, backend)

    # -- get / put -------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_get_of_a_missing_key_fails_not_found(self, backend) -> None:
        with pytest.raises(NotFound):
            await backend.get("/users/nobody")

    @pytest_twisted.ensureDeferred
    async def test_put_then_get_returns_the_same_item(self, backend) -> None:
        stored = await backend.put("/users/alice", b'{"name": "alice"}')
        assert stored.key == "/users/alice"
        assert stored.value == b'{"name": "alice"}'
        assert stored.expires is None
        assert stored.revision > 0
        assert await backend.get("/users/alice") == stored

    @pytest_twisted.ensureDeferred
    async def test_put_replaces_the_value_and_raises_the_revision(self, backend) -> None:
        first = await backend.put("/users/alice", b"one")
        second = await backend.put("/users/alice", b"two")
        assert second.value == b"two"
        assert second.revision > first.revision
        assert await backend.get("/users/alice") == second

    @pytest_twisted.ensureDeferred
    async def test_values_are_kept_byte_for_byte(self, backend) -> None:
        values = {
            "/v/empty": b"",
            "/v/binary": bytes(range(256)) * 3,
            "/v/large": b"\x00\xff" * (512 * 1024),
        }
        for key, value in values.items():
            await backend.put(key, value)
        for key, value in values.items():
            item = await backend.get(key)
            assert type(item.value) is bytes
            assert item.value == value

    @pytest_twisted.ensureDeferred
    async def test_bytearray_values_are_stored_as_bytes(self, backend) -> None:
        await backend.put("/v/a", bytearray(b"abc"))
        assert (await backend.get("/v/a")).value == b"abc"

    @pytest_twisted.ensureDeferred
    async def test_text_values_are_refused(self, backend) -> None:
        with pytest.raises(BadRequest):
            await backend.put("/v/a", "not bytes")
        with pytest.raises(NotFound):
            await backend.get("/v/a")

    @pytest_twisted.ensureDeferred
    async def test_empty_keys_are_refused(self, backend) -> None:
        with pytest.raises(BadRequest):
            await backend.put("", b"x")
        with pytest.raises(BadRequest):
            await backend.get("")

    @pytest_twisted.ensureDeferred
    async def test_unicode_keys_are_kept(self, backend) -> None:
        key = "/users/zoë/日本/\U0001f511"
        await backend.put(key, b"x")
        assert (await backend.get(key)).key == key

    # -- create / update -------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_create_stores_a_new_key(self, backend) -> None:
        created = await backend.create("/tokens/t1", b"node")
        assert await backend.get("/tokens/t1") == created

    @pytest_twisted.ensureDeferred
    async def test_create_of_an_existing_key_fails_and_keeps_it(self, backend) -> None:
        original = await backend.create("/tokens/t1", b"node")
        with pytest.raises(AlreadyExists):
            await backend.create("/tokens/t1", b"other")
        assert await backend.get("/tokens/t1") == original

    @pytest_twisted.ensureDeferred
    async def test_update_replaces_an_existing_key(self, backend) -> None:
        original = await backend.put("/roles/admin", b"v1")
        updated = await backend.update("/roles/admin", b"v2")
        assert updated.value == b"v2"
        assert updated.revision > original.revision
        assert await backend.get("/roles/admin") == updated

    @pytest_twisted.ensureDeferred
    async def test_update_of_a_missing_key_fails_and_creates_nothing(self, backend) -> None:
        with pytest.raises(NotFound):
            await backend.update("/roles/admin", b"v2")
        with pytest.raises(NotFound):
            await backend.get("/roles/admin")

    # -- compare_and_swap ------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_compare_and_swap_replaces_when_the_value_matches(self, backend) -> None:
        original = await backend.put("/locks/l1", b"old")
        swapped = await backend.compare_and_swap("/locks/l1", b"old", b"new")
        assert swapped.value == b"new"
        assert swapped.revision > original.revision
        assert await backend.get("/locks/l1") == swapped

    @pytest_twisted.ensureDeferred
    async def test_compare_and_swap_fails_when_the_value_differs(self, backend) -> None:
        original = await backend.put("/locks/l1", b"current")
        with pytest.raises(CompareFailed):
            await backend.compare_and_swap("/locks/l1", b"stale", b"new")
        assert await backend.get("/locks/l1") == original

    @pytest_twisted.ensureDeferred
    async def test_compare_and_swap_of_a_missing_key_fails_not_found(self, backend) -> None:
        with pytest.raises(NotFound):
            await backend.compare_and_swap("/locks/l1", b"old", b"new")
        with pytest.raises(NotFound):
            await backend.get("/locks/l1")

    @pytest_twisted.ensureDeferred
    async def test_compare_and_swap_can_set_an_expiry(self, backend, clock) -> None:
        await backend.put("/locks/l1", b"old")
        expires = expiring_in(clock, 30)
        swapped = await backend.compare_and_swap("/locks/l1", b"old", b"new", expires)
        assert swapped.expires == expires
        clock.advance(30)
        with pytest.raises(NotFound):
            await backend.get("/locks/l1")

    # -- delete ----------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_delete_removes_the_key(self, backend) -> None:
        await put_all(backend, "/users/alice", "/users/bob")
        assert await backend.delete("/users/alice") is None
        with pytest.raises(NotFound):
            await backend.get("/users/alice")
        assert (await backend.get("/users/bob")).value == b"/users/bob"

    @pytest_twisted.ensureDeferred
    async def test_delete_of_a_missing_key_fails_not_found(self, backend) -> None:
        with pytest.raises(NotFound):
            await backend.delete("/users/alice")

    # -- get_range -------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_get_range_returns_items_under_the_prefix_sorted_by_key(self, backend) -> None:
        await put_all(backend, "/users/carol", "/users/alice", "/roles/admin", "/users/bob")
        items = await backend.get_range("/users/")
        assert [item.key for item in items] == ["/users/alice", "/users/bob", "/users/carol"]
        assert [item.value for item in items] == [b"/users/alice", b"/users/bob", b"/users/carol"]
        assert all(isinstance(item, Item) and item.revision > 0 for item in items)

    @pytest_twisted.ensureDeferred
    async def test_get_range_does_not_mix_up_similar_prefixes(self, backend) -> None:
        await put_all(backend, "/users", "/users/", "/users/a", "/users2/a", "/users0", "/users.", "/user/a")
        assert await keys_under(backend, "/users/") == ["/users/", "/users/a"]
        assert await keys_under(backend, "/users2/") == ["/users2/a"]
        assert await keys_under(backend, "/users") == [
            "/users", "/users.", "/users/", "/users/a", "/users0", "/users2/a"
        ]

    @pytest_twisted.ensureDeferred
    async def test_get_range_of_the_empty_prefix_returns_everything(self, backend) -> None:
        await put_all(backend, "/b", "/a", "/c/d")
        assert await keys_under(backend, "") == ["/a", "/b", "/c/d"]

    @pytest_twisted.ensureDeferred
    async def test_get_range_with_no_match_is_empty(self, backend) -> None:
        await put_all(backend, "/users/alice")
        assert await backend.get_range("/nodes/") == []

    @pytest_twisted.ensureDeferred
    async def test_get_range_orders_by_code_point(self, backend) -> None:
        keys = ["/k/Z", "/k/a", "/k/é", "/k/\uffff", "/k/\U0001f511", "/k/\U0010ffff", "/k/\U0010ffffz"]
        await put_all(backend, *reversed(keys))
        assert await keys_under(backend, "/k/") == sorted(keys)
        assert await keys_under(backend, "/k/\U0010ffff") == ["/k/\U0010ffff", "/k/\U0010ffffz"]

    @pytest_twisted.ensureDeferred
    async def test_get_range_prefix_ending_below_the_surrogates(self, backend) -> None:
        # The next code point after U+D7FF that text can hold is U+E000.
        await put_all(backend, "/s\ud7ff", "/s\ud7ffz", "/s\ue000", "/s\ud7fe")
        assert await keys_under(backend, "/s\ud7ff") == ["/s\ud7ff", "/s\ud7ffz"]

    @pytest_twisted.ensureDeferred
    async def test_get_range_limit_returns_the_first_keys(self, backend) -> None:
        await put_all(backend, "/n/3", "/n/1", "/n/2", "/o/1")
        assert await keys_under(backend, "/n/", limit=2) == ["/n/1", "/n/2"]
        assert await keys_under(backend, "/n/", limit=1) == ["/n/1"]
        assert await keys_under(backend, "/n/", limit=10) == ["/n/1", "/n/2", "/n/3"]
        assert await keys_under(backend, "/n/", limit=0) == []

    @pytest_twisted.ensureDeferred
    async def test_get_range_limit_counts_only_live_items(self, backend, clock) -> None:
        await backend.put("/n/1", b"x", expiring_in(clock, 5))
        await backend.put("/n/2", b"x", expiring_in(clock, 5))
        await put_all(backend, "/n/3", "/n/4")
        clock.advance(5)
        assert await keys_under(backend, "/n/", limit=2) == ["/n/3", "/n/4"]

    @pytest_twisted.ensureDeferred
    async def test_get_range_refuses_a_negative_limit(self, backend) -> None:
        with pytest.raises(BadRequest):
            await backend.get_range("/n/", -1)

    @pytest_twisted.ensureDeferred
    async def test_ranges_refuse_a_prefix_no_key_could_start_with(self, backend) -> None:
        for prefix in (b"/n/", "/n/\ud800"):
            with pytest.raises(BadRequest):
                await backend.get_range(prefix)
            with pytest.raises(BadRequest):
                await backend.delete_range(prefix)

    # -- delete_range ----------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_delete_range_deletes_only_under_the_prefix(self, backend) -> None:
        await put_all(backend, "/users", "/users/a", "/users/b", "/users2/a", "/roles/x")
        assert await backend.delete_range("/users/") == 2
        assert await keys_under(backend, "") == ["/roles/x", "/users", "/users2/a"]

    @pytest_twisted.ensureDeferred
    async def test_delete_range_with_no_match_deletes_nothing(self, backend) -> None:
        await put_all(backend, "/users/a")
        assert await backend.delete_range("/nodes/") == 0
        assert await keys_under(backend, "") == ["/users/a"]

    @pytest_twisted.ensureDeferred
    async def test_delete_range_counts_only_live_items(self, backend, clock) -> None:
        await backend.put("/sessions/old", b"x", expiring_in(clock, 1))
        await put_all(backend, "/sessions/new")
        clock.advance(2)
        assert await backend.delete_range("/sessions/") == 1
        assert await backend.get_range("/sessions/") == []

    # -- expiry ----------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_item_is_visible_until_it_expires(self, backend, clock) -> None:
        expires = expiring_in(clock, 60)
        stored = await backend.put("/tokens/t1", b"node", expires)
        assert stored.expires == expires
        clock.advance(59.5)
        assert await backend.get("/tokens/t1") == stored
        assert await keys_under(backend, "/tokens/") == ["/tokens/t1"]
        clock.advance(0.5)
        with pytest.raises(NotFound):
            await backend.get("/tokens/t1")
        assert await backend.get_range("/tokens/") == []

    @pytest_twisted.ensureDeferred
    async def test_item_expiring_in_the_past_is_never_visible(self, backend, clock) -> None:
        await backend.put("/tokens/t1", b"node", expiring_in(clock, -1))
        with pytest.raises(NotFound):
            await backend.get("/tokens/t1")

    @pytest_twisted.ensureDeferred
    async def test_expired_item_behaves_as_deleted_for_writes(self, backend, clock) -> None:
        await backend.put("/tokens/t1", b"node", expiring_in(clock, 10))
        clock.advance(10)
        with pytest.raises(NotFound):
            await backend.update("/tokens/t1", b"x")
        with pytest.raises(NotFound):
            await backend.compare_and_swap("/tokens/t1", b"node", b"x")
        with pytest.raises(NotFound):
            await backend.delete("/tokens/t1")
        created = await backend.create("/tokens/t1", b"fresh")
        assert await backend.get("/tokens/t1") == created

    @pytest_twisted.ensureDeferred
    async def test_expiry_round_trips_as_aware_utc_to_the_microsecond(self, backend) -> None:
        expires = datetime(2031, 5, 17, 8, 30, 15, 123456, tzinfo=timezone.utc)
        await backend.put("/certs/c1", b"x", expires)
        item = await backend.get("/certs/c1")
        assert item.expires == expires
        assert item.expires.utcoffset() == timedelta(0)

    @pytest_twisted.ensureDeferred
    async def test_expiry_in_another_timezone_is_converted_to_utc(self, backend) -> None:
        paris_summer = timezone(timedelta(hours=2))
        await backend.put("/certs/c1", b"x", datetime(2031, 5, 17, 10, 30, tzinfo=paris_summer))
        item = await backend.get("/certs/c1")
        assert item.expires == datetime(2031, 5, 17, 8, 30, tzinfo=timezone.utc)
        assert item.expires.tzinfo == timezone.utc

    @pytest_twisted.ensureDeferred
    async def test_naive_expiry_is_taken_as_utc(self, backend, clock) -> None:
        aware = expiring_in(clock, 10)
        await backend.put("/certs/c1", b"x", aware.replace(tzinfo=None))
        assert (await backend.get("/certs/c1")).expires == aware
        clock.advance(10)
        with pytest.raises(NotFound):
            await backend.get("/certs/c1")

    @pytest_twisted.ensureDeferred
    async def test_put_without_expiry_clears_an_expiry(self, backend, clock) -> None:
        await backend.put("/nodes/n1", b"x", expiring_in(clock, 10))
        await backend.put("/nodes/n1", b"y")
        clock.advance(3600)
        item = await backend.get("/nodes/n1")
        assert (item.value, item.expires) == (b"y", None)

    @pytest_twisted.ensureDeferred
    async def test_expires_must_be_a_datetime(self, backend) -> None:
        with pytest.raises(BadRequest):
            await backend.put("/nodes/n1", b"x", 1234.5)

    # -- revisions -------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_revision_grows_with_every_write_to_any_key(self, backend) -> None:
        revisions = [
            (await backend.put("/a", b"1")).revision,
            (await backend.create("/b", b"1")).revision,
            (await backend.update("/a", b"2")).revision,
            (await backend.compare_and_swap("/b", b"1", b"2")).revision,
            (await backend.put("/a", b"3")).revision,
        ]
        assert revisions == sorted(set(revisions))

    @pytest_twisted.ensureDeferred
    async def test_recreated_key_never_reuses_a_revision(self, backend) -> None:
        before = await backend.put("/users/alice", b"v1")
        await backend.delete("/users/alice")
        after = await backend.create("/users/alice", b"v1")
        assert after.revision > before.revision

    @pytest_twisted.ensureDeferred
    async def test_failed_writes_change_nothing(self, backend) -> None:
        stored = await backend.put("/a", b"1")
        with pytest.raises(AlreadyExists):
            await backend.create("/a", b"2")
        with pytest.raises(CompareFailed):
            await backend.compare_and_swap("/a", b"0", b"2")
        assert await backend.get("/a") == stored
        assert (await backend.put("/b", b"1")).revision > stored.revision

    # -- close -----------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_calls_after_close_fail(self, backend) -> None:
        await backend.put("/a", b"1")
        await backend.close()
        with pytest.raises(EdgeError):
            await backend.get("/a")
        await backend.close()  # closing twice is harmless

    # -- watch -----------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_watch_starts_with_init(self, backend) -> None:
        await backend.put("/roles/a", b"1")
        watcher = backend.watch(["/roles/"])
        event = await watcher.next()
        assert (event.type, event.key, event.item) == ("init", "", None)
        watcher.close()

    @pytest_twisted.ensureDeferred
    async def test_watch_delivers_puts_and_deletes_in_commit_order(self, backend) -> None:
        watcher = backend.watch(["/roles/", "/locks/"])
        assert (await watcher.next()).type == "init"
        a1 = await backend.put("/roles/a", b"1")
        await backend.put("/users/x", b"not watched")
        lock = await backend.create("/locks/l1", b"l", expiring_in(backend.clock, 60))
        a2 = await backend.update("/roles/a", b"2")
        await backend.delete("/roles/a")
        await put_all(backend, "/roles/b", "/roles/c")
        assert await backend.delete_range("/roles/") == 2
        events = [await watcher.next() for _ in range(7)]
        assert [(e.type, e.key) for e in events] == [
            ("put", "/roles/a"), ("put", "/locks/l1"), ("put", "/roles/a"),
            ("delete", "/roles/a"), ("put", "/roles/b"), ("put", "/roles/c"),
            ("delete", "/roles/b"),
        ]
        assert events[0].item == a1 and events[2].item == a2
        assert events[1].item == lock and events[1].item.expires == lock.expires
        revisions = [e.revision for e in events] + [(await watcher.next()).revision]
        assert revisions == sorted(set(revisions))
        assert events[3].revision > a2.revision  # a delete draws a revision too
        watcher.close()

    @pytest_twisted.ensureDeferred
    async def test_a_pending_next_is_fired_by_the_next_commit(self, backend) -> None:
        watcher = backend.watch([""])
        await watcher.next()
        pending = watcher.next()
        assert not pending.called
        await backend.put("/x", b"1")
        assert (await pending).key == "/x"
        watcher.close()

    @pytest_twisted.ensureDeferred
    async def test_every_watcher_gets_every_matching_event(self, backend) -> None:
        first, second = backend.watch(["/a/"]), backend.watch(["/a/x"])
        await first.next(), await second.next()
        await put_all(backend, "/a/x", "/a/y")
        assert [(await first.next()).key, (await first.next()).key] == ["/a/x", "/a/y"]
        assert (await second.next()).key == "/a/x"
        assert second.pending() == []
        first.close(), second.close()

    @pytest_twisted.ensureDeferred
    async def test_overflow_closes_the_watch_and_drops_the_backlog(self, backend) -> None:
        watcher = backend.watch(["/n/"], backlog=3)
        await put_all(backend, "/n/1", "/n/2", "/n/3")  # init + 3 > backlog
        assert watcher.closed_reason is not None and "overflow" in watcher.closed_reason
        with pytest.raises(WatchClosed):
            await watcher.next()  # not even the queued events: there is a gap
        assert await watcher.when_closed() == watcher.closed_reason

    @pytest_twisted.ensureDeferred
    async def test_after_a_gap_a_new_watch_and_a_reread_give_the_current_state(self, backend) -> None:
        watcher = backend.watch(["/n/"], backlog=2)
        await put_all(backend, "/n/1", "/n/2", "/n/3")
        await backend.delete("/n/2")
        with pytest.raises(WatchClosed):
            await watcher.next()
        # The consumer's recipe: watch again, wait for init, then re-read.
        again = backend.watch(["/n/"])
        assert (await again.next()).type == "init"
        state = {i.key: i for i in await backend.get_range("/n/")}
        await backend.put("/n/4", b"4")
        event = await again.next()
        state[event.key] = event.item
        assert sorted(state) == ["/n/1", "/n/3", "/n/4"]
        again.close()

    @pytest_twisted.ensureDeferred
    async def test_closing_the_backend_closes_its_watchers(self, backend) -> None:
        watcher = backend.watch([""])
        await watcher.next()
        pending = watcher.next()
        await backend.close()
        with pytest.raises(WatchClosed):
            await pending
        with pytest.raises(EdgeError):
            backend.watch([""])

    @pytest_twisted.ensureDeferred
    async def test_a_consumer_close_fails_its_pending_next(self, backend) -> None:
        watcher = backend.watch([""])
        await watcher.next()
        pending = watcher.next()
        watcher.close()
        with pytest.raises(WatchClosed):
            await pending
        await backend.put("/x", b"after")
        with pytest.raises(WatchClosed):
            await watcher.next()

    def test_watch_refuses_a_bare_string_or_no_prefix(self, backend) -> None:
        with pytest.raises(BadRequest):
            backend.watch("/roles/")
        with pytest.raises(BadRequest):
            backend.watch([])
        with pytest.raises(BadRequest):
            backend.watch([""], backlog=0)
