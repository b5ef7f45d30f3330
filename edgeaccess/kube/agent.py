"""The Kubernetes agent on a node: ``kube`` channels in, the API with the agent's credential out.

Each ``kube`` channel the proxy opens carries HTTP/1.1 requests of one
user connection. For every request the agent

1. reads who the user is: the user's X.509 certificate the proxy forwards
   (``Edge-User-Certificate``, verified here against the cluster CA), or, for
   a user of a trusted root cluster, the identity its own proxy asserts
   (``Edge-Identity``; the tunnel is mutually authenticated);
2. decides again, with the roles it caches, which user and groups the
   request may reach the API as (``--as``/``--as-group`` included), and
   answers a ``Status`` 403 itself when nothing is allowed;
3. drops every credential and impersonation header the client sent, adds
   its own credential and ``Impersonate-User``/``Impersonate-Group``, and
   writes the request to its connection to the API (one per channel,
   reused for every request of that channel, kept for the next channel when
   the user leaves);
4. relays the answer back; a ``101 Switching Protocols`` (exec, attach,
   port-forward over WebSocket or SPDY) turns both directions into a plain
   byte splice.

The API being down, or answering garbage, gets a ``Status`` error (502/503)
that never includes the agent's credential.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from typing import Callable

from cryptography import x509
from twisted.internet import defer, ssl, threads
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from edgeaccess import errors, httpwire
from edgeaccess.kube.access import Impersonation
from edgeaccess.kube.kubeconfig import (
    AgentConfig,
    Credential,
    read_static_credential,
    run_exec_plugin,
)
from edgeaccess.kube.pending import PendingRequestBytes
from edgeaccess.kube.status import status_response
from edgeaccess.pki import x509ca
from edgeaccess.proxy.splice import no_delay, tune_transport

_log = Logger()

#: Header names (lowercase) the client may not send on to the API.
_STRIPPED_PREFIXES = (b"impersonate-", b"edge-")
_STRIPPED = {b"authorization", b"proxy-authorization", b"host", b"connection", b"keep-alive",
             b"proxy-connection", b"te", b"trailer"}
#: Idle API connections kept for new channels.
_POOL_SIZE = 16
_CERT_CACHE = 512


class UserIdentity:
    """Who a request is for, as the agent established it."""

    @property
    def username(self) -> str:  # what lock checks read
        return self.name

    __slots__ = ("name", "cluster", "roles", "traits")

    def __init__(self, name: str, cluster: str, roles, traits) -> None:
        self.name = name
        self.cluster = cluster
        self.roles = tuple(roles)
        self.traits = dict(traits or {})


class KubeAgent:
    """Publishes one Kubernetes API through the node's tunnel.

    :param name: the Kubernetes cluster's name in edgeaccess.
    :param labels: its labels (``--kube-labels``).
    :param config: what the kubeconfig said (server, CA, credential).
    :param decide: ``decide(identity, kube_labels, as_user, as_groups) ->
        Impersonation``; raises AccessDenied (the node's roles).
    :param ca_certs: callable returning the cluster CA certificates user
        certificates must chain to.
    :param cluster_name: this node's cluster.
    :param lock_check: ``lock_check(user)`` raises AccessDenied for a locked user.
    :param sessions: callable returning the node's ``LiveSessions`` (or None):
        each channel is registered, so a lock ends it.
    """

    def __init__(self, *, name: str, labels: dict[str, str], config: AgentConfig, reactor,
                 decide: Callable[..., Impersonation], ca_certs: Callable[[], list],
                 cluster_name: str, lock_check: Callable | None = None,
                 sessions: Callable | None = None) -> None:
        self.lock_check = lock_check
        self.sessions = sessions or (lambda: None)
        self.name = name
        self.labels = dict(labels)
        self.config = config
        self.reactor = reactor
        self.decide = decide
        self.ca_certs = ca_certs
        self.cluster_name = cluster_name
        self.credential: Credential | None = None
        self._refresh_call = None
        self._tls_options = None
        self._pool: list[_APIConnection] = []
        self._certs: dict[bytes, tuple[x509.Certificate, x509ca.Identity]] = {}

    # --- credential ------------------------------------------------------------

    def start(self) -> defer.Deferred:
        """Read the credential (and keep an exec plugin's fresh)."""
        return defer.Deferred.fromCoroutine(self._refresh())

    def stop(self) -> None:
        if self._refresh_call is not None and self._refresh_call.active():
            self._refresh_call.cancel()
        for connection in self._pool:
            connection.transport.loseConnection()
        self._pool = []

    async def _refresh(self) -> None:
        config = self.config
        try:
            if config.exec_plugin is not None:
                credential = await threads.deferToThreadPool(
                    self.reactor, self.reactor.getThreadPool(), run_exec_plugin,
                    config.exec_plugin)
            else:
                credential = await threads.deferToThreadPool(
                    self.reactor, self.reactor.getThreadPool(), read_static_credential, config)
            self._set_credential(credential)
            delay = 300.0 if config.token_file else None
            if credential.expires is not None:
                delay = max(5.0, (credential.expires - self.reactor.seconds()) * 0.8)
        except (errors.EdgeError, OSError) as e:
            _log.error("Kubernetes agent {name}: no credential for the API: {reason}",
                       name=self.name, reason=e)
            delay = 10.0
        if delay is not None:
            self._refresh_call = self.reactor.callLater(
                delay, lambda: defer.Deferred.fromCoroutine(self._refresh()))

    def _set_credential(self, credential: Credential) -> None:
        changed = self.credential is None or \
            (credential.cert_pem, credential.key_pem) != (self.credential.cert_pem,
                                                         self.credential.key_pem)
        self.credential = credential
        if changed:
            self._tls_options = self._make_tls_options(credential)
            for connection in self._pool:
                connection.transport.loseConnection()
            self._pool = []

    def _make_tls_options(self, credential: Credential):
        if not self.config.tls:
            return None
        client_cert = None
        if credential.cert_pem and credential.key_pem:
            client_cert = ssl.PrivateCertificate.loadPEM(
                credential.key_pem.decode() + "\n" + credential.cert_pem.decode())
        hostname = self.config.tls_server_name or self.config.host
        if self.config.insecure:
            options = ssl.CertificateOptions(
                privateKey=client_cert.privateKey.original if client_cert else None,
                certificate=client_cert.original if client_cert else None)
            return options
        trust = ssl.Certificate.loadPEM(self.config.ca_pem) if self.config.ca_pem else None
        return ssl.optionsForClientTLS(hostname, trustRoot=trust, clientCertificate=client_cert)

    # --- users -----------------------------------------------------------------

    def identify(self, head: httpwire.Head) -> UserIdentity:
        """The user of a request (see the module docstring).

        :raises errors.AccessDenied: no verifiable identity.
        """
        cert_header = head.get(b"edge-user-certificate")
        if cert_header:
            cert, identity = self._verified(cert_header)
            now = datetime.fromtimestamp(self.reactor.seconds(), timezone.utc)
            if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
                raise errors.AccessDenied("your certificate has expired: run edge login")
            if identity.kind != "user":
                raise errors.AccessDenied("only user certificates reach Kubernetes")
            return UserIdentity(identity.name, identity.cluster, identity.roles,
                                identity.traits)
        asserted = head.get(b"edge-identity")
        if asserted:
            try:
                data = json.loads(asserted)
                identity = UserIdentity(str(data["user"]), str(data["cluster"]),
                                        [str(r) for r in data.get("roles") or []],
                                        data.get("traits") or {})
            except (ValueError, KeyError, TypeError, AttributeError):
                raise errors.AccessDenied("malformed identity from the proxy") from None
            if identity.cluster == self.cluster_name:
                # This cluster's users always come with their certificate.
                raise errors.AccessDenied("a user of this cluster needs a certificate")
            return identity
        raise errors.AccessDenied("no user identity on the request")

    def _verified(self, header: bytes):
        found = self._certs.get(header)
        if found is not None:
            return found
        try:
            cert = x509.load_der_x509_certificate(base64.b64decode(header, validate=True))
        except ValueError:
            raise errors.AccessDenied("malformed user certificate") from None
        for ca in self.ca_certs():
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, Exception):
                continue
            break
        else:
            raise errors.AccessDenied("the user certificate is not from this cluster's CA")
        try:
            identity = x509ca.identity_from_certificate(cert)
        except ValueError:
            raise errors.AccessDenied("the user certificate holds no identity") from None
        if len(self._certs) >= _CERT_CACHE:
            self._certs.clear()
        self._certs[header] = (cert, identity)
        return cert, identity

    # --- connections to the API ----------------------------------------------------

    def connect_api(self, factory) -> defer.Deferred:
        endpoint = HostnameEndpoint(self.reactor, self.config.host, self.config.port, timeout=10)
        if self._tls_options is not None:
            endpoint = wrapClientTLS(self._tls_options, endpoint)
        return endpoint.connect(factory)

    def take_pooled(self) -> _APIConnection | None:
        while self._pool:
            connection = self._pool.pop()
            if connection.connected and connection.reusable:
                return connection
        return None

    def give_back(self, connection: _APIConnection) -> None:
        if connection.reusable and connection.connected and len(self._pool) < _POOL_SIZE:
            connection.owner = None
            connection.transport.resumeProducing()
            self._pool.append(connection)
        else:
            connection.transport.loseConnection()

    def forget(self, connection: _APIConnection) -> None:
        if connection in self._pool:
            self._pool.remove(connection)

    def channel_factory(self) -> Factory:
        agent = self

        class _Factory(Factory):
            def buildProtocol(self, addr):
                return AgentChannel(agent)

        return _Factory()

    def api_headers(self, imp: Impersonation) -> list[tuple[bytes, bytes]]:
        """The agent's credential and the impersonation headers."""
        headers = [(b"Host", f"{self.config.host}:{self.config.port}".encode())]
        credential = self.credential
        if credential is not None and credential.token:
            headers.append((b"Authorization", b"Bearer " + credential.token.encode()))
        headers.append((b"Impersonate-User", imp.user.encode()))
        headers += [(b"Impersonate-Group", group.encode()) for group in imp.groups]
        return headers


def _keep_header(name: bytes) -> bool:
    lower = name.lower()
    return lower not in _STRIPPED and not lower.startswith(_STRIPPED_PREFIXES)


class AgentChannel(Protocol):
    """One ``kube`` channel: requests from the proxy, answers from the API."""

    def __init__(self, agent: KubeAgent) -> None:
        self.agent = agent
        self.reader = httpwire.MessageReader(request=True, handler=self)
        self.api: _APIConnection | None = None
        self._connecting: defer.Deferred | None = None
        self._pending = PendingRequestBytes()
        self._local_answer = False
        self._upgrade = False
        self._method = b"GET"
        self._lost = False
        #: A request went to the API and its answer has not ended yet.
        self._in_flight = False
        self._head_out: bytes | None = None
        self.live_session = None

    # --- from the proxy ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        try:
            self.reader.feed(data)
        except httpwire.BadMessage as e:
            _log.info("Kubernetes agent {name}: bad request from the proxy: {reason}",
                      name=self.agent.name, reason=e)
            self._answer(e.status, f"bad request: {e}", close=True)

    def message_head(self, head: httpwire.Head, raw: bytes) -> tuple[str, int]:
        # One request at a time: the next one waits until this answer is out.
        self.reader.hold()
        framing = httpwire.request_framing(head)
        self._method = head.method
        self._upgrade = head.wants_upgrade
        self._local_answer = False
        try:
            user = self.agent.identify(head)
            if self.agent.lock_check is not None:
                self.agent.lock_check(user)
            self._register(user)
            imp = self.agent.decide(user, self.agent.name, self.agent.labels,
                                    (head.get(b"impersonate-user") or b"").decode(
                                        "utf-8", "replace") or None,
                                    [g.decode("utf-8", "replace")
                                     for g in head.get_all(b"impersonate-group")])
        except errors.AccessDenied as e:
            _log.info("Kubernetes agent {name}: refused {method} {path}: {reason}",
                      name=self.agent.name, method=head.method.decode("latin-1"),
                      path=head.target[:200].decode("latin-1"), reason=e)
            self._local_answer = True
            self._answer(403, str(e))
            return framing
        if self.agent.credential is None:
            self._local_answer = True
            self._answer(503, f"the agent of Kubernetes cluster {self.agent.name} has no "
                              "credential for its API (see the node's log)")
            return framing
        headers = [(k, v) for k, v in head.headers if _keep_header(k)]
        headers += self.agent.api_headers(imp)
        if self._upgrade:
            headers.append((b"Connection", b"Upgrade"))
        out = httpwire.Head(head.start, headers)
        self._in_flight = True
        self._to_api(out.serialize())
        return framing

    def _register(self, user: UserIdentity) -> None:
        sessions = self.agent.sessions()
        if self.live_session is None and sessions is not None:
            self.live_session = sessions.register(
                user=user.name, cluster=user.cluster, kind="kube", terminate=self._terminate)

    def _terminate(self, message: str) -> None:
        """A lock: end this channel and the API connection it uses."""
        self.live_session = None
        _log.info("Kubernetes agent {name}: closing a channel: {message}",
                  name=self.agent.name, message=message)
        api, self.api = self.api, None
        if api is not None:
            api.reusable = False
            api.transport.loseConnection()
        if self.transport is not None:
            self.transport.loseConnection()

    def message_body(self, data: bytes) -> None:
        if not self._local_answer:
            self._to_api(data)

    def raw(self, data: bytes) -> None:
        """The client's bytes after a ``101``."""
        self._to_api(data)

    def message_end(self) -> None:
        if self._local_answer:
            self._local_answer = False
            self.reader.release()

    def _answer(self, code: int, message: str, close: bool = False) -> None:
        if self.transport is not None:
            self.transport.write(status_response(code, message, close=close))
            if close:
                self.transport.loseConnection()

    # --- towards the API -----------------------------------------------------------

    def _to_api(self, data: bytes) -> None:
        if self.api is not None and self.api.connected:
            self.api.transport.write(data)
            return
        self._pending.hold(data, self.transport)
        if self._connecting is None:
            pooled = self.agent.take_pooled()
            if pooled is not None:
                self._attach(pooled)
                return
            self._connecting = self.agent.connect_api(Factory.forProtocol(_APIConnection))
            self._connecting.addCallbacks(self._attach, self._api_unreachable)

    def _attach(self, api: _APIConnection) -> None:
        self._connecting = None
        if self._lost:
            self.agent.give_back(api)
            return
        self.api = api
        api.attach(self)
        self._pending.attach(self.transport, api.transport)

    def _api_unreachable(self, failure) -> None:
        self._connecting = None
        self._pending.discard()
        _log.warn("Kubernetes agent {name}: the API at {server} is unreachable: {reason}",
                  name=self.agent.name, server=self.agent.config.server,
                  reason=failure.getErrorMessage())
        self._answer(503, f"the Kubernetes API of cluster {self.agent.name} is unreachable",
                     close=True)

    # --- answers from the API --------------------------------------------------------

    def request_method(self) -> bytes:
        return self._method

    def answer_head(self, head: httpwire.Head, raw: bytes) -> None:
        if head.status == 101 and self._upgrade:
            self.transport.write(raw)
            self.reader.switch_to_raw()
            return
        # Sent with the first body bytes: one tunnel frame for a small answer.
        self._head_out = raw

    def answer_body(self, data: bytes) -> None:
        head = self._head_out
        if head is not None:
            self._head_out = None
            data = head + data
        self.transport.write(data)

    def answer_raw(self, data: bytes) -> None:
        self.transport.write(data)

    def answer_flush(self) -> None:
        """The end of what one read from the API brought: a head whose body is
        still to come (a watch) goes now."""
        head = self._head_out
        if head is not None:
            self._head_out = None
            self.transport.write(head)

    def answer_end(self) -> None:
        self.answer_flush()
        self._in_flight = False
        self.reader.release()

    def answer_garbage(self, error: httpwire.BadMessage, head_sent: bool) -> None:
        api, self.api = self.api, None
        if api is not None:
            api.reusable = False
        self._head_out = None
        _log.warn("Kubernetes agent {name}: the API answered garbage: {reason}",
                  name=self.agent.name, reason=error)
        if not head_sent:
            self._answer(502, f"the Kubernetes API of cluster {self.agent.name} sent an "
                              "invalid answer", close=True)
        elif self.transport is not None:
            self.transport.loseConnection()

    def answer_lost(self, clean_end: bool) -> None:
        self.api = None
        if self._lost:
            return
        if clean_end or self.reader.raw:
            self.transport.loseConnection()
        elif not self.reader.idle:
            self._answer(502, f"the Kubernetes API of cluster {self.agent.name} closed the "
                              "connection", close=True)

    def connectionLost(self, reason) -> None:
        self._lost = True
        if self.live_session is not None:
            self.live_session.unregister()
            self.live_session = None
        api, self.api = self.api, None
        if api is not None:
            api.transport.unregisterProducer()
            if self.reader.raw or self._in_flight or not api.reader.idle:
                # Mid-request or mid-answer: the connection cannot serve another user.
                api.transport.loseConnection()
            else:
                self.agent.give_back(api)


class _APIConnection(httpwire.AnswerReader):
    """One connection to the API server; serves the channel attached to it
    (``owner``), then waits in the agent's pool for the next one."""

    def __init__(self) -> None:
        super().__init__()
        self.connected = False
        self.reusable = True
        self._tuned = False

    def connectionMade(self) -> None:
        self.connected = True
        no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if not self._tuned:
            # After the handshake (an https API): TLS in large pieces.
            self._tuned = True
            tune_transport(self.transport)
        super().dataReceived(data)

    def unasked(self, data: bytes) -> None:
        # An idle pooled connection talking is broken.
        self.reusable = False
        self.transport.loseConnection()

    def message_head(self, head: httpwire.Head, raw: bytes) -> tuple[str, int]:
        if head.status == 101 or b"close" in head.tokens(b"connection"):
            self.reusable = False
        return super().message_head(head, raw)

    def message_end(self) -> None:
        super().message_end()
        if not self.reusable:
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.connected = False
        self.reusable = False
        super().connectionLost(reason)


def make_decider(*, cluster_name: str, role_documents: Callable[[], dict],
                 trusted_clusters: Callable[[], list]) -> Callable[..., Impersonation]:
    """The node's decision for a request: its cached roles (mapped for a root's users)."""
    from edgeaccess.cluster.trusted import map_roles
    from edgeaccess.identity import rbac, roles
    from edgeaccess.kube.access import impersonation

    # Parsed roles and built checkers, reused while the role documents are the
    # same objects (the node replaces a document when it changes).
    parsed: dict[str, tuple[dict, object]] = {}
    checkers: dict[tuple, tuple[tuple, rbac.AccessChecker]] = {}

    def parse(name: str, doc: dict):
        cached = parsed.get(name)
        if cached is not None and cached[0] is doc:
            return cached[1]
        try:
            role = roles.parse_role(doc)
        except errors.EdgeError:
            role = None
        if len(parsed) > 4096:
            parsed.clear()
        parsed[name] = (doc, role)
        return role

    def decide(user: UserIdentity, kube_name: str, kube_labels, as_user,
               as_groups) -> Impersonation:
        names = list(user.roles)
        if user.cluster != cluster_name:
            for trusted in trusted_clusters():
                if trusted.get("name") == user.cluster:
                    names = map_roles(trusted.get("role_map", []), user.roles)
                    break
            else:
                raise errors.AccessDenied(f"users of cluster {user.cluster} are not accepted")
        documents = role_documents()
        found = []
        for name in names:
            doc = documents.get(name)
            if doc is None:
                continue
            role = parse(name, doc)
            if role is not None:
                found.append(role)
        if not found:
            raise errors.AccessDenied(f"none of the roles {names} exist here")
        key = (user.name, user.cluster, tuple(names), json.dumps(user.traits, sort_keys=True))
        cached = checkers.get(key)
        if cached is None or len(cached[0]) != len(found) or \
                any(a is not b for a, b in zip(cached[0], found)):
            if len(checkers) > 4096:
                checkers.clear()
            cached = checkers[key] = (tuple(found), rbac.AccessChecker(found, user.traits))
        return impersonation(cached[1], user.name, kube_name, kube_labels, as_user=as_user,
                             as_groups=as_groups)

    return decide
