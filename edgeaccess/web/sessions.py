"""Web sessions: what a browser's session cookie stands for.

A web session is a server-side record in the backend (``/web_sessions/ID``)
named by the SHA-256 of a random token; only the browser holds the token
(in a ``Secure; HttpOnly; SameSite=Lax`` cookie), so whoever reads the
backend cannot replay a session. The record says who the user is (name,
roles, traits, login method), when the session ends (never later than the
roles' ``max_session_ttl`` allows a certificate to live), and a CSRF token
for the session's forms.

A session ends on logout (:meth:`WebSessionStore.revoke`), at its expiry,
when its user is removed or changes password (local users: the record
keeps a digest of the password hash it was opened with), and when a lock
names its user (``lock_check``). :meth:`WebSessionStore.get` checks all of
these on every request; code that holds something open for a session
(web terminals, app sessions) subscribes with :meth:`on_end` and is told
within ``check_interval`` seconds, also of a logout on another proxy that
shares the backend.

How a Klein route of the proxy gets the current session::

    session = await store.from_request(request)      # None without a valid one
    session = await store.require(request)           # or AuthenticationFailed
    if session.csrf_ok(form_value): ...              # for state changes

Sessions are created by :meth:`WebSessionStore.login`, which goes through
the auth service's own login (password or LDAP connector, lock-out, the
``user.login`` audit event, TTL from the roles).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger

from edgeaccess import errors
from edgeaccess.identity import rbac

_log = Logger()

#: Name of the session cookie. ``__Host-``: the browser only accepts it
#: Secure, host-only (no Domain) and with Path=/, so an app on
#: ``app.<public host>`` cannot set or shadow it.
COOKIE_NAME = b"__Host-edge-session"
#: Where session records live in the backend.
PREFIX = "/web_sessions/"
#: Longest web session, further bounded by the roles' max_session_ttl.
DEFAULT_WEB_SESSION_TTL = timedelta(hours=12)
#: At most this many sessions are kept per user: the oldest go first.
MAX_SESSIONS_PER_USER = 32


def _iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def session_id_for(token: str) -> str:
    """The id (storage key) of the session a cookie token names."""
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def password_marker(password_hash: str | None) -> str:
    """A digest of a stored password hash: changes whenever the password does."""
    return hashlib.sha256((password_hash or "").encode("utf-8")).hexdigest()[:32]


def _well_formed_token(token) -> bool:
    return isinstance(token, str) and 20 <= len(token) <= 100 and all(
        c.isalnum() or c in "-_" for c in token)


@attrs.frozen
class WebSession:
    """One browser's login.

    :ivar id: hex SHA-256 of the cookie token (what the session list shows
        and revokes; the token itself is never stored).
    :ivar user: the user name.
    :ivar roles: role names at login.
    :ivar traits: the user's traits (``logins``, LDAP attributes ...).
    :ivar method: ``local`` or ``ldap``; ``connector`` names the connector.
    :ivar csrf: token every state-changing form of this session carries.
    """

    id: str
    user: str
    cluster: str
    roles: tuple[str, ...]
    traits: dict
    method: str
    connector: str | None
    created: datetime
    expires: datetime
    csrf: str
    remote_addr: str = ""
    user_agent: str = ""
    password_marker: str | None = None

    def to_dict(self) -> dict:
        return {
            "id": self.id, "user": self.user, "cluster": self.cluster,
            "roles": list(self.roles), "traits": self.traits, "method": self.method,
            "connector": self.connector, "created": _iso(self.created),
            "expires": _iso(self.expires), "csrf": self.csrf,
            "remote_addr": self.remote_addr, "user_agent": self.user_agent,
            "password_marker": self.password_marker,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "WebSession":
        return cls(
            id=data["id"], user=data["user"], cluster=data["cluster"],
            roles=tuple(data.get("roles") or ()), traits=dict(data.get("traits") or {}),
            method=data.get("method", "local"), connector=data.get("connector"),
            created=_parse_iso(data["created"]), expires=_parse_iso(data["expires"]),
            csrf=data["csrf"], remote_addr=data.get("remote_addr", ""),
            user_agent=data.get("user_agent", ""),
            password_marker=data.get("password_marker"))

    def csrf_ok(self, value) -> bool:
        """Whether ``value`` (a form field or header) is this session's CSRF token."""
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        return isinstance(value, str) and hmac.compare_digest(value, self.csrf)

    def identity(self):
        """The session's user as an X.509-style identity (leaf clusters'
        internal API and role checks take one)."""
        from edgeaccess.pki.x509ca import Identity

        logins = self.traits.get("logins") or ()
        return Identity(kind="user", name=self.user, cluster=self.cluster,
                        roles=self.roles, logins=tuple(logins), traits=self.traits)


