"""Lock documents, the one matching rule, the node state and the session seam."""

from __future__ import annotations

import pytest

from edgeaccess import errors
from edgeaccess.controlplane.sessions import LiveSessions
from edgeaccess.controlplane.state import ControlState, PersistedControlState
from edgeaccess.identity.locks import matching_lock, parse_lock

NOW = 1_800_000_000.0
ID = "0" * 31 + "1"


def lock(target, **extra):
    return parse_lock({"id": extra.pop("id", ID), "target": target, "message": "m", **extra})


@pytest.mark.parametrize("locks, query, hit", [
    ([lock({"user": "alice"})], dict(user="alice", user_cluster="c"), True),
    ([lock({"user": "alice"})], dict(user="bob", user_cluster="c"), False),
    ([lock({"user": "alice"})], dict(user="alice", user_cluster="root"), False),
    ([lock({"user": "alice"}, cluster="root", id="root." + ID)],
     dict(user="alice", user_cluster="root"), True),
    ([lock({"user": "alice"}, cluster="root", id="root." + ID)],
     dict(user="alice", user_cluster="c"), False),
    ([lock({"node": "web-1"})], dict(node_names=("web-1", "uuid-1")), True),
    ([lock({"node": "uuid-1"})], dict(node_names=("web-1", "uuid-1")), True),
    ([lock({"node": "web-2"})], dict(user="alice", node_names=("web-1",)), False),
    ([lock({"user": "alice"}, expires="2027-01-15T07:00:00Z")], dict(user="alice"), False),
    ([lock({"user": "alice"}, expires="2027-01-15T09:00:00Z")], dict(user="alice"), True),
])
def test_matching_lock(locks, query, hit):
    found = matching_lock(locks, NOW, local_cluster="c", **query)
    assert (found is not None) == hit


@pytest.mark.parametrize("bad", [
    {"id": "x", "target": {"user": "a"}},
    {"id": ID, "target": {"group": "a"}},
    {"id": ID, "target": {"user": "a", "node": "b"}},
    {"id": ID, "target": {"user": "../etc"}},
    {"id": ID, "target": {"user": "a"}, "message": "m" * 600},
    {"id": ID, "target": {"user": "a"}, "expires": "tomorrow"},
    "not an object",
])
def test_malformed_locks_are_refused(bad):
    with pytest.raises(errors.BadRequest):
        parse_lock(bad)


def test_control_characters_are_taken_out_of_a_message():
    assert lock({"user": "a"}, message="line\x1b[2Jone\r\n")["message"] == "line [2Jone"


def test_a_malformed_update_changes_nothing():
    state = ControlState()
    state.apply({"type": "update", "changes": [
        {"kind": "lock", "name": ID, "value": {"id": ID, "target": {"user": "a"}}}]})
    before = dict(state.state["locks"])
    with pytest.raises(errors.BadRequest):
        state.apply({"type": "update", "changes": [
            {"kind": "lock", "name": ID, "value": None},
            {"kind": "role", "name": "dev", "value": {"metadata": {"name": "other"}}}]})
    assert state.state["locks"] == before


def test_the_state_survives_a_restart(tmp_path):
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    first = PersistedControlState(tmp_path, reactor)
    first.apply({"type": "init", "state": {"locks": {ID: {"id": ID, "target": {"node": "n"}}}}})
    second = PersistedControlState(tmp_path, reactor)
    assert [l["id"] for l in second.locks] == [ID]


def test_live_sessions_end_only_the_targets():
    sessions = LiveSessions("c")
    ended: list = []
    sessions.register(user="alice", cluster="c", node="web-1",
                      terminate=lambda m: ended.append(("alice@web-1", m)))
    sessions.register(user="bob", cluster="c", node="web-1",
                      terminate=lambda m: ended.append(("bob@web-1", m)))
    keep = sessions.register(user="bob", cluster="c", node="db-1",
                             terminate=lambda m: ended.append(("bob@db-1", m)))
    assert sessions.enforce([lock({"user": "alice"})], NOW) == 1
    assert sessions.enforce([lock({"node": "web-1"})], NOW) == 1
    assert [who for who, _ in ended] == ["alice@web-1", "bob@web-1"]
    assert ended[0][1] == "user alice is locked: m"
    keep.unregister()
    assert len(sessions) == 0
