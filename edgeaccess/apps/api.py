"""The web port's app routes, in front of the web UI's resource.

- ``GET /v1/apps`` (and ``/v1/clusters/LEAF/apps``): the apps the caller's
  roles allow (``edge apps ls``);
- ``POST /v1/apps/login`` ``{"app", "cluster", "tls_public_key"}``: an app
  session and its certificate (``edge apps login``);
- ``POST /v1/apps/logout`` ``{"app"?}``: ends the caller's app sessions
  (all, or those of one app) and closes their connections;
- ``GET /.well-known/jwks.json``: the public keys apps verify
  ``Edge-Jwt-Assertion`` with.

:class:`WebRouting` sends those paths here and the rest to the web UI; a
request whose ``Host`` names an app host never reaches the UI (421: it came
on a connection whose TLS server name was not that app's).
"""

from __future__ import annotations

from datetime import timezone

from klein import Klein
from twisted.logger import Logger
from twisted.web.resource import Resource

from edgeaccess import errors, httpapi, tls
from edgeaccess.apps.proxy import error_page
from edgeaccess.apps.spec import check_app_name
from edgeaccess.httpapi import field, json_response, read_json
from edgeaccess.identity import rbac

_log = Logger()


class AppsAPI:
    """Klein app for the app routes.

    :param gateway: the :class:`~edgeaccess.apps.sessions.AppGateway`.
    :param leaf_request: ``async (cluster, path, identity) -> JSON`` asking a
        trusted leaf cluster (None: no leaves).
    :param leaf_known: ``(cluster) -> bool``.
    """

    app = Klein()

    def __init__(self, gateway, leaf_request=None, leaf_known=lambda name: False) -> None:
        self.gateway = gateway
        self.auth = gateway.auth
        self.leaf_request = leaf_request
        self.leaf_known = leaf_known

    def resource(self):
        return self.app.resource()

    @app.handle_errors(Exception)
    def _errors(self, request, failure):
        return httpapi.error_response(request, failure)

    def _user(self, request):
        identity = httpapi.caller(request)
        if identity.kind != "user" or identity.cluster != self.auth.cluster_name:
            raise errors.AccessDenied("a user certificate of this cluster is required")
        return identity

    async def _local_apps(self, identity) -> list[dict]:
        checker = rbac.AccessChecker(await self.auth.get_roles(identity.roles), identity.traits)
        return self.gateway.local_apps(checker)

    async def _leaf_apps(self, cluster: str, identity) -> list[dict]:
        if self.leaf_request is None or not self.leaf_known(cluster):
            raise errors.NotFound(f"cluster {cluster} not found")
        apps = await self.leaf_request(cluster, "/v1/apps", identity)
        if not isinstance(apps, list):
            raise errors.EdgeError(f"cluster {cluster} sent a malformed app list")
        found = []
        for entry in apps:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                found.append({"name": entry["name"], "uri": str(entry.get("uri", "")),
                              "labels": entry.get("labels") or {},
                              "node": str(entry.get("node", "")), "cluster": cluster,
                              "public_addr": self.gateway.public_origin(entry["name"])})
        return found

    @app.route("/v1/apps", methods=["GET"])
    async def apps(self, request):
        identity = self._user(request)
        return json_response(request, await self._local_apps(identity))

    @app.route("/v1/clusters/<cluster>/apps", methods=["GET"])
    async def leaf_apps(self, request, cluster):
        identity = self._user(request)
        if cluster == self.auth.cluster_name:
            return json_response(request, await self._local_apps(identity))
        return json_response(request, await self._leaf_apps(cluster, identity))

    @app.route("/v1/apps/login", methods=["POST"])
    async def login(self, request):
        identity = self._user(request)
        data = read_json(request)
        name = check_app_name(field(data, "app"))
        cluster = field(data, "cluster", required=False) or self.auth.cluster_name
        public_key = field(data, "tls_public_key")
        ttl = field(data, "ttl", required=False)
        ttl = httpapi.parse_duration(ttl) if ttl is not None else None
        if cluster == self.auth.cluster_name:
            apps = await self._local_apps(identity)
        else:
            apps = await self._leaf_apps(cluster, identity)
        if not any(a["name"] == name for a in apps):
            _log.info("app login refused: {user} to app {app} of cluster {cluster}",
                      user=identity.name, app=name, cluster=cluster)
            self.auth._emit("app.session.start", user=identity.name, app=name,
                            app_cluster=cluster, success=False,
                            remote_addr=httpapi.remote_addr(request),
                            error="no such app or not allowed")
            raise errors.NotFound(f"app {name} not found in cluster {cluster} "
                                  "(or your roles do not allow it); see edge apps ls")
        cert = tls.peer_certificate(request.transport)
        answer = await self.gateway.issue(
            identity=identity, user_cert_expires=cert.not_valid_after_utc.astimezone(timezone.utc),
            app=name, cluster=cluster, public_key_pem=public_key,
            remote_addr=httpapi.remote_addr(request), ttl=ttl)
        return json_response(request, answer)

    @app.route("/v1/apps/logout", methods=["POST"])
    async def logout(self, request):
        identity = self._user(request)
        data = read_json(request)
        name = field(data, "app", required=False)
        ended = []
        for record in await self.gateway.sessions.of_user(identity.name):
            if name is None or record.get("app") == name:
                await self.gateway.sessions.end(record, "logout",
                                                remote_addr=httpapi.remote_addr(request))
                ended.append(record["app"])
        return json_response(request, {"ended": sorted(ended)})

    @app.route("/web/launch/<name>", methods=["GET"])
    async def launch(self, request, name):
        """The browser flow: the app host sent a browser without an app cookie here.

        With a web session (else: the login page), an app session tied to it
        is created and the browser goes back to the app host with it; the
        app host checks the launch's state cookie and sets its own cookie.
        """
        from urllib.parse import quote, urlencode

        from edgeaccess.apps.proxy import _safe_path

        store = self.gateway.web_sessions
        if store is None:
            raise errors.NotFound("the browser flow needs the web UI")
        name = check_app_name(name)
        state = (request.args.get(b"state") or [b""])[0].decode("ascii", "replace")
        path = _safe_path((request.args.get(b"path") or [b"/"])[0].decode("utf-8", "replace"))
        if not state or len(state) > 64 or not state.replace("-", "").replace("_", "").isalnum():
            raise errors.BadRequest("malformed launch state")
        cluster = (request.args.get(b"cluster") or [b""])[0].decode("utf-8", "replace")
        session = await store.from_request(request)
        if session is None:
            request.redirect(b"/")
            return b""
        found = self.gateway.index.find(name) if cluster in ("", self.auth.cluster_name) \
            else None
        if found is not None:
            cluster = self.auth.cluster_name
            checker = await store.checker_for(session)
            if not checker.can_access_app(found[1].labels):
                _log.info("app launch refused: {user} to app {app}", user=session.user,
                          app=name)
                raise errors.AccessDenied(f"your roles do not allow app {name}")
        else:
            cluster = await self._leaf_with_app(name, cluster, session)
        token, _record = await self.gateway.sessions.create_web(
            web_session=session, app=name, cluster=cluster,
            remote_addr=httpapi.remote_addr(request))
        target = self.gateway.public_origin(name) + "/__edge/launch?" + urlencode(
            {"state": state, "token": token, "path": path}, quote_via=quote)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.redirect(target.encode("ascii"))
        return b""

    async def _leaf_with_app(self, name: str, cluster: str, session) -> str:
        """The leaf cluster (``cluster``, or the first leaf online that has it)
        whose app ``name`` the web session's user may reach; the leaf decides
        with its mapped roles (it lists only the apps they allow)."""
        if cluster and cluster != self.auth.cluster_name:
            candidates = [cluster]
        else:
            candidates = list(self.gateway.leaf_names())
        for leaf in candidates:
            try:
                apps = await self._leaf_apps(leaf, session.identity())
            except errors.EdgeError as e:
                _log.info("app launch: cannot ask cluster {leaf} for its apps: {why}",
                          leaf=leaf, why=e)
                if cluster:
                    raise
                continue
            if any(a["name"] == name for a in apps):
                return leaf
        _log.info("app launch refused: {user} to app {app} (cluster {cluster})",
                  user=session.user, app=name, cluster=cluster or "any")
        raise errors.NotFound(
            f"there is no app named {name} you may reach in cluster "
            f"{cluster or self.auth.cluster_name}" + ("" if cluster else " or its leaf clusters"))

    @app.route("/.well-known/jwks.json", methods=["GET"])
    def jwks(self, request):
        request.setHeader(b"cache-control", b"public, max-age=60")
        request.setHeader(b"content-type", b"application/json")
        import json

        return json.dumps(self.gateway.keys.jwks(), sort_keys=True).encode() + b"\n"


