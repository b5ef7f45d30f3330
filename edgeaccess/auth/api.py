"""The auth API (port 3025): HTTPS with mutual TLS.

Admins (``edgectl``), users and nodes call it with certificates from the
cluster CA; the caller's identity comes from that certificate. The join
endpoint alone takes callers without a certificate: they prove
themselves with a join token.
"""

from __future__ import annotations

from klein import Klein
from twisted.logger import Logger

from edgeaccess import errors, httpapi
from edgeaccess.httpapi import field, json_response, read_json

_log = Logger()

#: resource name in the role rules for each stored resource kind
_RULE_RESOURCE = {"role": "role", "ldap_connector": "connector",
                  "trusted_cluster": "trusted_cluster"}


# --- node endpoints: served by the auth API (3025) and, for nodes that can
# only reach the proxy, by the proxy's web port (3080) too. -----------------


def calling_node(auth, request):
    """The caller's node identity; AccessDenied for anything else."""
    identity = httpapi.caller(request)
    if identity.kind != "node" or identity.cluster != auth.cluster_name:
        raise errors.AccessDenied("only nodes of this cluster may call this")
    return identity


async def node_renew(auth, request):
    identity = calling_node(auth, request)
    data = read_json(request)
    result = auth.renew_node(
        identity, field(data, "ssh_public_key"), field(data, "tls_public_key"),
        field(data, "addresses", list, required=False, default=[]),
        agent_server=field(data, "agent_server", bool, required=False, default=False),
        remote_addr=httpapi.remote_addr(request))
    return json_response(request, result)


async def node_heartbeat(auth, request):
    identity = calling_node(auth, request)
    stored = await auth.heartbeat(identity, read_json(request),
                                  remote_addr=httpapi.remote_addr(request))
    return json_response(request, stored)


async def node_roles(auth, request):
    """Every role definition, for the node's cache (nodes decide access)."""
    calling_node(auth, request)
    trust = getattr(auth, "leaf_trust", None)
    return json_response(request, {
        "roles": await auth.all_roles(),
        "ssh_user_ca": auth.status()["ssh_user_ca"],
        # Root clusters this (leaf) cluster trusts: their users' CA and the
        # mapping of their roles to ours.
        "trusted_clusters": await trust.node_trust() if trust is not None else [],
        "locks": await auth.list_locks(),
    })


async def node_watch(auth, request):
    """The LAN node's push stream (edgeaccess.controlplane.stream)."""
    identity = calling_node(auth, request)
    streams = getattr(auth, "watch_streams", None)
    if streams is None:
        raise errors.NotFound("this auth service pushes no control stream")
    return await streams.serve(request, identity.name)


