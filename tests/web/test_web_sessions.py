"""Web sessions over the in-memory backend and a fake clock: login through the
auth service, expiry bounded by the roles, logout, password change, user
removal, locks, and listeners told when a session ends."""

from __future__ import annotations

from datetime import timedelta

import pytest
import yaml

from authkit import PASSWORD, add_user, resolve
from edgeaccess import errors
from edgeaccess.web.sessions import PREFIX, WebSessionStore, session_id_for


def result_of(d):
    """The result of a Deferred that has fired (the memory backend's)."""
    out = []
    d.addBoth(out.append)
    return out[0]


@pytest.fixture
def store(auth, clock):
    return WebSessionStore(auth, clock)


def test_login_opens_a_session_the_token_finds(auth, store, audit):
    add_user(auth, "alice", logins=("alice",))
    token, session = resolve(store.login(username="alice", password=PASSWORD,
                                         remote_addr="192.0.2.1"))
    assert session.user == "alice" and session.roles == ("access",)
    assert session.traits["logins"] == ["alice"]
    assert resolve(store.get(token)) == session
    # The backend holds the token's digest, never the token.
    stored = result_of(auth.backend.get_range(PREFIX))
    assert [i.key for i in stored] == [PREFIX + session_id_for(token)]
    assert token.encode() not in stored[0].value
    assert audit.named("user.login")[-1]["success"] is True


def test_wrong_password_opens_nothing(auth, store, audit):
    add_user(auth, "alice")
    with pytest.raises(errors.AuthenticationFailed):
        resolve(store.login(username="alice", password="wrong"))
    assert result_of(auth.backend.get_range(PREFIX)) == []
    assert audit.named("user.login")[-1]["success"] is False


def test_expiry_is_bounded_by_the_roles_max_session_ttl(auth, store, clock):
    resolve(auth.upsert_resource(yaml.safe_load("""
kind: role
version: v1
metadata: {name: short}
spec:
  options: {max_session_ttl: 30m}
  allow: {logins: [root], node_labels: {'*': '*'}}
""")))
    add_user(auth, "bob", roles=("short",))
    token, session = resolve(store.login(username="bob", password=PASSWORD))
    assert session.expires - store.now() == timedelta(minutes=30)
    clock.advance(29 * 60)
    resolve(store.get(token))
    clock.advance(61)
    with pytest.raises(errors.AuthenticationFailed):
        resolve(store.get(token))


def test_logout_password_change_and_removal_end_sessions(auth, store, clock):
    add_user(auth, "carol")
    first, s1 = resolve(store.login(username="carol", password=PASSWORD))
    clock.advance(1)
    second, s2 = resolve(store.login(username="carol", password=PASSWORD))
    assert [s.id for s in resolve(store.list_for_user("carol"))] == [s1.id, s2.id]
    resolve(store.revoke(s1.id))
    with pytest.raises(errors.AuthenticationFailed):
        resolve(store.get(first))
    resolve(store.get(second))
    resolve(auth.set_password("carol", "another password 2"))
    with pytest.raises(errors.AuthenticationFailed, match="password was changed"):
        resolve(store.get(second))
    third, _ = resolve(store.login(username="carol", password="another password 2"))
    resolve(auth.delete_user("carol"))
    with pytest.raises(errors.AuthenticationFailed, match="removed"):
        resolve(store.get(third))


def test_a_lock_ends_the_session(auth, clock):
    locked = set()

    async def lock_check(session):
        return "maintenance" if session.user in locked else None

    store = WebSessionStore(auth, clock, lock_check=lock_check)
    add_user(auth, "dave")
    token, _ = resolve(store.login(username="dave", password=PASSWORD))
    locked.add("dave")
    with pytest.raises(errors.AuthenticationFailed, match="locked: maintenance"):
        resolve(store.get(token))


def test_listeners_hear_of_logout_at_once_and_of_other_ends_within_an_interval(auth, store,
                                                                              clock):
    add_user(auth, "erin")
    _, s1 = resolve(store.login(username="erin", password=PASSWORD))
    _, s2 = resolve(store.login(username="erin", password=PASSWORD))
    heard = []
    store.on_end(s1.id, lambda reason: heard.append((1, reason)))
    store.on_end(s2.id, lambda reason: heard.append((2, reason)))
    resolve(store.revoke(s1.id))
    assert heard == [(1, "logged out")]
    # Another proxy on the same backend logs s2 out: only the record goes.
    result_of(auth.backend.delete(PREFIX + s2.id))
    clock.advance(1.0)
    assert heard == [(1, "logged out"), (2, "logged out")]


def test_malformed_tokens_are_refused_before_any_lookup(store):
    for token in ("", "x", "a" * 500, "../../etc", "tok en" * 5):
        with pytest.raises(errors.AuthenticationFailed):
            resolve(store.get(token))