class WebSessionStore:
    """Web sessions of one cluster, in its backend.

    :param auth: the :class:`~edgeaccess.auth.service.AuthServer` (backend,
        clock, login, roles, users).
    :param clock: ``IReactorTime``; also runs the periodic check.
    :param lock_check: optional ``async (session) -> str | None``: a
        message when a lock stops the session's user, else ``None``.
    :param check_interval: seconds between checks of sessions someone
        listens to (:meth:`on_end`).
    """

    def __init__(self, auth, clock, *, lock_check=None, check_interval: float = 1.0) -> None:
        self.auth = auth
        self.backend = auth.backend
        self.clock = clock
        self.lock_check = lock_check
        self._listeners: dict[str, list[Callable[[str], None]]] = {}
        self._checker = task.LoopingCall(self._check_watched)
        self._checker.clock = clock
        self._check_interval = check_interval
        self._checking = False

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), timezone.utc)

    # --- creating ---------------------------------------------------------

    async def login(self, *, username: str, password: str, connector: str = "local",
                    remote_addr: str = "", user_agent: str = "") -> tuple[str, WebSession]:
        """Authenticate through the auth service and open a session.

        The auth service does the password or LDAP check, the lock-out, the
        ``user.login`` audit event and the TTL (the shortest
        ``max_session_ttl`` of the roles); the certificate it signs for a
        throw-away key is only read for the user's roles and traits.

        :returns: ``(cookie token, session)``.
        :raises errors.AuthenticationFailed: wrong user or password, locked.
        """
        from cryptography import x509

        from edgeaccess.pki import keys, x509ca

        key = keys.generate_private_key()
        certs = await self.auth.login(
            username=username, password=password,
            ssh_public_key=keys.public_key_openssh(key.public_key()).decode("ascii"),
            auth=connector or "local", ttl=DEFAULT_WEB_SESSION_TTL,
            remote_addr=remote_addr)
        identity = x509ca.identity_from_certificate(
            x509.load_pem_x509_certificate(certs.tls_certificate.encode("ascii")))
        marker = None
        if connector in ("", "local", None):
            user = await self.auth.get_user(identity.name)
            marker = password_marker(user.get("password_hash"))
        return await self.create(
            user=identity.name, roles=identity.roles, traits=identity.traits,
            method="local" if marker is not None else "ldap",
            connector=None if marker is not None else connector,
            expires=certs.valid_before, remote_addr=remote_addr, user_agent=user_agent,
            password_marker=marker)

    async def create(self, *, user: str, roles: Iterable[str], traits: dict, method: str,
                     connector: str | None, expires: datetime, remote_addr: str = "",
                     user_agent: str = "", password_marker: str | None = None
                     ) -> tuple[str, WebSession]:
        """Store a new session; returns ``(cookie token, session)``."""
        token = secrets.token_urlsafe(32)
        now = self.now()
        session = WebSession(
            id=session_id_for(token), user=user, cluster=self.auth.cluster_name,
            roles=tuple(roles), traits=dict(traits), method=method, connector=connector,
            created=now, expires=min(expires, now + DEFAULT_WEB_SESSION_TTL),
            csrf=secrets.token_urlsafe(24), remote_addr=remote_addr[:64],
            user_agent=user_agent[:200], password_marker=password_marker)
        await self.backend.create(PREFIX + session.id, _dumps(session.to_dict()),
                                  expires=session.expires)
        await self._trim(user)
        _log.info("web session {id} opened for {user} from {addr}, until {expires}",
                  id=session.id[:12], user=user, addr=remote_addr,
                  expires=_iso(session.expires))
        return token, session

    async def _trim(self, user: str) -> None:
        mine = await self.list_for_user(user)
        for old in mine[:-MAX_SESSIONS_PER_USER]:
            await self.revoke(old.id, reason="too many sessions")

    # --- reading ----------------------------------------------------------

    async def _load(self, session_id: str) -> WebSession | None:
        try:
            item = await self.backend.get(PREFIX + session_id)
        except errors.NotFound:
            return None
        try:
            return WebSession.from_dict(json.loads(item.value))
        except (ValueError, KeyError, TypeError):
            _log.warn("unreadable web session record {id}; removed", id=session_id[:12])
            await self._delete(session_id)
            return None

    async def get(self, token: str) -> WebSession:
        """The valid session a cookie token names.

        :raises errors.AuthenticationFailed: no such session, or it ended
            (expired, user gone, password changed, locked); an ended one is
            removed.
        """
        if not _well_formed_token(token):
            raise errors.AuthenticationFailed("no web session")
        session = await self._load(session_id_for(token))
        if session is None:
            raise errors.AuthenticationFailed("no web session")
        reason = await self.end_reason(session)
        if reason is not None:
            await self.revoke(session.id, reason=reason)
            raise errors.AuthenticationFailed(f"the web session ended: {reason}")
        return session

    async def end_reason(self, session: WebSession) -> str | None:
        """Why ``session`` is over, or ``None`` while it is valid."""
        if session.cluster != self.auth.cluster_name:
            return "another cluster's session"
        if session.expires <= self.now():
            return "expired"
        if session.password_marker is not None:
            try:
                user = await self.auth.get_user(session.user)
            except errors.NotFound:
                return "the user was removed"
            if password_marker(user.get("password_hash")) != session.password_marker:
                return "the password was changed"
        if self.lock_check is not None:
            message = await self.lock_check(session)
            if message:
                return f"locked: {message}"
        return None

    async def list_for_user(self, user: str) -> list[WebSession]:
        """The user's sessions, oldest first."""
        found = []
        for item in await self.backend.get_range(PREFIX):
            try:
                session = WebSession.from_dict(json.loads(item.value))
            except (ValueError, KeyError, TypeError):
                continue
            if session.user == user and session.expires > self.now():
                found.append(session)
        return sorted(found, key=lambda s: s.created)

    # --- ending -----------------------------------------------------------

    async def _delete(self, session_id: str) -> bool:
        try:
            await self.backend.delete(PREFIX + session_id)
            return True
        except errors.NotFound:
            return False

    async def revoke(self, session_id: str, *, reason: str = "logged out") -> None:
        """End a session: remove its record and tell who holds it open."""
        removed = await self._delete(session_id)
        if removed:
            _log.info("web session {id} ended: {reason}", id=session_id[:12], reason=reason)
        self._notify(session_id, reason)

    async def revoke_user(self, user: str, *, reason: str) -> int:
        """End every session of ``user``; returns how many there were."""
        sessions = await self.list_for_user(user)
        for session in sessions:
            await self.revoke(session.id, reason=reason)
        return len(sessions)

    # --- listeners (open terminals, app sessions) --------------------------

    def on_end(self, session_id: str, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(reason)`` once when the session ends.

        :returns: a function that unsubscribes.
        """
        self._listeners.setdefault(session_id, []).append(callback)
        if not self._checker.running:
            self._checker.start(self._check_interval, now=False)

        def unsubscribe() -> None:
            callbacks = self._listeners.get(session_id, [])
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks:
                self._listeners.pop(session_id, None)
            if not self._listeners and self._checker.running:
                self._checker.stop()

        return unsubscribe

    def _notify(self, session_id: str, reason: str) -> None:
        for callback in self._listeners.pop(session_id, []):
            try:
                callback(reason)
            except Exception:
                _log.failure("web session end listener failed")
        if not self._listeners and self._checker.running:
            self._checker.stop()

    def _check_watched(self):
        if self._checking:
            return None
        self._checking = True
        d = defer.Deferred.fromCoroutine(self._check_all(list(self._listeners)))

        def done(result):
            self._checking = False
            return result

        d.addBoth(done)
        d.addErrback(lambda f: _log.failure("checking open web sessions failed", f))
        return None

    async def _check_all(self, session_ids: list[str]) -> None:
        for session_id in session_ids:
            session = await self._load(session_id)
            reason = "logged out" if session is None else await self.end_reason(session)
            if reason is not None:
                await self.revoke(session_id, reason=reason)

    def stop(self) -> None:
        if self._checker.running:
            self._checker.stop()

    # --- requests ---------------------------------------------------------

    async def from_request(self, request) -> WebSession | None:
        """The request's valid session (from its cookie), or ``None``."""
        token = request.getCookie(COOKIE_NAME)
        if not token:
            return None
        try:
            return await self.get(token.decode("ascii", "replace"))
        except errors.AuthenticationFailed:
            return None

    async def require(self, request) -> WebSession:
        """The request's valid session, or :class:`errors.AuthenticationFailed`."""
        session = await self.from_request(request)
        if session is None:
            raise errors.AuthenticationFailed("log in first")
        return session

    def set_cookie(self, request, token: str, session: WebSession) -> None:
        """Give the browser the session cookie (lasting as long as the session)."""
        max_age = max(0, int((session.expires - self.now()).total_seconds()))
        request.addCookie(COOKIE_NAME, token.encode("ascii"), path=b"/", secure=True,
                          httpOnly=True, sameSite="lax", max_age=str(max_age).encode())

    def clear_cookie(self, request) -> None:
        request.addCookie(COOKIE_NAME, b"", path=b"/", secure=True, httpOnly=True,
                          sameSite="lax", max_age=b"0")

    async def checker_for(self, session: WebSession) -> rbac.AccessChecker:
        """The session's current roles as an access checker (roles are re-read,
        so a role edited since login applies at once)."""
        return rbac.AccessChecker(await self.auth.get_roles(session.roles), session.traits)


def _dumps(value) -> bytes:
    return json.dumps(value, sort_keys=True).encode("utf-8")



def lock_check_for(auth):
    """The ``lock_check`` hook over the auth service's locks, or ``None`` when
    this auth service has none (``list_locks``, the live control plane)."""
    if not callable(getattr(auth, "list_locks", None)):
        return None

    async def check(session: WebSession) -> str | None:
        from edgeaccess.identity import locks

        lock = locks.matching_lock(await auth.list_locks(), auth.clock.seconds(),
                                   user=session.user, user_cluster=session.cluster,
                                   local_cluster=auth.cluster_name)
        if lock is None:
            return None
        return lock.get("message") or f"lock {lock.get('id', '')}"

    return check
