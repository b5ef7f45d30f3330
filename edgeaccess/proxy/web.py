"""The proxy's web and login API (port 3080): HTTPS for users.

``/v1/ping`` tells clients and nodes where everything is; ``/v1/login``
trades a password for certificates; ``/v1/join`` relays node joins for
nodes that can only reach the proxy; ``/v1/nodes`` lists the nodes the
caller's roles allow (client certificate required). The server
certificate comes from the cluster CA, which clients pin.
"""

from __future__ import annotations

import html

from klein import Klein
from twisted.logger import Logger

from edgeaccess import __version__, errors, httpapi
from edgeaccess.auth import api as auth_api
from edgeaccess.httpapi import field, json_response, read_json

_log = Logger()

PROTOCOL_VERSION = 1


class ProxyWeb:
    """Klein app for the proxy's public port.

    :param auth: the :class:`~edgeaccess.auth.service.AuthServer` (same process).
    :param addresses: callable returning ``{"web": "host:port", "ssh": ...,
        "tunnel": ..., "auth": ...}`` as clients should dial them.
    :param public_host: host part of ``--public-addr``.
    """

    app = Klein()

    def __init__(self, auth, addresses, public_host: str, clusters=None, ui=None,
                 kube=None) -> None:
        self.auth = auth
        #: :class:`~edgeaccess.kube.proxy.KubeProxy` (``edge kube ls``)
        self.kube = kube
        self.addresses = addresses
        self.public_host = public_host
        #: :class:`~edgeaccess.cluster.root.RootClusters` (leaves trusting us)
        self.clusters = clusters
        #: :class:`~edgeaccess.web.app.WebUI`: ``/`` and ``/web/...``
        self.ui = ui

    def resource(self):
        return self.app.resource()

    @app.handle_errors(Exception)
    def _errors(self, request, failure):
        return httpapi.error_response(request, failure)

    @app.route("/", methods=["GET"])
    def index(self, request):
        if self.ui is not None:
            return self.ui.index(request)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        name = html.escape(self.auth.cluster_name)
        addr = html.escape(self.addresses()["web"])
        return (f"<!doctype html><title>edgeaccess {name}</title>"
                f"<h1>edgeaccess cluster {name}</h1>"
                f"<p>Log in with <code>edge login --proxy {addr} --user NAME</code>.</p>"
                ).encode("utf-8")

    @app.route("/v1/ping", methods=["GET"])
    async def ping(self, request):
        """Where everything is, and which login methods exist (connector names only)."""
        try:
            connectors = sorted(doc["metadata"]["name"] for doc in
                                await self.auth.get_resources("ldap_connector"))
        except Exception:
            # Nodes need the addresses below even when the backend is unwell.
            _log.failure("cannot list login connectors for /v1/ping")
            connectors = []
        addresses = self.addresses()
        return json_response(request, {
            "cluster_name": self.auth.cluster_name,
            "version": __version__,
            "protocol_version": PROTOCOL_VERSION,
            "public_addr": self.public_host,
            "proxy": {
                "web_addr": addresses["web"],
                "ssh_addr": addresses["ssh"],
                "tunnel_addr": addresses.get("tunnel"),
                "kube_addr": addresses.get("kube"),
            },
            "auth": {"local": True, "connectors": connectors},
        })

    @app.route("/v1/cluster/ca", methods=["GET"])
    def cluster_ca(self, request):
        """The CA certificates: clients compare them with their pin."""
        status = self.auth.status()
        return json_response(request, {
            "service": "proxy",
            "cluster_name": self.auth.cluster_name,
            "tls_ca": [self.auth.authority.tls_ca_pem],
            "ssh_host_ca": status["ssh_host_ca"],
            "ca_pin": status["ca_pin"],
            "web_ca": [pem] if (pem := self.auth.authority.web_ca_pem) else [],
        })

    @app.route("/v1/cluster/web_ca.pem", methods=["GET"])
    def web_ca(self, request):
        """The web CA, for operators to install in browsers (compare its
        fingerprint with ``edgectl status`` before trusting it)."""
        pem = self.auth.authority.web_ca_pem
        if pem is None:
            raise errors.NotFound("this cluster has no web CA")
        request.setHeader(b"content-type", b"application/x-pem-file")
        request.setHeader(b"content-disposition",
                          f'attachment; filename="{self.auth.cluster_name}-web-ca.pem"'.encode())
        request.setHeader(b"x-content-type-options", b"nosniff")
        return pem.encode()

    @app.route("/v1/login", methods=["POST"])
    async def login(self, request):
        data = read_json(request)
        ttl = field(data, "ttl", required=False)
        certs = await self.auth.login(
            username=field(data, "user"),
            password=field(data, "password"),
            ssh_public_key=field(data, "ssh_public_key"),
            tls_public_key=field(data, "tls_public_key", required=False),
            auth=field(data, "auth", required=False, default="local"),
            ttl=httpapi.parse_duration(ttl) if ttl else None,
            remote_addr=httpapi.remote_addr(request),
        )
        status = self.auth.status()
        result = certs.to_dict()
        result.update({
            "cluster_name": self.auth.cluster_name,
            "ssh_host_ca": status["ssh_host_ca"],
            "tls_ca": [self.auth.authority.tls_ca_pem],
            "ssh_addr": self.addresses()["ssh"],
            "trusted_clusters": [
                {"name": c["name"], "ssh_host_ca": c["ssh_host_ca"]}
                for c in (await self.clusters.remote_clusters() if self.clusters else [])],
        })
        return json_response(request, result)

    # --- trusted clusters -------------------------------------------------

    @app.route("/v1/trusted_clusters/join", methods=["POST"])
    async def trusted_cluster_join(self, request):
        """A leaf cluster's CA exchange (authorised by its token)."""
        if self.clusters is None:
            raise errors.NotFound("this proxy does not accept trusted clusters")
        data = read_json(request)
        result = await self.clusters.accept_leaf(
            token=field(data, "token"), leaf_name=field(data, "leaf_name"),
            host_ca=field(data, "host_ca", list), tls_ca=field(data, "tls_ca"),
            tunnel_public_key=field(data, "tunnel_public_key"),
            remote_addr=httpapi.remote_addr(request))
        return json_response(request, result)

    def _user(self, request):
        identity = httpapi.caller(request)
        if identity.kind not in ("user", "admin") or identity.cluster != self.auth.cluster_name:
            raise errors.AccessDenied("a user certificate of this cluster is required")
        return identity

    @app.route("/v1/clusters", methods=["GET"])
    async def clusters_list(self, request):
        self._user(request)
        leaves = await self.clusters.remote_clusters() if self.clusters else []
        return json_response(request, [
            {"name": c["name"], "kind": "leaf", "status": c["status"]} for c in leaves])

    @app.route("/v1/clusters/<name>/nodes", methods=["GET"])
    async def leaf_nodes(self, request, name):
        from edgeaccess.cluster.root import leaf_request

        identity = self._user(request)
        if name == self.auth.cluster_name:
            return await self.nodes(request)
        if self.clusters is None or name not in self.clusters.known:
            raise errors.NotFound(f"cluster {name} not found")
        tunnel = self.clusters.tunnels.get(name)
        if tunnel is None:
            raise errors.ClusterOffline(f"cluster {name} is offline")
        nodes = await leaf_request(self.auth._reactor, tunnel, "/v1/nodes", identity)
        return json_response(request, nodes)

    @app.route("/v1/nodes", methods=["GET"])
    async def nodes(self, request):
        """Nodes the calling user's roles allow (``edge ls``)."""
        from edgeaccess.identity import rbac

        identity = httpapi.caller(request)
        if identity.kind not in ("user", "admin") or identity.cluster != self.auth.cluster_name:
            raise errors.AccessDenied("a user certificate of this cluster is required")
        nodes = await self.auth.list_nodes()
        if identity.kind == "user":
            checker = rbac.AccessChecker(await self.auth.get_roles(identity.roles),
                                         identity.traits)
            nodes = [n for n in nodes if checker.can_access_node(n["labels"])]
        return json_response(request, nodes)

    @app.route("/web/", branch=True)
    def web_ui(self, request):
        """The web UI (:mod:`edgeaccess.web.app`)."""
        if self.ui is None:
            raise errors.NotFound("this proxy has no web UI")
        return self.ui.resource()

    @app.route("/v1/kube/clusters", methods=["GET"])
    async def kube_clusters(self, request):
        """Kubernetes clusters the calling user's roles allow (``edge kube ls``)."""
        from edgeaccess.kube.listing import allowed_kube_clusters

        identity = self._user(request)
        return json_response(request, allowed_kube_clusters(self.kube, identity))

    @app.route("/v1/clusters/<name>/kube", methods=["GET"])
    async def leaf_kube_clusters(self, request, name):
        from edgeaccess.cluster.root import leaf_request

        identity = self._user(request)
        if name == self.auth.cluster_name:
            return await self.kube_clusters(request)
        if self.clusters is None or name not in self.clusters.known:
            raise errors.NotFound(f"cluster {name} not found")
        tunnel = self.clusters.tunnels.get(name)
        if tunnel is None:
            raise errors.ClusterOffline(f"cluster {name} is offline")
        return json_response(request, await leaf_request(
            self.auth._reactor, tunnel, "/v1/kube/clusters", identity))

    # --- signup: the one-time link printed by `edgectl users add` -----------

    @app.route("/web/signup/<token>", methods=["GET"])
    async def signup_form(self, request, token):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        try:
            user = await self.auth.signup_user(token)
        except errors.TokenInvalid as e:
            request.setResponseCode(404)
            return f"<!doctype html><p>{html.escape(str(e))}</p>".encode()
        return (
            "<!doctype html><title>Set your password</title>"
            f"<h1>Welcome {html.escape(user)}</h1>"
            '<form method="post">'
            '<label>Password <input type="password" name="password" minlength="8" required>'
            '</label> <button type="submit">Set password</button></form>'
        ).encode("utf-8")

    @app.route("/web/signup/<token>", methods=["POST"])
    async def signup_submit(self, request, token):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        content_type = request.getHeader(b"content-type") or b""
        if content_type.startswith(b"application/json"):
            password = field(read_json(request), "password")
        else:
            values = request.args.get(b"password") or [b""]
            password = values[0].decode("utf-8", "replace")
        try:
            user = await self.auth.complete_signup(token, password)
        except errors.EdgeError as e:
            request.setResponseCode(e.http_status)
            return f"<!doctype html><p>{html.escape(str(e))}</p>".encode()
        addr = html.escape(self.addresses()["web"])
        return (f"<!doctype html><p>Password set for {html.escape(user)}. Now run "
                f"<code>edge login --proxy {addr} --user {html.escape(user)}</code>.</p>"
                ).encode("utf-8")


# Nodes behind NAT reach the cluster only through the proxy.
auth_api.add_node_routes(ProxyWeb.app)
