"""The web UI's pages (Klein), mounted by the proxy's web app under ``/web/``.

=================================  ==============================================
``/`` (``index``)                  login form, or the resources page once logged in
``POST /web/login``, ``/logout``   open and end a web session
``/web/``                          nodes (then apps, Kubernetes: ``resource_sections``)
``/web/ssh/LOGIN@NODE.CLUSTER``    the web terminal; its WebSocket is ``/web/ws/ssh/...``
``/web/sessions``                  the user's web sessions (end one)
``/web/recordings[/ID[.cast]]``    recorded sessions, player, download
``/web/audit[.json]``              audit log with filters, paging, export, verdict
``/web/admin/...``                 users, roles, join tokens, locks (``editor``)
``/web/static/...``                our CSS/JS and the vendored npm builds
=================================  ==============================================

Every page needs a web session except the login form; every state change
is a POST with the session's CSRF token from this origin (see
:mod:`edgeaccess.web.render`). What a page shows is what the session's
roles allow, re-read on every request.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime, timedelta, timezone
from typing import Awaitable, Callable
from urllib.parse import quote

import attrs
from klein import Klein
from markupsafe import Markup, escape
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource as web_resource
from twisted.web import static
from werkzeug.exceptions import HTTPException

from edgeaccess import errors, httpapi
from edgeaccess.web import render as r
from edgeaccess.web.sessions import WebSession, WebSessionStore
from edgeaccess.web.terminal import TerminalFactory, TerminalOpener, parse_target

_log = Logger()

#: A node counts as online when heard from this recently (tunnelled nodes
#: are listed from their live tunnel, so they are always recent).
ONLINE_WITHIN = timedelta(seconds=90)
AUDIT_PAGE = 50
CSRF_COOKIE = b"__Host-edge-csrf"
#: The auth service's message for a wrong name or password (shown as one sentence).
INVALID_CREDENTIALS = "invalid username or password"


@attrs.frozen
class ResourceRow:
    """One resource of a section: its name, labels and cluster (what the
    label filter looks at), then an action: a link, or a command to run."""

    name: str
    labels: dict = attrs.field(factory=dict)
    cluster: str = ""
    link: str | None = None
    link_text: str | None = None
    hint: str | None = None
    note: str | None = None

    def as_filterable(self) -> dict:
        return {"name": self.name, "labels": self.labels}


@attrs.frozen
class ResourceSection:
    """A table on the resources page below the nodes (apps, Kubernetes clusters).

    Other parts of the proxy add a provider to :attr:`WebUI.resource_sections`:
    ``async (session, checker, cluster) -> ResourceSection | None``
    (:mod:`edgeaccess.web.sections`). The page applies the label filter to
    the rows.
    """

    id: str
    title: str
    columns: tuple[str, ...]
    rows: tuple[ResourceRow, ...]
    empty: str = "Nothing you may reach"
    error: str | None = None


SectionProvider = Callable[[WebSession, object, str], Awaitable[ResourceSection | None]]


class _StaticFiles(static.File):
    """Our static files: no directory listings, explicit types, nosniff."""

    contentTypes = {
        **static.File.contentTypes,
        ".js": "text/javascript; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".wasm": "application/wasm",
        ".cast": "application/x-asciicast",
        ".map": "application/json",
    }

    def directoryListing(self):  # noqa: N802
        return web_resource.NoResource("no listing")


class WebUI:
    """The web UI of one proxy.

    :param auth: the auth service.
    :param sessions: the web session store.
    :param opener: opens web terminals (``None``: terminals are refused).
    :param clusters: the leaf clusters (``RootClusters``) or ``None``.
    :param addresses: the proxy's ``addresses()`` (``web`` for links).
    :param lock_source: optional object with ``list_locks()``,
        ``create_lock(...)``, ``delete_lock(id)`` coroutines for the locks page.
    """

    app = Klein()

    def __init__(self, auth, sessions: WebSessionStore, *, opener: TerminalOpener | None,
                 clusters, addresses, clock, lock_source=None) -> None:
        self.auth = auth
        self.sessions = sessions
        self.opener = opener
        self.clusters = clusters
        self.addresses = addresses
        self.clock = clock
        self.lock_source = lock_source
        #: Providers of the resources page's sections after the nodes.
        self.resource_sections: list[SectionProvider] = []
        self._static = _StaticFiles(str(r.STATIC), defaultType="application/octet-stream")

    def resource(self):
        return self.app.resource()

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), timezone.utc)

    # --- shared -----------------------------------------------------------

    @app.handle_errors(errors.AuthenticationFailed)
    def _not_logged_in(self, request, failure):
        if request.method == b"GET" and not request.path.startswith(b"/web/ws/"):
            return r.redirect(request, "/", 303)
        return self._error_page(request, failure.value)

    @app.handle_errors(Exception)
    def _errors(self, request, failure):
        error = failure.value
        if isinstance(error, HTTPException):
            # Klein's routing outcomes: no such page (404), wrong method (405).
            error = httpapi._routing_error(request, error)
            if error is None:  # a redirect, already applied
                return b""
        if not isinstance(error, errors.EdgeError):
            _log.failure("web UI error on {path}", failure, path=request.path)
            error = errors.EdgeError("internal error (see the proxy's log)")
        return self._error_page(request, error)

    def _error_page(self, request, error: errors.EdgeError) -> bytes:
        return r.render(request, "error.html", code=error.http_status,
                        title="Refused" if error.http_status in (401, 403) else "Error",
                        message=str(error), cluster=self.auth.cluster_name)

    async def _context(self, session: WebSession, nav: str) -> dict:
        checker = await self.sessions.checker_for(session)
        return {"session": session, "cluster": self.auth.cluster_name, "nav": nav,
                "can_audit": checker.can("event", "list"),
                "can_admin": checker.can("user", "list"), "checker": checker}

    def _web_addr(self) -> str:
        return self.addresses()["web"]

    # --- login --------------------------------------------------------------

    async def index(self, request):
        """``/``: the login form, or the resources page for a session."""
        session = await self.sessions.from_request(request)
        if session is not None:
            return r.redirect(request, "/web/", 303)
        return await self._login_form(request)

    async def _login_form(self, request, *, error: str | None = None, user: str = "",
                          connector: str = "local", code: int = 200) -> bytes:
        import secrets

        try:
            connectors = sorted(d["metadata"]["name"]
                                for d in await self.auth.get_resources("ldap_connector"))
        except Exception:
            _log.failure("cannot list login connectors for the login form")
            connectors = []
        csrf = secrets.token_urlsafe(24)
        request.addCookie(CSRF_COOKIE, csrf.encode(), path=b"/", secure=True, httpOnly=True,
                          sameSite="strict")
        return r.render(request, "login.html", code=code, title="Log in",
                        cluster=self.auth.cluster_name, connectors=connectors, error=error,
                        user=user, connector=connector, csrf=csrf,
                        web_addr=self._web_addr())

    @app.route("/login", methods=["GET"])
    async def login_page(self, request):
        return await self.index(request)

    @app.route("/login", methods=["POST"])
    async def login(self, request):
        import hmac

        r.check_origin(request, required=False)
        cookie = (request.getCookie(CSRF_COOKIE) or b"").decode("ascii", "replace")
        field = r.form_value(request, "csrf", limit=200)
        if not cookie or not hmac.compare_digest(cookie, field):
            raise errors.AccessDenied("the login form is stale or forged; reload the page")
        user = r.form_value(request, "user", limit=256).strip()
        password = r.form_value(request, "password", limit=1024)
        connector = r.form_value(request, "connector", limit=128) or "local"
        if not user or not password:
            return await self._login_form(request, error="Enter your user name and password.",
                                          user=user, connector=connector, code=400)
        agent = (request.getHeader(b"user-agent") or b"").decode("utf-8", "replace")
        try:
            token, session = await self.sessions.login(
                username=user, password=password, connector=connector,
                remote_addr=httpapi.remote_addr(request), user_agent=agent)
        except (errors.AccountLocked, errors.AccessDenied) as e:
            # Too many failures, or a lock (its message is for the user).
            return await self._login_form(request, error=str(e), user=user,
                                          connector=connector, code=403)
        except (errors.AuthenticationFailed, errors.BadRequest) as e:
            # The generic refusal, or what a connector chose to tell the user
            # (an LDAP user in no group mapped to a role), as `edge login` does.
            told = str(e) if isinstance(e, errors.AuthenticationFailed) else ""
            if not told or told.lower() == INVALID_CREDENTIALS:
                told = "Invalid user name or password."
            return await self._login_form(request, error=told, user=user,
                                          connector=connector, code=401)
        except errors.IdentityProviderUnreachable as e:
            return await self._login_form(request, error=str(e), user=user,
                                          connector=connector, code=503)
        self.sessions.set_cookie(request, token, session)
        return r.redirect(request, "/web/", 303)

    @app.route("/logout", methods=["POST"])
    async def logout(self, request):
        session = await self.sessions.require(request)
        r.check_csrf(request, session)
        await self.sessions.revoke(session.id, reason="logged out")
        self.sessions.clear_cookie(request)
        return r.redirect(request, "/", 303)

    # --- resources ---------------------------------------------------------

    @app.route("/", methods=["GET"])
    async def resources(self, request):
        session = await self.sessions.require(request)
        context = await self._context(session, "resources")
        checker = context.pop("checker")
        clusters = [{"name": self.auth.cluster_name, "status": "online"}]
        if self.clusters is not None:
            clusters += [{"name": c["name"], "status": c["status"]}
                         for c in await self.clusters.remote_clusters()]
        selected = r.query_value(request, "cluster", limit=128) or self.auth.cluster_name
        if selected not in {c["name"] for c in clusters}:
            selected = self.auth.cluster_name
        query = r.query_value(request, "q", limit=200).strip()
        # The node list and every section at once: a leaf is asked for each
        # over its tunnel, and those round trips should not add up.
        async def section_of(provider) -> ResourceSection | None:
            try:
                return await provider(session, checker, selected)
            except errors.EdgeError as e:
                return ResourceSection(id=getattr(provider, "section_id", "extra"),
                                       title=getattr(provider, "section_title", ""),
                                       columns=(), rows=(),
                                       error=f"cannot list them in {selected}: {e}")
            except Exception:
                _log.failure("a resources page section failed")
                return None

        pending = [defer.Deferred.fromCoroutine(section_of(p)) for p in self.resource_sections]
        error = None
        try:
            nodes = await self._nodes(session, checker, selected)
        except errors.EdgeError as e:
            nodes, error = [], f"cannot list the nodes of {selected}: {e}"
        nodes = [n for n in nodes if _matches(n, query)]
        sections = []
        for d in pending:
            section = await d
            if section is not None:
                sections.append(attrs.evolve(section, rows=tuple(
                    row for row in section.rows if _matches(row.as_filterable(), query))))
        return r.render(request, "resources.html", title="Resources", clusters=clusters,
                        selected_cluster=selected, query=query, nodes=nodes,
                        node_rows=_node_rows(nodes, checker.allowed_logins()),
                        sections=sections, error=error, **context)

    async def _nodes(self, session: WebSession, checker, cluster: str) -> list[dict]:
        now = self.now()
        if cluster == self.auth.cluster_name:
            found = [n for n in await self.auth.list_nodes()
                     if checker.can_access_node(n.get("labels") or {})]
        else:
            from edgeaccess.cluster.root import leaf_request

            tunnel = self.clusters.tunnels.get(cluster) if self.clusters else None
            if tunnel is None:
                raise errors.ClusterOffline(f"cluster {cluster} is offline")
            found = await leaf_request(self.clock, tunnel, "/v1/nodes", session.identity())
            if not isinstance(found, list):
                raise errors.EdgeError("the leaf cluster gave no node list")
        nodes = []
        for n in found:
            if not isinstance(n, dict) or not isinstance(n.get("name"), str):
                continue
            labels = n.get("labels") if isinstance(n.get("labels"), dict) else {}
            nodes.append({"name": n["name"], "labels": {str(k): str(v) for k, v in labels.items()},
                          "cluster": cluster, "status": _status(n, now)})
        return sorted(nodes, key=lambda n: n["name"])

    # --- web sessions --------------------------------------------------------

    @app.route("/sessions", methods=["GET"])
    async def web_sessions(self, request):
        session = await self.sessions.require(request)
        context = await self._context(session, "sessions")
        context.pop("checker")
        mine = await self.sessions.list_for_user(session.user)
        return r.render(request, "sessions.html", title="Web sessions",
                        sessions=list(reversed(mine)), **context)

    @app.route("/sessions/revoke", methods=["POST"])
    async def revoke_session(self, request):
        session = await self.sessions.require(request)
        r.check_csrf(request, session)
        target = r.form_value(request, "id", limit=64)
        if target not in {s.id for s in await self.sessions.list_for_user(session.user)}:
            raise errors.NotFound("no such session of yours")
        await self.sessions.revoke(target, reason="ended from another session")
        return r.redirect(request, "/web/sessions", 303)

    # --- web terminal --------------------------------------------------------

    @app.route("/ssh/<target>", methods=["GET"])
    async def terminal_page(self, request, target):
        session = await self.sessions.require(request)
        login, host = parse_target(target)
        context = await self._context(session, "resources")
        context.pop("checker")
        node, _, node_cluster = host.partition(".")
        return r.render(request, "terminal.html", title=f"{login}@{host}", login=login,
                        node=node, node_cluster=node_cluster or self.auth.cluster_name,
                        ws_path=f"/web/ws/ssh/{target}", **context)

    @app.route("/ws/ssh/<target>", methods=["GET"])
    async def terminal_socket(self, request, target):
        # Before the upgrade: same origin (a page elsewhere cannot ride the
        # cookie), a valid session, a well-formed target.
        r.check_origin(request, required=True)
        session = await self.sessions.require(request)
        login, host = parse_target(target)
        if self.opener is None:
            raise errors.EdgeError("web terminals are not available on this proxy")
        checker = await self.sessions.checker_for(session)
        from autobahn.twisted.resource import WebSocketResource

        from edgeaccess.tunnel.protocol import format_source

        peer = request.getClientAddress()
        host_ip, port = getattr(peer, "host", None), getattr(peer, "port", None)
        source = (format_source(host_ip, port) if isinstance(host_ip, str)
                  and isinstance(port, int) else None)
        return WebSocketResource(TerminalFactory(
            opener=self.opener, sessions=self.sessions, session=session, checker=checker,
            login=login, host=host, source=source, clock=self.clock))

    # --- recordings and audit (edgeaccess.web.records) -------------------------

    @app.route("/recordings", methods=["GET"])
    async def recordings(self, request):
        from edgeaccess.web import records

        session = await self.sessions.require(request)
        context = await self._context(session, "recordings")
        checker = context.pop("checker")
        everyone = checker.can("session", "list")
        found = await records.list_recordings(self.auth, None if everyone else session.user)
        return r.render(request, "recordings.html", title="Recordings", recordings=found,
                        everyone=everyone, **context)

    @app.route("/recordings/<name>", methods=["GET"])
    async def recording(self, request, name):
        from edgeaccess.web import records

        session = await self.sessions.require(request)
        context = await self._context(session, "recordings")
        checker = context.pop("checker")
        if name.endswith(".cast"):
            session_id = name[:-len(".cast")]
            info, data = await records.read_recording(self.auth, session, checker,
                                                      session_id)
            r.security_headers(request)
            request.setHeader(b"content-type", b"application/x-asciicast")
            request.setHeader(b"content-disposition",
                              f'attachment; filename="{session_id}.cast"'.encode())
            return data
        info, _ = await records.read_recording(self.auth, session, checker, name, data=False)
        return r.render(request, "player.html", csp=r.PLAYER_CSP, title="Recording",
                        session_id=name, info=info, **context)

    @app.route("/audit", methods=["GET"])
    async def audit(self, request):
        from edgeaccess.web import records

        session = await self.sessions.require(request)
        context = await self._context(session, "audit")
        checker = context.pop("checker")
        if not checker.can("event", "list"):
            raise errors.AccessDenied(f"{session.user} may not read the audit log")
        page = await records.audit_page(self.auth, request, AUDIT_PAGE)
        return r.render(request, "audit.html", title="Audit log", **page, **context)

    @app.route("/audit.json", methods=["GET"])
    async def audit_export(self, request):
        from edgeaccess.web import records

        session = await self.sessions.require(request)
        checker = await self.sessions.checker_for(session)
        if not checker.can("event", "list"):
            raise errors.AccessDenied(f"{session.user} may not read the audit log")
        events = await records.audit_events(self.auth, request)
        r.security_headers(request)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-disposition", b'attachment; filename="audit.json"')
        return json.dumps(events, indent=1, sort_keys=True).encode() + b"\n"

    # --- admin (edgeaccess.web.admin) -------------------------------------------

    @app.route("/admin/", branch=True)
    async def admin(self, request):
        from edgeaccess.web.admin import AdminPages

        session = await self.sessions.require(request)
        context = await self._context(session, "admin")
        return AdminPages(self, session, context).app.resource()

    # --- static files -------------------------------------------------------

    @app.route("/static/", branch=True)
    def static_files(self, request):
        r.security_headers(request, cache=True)
        request.setHeader(b"cache-control", b"private, max-age=3600")
        return self._static


#: Rows per block of the node list: the browser lays out and paints only
#: the blocks on screen (``content-visibility: auto``), so 1,000 nodes cost
#: little more than 100 before the first paint.
NODE_BLOCK = 50


def _node_rows(nodes: list[dict], logins: list[str]) -> Markup:
    """The node list's rows in blocks (one string per row, see
    :func:`_node_row`: the template engine's per-cell work made 1,000 rows
    cost ~100 ms)."""
    logins_key = tuple(logins)
    rows = [_node_row(n["name"], n["cluster"], tuple(sorted(n["labels"].items())),
                      n["status"], logins_key) for n in nodes]
    blocks = ["<div class=\"block\">" + "\n".join(rows[i:i + NODE_BLOCK]) + "</div>"
              for i in range(0, len(rows), NODE_BLOCK)]
    return Markup("\n".join(blocks))


@functools.lru_cache(maxsize=16384)
def _node_row(name: str, cluster: str, labels: tuple, status: str, logins: tuple) -> str:
    """One row of the node list. Compact markup (1,000 rows are ~250 KB):
    ``<b>`` name, ``<i>`` label, the status as a class; every value escaped,
    every attribute quoted. Rows repeat from page to page (nodes change
    rarely): they are kept, keyed by everything they show."""
    name_html, cluster_html = escape(name), escape(cluster)
    label_html = " ".join(f"<i>{escape(k)}={escape(v)}</i>" for k, v in labels)
    target = escape(quote(name, safe="") + "." + quote(cluster, safe=""))
    links = " ".join(
        f'<a href="/web/ssh/{escape(quote(login, safe=""))}@{target}" '
        f'target="_blank">{escape(login)}</a>'
        for login in logins) or "<em>no login allowed</em>"
    status_html = escape(status)
    return (f'<div class="row" data-node="{name_html}"><b>{name_html}</b>'
            f"<span>{label_html}</span><span>{cluster_html}</span>"
            f'<span class="{status_html}">{status_html}</span><span>{links}</span></div>')


def _status(node: dict, now: datetime) -> str:
    heard = node.get("last_heartbeat")
    if not isinstance(heard, str):
        return "offline"
    try:
        when = datetime.fromisoformat(heard.replace("Z", "+00:00"))
    except ValueError:
        return "offline"
    return "online" if now - when <= ONLINE_WITHIN else "offline"


def _matches(node: dict, query: str) -> bool:
    """``k=v`` terms must be labels of the node; other words must appear in
    its name or labels."""
    for term in query.split():
        key, sep, value = term.partition("=")
        if sep:
            if node["labels"].get(key) != value:
                return False
        elif term.lower() not in (node["name"] + " " + " ".join(
                f"{k}={v}" for k, v in node["labels"].items())).lower():
            return False
    return True