_API_PREFIXES = (b"/v1/apps", b"/.well-known/jwks.json", b"/web/launch/")


class WebRouting(Resource):
    """The web port's root: app routes here, the web UI's resource otherwise.

    Both are Klein leaf resources (they route on the whole path).
    """

    isLeaf = True

    def __init__(self, ui, apps_api: AppsAPI) -> None:
        super().__init__()
        self.ui = ui
        self.apps_resource = apps_api.resource()
        self.gateway = apps_api.gateway

    def _is_app_path(self, path: bytes) -> bool:
        if path.startswith(_API_PREFIXES):
            return True
        parts = path.split(b"/")
        # /v1/clusters/LEAF/apps
        return len(parts) == 5 and parts[1:3] == [b"v1", b"clusters"] and parts[4] == b"apps"

    def render(self, request):
        if self.gateway.host_is_app(request.getHeader(b"host")):
            _log.info("refused a request for app host {host} on a web UI connection from "
                      "{addr}", host=request.getHeader(b"host"),
                      addr=httpapi.remote_addr(request))
            request.setResponseCode(421)
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            request.setHeader(b"connection", b"close")
            page = error_page(421, "this host name must be the TLS server name (SNI) "
                                   "of the connection")
            return page.split(b"\r\n\r\n", 1)[1]
        if self._is_app_path(request.path):
            return self.apps_resource.render(request)
        return self.ui.render(request)
