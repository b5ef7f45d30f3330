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

import attrs
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from edgeaccess import errors
from edgeaccess.identity import passwords, presets, rbac, resources, roles
from edgeaccess.pki import keys, sshca, x509ca
from edgeaccess.pki.authority import CertificateAuthority

_log = Logger()

DEFAULT_USER_TTL = timedelta(hours=12)
MIN_USER_TTL = timedelta(minutes=1)
NODE_CERT_TTL = timedelta(hours=24)
SIGNUP_TTL = timedelta(hours=1)
DEFAULT_TOKEN_TTL = timedelta(minutes=30)
MAX_TOKEN_TTL = timedelta(days=7)
TOKEN_TYPES = ("node", "trusted_cluster")
#: A node disappears from listings after this long without a heartbeat.
NODE_TTL = timedelta(minutes=5)
#: Principal put in a certificate whose roles allow no login, since OpenSSH
#: certificates need at least one; no Unix account can be named so.
NO_LOGIN_PRINCIPAL = "-edge-nologin-"

# A bcrypt hash of a random password: compared against when the user does
# not exist, so that unknown and known users take the same time.
_DUMMY_HASH = None


def _dumps(value) -> bytes:
    return json.dumps(value, sort_keys=True).encode("utf-8")


def _loads(item) -> dict:
    return json.loads(item.value)


def _iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@attrs.frozen
class Certificates:
    """What a successful login returns."""

    username: str
    ssh_certificate: str
    tls_certificate: str
    roles: tuple[str, ...]
    logins: tuple[str, ...]
    valid_before: datetime

    def to_dict(self) -> dict:
        return {
            "username": self.username,
            "ssh_certificate": self.ssh_certificate,
            "tls_certificate": self.tls_certificate,
            "roles": list(self.roles),
            "logins": list(self.logins),
            "valid_before": _iso(self.valid_before),
        }


def _validate_name(name: str, what: str) -> str:
    return resources.validate_resource_name(name, what)


def _load_public_key(text: str, what: str):
    try:
        return keys.load_public_key_openssh(text)
    except (ValueError, TypeError, UnicodeError):
        raise errors.BadRequest(f"{what} is not an OpenSSH public key")


def _load_pem_public_key(text: str, what: str):
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_public_key(text.encode("ascii"))
    except (ValueError, TypeError, UnicodeError):
        raise errors.BadRequest(f"{what} is not a PEM public key")


