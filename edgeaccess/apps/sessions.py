"""App sessions, the apps this proxy can reach, and who may open which connection.

An app session is what ``edge apps login N`` creates: a record in the backend
(``/app_sessions/ID``, expiring with it) and a client certificate of kind
``app`` whose uuid is the session id. The proxy accepts that certificate on
``N.<public host>`` only, and only while the session exists: ``edge apps
logout`` deletes it and closes its open connections (WebSockets included).

:class:`AppGateway` answers the web port's two questions: is this server
name an app host (:meth:`AppGateway.app_name_for`), and may this connection
reach it (:meth:`AppGateway.authorize`, and per request ``AppAccess.check``).
Apps of a leaf cluster are relayed to the leaf's proxy through its tunnel,
which checks them against its own roles (mapped from the user's) and signs
the assertion with its own key (:meth:`AppGateway.relayed_authorizer`).
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timedelta, timezone
from typing import Any, Callable
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.logger import Logger

from edgeaccess import errors, tls
from edgeaccess.apps.proxy import (
    AppAccess,
    AppTimeouts,
    BrowserLaunch,
    RetryOnNewConnection,
    parse_preamble,
    server_name,
)
from edgeaccess.apps.requestaudit import request_fields
from edgeaccess.apps.spec import _APP_NAME
from edgeaccess.identity import rbac
from edgeaccess.pki import x509ca

_log = Logger()

SESSIONS_PREFIX = "/app_sessions/"
#: Per-request checks use what was read at most this long ago (seconds).
RECHECK = 1.0
#: Longest app session (also capped by the user's own certificate).
MAX_APP_SESSION = timedelta(hours=12)
#: Shortest app session a client may ask for (``edge apps login --ttl``).
MIN_APP_SESSION = timedelta(seconds=1)
#: A session's record outlives its expiry by this much, so that the proxy
#: that ends it (its timer, or any proxy's scan) can claim it with a delete
#: and audit ``app.session.end`` exactly once.
EXPIRY_GRACE = timedelta(minutes=10)
#: Every proxy reads all app sessions this often (seconds) and ends those
#: whose expiry, lock, roles or web session says so, whoever created them.
SCAN_INTERVAL = 10.0


class AppIndex:
    """The apps announced by the nodes whose reverse tunnel is up here.

    :param registry: the tunnel server's ``TunnelRegistry``.
    """

    def __init__(self, registry) -> None:
        self._by_name: dict[str, tuple[Any, Any]] = {}
        registry.subscribe(self._up, self._down)
        for tunnel in registry.connected():
            self._up(tunnel)

    def _up(self, tunnel) -> None:
        identity, inventory = tunnel.identity, tunnel.inventory
        if identity is None or identity.kind != "node" or inventory is None:
            return
        for app in inventory.apps:
            if not _APP_NAME.match(app.name):
                _log.warn("node {node} announces app {app!r}: not a valid app name; ignored",
                          node=identity.name, app=app.name[:64])
                continue
            previous = self._by_name.get(app.name)
            if previous is not None and previous[0] is not tunnel:
                _log.warn("app {app} is announced by node {node} and by node {other}; "
                          "the newest ({node}) serves it", app=app.name, node=identity.name,
                          other=previous[0].identity.name)
            self._by_name[app.name] = (tunnel, app)

    def _down(self, tunnel) -> None:
        for name, (holder, _app) in list(self._by_name.items()):
            if holder is tunnel:
                del self._by_name[name]

    def find(self, name: str):
        """``(tunnel, App)`` of app ``name``, or None."""
        return self._by_name.get(name)

    def all(self) -> list:
        return sorted(self._by_name.values(), key=lambda entry: entry[1].name)


def app_record(tunnel, app, public_url: str, cluster: str) -> dict:
    return {"name": app.name, "uri": app.uri, "labels": dict(app.labels),
            "node": tunnel.identity.name, "cluster": cluster, "public_addr": public_url}


_UNKNOWN = (0.0, None, 0.0)


def _no_assertion_keys() -> bytes:
    raise errors.EdgeError("the app assertion key is not loaded yet")


class AppSessions:
    """App sessions in the backend, with a short-lived cache for per-request checks.

    :param backend: an ``IBackend``; :param clock: ``IReactorTime``;
    :param emit: ``emit(event_type, **fields)`` for audit events.
    """

    def __init__(self, backend, clock, emit, web_sessions=None) -> None:
        self.web_sessions = web_sessions
        self.backend = backend
        self.clock = clock
        self.emit = emit
        #: id -> (when read, the record or None, its expiry as a timestamp)
        self._cache: dict[str, tuple[float, dict | None, float]] = {}
        self._live: dict[str, set] = {}
        self._refreshing: dict[str, defer.Deferred] = {}
        #: expiry timers of the sessions this proxy knows of (id -> DelayedCall)
        self._timers: dict[str, Any] = {}
        #: app sessions whose web session is followed here (id -> unsubscribe)
        self._following: dict[str, Callable[[], None]] = {}

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), timezone.utc)

    # --- ending on their own: expiry, the web session -----------------------

    def expire_at(self, record: dict) -> None:
        """End ``record`` when it expires (a timer, not the next request)."""
        if record["id"] in self._timers:
            return
        delay = (datetime.fromisoformat(record["expires"]) - self._now()).total_seconds()
        self._timers[record["id"]] = self.clock.callLater(max(0.0, delay), self._expired,
                                                          record)

    def _expired(self, record: dict) -> None:
        self._timers.pop(record["id"], None)
        self._run(self.end(record, "expired"))

    def follow_web_session(self, record: dict) -> None:
        """End ``record`` when the web session it was launched from ends."""
        web_session = record.get("web_session")
        if not isinstance(web_session, str) or self.web_sessions is None or \
                record["id"] in self._following:
            return

        def web_session_ended(reason: str) -> None:
            self._following.pop(record["id"], None)
            self._run(self.end(record, f"web session ended ({reason})"))

        self._following[record["id"]] = self.web_sessions.on_end(web_session,
                                                                 web_session_ended)

    async def web_session_gone(self, record: dict) -> str | None:
        """For the scan: why the web session a browser's app session was launched
        from is gone, when this proxy does not follow it (another proxy created
        the app session), else None."""
        web_session = record.get("web_session")
        if not isinstance(web_session, str) or record["id"] in self._following or \
                self.web_sessions is None:
            return None
        from edgeaccess.web.sessions import PREFIX as WEB_SESSIONS

        try:
            await self.backend.get(WEB_SESSIONS + web_session)
        except errors.NotFound:
            return "web session ended (logged out or expired)"
        return None

    def _run(self, coroutine) -> None:
        defer.Deferred.fromCoroutine(coroutine).addErrback(
            lambda f: _log.failure("ending an app session failed", f))

    def stop(self) -> None:
        """Cancel the expiry timers and web-session listeners (proxy shutdown)."""
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for unsubscribe in self._following.values():
            unsubscribe()
        self._following.clear()

    def expired(self, record: dict) -> bool:
        return datetime.fromisoformat(record["expires"]) <= self._now()

    async def create(self, *, user: str, roles, traits, app: str, cluster: str,
                     expires: datetime, remote_addr: str) -> dict:
        record = {"id": secrets.token_hex(16), "user": user, "roles": list(roles),
                  "traits": dict(traits), "app": app, "cluster": cluster,
                  "created": self._now().isoformat(), "expires": expires.isoformat(),
                  "remote_addr": remote_addr}
        await self.backend.put(SESSIONS_PREFIX + record["id"],
                               json.dumps(record, sort_keys=True).encode(),
                               expires=expires + EXPIRY_GRACE)
        self._remember(record["id"], record)
        self.expire_at(record)
        self.emit("app.session.start", user=user, app=app, app_cluster=cluster,
                  session_id=record["id"], remote_addr=remote_addr, success=True)
        _log.info("app session {id} started: {user} to app {app} (cluster {cluster}) "
                  "from {addr}", id=record["id"][:8], user=user, app=app, cluster=cluster,
                  addr=remote_addr)
        return record

    async def create_web(self, *, web_session, app: str, cluster: str,
                         remote_addr: str) -> tuple[str, dict]:
        """An app session for a browser, tied to ``web_session`` (it ends with it).

        Returns ``(cookie token, record)``; the record's id is a digest of the
        token, which is never stored.
        """
        token = secrets.token_urlsafe(32)
        record = {"id": web_token_id(token), "user": web_session.user,
                  "roles": list(web_session.roles), "traits": dict(web_session.traits),
                  "app": app, "cluster": cluster, "web_session": web_session.id,
                  "created": self._now().isoformat(),
                  "expires": web_session.expires.isoformat(), "remote_addr": remote_addr}
        await self.backend.put(SESSIONS_PREFIX + record["id"],
                               json.dumps(record, sort_keys=True).encode(),
                               expires=web_session.expires + EXPIRY_GRACE)
        self._remember(record["id"], record)
        self.expire_at(record)
        self.follow_web_session(record)
        self.emit("app.session.start", user=record["user"], app=app, app_cluster=cluster,
                  session_id=record["id"], remote_addr=remote_addr, success=True,
                  method="web")
        _log.info("app session {id} started from web session: {user} to app {app} from "
                  "{addr}", id=record["id"][:8], user=record["user"], app=app,
                  addr=remote_addr)
        return token, record

    async def get(self, session_id: str) -> dict | None:
        """The session, read from the backend now (None: ended or expired)."""
        if not isinstance(session_id, str) or len(session_id) != 32 or \
                not all(c in "0123456789abcdef" for c in session_id):
            return None
        try:
            item = await self.backend.get(SESSIONS_PREFIX + session_id)
            record = json.loads(item.value)
        except errors.NotFound:
            record = None
        if record is not None and self.expired(record):
            record = None  # kept for EXPIRY_GRACE only to be ended once
        self._remember(session_id, record)
        return record

    def _remember(self, session_id: str, record: dict | None) -> None:
        expires = 0.0 if record is None else datetime.fromisoformat(record["expires"]).timestamp()
        self._cache[session_id] = (self.clock.seconds(), record, expires)

    def current(self, session_id: str) -> dict | None:
        """The cached session (read again in the background when older than RECHECK)."""
        now = self.clock.seconds()
        checked, record, expires = self._cache.get(session_id, _UNKNOWN)
        if now - checked > RECHECK and session_id not in self._refreshing:
            d = defer.Deferred.fromCoroutine(self.get(session_id))
            self._refreshing[session_id] = d

            def done(result):
                self._refreshing.pop(session_id, None)
                if result is None:
                    self.close_connections(session_id, "the app session ended")
                return None

            d.addCallbacks(done, lambda f: (self._refreshing.pop(session_id, None),
                                            _log.failure("app session check failed", f)))
        if record is not None and expires <= now:
            return None
        return record

    async def all(self) -> list[dict]:
        """Every app session record in the backend (ended ones within their grace too)."""
        found = []
        for item in await self.backend.get_range(SESSIONS_PREFIX):
            try:
                record = json.loads(item.value)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str) and \
                    isinstance(record.get("expires"), str):
                found.append(record)
        return found

    async def of_user(self, user: str) -> list[dict]:
        return [r for r in await self.all() if r.get("user") == user and not self.expired(r)]

    async def end(self, record: dict, reason: str, remote_addr: str = "") -> bool:
        """End an app session: its record goes, its connections close, and
        ``app.session.end`` is audited with ``reason``, by whichever proxy
        deletes the record (once per session, however many proxies notice).

        :returns: whether it was this call that ended it.
        """
        session_id = record["id"]
        timer = self._timers.pop(session_id, None)
        if timer is not None and timer.active():
            timer.cancel()
        unsubscribe = self._following.pop(session_id, None)
        if unsubscribe is not None:
            unsubscribe()
        try:
            await self.backend.delete(SESSIONS_PREFIX + session_id)
            ended_here = True
        except errors.NotFound:
            ended_here = False  # another proxy (or call) ended it first
        self._remember(session_id, None)
        self.close_connections(session_id, reason)
        if not ended_here:
            return False
        self.emit("app.session.end", user=record["user"], app=record["app"],
                  app_cluster=record["cluster"], session_id=session_id,
                  remote_addr=remote_addr or None, reason=reason,
                  method="web" if record.get("web_session") else None)
        _log.info("app session {id} of {user} to app {app} ended: {why}",
                  id=session_id[:8], user=record["user"], app=record["app"], why=reason)
        return True

    def attach(self, session_id: str, connection) -> None:
        self._live.setdefault(session_id, set()).add(connection)

    def detach(self, session_id: str, connection) -> None:
        live = self._live.get(session_id)
        if live is not None:
            live.discard(connection)
            if not live:
                del self._live[session_id]

    def close_connections(self, session_id: str, reason: str) -> None:
        for connection in list(self._live.pop(session_id, ())):
            connection.close_for(reason)


def web_token_id(token: str) -> str:
    """The app session id a browser's app cookie token names."""
    import hashlib

    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()[:32]


