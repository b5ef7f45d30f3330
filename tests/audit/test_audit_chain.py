"""The hash-chained audit log over an in-memory backend: append, verify, ingest, search."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from auditkit import Counter, clock, run
from edgeaccess import errors
from edgeaccess.audit import events as ev
from edgeaccess.audit.log import HEAD_KEY, AuditLog, event_key
from edgeaccess.backend.interfaces import IAtomicUpdate, IBackend
from edgeaccess.backend.memory import MemoryBackend
from zope.interface import implementer_only


@pytest.fixture
def fake_clock():
    return clock()


@implementer_only(IBackend)
class PlainMemoryBackend(MemoryBackend):
    """A backend without transactions (as SQLite's): appends take the
    create()-and-retry path."""

    atomic_update = None


@pytest.fixture(params=["transactions", "create-and-retry"])
def backend(request, fake_clock):
    """Both append paths: one transaction per append (IAtomicUpdate, as on
    PostgreSQL), and create()-with-retry."""
    if request.param == "transactions":
        return MemoryBackend(fake_clock)
    return PlainMemoryBackend(fake_clock)


@pytest.fixture
def log(backend, fake_clock):
    return AuditLog(backend, "example", fake_clock, new_id=Counter())


def emit_many(log, n, clock=None):
    for i in range(n):
        run(log.emit("user.login", user=f"u{i}", success=True))
        if clock is not None:
            clock.advance(60)


def stored(backend, seq):
    return json.loads(run(backend.get(event_key(seq))).value)


def put(backend, seq, record):
    run(backend.put(event_key(seq), json.dumps(record).encode()))


def test_events_are_chained_from_genesis(log, backend):
    emit_many(log, 3)
    records = [stored(backend, n) for n in (1, 2, 3)]
    assert records[0]["prev_hash"] == ev.GENESIS_HASH
    for before, after in zip(records, records[1:]):
        assert after["prev_hash"] == before["hash"]
    for record in records:
        assert record["hash"] == ev.chain_hash(record["prev_hash"], record["event"])
    assert json.loads(run(backend.get(HEAD_KEY)).value) == {"seq": 3, "hash": records[2]["hash"]}
    result = run(log.verify())
    assert result.ok and result.events == 3 and result.head_seq == 3


def test_emitted_events_carry_the_spec_fields(log, backend):
    event = run(log.emit("user.login", user="alice", success=False, remote_addr="10.1.2.3",
                         connector=None))
    assert event == stored(backend, 1)["event"]
    assert set(event) == {"id", "event", "time", "cluster", "user", "success", "remote_addr"}
    assert event["cluster"] == "example" and event["event"] == "user.login"
    assert event["time"] == "2023-11-14T22:13:20.000000Z"


def test_canonical_json_is_independent_of_key_order():
    assert ev.canonical_json({"b": 1, "a": "é"}) == ev.canonical_json({"a": "é", "b": 1})
    assert ev.canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()


def test_verify_names_an_altered_event(log, backend):
    emit_many(log, 5)
    record = stored(backend, 3)
    record["event"]["user"] = "mallory"
    put(backend, 3, record)
    result = run(log.verify())
    assert not result.ok
    first = result.problems[0]
    assert (first.seq, first.kind) == (3, "altered")
    assert "event 3" in first.message and record["event"]["id"] in first.message


def test_verify_names_a_removed_event(log, backend):
    emit_many(log, 5)
    run(backend.delete(event_key(2)))
    first = run(log.verify()).problems[0]
    assert (first.seq, first.kind) == (2, "removed")
    assert "event 2 was removed" in first.message


def test_verify_names_a_removal_hidden_by_renumbering(log, backend):
    emit_many(log, 4)
    third, fourth = stored(backend, 3), stored(backend, 4)
    third["seq"], fourth["seq"] = 2, 3
    put(backend, 2, third)
    put(backend, 3, fourth)
    run(backend.delete(event_key(4)))
    run(backend.put(HEAD_KEY, json.dumps({"seq": 3, "hash": fourth["hash"]}).encode()))
    first = run(log.verify()).problems[0]
    assert (first.seq, first.kind) == (2, "removed")


def test_verify_names_an_inserted_event(log, backend):
    emit_many(log, 3)
    records = [stored(backend, n) for n in (1, 2, 3)]
    forged_event = {**records[1]["event"], "id": "forged", "user": "ghost"}
    forged = {"seq": 2, "prev_hash": records[0]["hash"],
              "hash": ev.chain_hash(records[0]["hash"], forged_event), "event": forged_event}
    put(backend, 2, forged)
    put(backend, 3, {**records[1], "seq": 3})
    put(backend, 4, {**records[2], "seq": 4})
    run(backend.put(HEAD_KEY, json.dumps({"seq": 4, "hash": records[2]["hash"]}).encode()))
    first = run(log.verify()).problems[0]
    assert (first.seq, first.kind) == (2, "inserted")
    assert "event 2 was inserted" in first.message


def test_verify_names_reordered_events(log, backend):
    emit_many(log, 4)
    second, third = stored(backend, 2), stored(backend, 3)
    put(backend, 2, {**third, "seq": 2})
    put(backend, 3, {**second, "seq": 3})
    first = run(log.verify()).problems[0]
    assert (first.seq, first.kind) == (2, "reordered")


def test_verify_names_swapped_records_that_kept_their_numbers(log, backend):
    emit_many(log, 4)
    second, third = stored(backend, 2), stored(backend, 3)
    put(backend, 2, third)
    put(backend, 3, second)
    first = run(log.verify()).problems[0]
    assert (first.seq, first.kind) == (2, "reordered")


def test_verify_sees_events_cut_from_the_end(log, backend):
    emit_many(log, 4)
    run(backend.delete(event_key(4)))
    first = run(log.verify()).problems[0]
    assert (first.seq, first.kind) == (4, "removed")


def test_verify_reports_every_problem_first_one_first(log, backend):
    emit_many(log, 6)
    run(backend.delete(event_key(5)))
    record = stored(backend, 2)
    record["event"]["success"] = False
    put(backend, 2, record)
    problems = run(log.verify()).problems
    assert [(p.seq, p.kind) for p in problems] == [(2, "altered"), (5, "removed")]


def test_ingesting_the_same_batch_twice_stores_it_once(log, backend):
    batch = [{"id": f"node-ev-{i}", "event": "exec", "time": "2024-01-01T00:00:00Z",
              "cluster": "example", "command": f"echo {i}", "session_id": "s1"}
             for i in range(3)]
    assert run(log.ingest(batch, node_name="n1", node_id="uuid-1")) == \
        ["node-ev-0", "node-ev-1", "node-ev-2"]
    assert run(log.ingest(batch[1:] + [{**batch[0], "id": "node-ev-3"}],
                          node_name="n1")) == ["node-ev-1", "node-ev-2", "node-ev-3"]
    events = run(log.search())
    assert [e["id"] for e in events] == ["node-ev-0", "node-ev-1", "node-ev-2", "node-ev-3"]
    assert all(e["node"] == "n1" for e in events)
    assert run(log.verify()).ok


def test_a_node_cannot_report_other_event_types_or_pose_as_another_node(log):
    with pytest.raises(errors.BadRequest, match="may not report 'user.login'"):
        run(log.ingest([{"id": "x1", "event": "user.login", "time": "2024-01-01T00:00:00Z"}],
                       node_name="n1"))
    [stored_id] = run(log.ingest([{"id": "x2", "event": "exec", "node": "other",
                                   "time": "2024-01-01T00:00:00Z"}], node_name="n1"))
    assert run(log.search())[0]["node"] == "n1"


@pytest.mark.parametrize("bad", [
    "not an object",
    {"event": "exec", "time": "2024-01-01T00:00:00Z"},
    {"id": "a b", "event": "exec", "time": "2024-01-01T00:00:00Z"},
    {"id": "x", "event": "Exec!", "time": "2024-01-01T00:00:00Z"},
    {"id": "x", "event": "exec", "time": "yesterday"},
    {"id": "x", "event": "exec", "time": "2024-01-01T00:00:00Z", "Bad Field": 1},
    {"id": "x", "event": "exec", "time": "2024-01-01T00:00:00Z", "command": "x" * 20000},
    {"id": "x", "event": "exec", "time": "2024-01-01T00:00:00Z", "cluster": "other"},
])
def test_malformed_events_are_refused_and_nothing_is_stored(log, bad):
    good = {"id": "good", "event": "exec", "time": "2024-01-01T00:00:00Z"}
    with pytest.raises(errors.BadRequest):
        run(log.ingest([good, bad], node_name="n1"))
    assert run(log.search()) == []


def test_a_writer_that_died_before_moving_the_head_is_repaired(backend, fake_clock):
    first = AuditLog(backend, "example", fake_clock, new_id=Counter("a"))
    emit_many(first, 2)
    # An event written, but neither its id indexed nor the head moved.
    orphan_event = {"id": "orphan", "event": "exec", "time": "2024-01-01T00:00:00Z",
                    "cluster": "example"}
    prev = stored(backend, 2)["hash"]
    put(backend, 3, {"seq": 3, "prev_hash": prev, "hash": ev.chain_hash(prev, orphan_event),
                     "event": orphan_event})
    second = AuditLog(backend, "example", fake_clock, new_id=Counter("b"))
    assert run(second.ingest([orphan_event])) == ["orphan"]  # no duplicate
    run(second.emit("user.login", user="x"))
    assert [r["seq"] for r in run(second.records())] == [1, 2, 3, 4]
    assert run(second.verify()).ok


def test_two_writers_on_one_backend_keep_one_chain(backend, fake_clock):
    a = AuditLog(backend, "example", fake_clock, new_id=Counter("a"))
    b = AuditLog(backend, "example", fake_clock, new_id=Counter("b"))
    for _ in range(3):
        run(a.emit("user.login", user="a"))
        run(b.emit("user.login", user="b"))
    records = run(a.records())
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert sorted(r["event"]["id"] for r in records) == \
        ["a-1", "a-2", "a-3", "b-1", "b-2", "b-3"]
    assert run(a.verify()).ok


def test_search_filters(log, fake_clock):
    start = log.now()
    run(log.emit("user.login", user="alice", success=True))
    fake_clock.advance(3600)
    run(log.ingest([{"id": "e1", "event": "session.start", "time": ev.rfc3339(log.now()),
                     "user": "alice", "session_id": "s1"},
                    {"id": "e2", "event": "exec", "time": ev.rfc3339(log.now()),
                     "user": "bob", "session_id": "s2", "command": "ls"}],
                   node_name="n1", node_id="u1"))
    ids = lambda **kw: [e["id"] for e in run(log.search(**kw))]  # noqa: E731
    assert ids(user="alice") == ["ev-1", "e1"]
    assert ids(types=["exec"]) == ["e2"]
    assert ids(types=["session."]) == ["e1"]
    assert ids(node="n1") == ["e1", "e2"] == ids(node="u1")
    assert ids(session_id="s2") == ["e2"]
    assert ids(since=start + timedelta(minutes=30)) == ["e1", "e2"]
    assert ids(until=start + timedelta(minutes=30)) == ["ev-1"]
    assert ids(limit=1) == ["e2"]


def test_an_emit_that_cannot_be_stored_is_logged_not_raised(fake_clock):
    backend = MemoryBackend(fake_clock)
    log = AuditLog(backend, "example", fake_clock)
    run(backend.close())
    assert run(log.emit("user.login", user="x")) is None


# --- relinking: an attacker who rewrites links, not only contents -------------

def test_chain_hash_commits_to_the_previous_link():
    event = {"id": "e1", "event": "user.login"}
    assert ev.chain_hash("a" * 64, event) != ev.chain_hash("b" * 64, event)
    assert ev.chain_hash(ev.GENESIS_HASH, event) != ev.chain_hash("a" * 64, event)


def test_an_event_rehashed_but_not_relinked_is_caught(log, backend):
    emit_many(log, 5)
    record = stored(backend, 3)
    record["event"]["user"] = "mallory"
    record["hash"] = ev.chain_hash(record["prev_hash"], record["event"])
    put(backend, 3, record)
    result = run(log.verify())
    assert not result.ok
    first = result.problems[0]
    assert first.seq == 4 and "does not chain to event 3" in first.message


def test_links_rewritten_around_a_removed_event_are_caught(log, backend):
    # Event 2 is removed, the later ones renumbered and their prev_hash
    # pointed at their new predecessor; their hashes (and the head's) are
    # kept. Only a hash that covers prev_hash shows the rewritten links.
    emit_many(log, 4)
    records = [stored(backend, n) for n in (1, 2, 3, 4)]
    third = {**records[2], "seq": 2, "prev_hash": records[0]["hash"]}
    fourth = {**records[3], "seq": 3, "prev_hash": third["hash"]}
    put(backend, 2, third)
    put(backend, 3, fourth)
    run(backend.delete(event_key(4)))
    run(backend.put(HEAD_KEY, json.dumps({"seq": 3, "hash": fourth["hash"]}).encode()))
    result = run(log.verify())
    assert not result.ok
    assert (result.problems[0].seq, result.problems[0].kind) == (2, "altered")


def test_a_wrong_prev_hash_is_caught_even_when_every_later_link_is_recomputed(log, backend):
    emit_many(log, 5)
    records = {n: stored(backend, n) for n in range(1, 6)}
    # Event 3 now claims event 1 as its predecessor; 3, 4, 5 and the head
    # are all rehashed and relinked consistently from there.
    prev = records[1]["hash"]
    for seq in (3, 4, 5):
        record = {**records[seq], "prev_hash": prev}
        record["hash"] = prev = ev.chain_hash(prev, record["event"])
        put(backend, seq, record)
    run(backend.put(HEAD_KEY, json.dumps({"seq": 5, "hash": prev}).encode()))
    result = run(log.verify())
    assert not result.ok
    assert result.problems[0].seq in (2, 3)


def test_the_two_append_paths_are_the_ones_tested(backend, log):
    assert log._atomic == IAtomicUpdate.providedBy(backend)


def test_events_waiting_for_a_transaction_share_the_next_one(fake_clock):
    """Group commit: what arrives while a transaction runs goes in the next."""
    from twisted.internet.defer import Deferred

    backend = MemoryBackend(fake_clock)
    held: list = []
    real = backend.atomic_update

    def slow_update(compute):
        gate = Deferred()
        held.append(gate)
        return gate.addCallback(lambda _: real(compute))

    backend.atomic_update = slow_update
    log = AuditLog(backend, "example", fake_clock, new_id=Counter())
    results = [log.emit("user.login", user=f"u{i}") for i in range(5)]
    assert len(held) == 1  # the first event's transaction is running
    held[0].callback(None)
    assert len(held) == 2  # the four others, together
    held[1].callback(None)
    assert all(run(d) for d in results)
    assert [r["seq"] for r in run(log.records())] == [1, 2, 3, 4, 5]
    assert run(log.verify()).ok


def test_events_emitted_during_an_outage_are_kept_and_stored_when_it_ends(fake_clock):
    """The backend refuses every transaction for a while (longer than its own
    retries): emitted events wait in memory and are stored, in order, once
    it takes them again; a node's batch fails at once (the node resends)."""
    from twisted.internet.defer import Deferred

    from edgeaccess import errors as edge_errors

    backend = MemoryBackend(fake_clock)
    real = backend.atomic_update
    down = {"value": True}

    def flaky(compute):
        if down["value"]:
            from twisted.internet.defer import fail

            return fail(edge_errors.EdgeError("storage failure: the server is gone"))
        return real(compute)

    backend.atomic_update = flaky
    log = AuditLog(backend, "example", fake_clock, new_id=Counter())
    emitted = [log.emit("user.login", user=f"u{i}") for i in range(3)]
    node_batch = Deferred.fromCoroutine(log.ingest([
        {"id": "n-1", "event": "exec", "time": "2024-01-01T00:00:00Z", "cluster": "example"}],
        node_name="node1"))
    failures = []
    node_batch.addErrback(failures.append)
    fake_clock.advance(1)  # the next attempt: the node's batch fails, the emitted wait
    assert failures and not any(d.called for d in emitted)
    fake_clock.advance(30)
    fake_clock.advance(30)
    assert not any(d.called for d in emitted)
    down["value"] = False
    fake_clock.advance(10)
    assert all(d.called for d in emitted)
    assert [r["event"]["user"] for r in run(log.records())] == ["u0", "u1", "u2"]
    assert run(log.verify()).ok