class AuthServer:
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

    # --- helpers -----------------------------------------------------------

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), timezone.utc)

    def _in_thread(self, f, *args):
        return deferToThreadPool(self._reactor, self._threadpool, f, *args)

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
                item = await self.backend.get(f"/resources/role/{name}")
            except errors.NotFound:
                _log.warn("role {role} does not exist; ignored", role=name)
                continue
            found.append(roles.parse_role(_loads(item)))
        return found

    async def all_roles(self) -> list[dict]:
        return [_loads(i) for i in await self.backend.get_range("/resources/role/")]

    # --- users -------------------------------------------------------------

    async def create_user(self, name: str, role_names, logins, *, traits=None) -> str:
        """Create a user without a password; returns a one-time signup token."""
        _validate_name(name, "user")
        role_names = [r for r in role_names if r]
        if not role_names:
            raise errors.BadRequest("a user needs at least one role (--roles)")
        existing = {d["metadata"]["name"] for d in await self.all_roles()}
        missing = [r for r in role_names if r not in existing]
        if missing:
            raise errors.BadRequest(f"unknown role(s): {', '.join(missing)}")
        for login in logins:
            _validate_login(login)
        record = {
            "name": name,
            "roles": list(role_names),
            "logins": list(logins),
            "traits": traits or {},
            "password_hash": None,
            "login_state": passwords.LoginState().to_dict(),
            "created": _iso(self.now()),
        }
        try:
            await self.backend.create(f"/users/{name}", _dumps(record))
        except errors.AlreadyExists:
            raise errors.AlreadyExists(f"user {name} already exists")
        token = secrets.token_hex(16)
        await self.backend.create(
            f"/signup/{token}", _dumps({"user": name}), expires=self.now() + SIGNUP_TTL
        )
        _log.info("created user {user} with roles {roles}", user=name, roles=role_names)
        self._emit("user.create", user=name, roles=list(role_names))
        return token

    async def get_user(self, name: str) -> dict:
        _validate_name(name, "user")
        try:
            return _loads(await self.backend.get(f"/users/{name}"))
        except errors.NotFound:
            raise errors.NotFound(f"user {name} not found")

    async def list_users(self) -> list[dict]:
        users = [_loads(i) for i in await self.backend.get_range("/users/")]
        return [_public_user(u, self.lockout, self.now()) for u in users]

    async def delete_user(self, name: str) -> None:
        _validate_name(name, "user")
        try:
            await self.backend.delete(f"/users/{name}")
        except errors.NotFound:
            raise errors.NotFound(f"user {name} not found")
        _log.info("deleted user {user}", user=name)
        self._emit("user.delete", user=name)

    async def set_password(self, name: str, password: str) -> None:
        user = await self.get_user(name)
        hashed = await self._in_thread(passwords.hash_password, password)
        user["password_hash"] = hashed
        user["login_state"] = passwords.LoginState().to_dict()
        await self.backend.put(f"/users/{name}", _dumps(user))
        _log.info("password set for user {user}", user=name)
        self._emit("user.password_change", user=name)

    async def complete_signup(self, token: str, password: str) -> str:
        """Set the password of the user a signup token was made for."""
        if not isinstance(token, str) or not token.isalnum() or len(token) > 64:
            raise errors.TokenInvalid("invalid or expired signup link")
        try:
            item = await self.backend.get(f"/signup/{token}")
        except errors.NotFound:
            raise errors.TokenInvalid("invalid or expired signup link")
        name = _loads(item)["user"]
        await self.set_password(name, password)
        try:
            await self.backend.delete(f"/signup/{token}")
        except errors.NotFound:
            pass
        return name

    async def signup_user(self, token: str) -> str:
        """The user a signup token belongs to (for the signup page)."""
        if not isinstance(token, str) or not token.isalnum() or len(token) > 64:
            raise errors.TokenInvalid("invalid or expired signup link")
        try:
            return _loads(await self.backend.get(f"/signup/{token}"))["user"]
        except errors.NotFound:
            raise errors.TokenInvalid("invalid or expired signup link")

    # --- login -------------------------------------------------------------

    async def authenticate_local(self, name: str, password: str, remote_addr: str = "") -> dict:
        """Check a local user's password, applying the lock-out policy."""
        global _DUMMY_HASH
        refusal = errors.AuthenticationFailed("invalid username or password")
        if not isinstance(name, str) or not resources.RESOURCE_NAME_PATTERN.fullmatch(name):
            raise refusal
        try:
            item = await self.backend.get(f"/users/{name}")
        except errors.NotFound:
            if _DUMMY_HASH is None:
                _DUMMY_HASH = await self._in_thread(
                    passwords.hash_password, secrets.token_hex(16))
            await self._in_thread(passwords.check_password, password or "x", _DUMMY_HASH)
            _log.warn("login refused for {user} from {addr}: no such user",
                      user=name, addr=remote_addr)
            self._emit("user.login", user=name, success=False, method="local",
                       remote_addr=remote_addr, error="no such user")
            raise refusal
        user = _loads(item)
        now = self.now()
        state = passwords.LoginState.from_dict(user.get("login_state") or {})
        if self.lockout.is_locked(state, now):
            _log.warn("login refused for {user} from {addr}: account locked until {until}",
                      user=name, addr=remote_addr, until=state.locked_until)
            self._emit("user.login", user=name, success=False, method="local",
                       remote_addr=remote_addr, error="account locked")
            raise errors.AccountLocked(
                f"account {name} is locked after too many failed logins; "
                f"try again after {_iso(state.locked_until)}"
            )
        ok = False
        if user.get("password_hash") and password:
            ok = await self._in_thread(passwords.check_password, password, user["password_hash"])
        if not ok:
            state = self.lockout.record_failure(state, now)
            user["login_state"] = state.to_dict()
            await self.backend.put(f"/users/{name}", _dumps(user))
            locked = self.lockout.is_locked(state, now)
            _log.warn("login refused for {user} from {addr}: wrong password{locked}",
                      user=name, addr=remote_addr,
                      locked="; account now locked" if locked else "")
            self._emit("user.login", user=name, success=False, method="local",
                       remote_addr=remote_addr, error="wrong password")
            if locked:
                self._emit("user.locked", user=name)
            raise refusal
        if state.failures or state.locked_until:
            user["login_state"] = self.lockout.reset(state).to_dict()
            await self.backend.put(f"/users/{name}", _dumps(user))
        return user

    async def login(self, *, username: str, password: str, ssh_public_key: str,
                    tls_public_key: str | None = None, auth: str = "local",
                    ttl: timedelta | None = None, remote_addr: str = "") -> Certificates:
        """Authenticate a user and sign certificates for their keys."""
        ssh_key = _load_public_key(ssh_public_key, "ssh_public_key")
        tls_key = (_load_pem_public_key(tls_public_key, "tls_public_key")
                   if tls_public_key else ssh_key)
        # Traits by plain name: {{internal.X}} and {{external.X}} both read
        # traits["X"] (see edgeaccess.identity.rbac).
        if auth in ("", "local"):
            user = await self.authenticate_local(username, password, remote_addr)
            role_names = user["roles"]
            traits = {**(user.get("traits") or {}), "logins": list(user.get("logins", []))}
            method = "local"
        else:
            from edgeaccess.identity.kinds import canonical_login_name

            external = await self._authenticate_connector(auth, username, password, remote_addr)
            role_names = list(external.roles)
            traits = {k: list(v) for k, v in external.traits.items()}
            method = "ldap"
            # The directory matched "ALICE" or " alice" to alice: certificates,
            # locks and audit must all name her "alice".
            username = canonical_login_name(username, traits)
        role_objects = await self.get_roles(role_names)
        checker = rbac.AccessChecker(role_objects, traits)
        logins = checker.allowed_logins()
        max_ttl = checker.max_session_ttl()
        ttl = min(ttl or DEFAULT_USER_TTL, max_ttl)
        if ttl < MIN_USER_TTL:
            raise errors.BadRequest("requested ttl is too short")
        now = self.now()
        ssh_cert = self.authority.sign_user(
            ssh_key,
            username=username,
            principals=logins or [NO_LOGIN_PRINCIPAL],
            roles=role_names,
            cluster=self.cluster_name,
            traits=traits,
            now=now,
            ttl=ttl,
            permit_port_forwarding=checker.port_forwarding(),
            permit_agent_forwarding=checker.forward_agent(),
        )
        identity = x509ca.Identity(
            kind="user", name=username, cluster=self.cluster_name,
            roles=tuple(role_names), logins=tuple(logins), traits=traits,
        )
        tls_cert = self.authority.sign_tls(tls_key, identity, now=now, ttl=ttl)
        _log.info("login of {user} ({method}{connector}) from {addr}: roles {roles}, "
                  "logins {logins}, valid {ttl}",
                  user=username, method=method,
                  connector="" if method == "local" else f" via {auth}",
                  addr=remote_addr, roles=role_names, logins=logins, ttl=ttl)
        self._emit("user.login", user=username, success=True, method=method,
                   connector=None if method == "local" else auth, remote_addr=remote_addr)
        return Certificates(
            username=username,
            ssh_certificate=ssh_cert.public_bytes().decode("ascii"),
            tls_certificate=x509ca.certificate_pem(tls_cert).decode("ascii"),
            roles=tuple(role_names),
            logins=tuple(logins),
            valid_before=now + ttl,
        )

    async def _authenticate_connector(self, name, username, password, remote_addr):
        """Authenticate ``username`` through the stored connector ``name``.

        The connector document is read on every login, so a connector replaced
        or removed (here or by another proxy on the same backend) takes effect
        at once. The lock-out count is kept per connector and folded user name
        (directories match ``ALICE`` or `` alice`` as ``alice``), and the
        logins of one user run one at a time, so neither another spelling nor
        a burst of parallel guesses gets more than the allowed failures.
        """
        from contextlib import nullcontext

        from edgeaccess.identity.kinds import login_name_key

        if not isinstance(name, str) or not resources.RESOURCE_NAME_PATTERN.fullmatch(name):
            raise errors.BadRequest("unknown login connector")
        try:
            item = await self.backend.get(f"/resources/ldap_connector/{name}")
        except errors.NotFound:
            self._login_methods.pop(name, None)
            raise errors.BadRequest(f"unknown login connector {name!r}")
        doc = _loads(item)
        method = self._login_methods.get(name)
        if method is None or getattr(method, "doc", doc) != doc:
            if self._connector_factory is None:
                raise errors.BadRequest(f"login connector {name!r} is not available")
            method = self._connector_factory(doc)
            self._login_methods[name] = method
        if not isinstance(username, str) or not username or len(username) > 256:
            raise errors.AuthenticationFailed("invalid username or password")
        user_key = login_name_key(username)
        lock_key = f"/ldap_lockout/{name}/{user_key}"
        one_at_a_time = getattr(method, "one_at_a_time", None)
        async with (one_at_a_time(user_key) if one_at_a_time else nullcontext()):
            now = self.now()
            try:
                state = passwords.LoginState.from_dict(_loads(await self.backend.get(lock_key)))
            except errors.NotFound:
                state = passwords.LoginState()
            if self.lockout.is_locked(state, now):
                _log.warn("login refused for {user} via {connector} from {addr}: account locked",
                          user=username, connector=name, addr=remote_addr)
                self._emit("user.login", user=username, success=False, method="ldap",
                           connector=name, remote_addr=remote_addr, error="account locked")
                raise errors.AccountLocked(
                    f"account {username} is locked after too many failed logins; "
                    f"try again after {_iso(state.locked_until)}"
                )
            try:
                identity = await method.authenticate(username, password)
            except errors.AuthenticationFailed as e:
                state = self.lockout.record_failure(state, self.now())
                await self.backend.put(lock_key, _dumps(state.to_dict()),
                                       expires=self.now() + self.lockout.window
                                       + self.lockout.lock_duration)
                _log.info("login refused for {user} via {connector} from {addr}: {reason}",
                          user=username, connector=name, addr=remote_addr, reason=e)
                self._emit("user.login", user=username, success=False, method="ldap",
                           connector=name, remote_addr=remote_addr, error=str(e))
                raise
            except errors.EdgeError as e:
                # The directory is down or slow: not the user's fault, not counted.
                self._emit("user.login", user=username, success=False, method="ldap",
                           connector=name, remote_addr=remote_addr, error=str(e))
                raise
            if state.failures:
                try:
                    await self.backend.delete(lock_key)
                except errors.NotFound:
                    pass
        return identity

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
        if not isinstance(token, str) or not token.isalnum() or len(token) > 64:
            raise errors.NotFound("token not found")
        try:
            await self.backend.delete(f"/tokens/{token}")
        except errors.NotFound:
            raise errors.NotFound("token not found")
        self._emit("token.delete")

    async def check_token(self, token: str, token_type: str) -> dict:
        """The record of a valid, unexpired token of ``token_type``."""
        if not isinstance(token, str) or not token.isalnum() or len(token) > 64:
            raise errors.TokenInvalid("the join token is invalid or unknown")
        try:
            item = await self.backend.get(f"/tokens/{token}")
        except errors.NotFound:
            raise errors.TokenInvalid("the join token is invalid, unknown or expired")
        record = _loads(item)
        if parse_iso(record["expires"]) <= self.now():
            raise errors.TokenExpired("the join token has expired")
        if record["type"] != token_type:
            raise errors.TokenInvalid(f"the join token is not a {token_type} token")
        return record

    # --- nodes -------------------------------------------------------------

    async def join_node(self, *, token: str, name: str, ssh_public_key: str,
                        tls_public_key: str, uuid: str | None = None,
                        addresses=(), remote_addr: str = "") -> dict:
        """Admit a node with a join token: sign its host and TLS certificates."""
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
        result = self._sign_node(node_uuid, name, ssh_public_key, tls_public_key, addresses)
        _log.info("node {name} ({uuid}) joined from {addr}", name=name, uuid=node_uuid,
                  addr=remote_addr)
        self._emit("node.join", node=name, node_id=node_uuid, success=True,
                   remote_addr=remote_addr)
        return result

    def renew_node(self, identity: x509ca.Identity, ssh_public_key: str,
                   tls_public_key: str, addresses=()) -> dict:
        """Re-sign a joined node's certificates (same name and uuid)."""
        if identity.kind != "node" or not identity.uuid:
            raise errors.AccessDenied("only nodes renew node certificates")
        return self._sign_node(identity.uuid, identity.name, ssh_public_key,
                               tls_public_key, addresses)

    def _sign_node(self, node_uuid, name, ssh_public_key, tls_public_key, addresses) -> dict:
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
        return {
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
        await self.backend.put(f"/nodes/{identity.uuid}", _dumps(stored),
                               expires=now + NODE_TTL)
        return stored

    async def list_nodes(self) -> list[dict]:
        nodes = [_loads(i) for i in await self.backend.get_range("/nodes/")]
        # SPEC: listings name the node's uuid "id" (edgectl nodes ls --format json).
        nodes = [{**n, "id": n["uuid"]} for n in nodes]
        return sorted(nodes, key=lambda n: (n["name"], n["uuid"]))

    async def find_node(self, name: str) -> dict | None:
        """A node by name or uuid (the most recent heartbeat wins)."""
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


def _validate_login(login: str) -> None:
    import re

    if not isinstance(login, str) or not (
        re.fullmatch(r"[a-z_][a-z0-9_.-]{0,31}\$?", login)
        or re.fullmatch(r"\{\{(internal|external)\.[a-zA-Z0-9_]+\}\}", login)
    ):
        raise errors.BadRequest(f"invalid login {login!r}")


def _public_user(user: dict, lockout, now) -> dict:
    state = passwords.LoginState.from_dict(user.get("login_state") or {})
    return {
        "name": user["name"],
        "roles": user["roles"],
        "logins": user.get("logins", []),
        "has_password": bool(user.get("password_hash")),
        "locked": lockout.is_locked(state, now),
        "created": user.get("created"),
    }


def _display_dict(doc: dict) -> dict:
    """A stored document as shown to admins: secrets redacted."""
    spec = doc.get("spec")
    if doc.get("kind") == "ldap_connector" and isinstance(spec, dict) and spec.get("bind_password"):
        doc = {**doc, "spec": {**spec, "bind_password": "********"}}
    if doc.get("kind") == "trusted_cluster" and isinstance(spec, dict) and spec.get("token"):
        doc = {**doc, "spec": {**spec, "token": "********"}}
    return doc
