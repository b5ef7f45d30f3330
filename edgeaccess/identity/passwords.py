"""Local passwords (bcrypt) and the lockout after repeated failed logins.

bcrypt reads at most 72 bytes of a password; rather than silently ignore the rest (two
passwords sharing their first 72 bytes would both work), longer passwords are refused.

The lockout policy is pure: it turns a :class:`LoginState` and the current time into a new
state, and the caller stores the state (:meth:`LoginState.to_dict` is JSON-ready).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import attrs
import bcrypt
from twisted.logger import Logger

from edgeaccess.errors import BadRequest, EdgeError

_log = Logger()

MIN_PASSWORD_LENGTH = 8
#: bcrypt's limit, in UTF-8 bytes.
MAX_PASSWORD_BYTES = 72
#: Cost of new hashes (2**12 rounds, ~0.25 s here); tests pass a lower one.
DEFAULT_ROUNDS = 12

# A valid cost-12 hash of a random password, checked against when the user has no hash, so
# that "no such user" takes as long as "wrong password".
_DUMMY_HASH = b"$2b$12$wTAZRJ2j1RGfsr5SQOh4heCosKecmFAd4IgPedGDVdSz4uvZlz1EK"


def validate_new_password(password: str) -> bytes:
    """Check a password being set and return its UTF-8 bytes.

    :raises BadRequest: shorter than 8 characters, longer than 72 bytes, or containing a
        NUL character. The message never contains the password.
    """
    if not isinstance(password, str):
        raise BadRequest("the password must be a string")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise BadRequest(f"the password must be at least {MIN_PASSWORD_LENGTH} characters long")
    encoded = password.encode("utf-8", "surrogatepass")
    if len(encoded) > MAX_PASSWORD_BYTES:
        raise BadRequest(f"the password must be at most {MAX_PASSWORD_BYTES} bytes long (UTF-8)")
    if b"\0" in encoded:
        raise BadRequest("the password must not contain a NUL character")
    return encoded


def hash_password(password: str, *, rounds: int = DEFAULT_ROUNDS) -> str:
    """Hash a new password with bcrypt (random salt) after :func:`validate_new_password`.

    This takes a noticeable time by design: call it off the reactor thread in servers.
    """
    encoded = validate_new_password(password)
    return bcrypt.hashpw(encoded, bcrypt.gensalt(rounds)).decode("ascii")


def check_password(password: str, hashed: str | None) -> bool:
    """True if ``password`` matches the bcrypt hash ``hashed`` (compared in constant time).

    With ``hashed=None`` (unknown user, or a user without a password) a dummy hash is still
    checked, so that the answer takes as long, and the result is False. A malformed hash
    or a password bcrypt cannot take (over 72 bytes, NUL) is also False.
    """
    if not isinstance(password, str):
        return False
    encoded = password.encode("utf-8", "surrogatepass")
    usable = len(encoded) <= MAX_PASSWORD_BYTES and b"\0" not in encoded
    if hashed is None or not usable:
        bcrypt.checkpw(b"edgeaccess-not-a-password", _DUMMY_HASH)
        return False
    try:
        return bcrypt.checkpw(encoded, hashed.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        _log.warn("stored password hash is malformed")
        return False


def _aware(moment: datetime, what: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime")
    return moment


@attrs.frozen
class LoginState:
    """Recent failed logins of one user and the end of their lockout, if locked."""

    failures: tuple[datetime, ...] = attrs.field(default=(), converter=tuple)
    locked_until: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (RFC 3339 times)."""
        return {
            "failures": [moment.isoformat() for moment in self.failures],
            "locked_until": None if self.locked_until is None else self.locked_until.isoformat(),
        }

    @classmethod
    def from_dict(cls, data: object) -> LoginState:
        """Inverse of :meth:`to_dict`.

        :raises EdgeError: the stored data is not a login state.
        """
        try:
            if not isinstance(data, dict):
                raise ValueError("not a mapping")
            failures = data.get("failures", [])
            if not isinstance(failures, list):
                raise ValueError("failures is not a list")
            locked = data.get("locked_until")
            return cls(
                failures=tuple(
                    _aware(datetime.fromisoformat(moment), "failure") for moment in failures
                ),
                locked_until=None
                if locked is None
                else _aware(datetime.fromisoformat(locked), "locked_until"),
            )
        except (TypeError, ValueError) as error:
            raise EdgeError(f"stored login state is invalid: {error}") from None


@attrs.frozen
class LockoutPolicy:
    """Lock an account after ``max_failures`` failed logins within ``window``.

    The lock lasts ``lock_duration``; the failures that caused it are then forgotten, so
    the user gets ``max_failures`` new attempts once it ends. Failures while locked do not
    extend the lock (an attacker could otherwise keep a user out forever at no cost).
    All times must be timezone-aware.
    """

    max_failures: int = 5
    window: timedelta = timedelta(minutes=30)
    lock_duration: timedelta = timedelta(minutes=30)

    def __attrs_post_init__(self) -> None:
        if self.max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        if self.window <= timedelta(0) or self.lock_duration <= timedelta(0):
            raise ValueError("window and lock_duration must be positive")

    def is_locked(self, state: LoginState, now: datetime) -> bool:
        """True while the account is locked."""
        _aware(now, "now")
        return state.locked_until is not None and now < state.locked_until

    def record_failure(self, state: LoginState, now: datetime) -> LoginState:
        """The state after a failed login at ``now``."""
        if self.is_locked(state, now):
            return state
        recent = tuple(moment for moment in state.failures if now - moment < self.window)
        failures = recent + (now,)
        if len(failures) >= self.max_failures:
            return LoginState(failures=(), locked_until=now + self.lock_duration)
        return LoginState(failures=failures, locked_until=None)

    def reset(self, state: LoginState) -> LoginState:
        """The state after a successful login (or an administrator's unlock): clean."""
        return LoginState()

    def failures_left(self, state: LoginState, now: datetime) -> int:
        """How many more failures within the window lock the account (0 while locked)."""
        if self.is_locked(state, now):
            return 0
        recent = [moment for moment in state.failures if now - moment < self.window]
        return self.max_failures - len(recent)
