"""bcrypt passwords and the failed-login lockout policy."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from edgeaccess.errors import BadRequest, EdgeError
from edgeaccess.identity.passwords import (
    LockoutPolicy,
    LoginState,
    check_password,
    hash_password,
)

FAST = 4  # bcrypt cost for tests: the minimum


def test_hashed_password_checks_and_wrong_one_does_not():
    hashed = hash_password("correct horse", rounds=FAST)
    assert hashed.startswith("$2b$04$")
    assert check_password("correct horse", hashed)
    assert not check_password("correct hors", hashed)
    assert not check_password("correct horse ", hashed)


def test_same_password_hashes_differently_each_time():
    assert hash_password("password1", rounds=FAST) != hash_password("password1", rounds=FAST)


def test_non_ascii_password_of_72_bytes_is_usable():
    password = "é" * 36  # 72 bytes in UTF-8
    assert check_password(password, hash_password(password, rounds=FAST))


@pytest.mark.parametrize(
    "password, message",
    [
        ("short", "at least 8 characters"),
        ("1234567", "at least 8 characters"),
        ("a" * 73, "at most 72 bytes"),
        ("é" * 37, "at most 72 bytes"),  # 37 characters, 74 bytes
        ("password\0x", "NUL"),
    ],
)
def test_unusable_new_password_is_refused(password, message):
    with pytest.raises(BadRequest) as caught:
        hash_password(password, rounds=FAST)
    assert message in str(caught.value)
    assert password not in str(caught.value)


def test_overlong_password_does_not_match_its_72_byte_prefix():
    prefix = "a" * 72
    hashed = hash_password(prefix, rounds=FAST)
    assert check_password(prefix, hashed)
    assert not check_password(prefix + "b", hashed)


@pytest.mark.parametrize("hashed", [None, "", "not-a-hash", "$2b$04$short", "ünïcode"])
def test_missing_or_malformed_hash_never_matches(hashed):
    assert check_password("whatever1", hashed) is False


T0 = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)


def minutes(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


def fail_at(policy: LockoutPolicy, times: list[float], state: LoginState | None = None) -> LoginState:
    state = state or LoginState()
    for t in times:
        state = policy.record_failure(state, minutes(t))
    return state


@pytest.mark.parametrize(
    "failures, now, locked",
    [
        ([0, 1, 2, 3], 4, False),  # four failures: not yet
        ([0, 1, 2, 3, 4], 4, True),  # fifth failure locks
        ([0, 1, 2, 3, 4], 33.9, True),  # for 30 minutes
        ([0, 1, 2, 3, 4], 34, False),  # then unlocks
        ([0, 10, 20, 31, 40], 40, False),  # the first failure left the 30-minute window
        ([0, 10, 20, 29, 29.5], 29.5, True),
        ([], 0, False),
    ],
)
def test_lockout_after_five_failures_in_thirty_minutes(failures, now, locked):
    policy = LockoutPolicy()
    assert policy.is_locked(fail_at(policy, failures), minutes(now)) is locked


def test_lock_ends_with_fresh_attempts():
    policy = LockoutPolicy()
    state = fail_at(policy, [0, 1, 2, 3, 4])
    assert state.locked_until == minutes(34)
    assert policy.failures_left(state, minutes(10)) == 0
    assert policy.failures_left(state, minutes(34)) == 5
    state = fail_at(policy, [35, 36, 37, 38], state)
    assert not policy.is_locked(state, minutes(38))
    assert policy.failures_left(state, minutes(38)) == 1


def test_failures_while_locked_do_not_extend_the_lock():
    policy = LockoutPolicy()
    state = fail_at(policy, [0, 1, 2, 3, 4, 10, 20, 33])
    assert state.locked_until == minutes(34)


def test_success_resets_the_count():
    policy = LockoutPolicy()
    state = policy.reset(fail_at(policy, [0, 1, 2, 3]))
    assert state == LoginState()
    assert not policy.is_locked(fail_at(policy, [5, 6, 7, 8], state), minutes(8))


def test_custom_policy():
    policy = LockoutPolicy(max_failures=2, window=timedelta(minutes=1),
                           lock_duration=timedelta(hours=1))
    assert not policy.is_locked(fail_at(policy, [0, 1.5]), minutes(1.5))
    state = fail_at(policy, [0, 0.5])
    assert policy.is_locked(state, minutes(59)) and not policy.is_locked(state, minutes(60.5))


@pytest.mark.parametrize(
    "arguments",
    [{"max_failures": 0}, {"window": timedelta(0)}, {"lock_duration": timedelta(seconds=-1)}],
)
def test_nonsense_policy_is_refused(arguments):
    with pytest.raises(ValueError):
        LockoutPolicy(**arguments)


def test_naive_times_are_refused():
    with pytest.raises(ValueError):
        LockoutPolicy().record_failure(LoginState(), datetime(2025, 1, 1))


@pytest.mark.parametrize(
    "state",
    [
        LoginState(),
        LoginState(failures=(minutes(0), minutes(1))),
        LoginState(locked_until=minutes(30)),
    ],
)
def test_login_state_survives_json_storage(state):
    assert LoginState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"failures": "2025-01-01"},
        {"failures": ["yesterday"]},
        {"failures": ["2025-01-01T00:00:00"]},  # naive
        {"failures": [], "locked_until": 5},
    ],
)
def test_corrupt_login_state_is_reported(data):
    with pytest.raises(EdgeError):
        LoginState.from_dict(data)