class AuthAPI:
    """Klein app over an :class:`~edgeaccess.auth.service.AuthServer`."""

    app = Klein()

    def __init__(self, auth) -> None:
        self.auth = auth

    def resource(self):
        return self.app.resource()

    # --- authorisation ---------------------------------------------------

    async def _require(self, request, resource: str, verb: str):
        """The caller, if allowed ``verb`` on ``resource``; AccessDenied otherwise."""
        from edgeaccess.identity import rbac

        identity = httpapi.caller(request)
        if identity.cluster != self.auth.cluster_name:
            raise errors.AccessDenied("certificate of another cluster")
        if identity.kind == "admin":
            return identity
        if identity.kind == "user":
            checker = rbac.AccessChecker(await self.auth.get_roles(identity.roles),
                                         identity.traits)
            try:
                checker.check_action(resource, verb)
            except errors.AccessDenied:
                _log.warn("{user} may not {verb} {resource}", user=identity.name,
                          verb=verb, resource=resource)
                raise errors.AccessDenied(f"user {identity.name} may not {verb} {resource}s")
            return identity
        raise errors.AccessDenied(f"a {identity.kind} identity may not {verb} {resource}s")

    @app.handle_errors(Exception)
    def _errors(self, request, failure):
        return httpapi.error_response(request, failure)

    # --- status ----------------------------------------------------------

    @app.route("/v1/status", methods=["GET"])
    async def status(self, request):
        httpapi.caller(request)
        return json_response(request, self.auth.status())

    @app.route("/v1/cluster/ca", methods=["GET"])
    def cluster_ca(self, request):
        """The CA certificates (no client certificate needed): joining
        nodes compare them with their pin."""
        return json_response(request, {
            "service": "auth",
            "cluster_name": self.auth.cluster_name,
            "tls_ca": [self.auth.authority.tls_ca_pem],
            "ca_pin": self.auth.authority.pin,
        })

    # --- users -----------------------------------------------------------

    @app.route("/v1/users", methods=["GET"])
    async def list_users(self, request):
        await self._require(request, "user", "list")
        return json_response(request, await self.auth.list_users())

    @app.route("/v1/users", methods=["POST"])
    async def create_user(self, request):
        who = await self._require(request, "user", "create")
        data = read_json(request)
        name = field(data, "name")
        roles = field(data, "roles", list)
        logins = field(data, "logins", list, required=False, default=[])
        if not all(isinstance(x, str) for x in roles + logins):
            raise errors.BadRequest("roles and logins must be lists of names")
        token = await self.auth.create_user(name, roles, logins)
        _log.info("{admin} created user {user}", admin=who.name, user=name)
        return json_response(request, {"name": name, "signup_token": token}, 201)

    @app.route("/v1/users/<name>", methods=["DELETE"])
    async def delete_user(self, request, name):
        await self._require(request, "user", "delete")
        await self.auth.delete_user(name)
        return json_response(request, {"deleted": name})

    @app.route("/v1/users/<name>/password", methods=["PUT"])
    async def set_password(self, request, name):
        await self._require(request, "user", "update")
        password = field(read_json(request), "password")
        await self.auth.set_password(name, password)
        return json_response(request, {"updated": name})

    # --- tokens ----------------------------------------------------------

    @app.route("/v1/tokens", methods=["GET"])
    async def list_tokens(self, request):
        await self._require(request, "token", "list")
        return json_response(request, await self.auth.list_tokens())

    @app.route("/v1/tokens", methods=["POST"])
    async def create_token(self, request):
        await self._require(request, "token", "create")
        data = read_json(request)
        ttl = field(data, "ttl", required=False)
        record = await self.auth.create_token(
            field(data, "type"), httpapi.parse_duration(ttl) if ttl else None)
        return json_response(request, record, 201)

    @app.route("/v1/tokens/<token>", methods=["DELETE"])
    async def delete_token(self, request, token):
        await self._require(request, "token", "delete")
        await self.auth.delete_token(token)
        return json_response(request, {"deleted": True})

    # --- resources -------------------------------------------------------

    @app.route("/v1/resources", methods=["POST"])
    async def create_resource(self, request):
        data = read_json(request)
        doc = field(data, "resource", dict)
        force = field(data, "force", bool, required=False, default=False)
        kind = doc.get("kind")
        await self._require(request, _RULE_RESOURCE.get(kind, str(kind)),
                            "update" if force else "create")
        obj = await self.auth.upsert_resource(doc, force=force)
        from edgeaccess.identity import resources

        return json_response(request, {"kind": resources.resource_kind(obj),
                                       "name": resources.resource_name(obj)}, 201)

    @app.route("/v1/resources/<kind>", methods=["GET"])
    async def list_resources(self, request, kind):
        await self._require(request, _RULE_RESOURCE.get(kind, kind), "list")
        return json_response(request, await self.auth.get_resources(kind))

    @app.route("/v1/resources/<kind>/<name>", methods=["GET"])
    async def get_resource(self, request, kind, name):
        await self._require(request, _RULE_RESOURCE.get(kind, kind), "read")
        return json_response(request, await self.auth.get_resources(kind, name))

    @app.route("/v1/resources/<kind>/<name>", methods=["DELETE"])
    async def delete_resource(self, request, kind, name):
        await self._require(request, _RULE_RESOURCE.get(kind, kind), "delete")
        await self.auth.delete_resource(kind, name)
        return json_response(request, {"deleted": f"{kind}/{name}"})

    # --- locks -----------------------------------------------------------

    @app.route("/v1/locks", methods=["GET"])
    async def list_locks(self, request):
        await self._require(request, "lock", "list")
        return json_response(request, await self.auth.list_locks())

    @app.route("/v1/locks", methods=["POST"])
    async def create_lock(self, request):
        who = await self._require(request, "lock", "create")
        data = read_json(request)
        ttl = field(data, "ttl", required=False)
        lock = await self.auth.create_lock(
            field(data, "target", dict),
            ttl=httpapi.parse_duration(ttl) if ttl else None,
            message=field(data, "message", required=False),
            created_by=f"{who.kind}:{who.name}")
        return json_response(request, lock, 201)

    @app.route("/v1/locks/<lock_id>", methods=["DELETE"])
    async def delete_lock(self, request, lock_id):
        who = await self._require(request, "lock", "delete")
        await self.auth.delete_lock(lock_id, deleted_by=f"{who.kind}:{who.name}")
        return json_response(request, {"deleted": lock_id})

    # --- nodes -----------------------------------------------------------

    @app.route("/v1/watch", methods=["GET"])
    async def watch(self, request):
        return await node_watch(self.auth, request)

    @app.route("/v1/nodes", methods=["GET"])
    async def list_nodes(self, request):
        await self._require(request, "node", "list")
        return json_response(request, await self.auth.list_nodes())

    # --- app assertion keys (edgeaccess.apps.jwt) --------------------------

    @app.route("/v1/apps/jwt_keys", methods=["GET"])
    async def app_jwt_keys(self, request):
        await self._require(request, "cert_authority", "read")
        from edgeaccess.apps.jwt import AppSigningKeys

        keys = AppSigningKeys(self.auth.backend, self.auth.cluster_name, self.auth.clock,
                              self.auth.ca_key)
        await keys.load()
        return json_response(request, keys.describe())

    @app.route("/v1/apps/jwt_keys/rotate", methods=["POST"])
    async def rotate_app_jwt_key(self, request):
        who = await self._require(request, "cert_authority", "rotate")
        from edgeaccess.apps.jwt import AppSigningKeys

        keys = AppSigningKeys(self.auth.backend, self.auth.cluster_name, self.auth.clock,
                              self.auth.ca_key)
        await keys.load()
        kid = await keys.rotate()
        self.auth._emit("app.jwt_key.rotated", user=f"{who.kind}:{who.name}", kid=kid,
                        remote_addr=httpapi.remote_addr(request), success=True)
        return json_response(request, {"kid": kid, "keys": keys.describe()})

    # --- audit log and session recordings (edgeaccess.audit.http) ----------

    @app.route("/v1/audit/events", methods=["GET"])
    async def audit_search(self, request):
        from edgeaccess.audit import http as audit_http

        return await audit_http.search(self.auth, request)

    @app.route("/v1/audit/verify", methods=["GET"])
    async def audit_verify(self, request):
        from edgeaccess.audit import http as audit_http

        return await audit_http.verify(self.auth, request)


