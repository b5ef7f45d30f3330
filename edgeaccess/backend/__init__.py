"""Storage backends: one ordered key/value contract, several drivers.

``interfaces.IBackend`` is the contract; ``memory.MemoryBackend`` is the
in-memory twin for tests; ``sqlite.SQLiteBackend`` is the embedded default.
``backend_from_url`` picks one from the ``--backend`` option.

This module also holds the small rules every driver shares, so that they
cannot drift apart: how expiry times are converted, when an item counts
as expired, how a key prefix becomes a key range, and what keys, values
and limits are accepted.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from twisted.internet.interfaces import IReactorTime

from edgeaccess.errors import BadRequest

if TYPE_CHECKING:
    from edgeaccess.backend.interfaces import IBackend

#: File name of the embedded database inside the data directory.
DEFAULT_SQLITE_NAME = "backend.sqlite3"

# The highest code point, and the surrogate block that UTF-8 (and thus
# SQLite's text) cannot hold: used to compute the end of a prefix range.
_MAX_CODE_POINT = 0x10FFFF
_SURROGATES = range(0xD800, 0xE000)


def expires_to_epoch(expires: datetime | None) -> float | None:
    """UTC epoch seconds of ``expires``; a naive datetime is taken as UTC."""
    if expires is None:
        return None
    if not isinstance(expires, datetime):
        raise BadRequest(f"expires must be a datetime, not {type(expires).__name__}")
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=timezone.utc)
    return expires.timestamp()


def epoch_to_expires(epoch: float | None) -> datetime | None:
    """The timezone-aware UTC datetime for ``epoch`` seconds (or ``None``)."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc)


def normalize_expires(expires: datetime | None) -> datetime | None:
    """``expires`` as an aware UTC datetime, exactly as it reads back from storage."""
    return epoch_to_expires(expires_to_epoch(expires))


def is_live(expires_epoch: float | None, now: float) -> bool:
    """Whether an item expiring at ``expires_epoch`` is still visible at ``now``.

    An item is expired from its expiry instant on (``expires <= now``).
    """
    return expires_epoch is None or expires_epoch > now


def check_key(key: str) -> str:
    """Refuse keys that no driver can store or order consistently."""
    if not isinstance(key, str):
        raise BadRequest(f"a key must be text, not {type(key).__name__}")
    if not key:
        raise BadRequest("a key must not be empty")
    if any(ord(char) in _SURROGATES for char in key):
        raise BadRequest("a key must be valid Unicode")
    return key


def check_prefix(prefix: str) -> str:
    """Like :func:`check_key`, but the empty prefix (everything) is allowed."""
    if prefix == "":
        return prefix
    return check_key(prefix)


def check_value(value: bytes) -> bytes:
    """Values are bytes; ``bytearray`` and ``memoryview`` are copied to bytes."""
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, bytes):
        raise BadRequest(f"a value must be bytes, not {type(value).__name__}")
    return value


def check_limit(limit: int | None) -> int | None:
    """``None`` means no limit; otherwise a non-negative integer."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise BadRequest(f"limit must be a non-negative integer or None, not {limit!r}")
    return limit


def prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``.

    Keys starting with ``prefix`` are exactly those in ``[prefix, bound)``
    under code-point order (which is also UTF-8 byte order, SQLite's
    ``BINARY`` collation). ``None`` means there is no upper bound (the
    empty prefix, or one made only of the highest code point).
    """
    stripped = prefix.rstrip(chr(_MAX_CODE_POINT))
    if not stripped:
        return None
    last = ord(stripped[-1]) + 1
    if last in _SURROGATES:
        last = _SURROGATES.stop
    return stripped[:-1] + chr(last)


def backend_from_url(
    url: str | None,
    clock: IReactorTime,
    data_dir: str | os.PathLike[str] | None,
    reactor: object = None,
    pool_size: int | None = None,
) -> IBackend:
    """Build (without opening) the backend named by ``url``.

    - ``None``, ``""`` or ``"sqlite:"``: SQLite in ``data_dir/backend.sqlite3``;
    - ``"sqlite:///abs/path.db"`` or ``"sqlite:relative.db"`` (relative to
      ``data_dir``): SQLite at that path;
    - ``"memory:"``: an in-memory backend (tests, demos; lost on exit).

    - ``"postgresql://USER:PASS@HOST:PORT/DB[?sslmode=...]"``: PostgreSQL,
      shared by several proxies (libpq URL syntax and options).

    The SQLite
    database file is created (mode 0600) when the backend is first used.

    :param clock: decides expiry.
    :param reactor: runs the SQLite thread hop (defaults as in
        :class:`~edgeaccess.backend.sqlite.SQLiteBackend`).
    :param pool_size: PostgreSQL: query connections (threads); default 4.
    :raises BadRequest: for an unknown or unusable URL.
    """
    # Imported here: the drivers import the helpers above from this package.
    from edgeaccess.backend.memory import MemoryBackend
    from edgeaccess.backend.sqlite import SQLiteBackend

    parts = urlsplit(url or "sqlite:")
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return MemoryBackend(clock)
    if scheme == "sqlite":
        path = unquote(parts.path) or DEFAULT_SQLITE_NAME
        if parts.netloc:
            raise BadRequest("use sqlite:///absolute/path or sqlite:relative/path (no host)")
        if not os.path.isabs(path):
            if data_dir is None:
                raise BadRequest(f"a relative SQLite path needs a data directory: {path}")
            path = os.path.join(os.fspath(data_dir), path)
        return SQLiteBackend(path, clock, reactor)
    if scheme in ("postgres", "postgresql"):
        from edgeaccess.backend.postgres import PostgresBackend

        if not parts.hostname and "host=" not in parts.query:
            raise BadRequest("a PostgreSQL URL needs a host: postgresql://USER:PASS@HOST:PORT/DB")
        return PostgresBackend(url, clock, reactor, max_threads=pool_size or 4)
    raise BadRequest(f"unknown backend URL scheme {parts.scheme!r} (use sqlite:, memory: or postgresql:)")
