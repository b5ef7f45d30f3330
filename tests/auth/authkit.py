"""Helpers for the auth service's unit tests: no sockets, no threads, a fake clock.

The auth service hops to a thread pool for bcrypt. Here the "thread pool"
runs the call inline and the "reactor" delivers the result inline, so an
``async`` method of :class:`AuthServer` over a :class:`MemoryBackend`
(whose Deferreds have already fired) completes synchronously:
:func:`resolve` returns its result or raises its error.
"""

from __future__ import annotations

from datetime import datetime, timezone

import attrs
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from edgeaccess.auth.service import AuthServer
from edgeaccess.identity import kinds  # noqa: F401  (registers the resource kinds)
from edgeaccess.pki import keys, x509ca
from edgeaccess.pki.authority import CertificateAuthority

CLUSTER = "unit"
#: 2027-01-15T08:00:00Z: a fake "now" far from the epoch (certificates start 1 min earlier).
START = 1_800_000_000.0
PASSWORD = "correct horse battery"


class InlineThreadPool:
    """Runs ``callInThreadWithCallback`` work at once, on the calling thread."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def callInThreadWithCallback(self, on_result, func, *args, **kwargs):
        self.calls.append(getattr(func, "__name__", repr(func)))
        try:
            result = func(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class InlineReactor:
    """``callFromThread`` that calls at once (the other half of the thread hop)."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


def resolve(coroutine):
    """Run a coroutine that must finish synchronously; return or raise its outcome."""
    d = Deferred.fromCoroutine(coroutine)
    outcome: list = []
    d.addBoth(outcome.append)
    assert outcome, "the coroutine waited on something that never fires"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


@attrs.define
class AuditRecorder:
    """Collects ``emit(event, **fields)`` calls."""

    events: list = attrs.Factory(list)

    def emit(self, event: str, **fields) -> None:
        self.events.append((event, fields))

    def named(self, event: str) -> list[dict]:
        return [fields for name, fields in self.events if name == event]


def make_authority(cluster: str = CLUSTER) -> CertificateAuthority:
    """The three CAs of a cluster, in memory."""
    now = datetime.fromtimestamp(START, timezone.utc)
    tls_key, tls_cert = x509ca.create_ca(cluster, now)
    return CertificateAuthority(cluster, keys.generate_private_key(),
                                keys.generate_private_key(), tls_key, tls_cert)


def add_user(auth: AuthServer, name: str, roles=("access",), logins=("root",),
             password: str | None = PASSWORD) -> None:
    """Create a user and (unless ``password`` is None) set the password."""
    resolve(auth.create_user(name, list(roles), list(logins)))
    if password is not None:
        resolve(auth.set_password(name, password))
