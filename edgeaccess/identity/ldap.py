"""Login against a corporate LDAP directory (an ``ldap_connector``).

ldap3 is blocking, so every login runs in a bounded thread pool, with a
fresh ``SAFE_SYNC`` connection and timeouts on connect and on each answer
(DESIGN.md, "LDAP").  One login:

1. refuses an empty password or a malformed user name before any network
   traffic (an empty simple bind would be an anonymous bind);
2. binds as the connector's service account and searches the user with the
   escaped user name, refusing zero or several matches;
3. binds as the user's DN with the given password on a second connection;
4. searches the user's groups (user DN and name escaped in the filter) with
   the service account, maps them to roles, and the user's attributes to
   traits.

The caller sees :class:`~edgeaccess.errors.AuthenticationFailed` with a
generic message, or :class:`~edgeaccess.errors.IdentityProviderUnreachable`
with a short reason; the log gets the precise reason, never a password.
"""

from __future__ import annotations

import math
import re
import ssl
from collections.abc import Iterable, Mapping
from typing import Any, cast

import attrs
from ldap3 import NONE, SAFE_SYNC, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException, LDAPSSLConfigurationError
from ldap3.core.results import (
    RESULT_INVALID_CREDENTIALS,
    RESULT_NO_SUCH_OBJECT,
    RESULT_SIZE_LIMIT_EXCEEDED,
    RESULT_SUCCESS,
)
from ldap3.utils.conv import escape_filter_chars
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from edgeaccess.errors import AuthenticationFailed, IdentityProviderUnreachable
from edgeaccess.identity.connectors import LDAPConnector

_log = Logger()

#: Message for every refusal that must not tell which part was wrong.
INVALID_CREDENTIALS = "invalid username or password"
#: Default size of a login method's own thread pool.
DEFAULT_MAX_THREADS = 10
#: Longest user name sent to a directory.
MAX_USERNAME_LENGTH = 256