# --- routes both HTTPS apps serve --------------------------------------------


def add_node_routes(app: Klein) -> None:
    """Register what nodes call: join, renewal, heartbeats, roles, audit and
    recording delivery, and recordings for ``edge play``. Served by the auth
    API (3025) and by the proxy's web port (3080), since nodes behind NAT
    reach only the proxy. The app's class must have ``self.auth``."""
    from edgeaccess.audit import http as audit_http

    @app.route("/v1/join", methods=["POST"])
    async def join(self, request):
        data = read_json(request)
        result = await self.auth.join_node(
            token=field(data, "token"),
            name=field(data, "name"),
            uuid=field(data, "uuid", required=False),
            ssh_public_key=field(data, "ssh_public_key"),
            tls_public_key=field(data, "tls_public_key"),
            addresses=field(data, "addresses", list, required=False, default=[]),
            remote_addr=httpapi.remote_addr(request),
            agent_server=field(data, "agent_server", bool, required=False, default=False),
        )
        return json_response(request, result)

    @app.route("/v1/nodes/renew", methods=["POST"])
    async def renew(self, request):
        return await node_renew(self.auth, request)

    @app.route("/v1/nodes/heartbeat", methods=["POST"])
    async def heartbeat(self, request):
        return await node_heartbeat(self.auth, request)

    @app.route("/v1/nodes/roles", methods=["GET"])
    async def roles(self, request):
        return await node_roles(self.auth, request)

    @app.route("/v1/audit/events", methods=["POST"])
    async def audit_ingest(self, request):
        return await audit_http.node_events(self.auth, request)

    @app.route("/v1/recordings/<session_id>", methods=["PUT"])
    async def recording_chunk(self, request, session_id):
        return await audit_http.node_recording_put(self.auth, request, session_id)

    @app.route("/v1/recordings/<session_id>/complete", methods=["POST"])
    async def recording_complete(self, request, session_id):
        return await audit_http.node_recording_complete(self.auth, request, session_id)

    @app.route("/v1/recordings/<session_id>", methods=["GET"])
    async def recording(self, request, session_id):
        """A session's recording, for its own user, admins or auditors."""
        return await audit_http.recording(self.auth, request, session_id)


add_node_routes(AuthAPI.app)