class _Checker:
    """Whether roles still allow an app, read again at most every RECHECK seconds."""

    def __init__(self, load_roles, roles, traits, labels, clock) -> None:
        self._load_roles = load_roles
        self._roles = list(roles)
        self._traits = traits
        self._labels = labels
        self._clock = clock
        self._checked = -RECHECK
        self._allowed = False
        self._loading = None

    async def refresh(self) -> bool:
        checker = rbac.AccessChecker(await self._load_roles(self._roles), self._traits)
        self._allowed = checker.can_access_app(self._labels)
        self._checked = self._clock.seconds()
        return self._allowed

    def allowed(self) -> bool:
        if self._clock.seconds() - self._checked > RECHECK and self._loading is None:
            self._loading = defer.Deferred.fromCoroutine(self.refresh())

            def done(result):
                self._loading = None
                return None

            self._loading.addCallbacks(done, lambda f: (done(None), _log.failure(
                "app access check failed", f)))
        return self._allowed


class AppGateway:
    """The app side of one proxy.

    :param auth: the :class:`~edgeaccess.auth.service.AuthServer`.
    :param index: :class:`AppIndex`; :param sessions: :class:`AppSessions`;
    :param keys: :class:`~edgeaccess.apps.jwt.AppSigningKeys`.
    :param public_host: the host part of ``--public-addr``.
    :param web_addr: ``() -> "host:port"`` users reach the web port at.
    :param leaf_tunnel: ``(cluster) -> tunnel | None`` for trusted leaf clusters.
    :param endpoint_for: ``(tunnel, kind, target, source) -> endpoint``.
    """

    def __init__(self, *, auth, index: AppIndex, sessions: AppSessions, keys, public_host: str,
                 web_addr: Callable[[], str], clock, leaf_tunnel=None,
                 endpoint_for=None, web_sessions=None, ui_host: str | None = None,
                 request_audit=None, leaf_names=None) -> None:
        self.auth = auth
        #: ``() -> [names]`` of the leaf clusters whose tunnel is up here
        self.leaf_names = leaf_names or (lambda: [])
        #: :class:`~edgeaccess.apps.requestaudit.RequestAudit`, or None (off)
        self.request_audit = request_audit
        #: the web UI's :class:`~edgeaccess.web.sessions.WebSessionStore` (browser flow)
        self.web_sessions = web_sessions
        #: the web UI's host (the launcher's), default the apps' domain
        self.ui_host = (ui_host or public_host).lower()
        self.cluster = auth.cluster_name
        self.index = index
        self.sessions = sessions
        self.keys = keys
        self.public_host = public_host.lower().rstrip(".")
        self._suffix = "." + self.public_host
        self.web_addr = web_addr
        self.clock = clock
        self.leaf_tunnel = leaf_tunnel or (lambda cluster: None)
        if endpoint_for is None:
            from edgeaccess.tunnel.endpoints import TunnelChannelEndpoint

            endpoint_for = TunnelChannelEndpoint
        self.endpoint_for = endpoint_for
        self._role_cache: dict[tuple, tuple[float, list]] = {}
        self._locks: tuple[float, list] | None = None
        self._scanned = -SCAN_INTERVAL
        #: the app connections' timeouts (set by ``edgeaccess.apps.service.build``)
        self.timeouts = AppTimeouts()

    # --- locks --------------------------------------------------------------

    async def refresh_locks(self) -> None:
        list_locks = getattr(self.auth, "list_locks", None)
        if callable(list_locks):
            self._locks = (self.clock.seconds(), await list_locks())

    def lock_message(self, user: str) -> str | None:
        """Why ``user`` (of this cluster) is locked, from the locks read last, or None."""
        if self._locks is None:
            return None
        from edgeaccess.identity import locks

        lock = locks.matching_lock(self._locks[1], self.clock.seconds(), user=user,
                                   user_cluster=self.cluster, local_cluster=self.cluster)
        if lock is None:
            return None
        return lock.get("message") or f"lock {lock.get('id', '')}"

    async def sweep(self) -> None:
        """End the app sessions that are over (run every second).

        The sessions with connections open here are checked each time (a lock
        or a role change ends them within 2 s); every session in the backend
        is checked every :data:`SCAN_INTERVAL` seconds (those of a proxy that
        is gone, and those without a connection). Each ending is audited once.
        """
        await self.refresh_locks()
        now = self.clock.seconds()
        full = now - self._scanned >= SCAN_INTERVAL
        if full:
            self._scanned = now
            records = await self.sessions.all()
        else:
            records = [r for r in (self.sessions.current(i) for i in list(self.sessions._live))
                       if r is not None]
        for record in records:
            reason = await self.end_reason(record)
            if reason is None and full:
                reason = await self.sessions.web_session_gone(record)
            if reason is not None:
                await self.sessions.end(record, reason)
            else:
                # Sessions another proxy started (or this one before a restart).
                self.sessions.expire_at(record)

    async def end_reason(self, record: dict) -> str | None:
        """Why app session ``record`` is over (expired, locked, roles), or None."""
        if self.sessions.expired(record):
            return "expired"
        message = self.lock_message(record["user"])
        if message is not None:
            return f"locked: {message}"
        if record.get("cluster") == self.cluster:
            found = self.index.find(record.get("app"))
            if found is not None:  # (an app offline now is refused when it is back)
                checker = rbac.AccessChecker(await self._roles(record.get("roles") or []),
                                             record.get("traits") or {})
                if not checker.can_access_app(found[1].labels):
                    return f"roles changed: they no longer allow app {record['app']}"
        return None

    async def _roles(self, names) -> list:
        """Role objects, read from the backend at most every RECHECK seconds per set
        (every connection of a session checks them again each second)."""
        key = tuple(names)
        cached = self._role_cache.get(key)
        now = self.clock.seconds()
        if cached is not None and now - cached[0] <= RECHECK:
            return cached[1]
        roles = await self.auth.get_roles(list(names))
        if len(self._role_cache) > 1000:
            self._role_cache.clear()
        self._role_cache[key] = (now, roles)
        return roles

    # --- names ------------------------------------------------------------

    def app_name_for(self, name: str | None) -> str | None:
        """The app ``name`` (a server name or ``Host`` without port) addresses, or None."""
        if not name or not name.endswith(self._suffix):
            return None
        label = name[: -len(self._suffix)]
        return label if _APP_NAME.match(label) else None

    def _port(self) -> int:
        _host, _, port = self.web_addr().rpartition(":")
        return int(port) if port.isdigit() else 443

    def public_origin(self, app: str) -> str:
        port = self._port()
        return f"https://{app}.{self.public_host}" + ("" if port == 443 else f":{port}")

    def expected_hosts(self, app: str) -> frozenset[str]:
        host = f"{app}.{self.public_host}"
        port = self._port()
        return frozenset({f"{host}:{port}"} | ({host} if port == 443 else set()))

    def host_is_app(self, host: bytes | None) -> bool:
        """Whether a ``Host`` header names an app host (the UI refuses those)."""
        if not host:
            return False
        name = host.decode("latin-1").lower().rsplit(":", 1)[0] if not host.startswith(b"[") \
            else ""
        return self.app_name_for(name) is not None

    # --- listing ------------------------------------------------------------

    def local_apps(self, checker) -> list[dict]:
        return [app_record(tunnel, app, self.public_origin(app.name), self.cluster)
                for tunnel, app in self.index.all() if checker.can_access_app(app.labels)]

    # --- authorising connections ----------------------------------------------

    def authorize(self, protocol, preamble) -> defer.Deferred:
        """For :class:`~edgeaccess.apps.proxy.AppProxyProtocol` on the web port."""
        return defer.Deferred.fromCoroutine(self._authorize_tls(protocol))

    async def _authorize_tls(self, protocol) -> AppAccess:
        transport = protocol.transport
        name = self.app_name_for(server_name(transport))
        if name is None:
            raise errors.NotFound("no such app")
        peer = transport.getPeer()
        client_ip = getattr(peer, "host", "") or ""
        identity = tls.peer_identity(transport)
        unknown = errors.NotFound(f"there is no app named {name} in cluster {self.cluster}")
        if identity is None:
            if self.index.find(name) is None and not (self.web_sessions is not None
                                                      and self.leaf_names()):
                raise unknown
            if self.web_sessions is not None:
                return self._browser_access(protocol, name, client_ip, _source(peer))
            raise errors.AuthenticationFailed(
                f"app {name} needs an app certificate: run `edge apps login {name}` and use "
                f"the files `edge apps config {name}` names")
        if identity.kind != "app" or identity.cluster != self.cluster:
            raise errors.AccessDenied(
                f"this is not an app certificate for {name} (run `edge apps login {name}`)")
        await self.refresh_locks()
        locked = self.lock_message(identity.name)
        if locked is not None:
            raise errors.AccessDenied(f"you are locked out: {locked}")
        session = await self.sessions.get(identity.uuid or "")
        if session is None or session.get("user") != identity.name:
            raise errors.AccessDenied(
                f"your app session has ended: run `edge apps login {name}` again")
        if session["app"] != name:
            if self.index.find(name) is None:
                raise unknown
            _log.warn("app certificate of {user} for app {app} used on app {other} from {addr}",
                      user=identity.name, app=session["app"], other=name, addr=client_ip)
            raise errors.AccessDenied(
                f"this certificate is for app {session['app']}, not {name}")
        session_id = session["id"]

        def attach(access: AppAccess) -> AppAccess:
            self.sessions.attach(session_id, protocol)
            access.on_close.append(lambda p: self.sessions.detach(session_id, p))
            return access

        source = _source(peer)
        if session["cluster"] != self.cluster:
            tunnel = self.leaf_tunnel(session["cluster"])
            if tunnel is None:
                raise errors.ClusterOffline(f"cluster {session['cluster']} is offline")
            preamble = json.dumps({
                "app": name, "user": identity.name, "roles": list(session["roles"]),
                "traits": session["traits"], "cluster": self.cluster, "session": session_id,
                "hosts": sorted(self.expected_hosts(name)),
                "origin": self.public_origin(name), "client_ip": client_ip,
            }, sort_keys=True).encode() + b"\n"
            return attach(AppAccess(
                app=name, user=identity.name,
                endpoint=self.endpoint_for(tunnel, "cluster", f"app:{name}", source=source),
                client_ip=client_ip, relay_preamble=preamble))
        found = self.index.find(name)
        if found is None:
            raise errors.NotFound(f"app {name} is not available: no node of cluster "
                                  f"{self.cluster} serves it now")
        tunnel, app = found
        checker = _Checker(self._roles, session["roles"], session["traits"],
                           app.labels, self.clock)
        if not await checker.refresh():
            raise errors.AccessDenied(f"your roles do not allow app {name}")

        def check() -> BaseException | None:
            if self.sessions.current(session_id) is None:
                return errors.AccessDenied(
                    f"your app session has ended: run `edge apps login {name}` again")
            locked = self.lock_message(identity.name)
            if locked is not None:
                return errors.AccessDenied(f"you are locked out: {locked}")
            if not checker.allowed():
                return errors.AccessDenied(f"your roles no longer allow app {name}")
            return None

        return attach(self._access(
            app, tunnel, user=identity.name, roles=session["roles"], session=session_id,
            hosts=self.expected_hosts(name), origin=self.public_origin(name),
            client_ip=client_ip, source=source, check=check,
            audit_request=self._request_auditor(name, lambda: identity.name,
                                                lambda: session_id, client_ip)))

    def launcher_url(self, app: str) -> str:
        port = self._port()
        return f"https://{self.ui_host}" + ("" if port == 443 else f":{port}") + \
            f"/web/launch/{app}"

    def _browser_access(self, protocol, name: str, client_ip: str, source) -> AppAccess:
        """A browser's connection: each request names its app session by cookie.

        The session says which cluster runs the app: this one (requests are
        checked, rewritten and signed here), or a leaf (requests are checked
        against the session here, then relayed to the leaf's proxy through its
        tunnel after a forwarded identity; the leaf checks its mapped roles,
        sets ``Host``/``X-Forwarded-*`` and signs with its own key). The
        first session a connection carries binds it: a request with another
        one is sent to a new connection.
        """
        found = self.index.find(name)
        tunnel, app = found if found is not None else (None, None)
        state: dict = {"checker": None, "session": None}
        gateway = self
        hosts = self.expected_hosts(name)
        origin = self.public_origin(name)

        def bind_local(record) -> None:
            state["checker"] = _Checker(gateway._roles, record["roles"], record["traits"],
                                        app.labels, gateway.clock)
            state["checker"]._allowed = True  # checked by the launcher just now
            state["checker"]._checked = gateway.clock.seconds()

        def bind_leaf(record) -> bool:
            leaf = gateway.leaf_tunnel(record["cluster"])
            if leaf is None:
                return False
            preamble = json.dumps({
                "app": name, "user": record["user"], "roles": list(record["roles"]),
                "traits": record["traits"], "cluster": gateway.cluster,
                "session": record["id"], "hosts": sorted(hosts), "origin": origin,
                "client_ip": client_ip,
            }, sort_keys=True).encode() + b"\n"
            access.endpoint = _PreambleEndpoint(
                gateway.endpoint_for(leaf, "cluster", f"app:{name}", source=source), preamble)
            # The leaf's proxy rewrites and signs: the request keeps its Host
            # (which the leaf checks against ``hosts``) and gets no assertion here.
            access.upstream_host = b""
            access.app_uri = ""
            access.assertion = None
            return True

        def session_for(token: str | None):
            """The valid app session of this app a cookie token names, or None."""
            if not token:
                return None
            session_id = web_token_id(token)
            record = gateway.sessions.current(session_id)
            if record is None or record.get("app") != name or "web_session" not in record:
                return None
            if record.get("cluster") == gateway.cluster:
                if found is None:
                    return None
            elif gateway.leaf_tunnel(record.get("cluster")) is None:
                return None
            bound = state["session"]
            if bound is None:
                if record["cluster"] == gateway.cluster:
                    bind_local(record)
                elif not bind_leaf(record):
                    return None
                state["session"] = record
                gateway.sessions.attach(session_id, protocol)
            elif bound["id"] != session_id:
                if bound["cluster"] != gateway.cluster or record["cluster"] != gateway.cluster:
                    raise RetryOnNewConnection()
                gateway.sessions.detach(bound["id"], protocol)
                bind_local(record)
                state["session"] = record
                gateway.sessions.attach(session_id, protocol)
            return record

        def check() -> BaseException | None:
            record = state["session"]
            if record is None or gateway.sessions.current(record["id"]) is None:
                return errors.AccessDenied(f"your session for app {name} has ended")
            locked = gateway.lock_message(record["user"])
            if locked is not None:
                return errors.AccessDenied(f"you are locked out: {locked}")
            checker = state["checker"]
            if checker is not None and not checker.allowed():
                return errors.AccessDenied(f"your roles no longer allow app {name}")
            return None  # (a leaf's app: the leaf checks its roles on each request)

        def current(field: str):
            record = state["session"]
            return record.get(field) if record is not None else None

        if found is not None:
            access = self._access(app, tunnel, user="(browser)", roles=(), session="",
                                  hosts=hosts, origin=origin, client_ip=client_ip,
                                  source=source, check=check,
                                  audit_request=self._request_auditor(
                                      name, lambda: current("user"), lambda: current("id"),
                                      client_ip))

            def assertion() -> bytes:
                record = state["session"]
                return gateway.keys.assertion(user=record["user"], roles=record["roles"],
                                              audience=app.uri, session=record["id"])

            access.assertion = assertion
        else:
            # Only a leaf can serve it (bind_leaf sets the route); the leaf audits
            # its requests.
            access = AppAccess(app=name, user="(browser)", endpoint=None,
                               expected_hosts=frozenset(hosts), public_origin=origin,
                               client_ip=client_ip, check=check)
        access.browser = BrowserLaunch(session_for=session_for,
                                       launcher=self.launcher_url(name))

        def detach(p):
            if state["session"] is not None:
                gateway.sessions.detach(state["session"]["id"], p)

        access.on_close.append(detach)
        return access

    def _request_auditor(self, app: str, user_of, session_of, client_ip: str, **extra):
        """``(method, target, status) -> None`` recording ``app.request`` events,
        or None when requests to ``app`` are not audited here."""
        audit = self.request_audit
        if audit is None or not audit.covers(app):
            return None
        cluster = self.cluster

        def record(method: bytes, target: bytes, status: int) -> None:
            audit.record({**request_fields(
                user=user_of(), app=app, cluster=cluster, method=method, target=target,
                status=status, remote_addr=client_ip, session_id=session_of()), **extra})

        return record

    def _access(self, app, tunnel, *, user, roles, session, hosts, origin, client_ip,
                source, check, audit_request=None) -> AppAccess:
        if self.keys is not None:
            assertion = self.keys.assertions_for(user=user, roles=roles, audience=app.uri,
                                                 session=session)
        else:
            assertion = _no_assertion_keys

        upstream = app.rewrite_host or urlsplit(app.uri).netloc
        return AppAccess(
            app=app.name, user=user,
            endpoint=self.endpoint_for(tunnel, "app", app.name, source=source),
            expected_hosts=frozenset(hosts), public_origin=origin, app_uri=app.uri,
            upstream_host=upstream.encode("idna"), client_ip=client_ip,
            assertion=assertion, check=check, audit_request=audit_request)

    def relayed_authorizer(self, root: str, mapped_roles):
        """For app connections a trusted root cluster relays through its tunnel.

        :param mapped_roles: ``async (root, remote_roles) -> local role names``
            (the trust's role map; raises AccessDenied when the trust is gone).
        """

        async def authorize(protocol, preamble: bytes) -> AppAccess:
            data = parse_preamble(preamble)
            user, remote = data.get("user"), data.get("roles")
            hosts, origin = data.get("hosts"), data.get("origin")
            traits = data.get("traits") or {}
            client_ip = data.get("client_ip") or ""
            if not isinstance(user, str) or not isinstance(remote, list) or \
                    not isinstance(hosts, list) or not isinstance(origin, str) or \
                    not isinstance(traits, dict) or not isinstance(client_ip, str):
                raise errors.BadRequest("malformed relay preamble")
            # The app is the channel's target, not anything the preamble says.
            name = getattr(protocol, "app_name", None)
            found = self.index.find(name) if isinstance(name, str) else None
            if found is None:
                raise errors.NotFound(f"app {name} is not available in cluster {self.cluster}")
            tunnel, app = found
            local = await mapped_roles(root, [r for r in remote if isinstance(r, str)])

            async def load_roles(names):
                return await self._roles(await mapped_roles(root, remote))

            checker = _Checker(lambda _names: load_roles(_names), local, traits, app.labels,
                               self.clock)
            if not await checker.refresh():
                raise errors.AccessDenied(f"your roles do not allow app {name} of cluster "
                                          f"{self.cluster}")

            def check() -> BaseException | None:
                if not checker.allowed():
                    return errors.AccessDenied(f"your roles no longer allow app {name}")
                return None

            source = _source(protocol.transport.getPeer())
            session = str(data.get("session") or "")
            return self._access(
                app, tunnel, user=user, roles=local, session=session,
                hosts=[str(h).lower() for h in hosts], origin=origin, client_ip=client_ip,
                source=source, check=check,
                audit_request=self._request_auditor(name, lambda: user, lambda: session,
                                                    client_ip, user_cluster=root))

        return authorize

    # --- issuing app certificates ------------------------------------------------

    async def issue(self, *, identity, user_cert_expires: datetime, app: str, cluster: str,
                    public_key_pem: str, remote_addr: str, ttl: timedelta | None = None) -> dict:
        """An app session and its certificate (the caller checked the app is allowed).

        :param ttl: the session's lifetime asked for (capped by the user's
            certificate and :data:`MAX_APP_SESSION`).
        """
        from cryptography.hazmat.primitives import serialization

        try:
            public_key = serialization.load_pem_public_key(public_key_pem.encode("ascii"))
        except (ValueError, TypeError, UnicodeError):
            raise errors.BadRequest("tls_public_key is not a PEM public key")
        now = datetime.fromtimestamp(self.clock.seconds(), timezone.utc)
        expires = min(user_cert_expires, now + MAX_APP_SESSION)
        if ttl is not None:
            if ttl < MIN_APP_SESSION:
                raise errors.BadRequest("an app session lasts at least 1s")
            expires = min(expires, now + ttl)
        if expires <= now:
            raise errors.CertificateInvalid("your certificate has expired: run edge login")
        record = await self.sessions.create(
            user=identity.name, roles=identity.roles, traits=identity.traits, app=app,
            cluster=cluster, expires=expires, remote_addr=remote_addr)
        cert = self.auth.authority.sign_tls(
            public_key, x509ca.Identity(kind="app", name=identity.name, cluster=self.cluster,
                                        roles=tuple(identity.roles),
                                        traits=dict(identity.traits), uuid=record["id"]),
            now=now, ttl=expires - now)
        return {"certificate": x509ca.certificate_pem(cert).decode("ascii"),
                "session_id": record["id"], "app": app, "cluster": cluster,
                "url": self.public_origin(app), "valid_before": expires.isoformat(),
                "tls_ca": self.auth.authority.tls_ca_pem}


class _PreambleEndpoint:
    """An endpoint whose connections start with ``preamble`` (a leaf relay's
    forwarded identity), written before anything the protocol writes."""

    def __init__(self, endpoint, preamble: bytes) -> None:
        self.endpoint = endpoint
        self.preamble = preamble

    def connect(self, factory):
        def connected(protocol):
            protocol.transport.write(self.preamble)
            return protocol

        return self.endpoint.connect(factory).addCallback(connected)


def _source(peer) -> str | None:
    from edgeaccess.tunnel.protocol import format_source

    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    if host is None or port is None:
        return None
    return format_source(host, port)
