"""The auth service: the cluster's single holder of CA keys.

Plain business logic over an :class:`~edgeaccess.backend.interfaces.IBackend`,
with no HTTP in it: the Klein apps (:mod:`edgeaccess.auth.api`,
:mod:`edgeaccess.proxy.web`) call these methods and map
:mod:`edgeaccess.errors` to HTTP answers.

Storage layout (JSON values)::

    /users/NAME                 user record (password hash, roles, logins, lock-out state)
    /signup/TOKEN               one-time signup token -> user name (expires)
    /tokens/TOKEN               join token (type, expires)
    /nodes/UUID                 node heartbeat record (expires when stale)
    /resources/KIND/NAME        roles, connectors, trusted clusters (resource documents)
"""

from __future__ import annotations

import json
import secrets
import uuid as uuidlib
from datetime import datetime, timedelta, timezone

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from edgeaccess import errors
from edgeaccess.identity import passwords, presets, resources, roles
from edgeaccess.pki import sshca, x509ca
from edgeaccess.pki.authority import CertificateAuthority
from edgeaccess.auth.common import (
    record_for_token,
    well_formed_token,  # noqa: F401  (re-exported)
    Certificates,
    _dumps,
    _iso,
    _load_pem_public_key,
    _load_public_key,
    _loads,
    _validate_name,
    parse_iso,
)
from edgeaccess.auth.locks import LockAdmin
from edgeaccess.auth.users import (  # noqa: F401  (re-exported)
    DEFAULT_USER_TTL,
    MIN_USER_TTL,
    NO_LOGIN_PRINCIPAL,
    SIGNUP_TTL,
    UserAccounts,
)

_log = Logger()

NODE_CERT_TTL = timedelta(hours=24)
DEFAULT_TOKEN_TTL = timedelta(minutes=30)
MAX_TOKEN_TTL = timedelta(days=7)
TOKEN_TYPES = ("node", "trusted_cluster")
#: A node disappears from listings after this long without a heartbeat.
NODE_TTL = timedelta(minutes=5)