_PLACEHOLDER = re.compile(r"\{(username|user_dn)\}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@attrs.frozen
class ExternalIdentity:
    """A user authenticated by an external identity provider.

    :ivar username: the login name as the user gave it.
    :ivar user_dn: the user's entry in the directory.
    :ivar groups: names of the user's directory groups.
    :ivar roles: edgeaccess roles granted by ``groups_to_roles`` (never empty).
    :ivar traits: trait name -> values (``{{external.NAME}}`` in roles).
    :ivar connector: name of the connector that authenticated the user.
    """

    username: str
    user_dn: str
    groups: tuple[str, ...]
    roles: tuple[str, ...]
    traits: dict[str, list[str]] = attrs.field(hash=False)
    connector: str


class _Refused(Exception):
    """A login refused for a reason the user must not learn in detail."""

    def __init__(self, reason: str, user_message: str = INVALID_CREDENTIALS) -> None:
        super().__init__(reason)
        self.reason = reason
        self.user_message = user_message


class _Unreachable(Exception):
    """The directory could not be used; ``short`` is safe to show."""

    def __init__(self, short: str, detail: str) -> None:
        super().__init__(short)
        self.short = short
        self.detail = detail


def _fill_filter(template: str, values: Mapping[str, str]) -> str:
    """Replace ``{name}`` placeholders, escaping each value (one pass)."""
    def replace(match: re.Match[str]) -> str:
        value = values.get(match.group(1))
        return match.group(0) if value is None else escape_filter_chars(value)

    return _PLACEHOLDER.sub(replace, template)


def _values(raw_attributes: Mapping[str, Any], name: str) -> list[str]:
    """Text values of attribute ``name`` (case-insensitive); undecodable ones skipped."""
    wanted = name.casefold()
    values: list[str] = []
    for key, raw in raw_attributes.items():
        if key.casefold() != wanted:
            continue
        for value in raw if isinstance(raw, (list, tuple)) else [raw]:
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    continue
            if isinstance(value, str) and value not in values:
                values.append(value)
    return values


def _entries(response: Iterable[Mapping[str, Any]] | None) -> list[Mapping[str, Any]]:
    return [r for r in response or () if r.get("type") == "searchResEntry"]


def _classify(error: BaseException) -> str:
    """A short, user-safe reason for a communication failure."""
    text = str(error).lower()
    if isinstance(error, LDAPSSLConfigurationError):
        return "TLS configuration error"
    if isinstance(error, ssl.SSLCertVerificationError) or "certificate verify failed" in text:
        return "TLS certificate not trusted"
    if "doesn't match" in text or "hostname mismatch" in text:
        return "TLS certificate does not match the host"
    if "starttls" in text or "start tls" in text:
        return "StartTLS failed"
    if isinstance(error, ssl.SSLError) or "ssl" in text or "tls" in text:
        return "TLS handshake failed"
    if "timed out" in text or "timeout" in text:
        return "timed out"
    if "refused" in text:
        return "connection refused"
    if "name or service not known" in text or "getaddrinfo" in text:
        return "unknown host"
    return "connection failed"


def _validate_username(username: str) -> str | None:
    """Why ``username`` is refused before any traffic, or None."""
    if not isinstance(username, str) or not username:
        return "empty username"
    if len(username) > MAX_USERNAME_LENGTH:
        return "username too long"
    if _CONTROL.search(username):
        return "control characters in username"
    return None


class LDAPLoginMethod:
    """Authenticate users against one LDAP connector.

    :param connector: the validated connector resource.
    :param reactor: delivers results back from the thread pool.
    :param threadpool: run blocking ldap3 calls here; when None, the method
        owns a pool of at most ``max_threads`` threads, started on first use
        (or by :meth:`start`) and stopped by :meth:`stop` or reactor shutdown.
    """

    def __init__(
        self,
        connector: LDAPConnector,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool | None = None,
        max_threads: int = DEFAULT_MAX_THREADS,
    ) -> None:
        if max_threads < 1:
            raise ValueError("max_threads must be at least 1")
        self.connector = connector
        self._reactor = reactor
        self._max_threads = max_threads
        self._owns_pool = threadpool is None
        self._threadpool = threadpool or self._new_pool()
        self._shutdown_trigger: Any = None
        if not connector.use_ssl and not connector.start_tls:
            _log.warn(
                "LDAP connector {connector} sends passwords without TLS ({url})",
                connector=connector.name,
                url=connector.url,
            )

    def _new_pool(self) -> ThreadPool:
        return ThreadPool(
            minthreads=0, maxthreads=self._max_threads, name=f"ldap-login-{self.connector.name}"
        )

    def start(self) -> None:
        """Start the owned thread pool (a no-op for a pool passed in)."""
        if not self._owns_pool or self._threadpool.started:
            return
        self._threadpool.start()
        if IReactorCore.providedBy(self._reactor):
            self._shutdown_trigger = cast(IReactorCore, self._reactor).addSystemEventTrigger(
                "during", "shutdown", self.stop
            )

    def stop(self) -> None:
        """Stop the owned thread pool, waiting for logins in progress.

        A later :meth:`authenticate` starts a new pool.
        """
        if self._shutdown_trigger is not None:
            trigger, self._shutdown_trigger = self._shutdown_trigger, None
            try:
                cast(IReactorCore, self._reactor).removeSystemEventTrigger(trigger)
            except (ValueError, KeyError):
                pass  # already fired: we are running as that trigger
        if self._owns_pool and self._threadpool.started:
            self._threadpool.stop()
            # A stopped ThreadPool cannot run work again: a later login
            # starts a fresh one.
            self._threadpool = self._new_pool()

    def authenticate(self, username: str, password: str) -> Deferred[ExternalIdentity]:
        """Check ``username``/``password`` against the directory.

        :return: fires with the :class:`ExternalIdentity`, or fails with
            :class:`AuthenticationFailed` or :class:`IdentityProviderUnreachable`.
        """
        problem = _validate_username(username)
        if problem is None and (not isinstance(password, str) or not password):
            problem = "empty password"
        if problem is not None:
            self._log_refusal(username, problem)
            return fail(AuthenticationFailed(INVALID_CREDENTIALS))
        self.start()
        d = deferToThreadPool(
            self._reactor, self._threadpool, self._authenticate_blocking, username, password
        )
        d.addCallbacks(self._succeeded, self._failed, errbackArgs=(username,))
        return d

    # -- reactor thread ---------------------------------------------------

    def _log_refusal(self, username: str, reason: str) -> None:
        _log.info(
            "LDAP login of {username!r} via {connector} refused: {reason}",
            username=username[:MAX_USERNAME_LENGTH] if isinstance(username, str) else "",
            connector=self.connector.name,
            reason=reason,
        )

    def _succeeded(self, identity: ExternalIdentity) -> ExternalIdentity:
        _log.info(
            "LDAP login of {username!r} ({user_dn}) via {connector}: roles {roles}",
            username=identity.username,
            user_dn=identity.user_dn,
            connector=self.connector.name,
            roles=list(identity.roles),
        )
        return identity

    def _failed(self, failure: Failure, username: str) -> ExternalIdentity:
        """Turn a worker's failure into the caller's error (raised here)."""
        error = failure.value
        if isinstance(error, _Refused):
            self._log_refusal(username, error.reason)
            raise AuthenticationFailed(error.user_message)
        if isinstance(error, _Unreachable):
            _log.warn(
                "LDAP connector {connector} ({url}) unreachable during login of "
                "{username!r}: {detail}",
                connector=self.connector.name,
                url=self.connector.url,
                username=username,
                detail=error.detail,
            )
            raise IdentityProviderUnreachable(f"identity provider unreachable: {error.short}")
        _log.failure(
            "LDAP login via {connector} failed unexpectedly",
            failure,
            connector=self.connector.name,
        )
        raise IdentityProviderUnreachable("identity provider unreachable: internal error")

    # -- worker thread: no logging, no reactor calls ----------------------

    def _service_password(self) -> str:
        connector = self.connector
        if connector.bind_password is not None:
            return connector.bind_password
        assert connector.bind_password_file is not None
        try:
            with open(connector.bind_password_file, encoding="utf-8") as f:
                return f.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise _Unreachable(
                "service account password unavailable",
                f"cannot read bind_password_file {connector.bind_password_file}: "
                f"{type(e).__name__}",
            ) from None

    def _server(self) -> Server:
        connector = self.connector
        tls = None
        if connector.use_ssl or connector.start_tls:
            tls = Tls(
                validate=ssl.CERT_REQUIRED,
                ca_certs_file=connector.ca_file,
                sni=connector.host,
            )
        return Server(
            connector.host,
            port=connector.port,
            use_ssl=connector.use_ssl,
            tls=tls,
            get_info=NONE,
            connect_timeout=connector.timeout,
        )

    def _connect(self, server: Server, user: str, password: str) -> tuple[Connection, Mapping[str, Any]]:
        """Open, secure and bind a connection; return it with the bind result."""
        conn = Connection(
            server,
            user=user,
            password=password,
            client_strategy=SAFE_SYNC,
            # ldap3 packs this into SO_RCVTIMEO as an integer.
            receive_timeout=max(1, math.ceil(self.connector.timeout)),
            auto_referrals=False,
            read_only=True,
            raise_exceptions=False,
        )
        try:
            conn.open(read_server_info=False)
            if self.connector.start_tls:
                conn.start_tls(read_server_info=False)
            _ok, result, _response, _request = conn.bind(read_server_info=False)
        except BaseException:
            _close(conn)
            raise
        return conn, result or {}

    def _search(
        self, conn: Connection, what: str, base: str, search_filter: str,
        attributes: list[str], size_limit: int,
    ) -> tuple[list[Mapping[str, Any]], int]:
        _ok, result, response, _request = conn.search(
            base,
            search_filter,
            search_scope=SUBTREE,
            attributes=attributes or ["1.1"],
            size_limit=size_limit,
            time_limit=max(1, math.ceil(self.connector.timeout)),
        )
        code = (result or {}).get("result")
        if code not in (RESULT_SUCCESS, RESULT_SIZE_LIMIT_EXCEEDED):
            description = (result or {}).get("description", "no result")
            short = f"{what} search failed"
            if code == RESULT_NO_SUCH_OBJECT:
                short = f"{what} search base does not exist"
            raise _Unreachable(short, f"{what} search under {base} failed: {description} ({code})")
        return _entries(response), code

    def _authenticate_blocking(self, username: str, password: str) -> ExternalIdentity:
        try:
            return self._authenticate_directory(username, password)
        except LDAPException as e:
            raise _Unreachable(_classify(e), f"{type(e).__name__}: {e}") from None
        except (OSError, ssl.SSLError) as e:
            raise _Unreachable(_classify(e), f"{type(e).__name__}: {e}") from None

    def _authenticate_directory(self, username: str, password: str) -> ExternalIdentity:
        connector = self.connector
        server = self._server()
        service, result = self._connect(server, connector.bind_dn, self._service_password())
        try:
            if result.get("result") != RESULT_SUCCESS:
                raise _Unreachable(
                    "service account bind refused",
                    f"bind as {connector.bind_dn} refused: {result.get('description')}",
                )
            trait_attributes = sorted(
                {a for attrs_ in connector.attributes_to_traits.values() for a in attrs_}
            )
            users, code = self._search(
                service,
                "user",
                connector.user_search.base_dn,
                _fill_filter(connector.user_search.filter, {"username": username}),
                trait_attributes,
                size_limit=2,
            )
            if len(users) > 1 or code == RESULT_SIZE_LIMIT_EXCEEDED:
                raise _Refused("several directory entries match the username")
            if not users:
                raise _Refused("no such user")
            user = users[0]
            user_dn = user.get("dn")
            if not isinstance(user_dn, str) or not user_dn:
                raise _Refused("user entry without DN")

            user_conn, user_result = self._connect(server, user_dn, password)
            _close(user_conn)
            if user_result.get("result") != RESULT_SUCCESS:
                if user_result.get("result") == RESULT_INVALID_CREDENTIALS:
                    raise _Refused(f"wrong password for {user_dn}")
                raise _Refused(f"bind as {user_dn} refused: {user_result.get('description')}")

            groups_search = connector.group_search
            groups_found, _code = self._search(
                service,
                "group",
                groups_search.base_dn,
                _fill_filter(groups_search.filter, {"username": username, "user_dn": user_dn}),
                [groups_search.name_attribute],
                size_limit=0,
            )
        finally:
            _close(service)

        groups: list[str] = []
        for entry in groups_found:
            for name in _values(entry.get("raw_attributes", {}), groups_search.name_attribute):
                if name not in groups:
                    groups.append(name)
        member_of = {g.casefold() for g in groups}
        roles: list[str] = []
        for mapping in connector.groups_to_roles:
            if mapping.group.casefold() in member_of:
                roles.extend(r for r in mapping.roles if r not in roles)
        if not roles:
            raise _Refused(
                f"{user_dn} is in no mapped group (groups: {groups})",
                f"user {username} is not in any group mapped to a role",
            )

        raw = user.get("raw_attributes", {})
        traits: dict[str, list[str]] = {}
        for trait, attributes in connector.attributes_to_traits.items():
            values: list[str] = []
            for attribute in attributes:
                values.extend(v for v in _values(raw, attribute) if v not in values)
            traits[trait] = values
        return ExternalIdentity(
            username=username,
            user_dn=user_dn,
            groups=tuple(groups),
            roles=tuple(roles),
            traits=traits,
            connector=connector.name,
        )


def _close(conn: Connection) -> None:
    try:
        conn.unbind()
    except (LDAPException, OSError):
        pass
