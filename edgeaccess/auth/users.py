"""Users of the auth service: accounts, signup, password and connector logins.

A mixin of :class:`~edgeaccess.auth.service.AuthServer` (it uses its
backend, clock, thread pool, authority and audit); kept apart so each
module reads as one subject.
"""

from __future__ import annotations

import re
import secrets
from datetime import timedelta

from twisted.logger import Logger

from edgeaccess import errors
from edgeaccess.auth.common import (
    record_for_token,
    Certificates,
    _dumps,
    _iso,
    _load_pem_public_key,
    _load_public_key,
    _loads,
    _validate_name,
)
from edgeaccess.identity import passwords, rbac, resources
from edgeaccess.pki import x509ca

_log = Logger()

#: Principal put in a certificate whose roles allow no login, since OpenSSH
#: certificates need at least one; no Unix account can be named so.
NO_LOGIN_PRINCIPAL = "-edge-nologin-"
DEFAULT_USER_TTL = timedelta(hours=12)
MIN_USER_TTL = timedelta(minutes=1)
SIGNUP_TTL = timedelta(hours=1)

# A bcrypt hash of a random password: compared against when the user does
# not exist, so that unknown and known users take the same time.
_DUMMY_HASH = None


class UserAccounts:
    """User accounts and logins (mixed into ``AuthServer``)."""

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

    async def reset_user(self, name: str) -> str:
        """Forget a user's password (ending their web sessions) and return a
        new one-time signup token to set another."""
        user = await self.get_user(name)
        user["password_hash"] = None
        user["login_state"] = passwords.LoginState().to_dict()
        await self.backend.put(f"/users/{name}", _dumps(user))
        token = secrets.token_hex(16)
        await self.backend.create(
            f"/signup/{token}", _dumps({"user": name}), expires=self.now() + SIGNUP_TTL
        )
        _log.info("password of user {user} reset", user=name)
        self._emit("user.reset", user=name)
        return token

    async def complete_signup(self, token: str, password: str) -> str:
        """Set the password of the user a signup token was made for."""
        name = (await record_for_token(self.backend, "/signup/", token, _bad_signup()))["user"]
        await self.set_password(name, password)
        try:
            await self.backend.delete(f"/signup/{token}")
        except errors.NotFound:
            pass
        return name

    async def signup_user(self, token: str) -> str:
        """The user a signup token belongs to (for the signup page)."""
        return (await record_for_token(self.backend, "/signup/", token, _bad_signup()))["user"]

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
        await self._refuse_locked_login(username, method, remote_addr)
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

    async def _refuse_locked_login(self, username: str, method: str, remote_addr: str) -> None:
        """A locked user gets no certificate (the lock's message says why)."""
        from edgeaccess.identity import locks

        lock = locks.matching_lock(await self.list_locks(), self.clock.seconds(),
                                   user=username, user_cluster=self.cluster_name,
                                   local_cluster=self.cluster_name)
        if lock is not None:
            refusal = locks.refusal(lock)
            _log.warn("login refused for {user} from {addr}: lock {id}", user=username,
                      addr=remote_addr, id=lock["id"])
            self._emit("user.login", user=username, success=False, method=method,
                       remote_addr=remote_addr, lock_id=lock["id"], error=str(refusal))
            raise refusal

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


def _validate_login(login: str) -> None:
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


def _bad_signup() -> errors.TokenInvalid:
    return errors.TokenInvalid("invalid or expired signup link")