class AuthServer(UserAccounts, LockAdmin):
    """Users, roles, tokens, nodes and certificate signing for one cluster.

    :param authority: the cluster's CAs.
    :param backend: an ``IBackend``.
    :param clock: an ``IReactorTime`` (``seconds()`` is "now").
    :param threadpool: where bcrypt runs, so the reactor never waits on it.
    :param reactor: used with ``threadpool`` for the thread hop.
    :param login_methods: connector name -> object with
        ``authenticate(username, password) -> Deferred[ExternalIdentity]``;
        the auth service builds LDAP ones from stored connectors when
        ``connector_factory`` is given.
    """

    def __init__(self, authority: CertificateAuthority, backend, clock, *,
                 reactor, threadpool, connector_factory=None,
                 lockout: passwords.LockoutPolicy | None = None,
                 audit=None) -> None:
        self.authority = authority
        self.cluster_name = authority.cluster_name
        self.backend = backend
        self.clock = clock
        self._reactor = reactor
        self._threadpool = threadpool
        self._connector_factory = connector_factory
        self._login_methods: dict[str, object] = {}
        self.lockout = lockout or passwords.LockoutPolicy()
        #: kind -> object with before_upsert(obj), after_delete(name) and
        #: after_change(name) coroutines (trusted clusters use it).
        self.resource_hooks: dict[str, object] = {}
        self.audit = audit
        #: The control-plane cache (edgeaccess.controlplane.cache), when the
        #: proxy runs one: reads of roles, locks and nodes come from it.
        self.cache = None
        #: The LAN nodes' push streams (edgeaccess.controlplane.stream).
        self.watch_streams = None
        #: ``() -> bytes | None``: the cluster's CA key (edgeaccess.pki.castore),
        #: which seals the app assertion keys; the proxy sets it (None until
        #: its CAs are loaded).
        self.ca_key = lambda: None

    # --- helpers -----------------------------------------------------------

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), timezone.utc)

    def _in_thread(self, f, *args):
        return deferToThreadPool(self._reactor, self._threadpool, f, *args)

    async def _range(self, prefix: str) -> list:
        """Items under ``prefix``: from the cache when it holds them."""
        if self.cache is not None and self.cache.covers(prefix):
            return self.cache.get_range(prefix)
        return await self.backend.get_range(prefix)

    async def _get(self, key: str):
        """The item at ``key`` (NotFound): from the cache when it holds it."""
        if self.cache is not None and self.cache.covers(key):
            item = self.cache.get(key)
            if item is None:
                raise errors.NotFound("item not found")
            return item
        return await self.backend.get(key)

    def _emit(self, event: str, **fields) -> None:
        if self.audit is not None:
            self.audit.emit(event, **fields)

    async def bootstrap(self) -> None:
        """Create what a new cluster needs: the preset roles."""
        for name, role in presets.PRESET_ROLES.items():
            key = f"/resources/role/{name}"
            try:
                await self.backend.create(key, _dumps(roles.role_to_dict(role)))
                _log.info("created preset role {role}", role=name)
            except errors.AlreadyExists:
                pass
        _log.info("preset roles ready")

    # --- resources (roles, connectors, trusted clusters) -----------------

    async def upsert_resource(self, doc: dict, *, force: bool = False) -> object:
        """Validate and store one resource document."""
        obj = resources.parse_resource(doc)
        kind = resources.resource_kind(obj)
        name = resources.resource_name(obj)
        key = f"/resources/{kind}/{name}"
        # Stored unredacted (connector bind passwords included): the backend
        # is as secret as the CA keys beside it; _display_dict redacts.
        value = _dumps(resources.resource_to_dict(obj))
        hook = self.resource_hooks.get(kind)
        if not force:
            try:
                await self.backend.get(key)
                raise errors.AlreadyExists(
                    f"{kind} {name} already exists (use --force to replace it)")
            except errors.NotFound:
                pass
        if hook is not None:
            # e.g. a trusted cluster: the exchange with the root must succeed
            # before the resource is stored.
            await hook.before_upsert(obj)
        if force:
            await self.backend.put(key, value)
        else:
            try:
                await self.backend.create(key, value)
            except errors.AlreadyExists:
                raise errors.AlreadyExists(
                    f"{kind} {name} already exists (use --force to replace it)"
                )
        self._login_methods.pop(name, None)
        _log.info("stored {kind} {name}", kind=kind, name=name)
        self._emit(f"{kind}.created", name=name)
        if hook is not None:
            await hook.after_change(name)
        return obj

    async def get_resources(self, kind: str, name: str | None = None) -> list[dict]:
        if kind not in resources.registered_kinds():
            raise errors.BadRequest(
                f"unknown resource kind {kind!r} (known: {', '.join(resources.registered_kinds())})"
            )
        if name is not None:
            _validate_name(name, kind)
            try:
                item = await self.backend.get(f"/resources/{kind}/{name}")
            except errors.NotFound:
                raise errors.NotFound(f"{kind} {name} not found")
            docs = [_loads(item)]
        else:
            docs = [_loads(i) for i in await self.backend.get_range(f"/resources/{kind}/")]
        return [_display_dict(d) for d in docs]

    async def delete_resource(self, kind: str, name: str) -> None:
        if kind not in resources.registered_kinds():
            raise errors.BadRequest(
                f"unknown resource kind {kind!r} (known: {', '.join(resources.registered_kinds())})"
            )
        _validate_name(name, kind)
        try:
            await self.backend.delete(f"/resources/{kind}/{name}")
        except errors.NotFound:
            raise errors.NotFound(f"{kind} {name} not found")
        self._login_methods.pop(name, None)
        _log.info("deleted {kind} {name}", kind=kind, name=name)
        self._emit(f"{kind}.deleted", name=name)
        hook = self.resource_hooks.get(kind)
        if hook is not None:
            await hook.after_delete(name)
            await hook.after_change(name)

    async def get_roles(self, names) -> list:
        """The ``Role`` objects for ``names``; unknown names are skipped (logged)."""
        found = []
        for name in names:
            try:
                item = await self._get(f"/resources/role/{name}")
            except errors.NotFound:
                _log.warn("role {role} does not exist; ignored", role=name)
                continue
            found.append(roles.parse_role(_loads(item)))
        return found

    async def all_roles(self) -> list[dict]:
        return [_loads(i) for i in await self._range("/resources/role/")]

    # --- join tokens -------------------------------------------------------

    async def create_token(self, token_type: str, ttl: timedelta | None = None) -> dict:
        if token_type not in TOKEN_TYPES:
            raise errors.BadRequest(
                f"unknown token type {token_type!r} (known: {', '.join(TOKEN_TYPES)})")
        if ttl is None:
            ttl = DEFAULT_TOKEN_TTL
        if ttl <= timedelta(0) or ttl > MAX_TOKEN_TTL:
            raise errors.BadRequest("token ttl must be between 1s and 7 days")
        token = secrets.token_hex(16)
        expires = self.now() + ttl
        record = {"token": token, "type": token_type, "expires": _iso(expires)}
        await self.backend.create(f"/tokens/{token}", _dumps(record), expires=expires)
        _log.info("created {type} join token expiring {expires}", type=token_type,
                  expires=record["expires"])
        self._emit("token.create", token_type=token_type)
        return record

    async def list_tokens(self) -> list[dict]:
        return [_loads(i) for i in await self.backend.get_range("/tokens/")]

    async def delete_token(self, token: str) -> None:
        if not well_formed_token(token):
            raise errors.NotFound("token not found")
        try:
            await self.backend.delete(f"/tokens/{token}")
        except errors.NotFound:
            raise errors.NotFound("token not found")
        self._emit("token.delete")

    async def check_token(self, token: str, token_type: str) -> dict:
        """The record of a valid, unexpired token of ``token_type``."""
        record = await record_for_token(
            self.backend, "/tokens/", token,
            errors.TokenInvalid("the join token is invalid, unknown or expired"))
        if parse_iso(record["expires"]) <= self.now():
            raise errors.TokenExpired("the join token has expired")
        if record["type"] != token_type:
            raise errors.TokenInvalid(f"the join token is not a {token_type} token")
        return record

    # --- nodes -------------------------------------------------------------

    async def join_node(self, *, token: str, name: str, ssh_public_key: str,
                        tls_public_key: str, uuid: str | None = None,
                        addresses=(), remote_addr: str = "",
                        agent_server: bool = False) -> dict:
        """Admit a node with a join token: sign its host and TLS certificates.

        :param agent_server: the node listens for the proxy (``--agent-listen``):
            sign it a server certificate too (see :meth:`_sign_node`).
        """
        try:
            await self.check_token(token, "node")
        except errors.TokenInvalid as e:
            _log.warn("node join refused for {name} from {addr}: {reason}",
                      name=name, addr=remote_addr, reason=e)
            self._emit("node.join", node=name, success=False, remote_addr=remote_addr,
                       error=str(e))
            raise
        _validate_name(name, "node")
        node_uuid = uuid or str(uuidlib.uuid4())
        try:
            uuidlib.UUID(node_uuid)
        except ValueError:
            raise errors.BadRequest("uuid is not a UUID")
        result = self._sign_node(node_uuid, name, ssh_public_key, tls_public_key, addresses,
                                 agent_server=agent_server, remote_addr=remote_addr)
        _log.info("node {name} ({uuid}) joined from {addr}", name=name, uuid=node_uuid,
                  addr=remote_addr)
        self._emit("node.join", node=name, node_id=node_uuid, success=True,
                   remote_addr=remote_addr)
        return result

    def renew_node(self, identity: x509ca.Identity, ssh_public_key: str,
                   tls_public_key: str, addresses=(), *, agent_server: bool = False,
                   remote_addr: str = "") -> dict:
        """Re-sign a joined node's certificates (same name and uuid)."""
        if identity.kind != "node" or not identity.uuid:
            raise errors.AccessDenied("only nodes renew node certificates")
        return self._sign_node(identity.uuid, identity.name, ssh_public_key,
                               tls_public_key, addresses, agent_server=agent_server,
                               remote_addr=remote_addr)

    def _sign_node(self, node_uuid, name, ssh_public_key, tls_public_key, addresses, *,
                   agent_server: bool = False, remote_addr: str = "") -> dict:
        """The node's certificates: SSH host, TLS client and, for a node that
        listens for the proxy (``agent_server``), a TLS *server* certificate
        with the same key (kind ``node``, EKU serverAuth only) naming the
        addresses it gave and the one it called from: the proxy dials one of
        them and checks it is this node (docs/security.md, "Who trusts whom").
        """
        ssh_key = _load_public_key(ssh_public_key, "ssh_public_key")
        tls_key = _load_pem_public_key(tls_public_key, "tls_public_key")
        now = self.now()
        extra = [a for a in addresses if isinstance(a, str) and len(a) < 256]
        host_cert = self.authority.sign_host(
            ssh_key, host_id=node_uuid,
            principals=sshca.node_principals(name, node_uuid, self.cluster_name, extra),
            now=now, ttl=NODE_CERT_TTL,
        )
        identity = x509ca.Identity(kind="node", name=name, cluster=self.cluster_name,
                                   uuid=node_uuid)
        tls_cert = self.authority.sign_tls(tls_key, identity, now=now, ttl=NODE_CERT_TTL)
        server: dict = {}
        if agent_server:
            dns, ips = _server_names([*extra, remote_addr])
            server_cert = self.authority.sign_tls(
                tls_key, identity, now=now, ttl=NODE_CERT_TTL, dns_names=dns,
                ip_addresses=ips, usage="server")
            server["tls_server_certificate"] = x509ca.certificate_pem(server_cert).decode("ascii")
        return {
            **server,
            "uuid": node_uuid,
            "name": name,
            "cluster_name": self.cluster_name,
            "ssh_host_certificate": host_cert.public_bytes().decode("ascii"),
            "tls_certificate": x509ca.certificate_pem(tls_cert).decode("ascii"),
            "tls_ca": self.authority.tls_ca_pem,
            "ssh_user_ca": [self.authority.user_ca_public_line],
            "ssh_host_ca": [self.authority.host_ca_public_line],
            "valid_before": _iso(now + NODE_CERT_TTL),
        }

    #: Nodes known to be up without a backend write: the proxy's tunnelled
    #: nodes (its tunnel registry is the truth while a tunnel is up). An
    #: object with ``records()`` and ``find(name_or_uuid)``, each returning
    #: node records (name, uuid, address, labels); they win over stored ones.
    live_nodes = None

    async def heartbeat(self, identity: x509ca.Identity, record: dict,
                        remote_addr: str = "") -> dict:
        """Register or refresh a node; a node can only register as itself."""
        if identity.kind != "node" or not identity.uuid:
            raise errors.AccessDenied("only nodes send heartbeats")
        if record.get("name") != identity.name or record.get("uuid", identity.uuid) != identity.uuid:
            _log.warn("node {uuid} ({name}) tried to register as {other}",
                      uuid=identity.uuid, name=identity.name, other=record.get("name"))
            raise errors.AccessDenied("a node can only register as itself")
        labels = record.get("labels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise errors.BadRequest("labels must map strings to strings")
        address = record.get("address") or "tunnel"
        if not isinstance(address, str) or len(address) > 256:
            raise errors.BadRequest("address must be host:port or 'tunnel'")
        if address != "tunnel":
            host, _, port = address.rpartition(":")
            if not port.isdigit():
                raise errors.BadRequest("address must be host:port or 'tunnel'")
            if host in ("", "0.0.0.0", "[::]", "::") and remote_addr:
                # A node listening on every interface: dial it where it came from.
                host = f"[{remote_addr}]" if ":" in remote_addr else remote_addr
                address = f"{host}:{port}"
        now = self.now()
        stored = {
            "name": identity.name,
            "uuid": identity.uuid,
            "cluster": self.cluster_name,
            "address": address,
            "labels": labels,
            "version": str(record.get("version", ""))[:32],
            "last_heartbeat": _iso(now),
        }
        if record.get("agent") is not None:
            stored["agent"] = _agent_record(record["agent"], identity.name, remote_addr)
        await self.backend.put(f"/nodes/{identity.uuid}", _dumps(stored),
                               expires=now + NODE_TTL)
        return stored

    def _live_node(self, record: dict, stored: dict | None, now: str) -> dict:
        return {**(stored or {"version": ""}), **record, "cluster": self.cluster_name,
                "last_heartbeat": now}

    async def list_nodes(self) -> list[dict]:
        stored = {n["uuid"]: n for n in map(_loads, await self._range("/nodes/"))}
        if self.live_nodes is not None:
            now = _iso(self.now())
            for record in self.live_nodes.records():
                uuid = record["uuid"]
                stored[uuid] = self._live_node(record, stored.get(uuid), now)
        # SPEC: listings name the node's uuid "id" (edgectl nodes ls --format json).
        nodes = [{**n, "id": n["uuid"]} for n in stored.values()]
        return sorted(nodes, key=lambda n: (n["name"], n["uuid"]))

    async def find_node(self, name: str) -> dict | None:
        """A node by name or uuid (the most recent heartbeat wins: a live
        tunnelled node is heard from now)."""
        if self.live_nodes is not None:
            live = self.live_nodes.find(name)
            if live:
                node = self._live_node(live[0], None, _iso(self.now()))
                return {**node, "id": node["uuid"]}
        matches = [n for n in await self.list_nodes() if name in (n["name"], n["uuid"])]
        if not matches:
            return None
        return max(matches, key=lambda n: n["last_heartbeat"])

    # --- status ------------------------------------------------------------

    def status(self) -> dict:
        return {
            "cluster_name": self.cluster_name,
            "ca_pin": self.authority.pin,
            "fingerprints": self.authority.fingerprints(),
            "ssh_user_ca": [self.authority.user_ca_public_line],
            "ssh_host_ca": [self.authority.host_ca_public_line],
        }


def _agent_record(agent, node_name: str, remote_addr: str) -> dict:
    """The LAN agent a direct node announces in its heartbeat (``--agent-listen``):
    ``{"address": "host:port", "inventory": {...}}`` with the inventory
    checked as a tunnel's ``Hello`` is (its Kubernetes clusters and apps)."""
    from edgeaccess.tunnel.protocol import Inventory

    if not isinstance(agent, dict):
        raise errors.BadRequest("agent must be an object")
    address = agent.get("address")
    if not isinstance(address, str) or len(address) > 256:
        raise errors.BadRequest("agent address must be host:port")
    host, _, port = address.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.BadRequest("agent address must be host:port")
    if host in ("", "0.0.0.0", "[::]", "::") and remote_addr:
        host = f"[{remote_addr}]" if ":" in remote_addr else remote_addr
    inventory = Inventory.from_json(json.dumps(agent.get("inventory")))
    if inventory.name != node_name:
        raise errors.AccessDenied("a node can only announce its own agent")
    return {"address": f"{host}:{port}", "inventory": json.loads(inventory.to_json())}


def _server_names(hosts) -> tuple[list[str], list[str]]:
    """``(dns_names, ip_addresses)`` of a node's server certificate: the
    well-formed ones among ``hosts`` (addresses a node gives, the one it
    called from); wildcards and anything else are left out."""
    import ipaddress
    import re

    dns: list[str] = []
    ips: list[str] = []
    for host in hosts:
        if not isinstance(host, str):
            continue
        host = host.strip().strip("[]")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            if re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})"
                            r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*", host) \
                    and host.lower() not in dns:
                dns.append(host.lower())
            continue
        if not address.is_unspecified and str(address) not in ips:
            ips.append(str(address))
    return dns, ips


def _display_dict(doc: dict) -> dict:
    """A stored document as shown to admins: secrets redacted."""
    spec = doc.get("spec")
    if doc.get("kind") == "ldap_connector" and isinstance(spec, dict) and spec.get("bind_password"):
        doc = {**doc, "spec": {**spec, "bind_password": "********"}}
    if doc.get("kind") == "trusted_cluster" and isinstance(spec, dict) and spec.get("token"):
        doc = {**doc, "spec": {**spec, "token": "********"}}
    return doc
