"""The proxy's Kubernetes port (3026): kubectl in, the cluster's agent out.

A user's kubectl speaks HTTP/1.1 over TLS with the user's client
certificate (the identity comes from the handshake, as on every port).
``/k8s/NAME/...`` names a Kubernetes cluster of this cluster (served by a
tunnelled agent that announced it), ``/k8s-leaf/LEAF/NAME/...`` one of a
trusted leaf cluster. For each request the proxy

- decides from the user's roles (``kubernetes_labels``,
  ``kubernetes_groups``, ``kubernetes_users``, deny wins, ``--as`` only for
  allowed values) and answers a ``Status`` 403 itself when nothing is allowed;
- strips the client's credentials and impersonation headers and sends its
  decision (``Impersonate-*``) with the user's certificate to the agent over
  the node's tunnel (one ``kube`` channel per user connection), where it is
  decided again;
- audits ``kube.request`` when the answer's status is known, and after a
  ``101`` splices both directions (exec and attach over WebSocket are tapped
  for the recording and the exit status, see :mod:`edgeaccess.kube.sessions`).

Requests are answered one at a time per connection (kubectl does not
pipeline); bytes of a next request wait, bounded, until the answer is out.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Callable

from cryptography.hazmat.primitives import serialization
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from edgeaccess import errors, httpwire, tls
from edgeaccess.audit.batch import BatchingEmitter
from edgeaccess.identity import rbac, roles as roles_module
from edgeaccess.kube.access import RequestInfo, impersonation, request_info, split_cluster
from edgeaccess.kube.pending import PendingRequestBytes
from edgeaccess.kube.status import status_response
from edgeaccess.proxy.splice import no_delay, tune_transport
from edgeaccess.tunnel.endpoints import TunnelChannelEndpoint
from edgeaccess.tunnel.protocol import format_source

_log = Logger()

#: Leaf clusters' Kubernetes: ``/k8s-leaf/LEAF/NAME/...``.
LEAF_PREFIX = b"/k8s-leaf/"
#: Largest request body passed on (kubectl apply of a big manifest fits).
MAX_BODY = 16 * 1024 * 1024
#: Headers the client may not send on.
_STRIPPED_PREFIXES = (b"impersonate-", b"edge-")
_STRIPPED = {b"authorization", b"proxy-authorization"}


class KubeDirectory:
    """Kubernetes clusters of this cluster's agents, from the tunnels' inventories."""

    def __init__(self, registry) -> None:
        self._registry = registry

    def _entries(self):
        for tunnel in self._registry.connected():
            identity, inventory = tunnel.identity, tunnel.inventory
            if identity is None or inventory is None or identity.kind != "node":
                continue
            for name in inventory.kube_clusters:
                yield name, tunnel, dict(inventory.kube_labels.get(name, {}))

    def find(self, name: str):
        """``(tunnel, labels)`` of the newest agent serving ``name``, or None."""
        found = None
        for entry_name, tunnel, labels in self._entries():
            if entry_name == name:
                found = (tunnel, labels)
        return found

    def records(self) -> list[dict]:
        seen: dict[str, dict] = {}
        for name, tunnel, labels in self._entries():
            seen[name] = {"name": name, "labels": labels, "node": tunnel.identity.name}
        return [seen[name] for name in sorted(seen)]


class RoleCache:
    """Every role of the cluster, parsed, re-read every ``interval`` seconds.

    Requests are decided from memory; a role change applies within the interval.
    """

    def __init__(self, auth, clock, interval: float = 1.0) -> None:
        self._auth = auth
        self.roles: dict[str, roles_module.Role] = {}
        #: Moves on when the roles change (checkers built before are stale then).
        self.generation = 0
        self._documents: list | None = None
        self._loop = LoopingCall(lambda: defer.Deferred.fromCoroutine(self.refresh())
                                 .addErrback(lambda f: _log.failure("role cache refresh", f)))
        self._loop.clock = clock
        self._interval = interval

    def start(self) -> None:
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    async def refresh(self) -> None:
        documents = await self._auth.all_roles()
        if documents == self._documents:
            return
        found = {}
        for doc in documents:
            try:
                role = roles_module.parse_role(doc)
            except errors.EdgeError:
                continue
            found[role.name] = role
        self.roles = found
        self._documents = documents
        self.generation += 1

    def checker(self, names, traits) -> rbac.AccessChecker:
        return rbac.AccessChecker([self.roles[n] for n in names if n in self.roles], traits)

    def checker_for(self, user) -> rbac.AccessChecker:
        """``user``'s checker, built once per connection and role change."""
        cached = user.checker
        if cached is None or cached[0] != self.generation:
            cached = user.checker = (self.generation, self.checker(user.roles, user.traits))
        return cached[1]


class KubeProxy:
    """The Kubernetes proxy of one cluster.

    :param cluster_name: this cluster.
    :param directory: :class:`KubeDirectory` of local Kubernetes clusters.
    :param roles: :class:`RoleCache`.
    :param router: the proxy's router (leaf clusters' Kubernetes).
    :param audit: the ``AuditLog`` (``kube.request``, exec events, recordings).
    :param leaf_roles: for a leaf's proxy: ``leaf_roles(root, remote_roles)``
        gives the local roles of a root's user (the role map).
    :param check_user: ``check_user(subject)`` raises AccessDenied (the lock's
        message) for a locked user (``subject.username``, ``subject.cluster``).
    :param sessions: the control plane's ``LiveSessions``: each user connection
        is registered, so a lock ends its watches, exec and port-forwards.
    """

    def __init__(self, *, cluster_name: str, directory: KubeDirectory, roles: RoleCache,
                 router, audit, reactor, leaf_roles: Callable | None = None,
                 known_leaf: Callable[[str], bool] | None = None,
                 check_user: Callable | None = None, sessions=None) -> None:
        self.cluster_name = cluster_name
        self.directory = directory
        self.roles = roles
        self.router = router
        self.audit = audit
        self.reactor = reactor
        self.leaf_roles = leaf_roles
        self.known_leaf = known_leaf or (lambda name: False)
        self.check_user = check_user
        self.sessions = sessions
        # kube.request is emitted per request: appended in batches (group commit).
        self._emitter = BatchingEmitter(audit, reactor) if audit is not None else None

    def factory(self) -> Factory:
        """For the TLS listener on 3026."""
        return _ConnectionFactory(self, forwarded_from=None)

    def forwarded_factory(self, root: str) -> Factory:
        """For ``kube:NAME`` channels a trusted root opens on a leaf's proxy."""
        return _ConnectionFactory(self, forwarded_from=root)

    def emit(self, event: str, **fields) -> None:
        if self._emitter is not None:
            self._emitter.emit(event, **fields)


class _ConnectionFactory(Factory):
    def __init__(self, proxy: KubeProxy, forwarded_from: str | None) -> None:
        self.proxy = proxy
        self.forwarded_from = forwarded_from

    def buildProtocol(self, addr):
        return ProxyConnection(self.proxy, self.forwarded_from)


class _User:
    """The caller: name, cluster, roles (already local to this cluster), traits."""

    def __init__(self, name, cluster, roles, traits, cert_b64=None, asserted=None) -> None:
        self.name = name
        self.username = name  # what lock checks read
        self.cluster = cluster
        self.roles = list(roles)
        self.traits = dict(traits or {})
        self.cert_b64 = cert_b64
        #: What is sent on to a leaf (root users' identity).
        self.asserted = asserted
        #: ``(role generation, AccessChecker)``: see :meth:`RoleCache.checker_for`.
        self.checker = None


@implementer(IHalfCloseableProtocol)
class ProxyConnection(Protocol):
    """One kubectl connection (or one root-forwarded channel on a leaf)."""

    def __init__(self, proxy: KubeProxy, forwarded_from: str | None) -> None:
        self.proxy = proxy
        self.forwarded_from = forwarded_from
        self.reader = httpwire.MessageReader(request=True, handler=self)
        self.user: _User | None = None
        self.remote_addr = ""
        self.upstream: _Upstream | None = None
        self._upstream_key: tuple | None = None
        self._connecting: defer.Deferred | None = None
        self._pending = PendingRequestBytes()
        self._lost = False
        self._local_answer = False
        self._body_size = 0
        # The request being answered.
        self.current: dict[str, Any] | None = None
        self.tap = None
        self.live_session = None
        self._tuned = False

    # --- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        no_delay(self.transport)
        peer = self.transport.getPeer()
        source = getattr(peer, "source", None)
        if source:
            self.remote_addr = source.rpartition(":")[0].strip("[]")
        else:
            self.remote_addr = getattr(peer, "host", "") or ""

    def _identify(self) -> _User:
        if self.user is not None:
            return self.user
        if self.forwarded_from is not None:
            raise errors.AccessDenied("a forwarded request carries no identity")
        cert = tls.peer_certificate(self.transport)
        identity = tls.peer_identity(self.transport)
        if cert is None or identity is None:
            raise errors.AuthenticationFailed("a client certificate is required: run edge "
                                              "kube login")
        if identity.kind != "user" or identity.cluster != self.proxy.cluster_name:
            raise errors.AccessDenied("a user certificate of this cluster is required")
        der = cert.public_bytes(serialization.Encoding.DER)
        self.user = _User(identity.name, identity.cluster, identity.roles, identity.traits,
                          cert_b64=base64.b64encode(der))
        return self.user

    def _forwarded_user(self, head: httpwire.Head) -> _User:
        """A root's user, as the root proxy forwarded it on its tunnel."""
        try:
            data = json.loads(head.get(b"edge-identity") or b"")
            name, cluster = str(data["user"]), str(data["cluster"])
            remote_roles = [str(r) for r in data.get("roles") or []]
            traits = data.get("traits") or {}
            if not isinstance(traits, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise errors.AccessDenied("malformed identity from the root cluster") from None
        if cluster != self.forwarded_from:
            raise errors.AccessDenied(f"cluster {self.forwarded_from} cannot speak for "
                                      f"users of {cluster}")
        local = self.proxy.leaf_roles(cluster, remote_roles) if self.proxy.leaf_roles else []
        if not local:
            raise errors.AccessDenied(f"roles {remote_roles} of cluster {cluster} map to no "
                                      f"role in cluster {self.proxy.cluster_name}")
        asserted = json.dumps({"user": name, "cluster": cluster, "roles": remote_roles,
                               "traits": traits}).encode()
        return _User(name, cluster, local, traits, asserted=asserted)

    # --- requests --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if not self._tuned:
            # After the handshake: TLS records read and written in large pieces.
            self._tuned = True
            tune_transport(self.transport, self.proxy.reactor)
        try:
            self.reader.feed(data)
        except httpwire.BadMessage as e:
            _log.info("kube proxy: bad request from {addr}: {reason}", addr=self.remote_addr,
                      reason=e)
            self._local(e.status, str(e), close=True)

    def readConnectionLost(self) -> None:
        if self.reader.raw and self.upstream is not None:
            self.upstream.transport.loseConnection()
        elif self.upstream is None or self.reader.idle:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    def message_head(self, head: httpwire.Head, raw: bytes) -> tuple[str, int]:
        # One request at a time: the next one waits until this answer is out.
        self.reader.hold()
        framing = httpwire.request_framing(head)
        self._body_size = 0
        self._local_answer = False
        self.tap = None
        self.current = {"method": head.method, "start": self.proxy.reactor.seconds()}
        try:
            self._route_request(head)
        except errors.EdgeError as e:
            info = self.current.get("info")
            code = e.http_status if e.http_status != 401 or self.forwarded_from is None else 403
            if info is not None:
                self._audit(code, reason=str(e))
            _log.info("kube proxy: refused {method} {path} from {addr}: {reason}",
                      method=head.method.decode("latin-1"),
                      path=head.target[:200].decode("latin-1"), addr=self.remote_addr,
                      reason=e)
            self._local_answer = True
            self._local(code, str(e))
        return framing

    def _check_locks(self, user: _User) -> None:
        """Refuse a locked user; register the connection so a lock ends it later."""
        if self.proxy.check_user is not None:
            self.proxy.check_user(user)
        if self.live_session is None and self.proxy.sessions is not None:
            self.live_session = self.proxy.sessions.register(
                user=user.name, cluster=user.cluster, kind="kube", terminate=self._terminate)

    def _terminate(self, message: str) -> None:
        """A lock: end this connection (watches, exec, port-forwards with it)."""
        _log.info("kube proxy: closing {user}'s connection: {message}",
                  user=self.user.name if self.user else "?", message=message)
        self.live_session = None
        if self.transport is not None and not self._lost:
            if self.reader.idle and self.current is None:
                self._local(403, message, close=True)
            else:
                self.transport.abortConnection()

    def _route_request(self, head: httpwire.Head) -> None:
        if head.target.startswith(LEAF_PREFIX):
            if self.forwarded_from is not None:
                raise errors.BadRequest("a leaf does not route to further leaves")
            rest = head.target[len(LEAF_PREFIX):]
            leaf, _, remainder = rest.partition(b"/")
            leaf_name = leaf.decode("ascii", "replace")
            name, path = split_cluster(b"/k8s/" + remainder)
            user = self._identify()
            self._check_locks(user)
            self.current["info"] = request_info(head.method, path)
            self.current.update(kube=name, leaf=leaf_name, user=user.name)
            if not self.proxy.known_leaf(leaf_name):
                raise errors.NotFound(f"cluster {leaf_name} not found")
            headers = self._client_headers(head)
            identity = json.dumps({"user": user.name, "cluster": user.cluster,
                                   "roles": user.roles, "traits": user.traits}).encode()
            headers.append((b"Edge-Identity", identity))
            out = httpwire.Head((head.method, b"/k8s/" + remainder, head.start[2]), headers)
            self._send(("leaf", leaf_name, name), out)
            return
        name, path = split_cluster(head.target)
        user = self._forwarded_user(head) if self.forwarded_from is not None \
            else self._identify()
        info = request_info(head.method, path)
        self.current.update(info=info, kube=name, user=user.name)
        self._check_locks(user)
        self.current.update(info=info, kube=name, user=user.name)
        found = self.proxy.directory.find(name)
        if found is None:
            raise errors.NotFound(f"Kubernetes cluster {name} not found in cluster "
                                  f"{self.proxy.cluster_name}")
        _tunnel, labels = found
        checker = self.proxy.roles.checker_for(user)
        as_user = (head.get(b"impersonate-user") or b"").decode("utf-8", "replace") or None
        as_groups = [g.decode("utf-8", "replace") for g in head.get_all(b"impersonate-group")]
        imp = impersonation(checker, user.name, name, labels, as_user=as_user,
                            as_groups=as_groups)
        self.current["imp"] = imp
        headers = self._client_headers(head)
        headers.append((b"Impersonate-User", imp.user.encode()))
        headers += [(b"Impersonate-Group", g.encode()) for g in imp.groups]
        if user.cert_b64 is not None:
            headers.append((b"Edge-User-Certificate", user.cert_b64))
        if user.asserted is not None:
            headers.append((b"Edge-Identity", user.asserted))
        out = httpwire.Head((head.method, path, head.start[2]), headers)
        if head.wants_upgrade:
            from edgeaccess.kube.sessions import tap_for

            self.tap = tap_for(self, head, info, user, name)
        self._send(("local", name), out)

    @staticmethod
    def _client_headers(head: httpwire.Head) -> list[tuple[bytes, bytes]]:
        kept = []
        for key, value in head.headers:
            lower = key.lower()
            if lower in _STRIPPED or lower.startswith(_STRIPPED_PREFIXES):
                continue
            kept.append((key, value))
        return kept

    def message_body(self, data: bytes) -> None:
        if self._local_answer:
            return
        self._body_size += len(data)
        if self._body_size > MAX_BODY:
            _log.info("kube proxy: request body from {addr} over {max} bytes",
                      addr=self.remote_addr, max=MAX_BODY)
            self._local_answer = True
            self._drop_upstream()
            self._local(413, f"the request body is larger than {MAX_BODY} bytes",
                        close=True)
            return
        self._to_upstream(data)

    def raw(self, data: bytes) -> None:
        """The client's bytes after a ``101`` (exec, attach, port-forward)."""
        if self.tap is not None:
            self.tap.from_client(data)
        self._to_upstream(data)

    def message_end(self) -> None:
        if self._local_answer:
            self._local_answer = False
            self.reader.release()

    def _local(self, code: int, message: str, close: bool = False) -> None:
        if self.transport is None or self._lost:
            return
        self.transport.write(status_response(code, message, close=close))
        if close:
            self.transport.loseConnection()

    # --- upstream (the agent's channel) --------------------------------------------

    def _send(self, key: tuple, head: httpwire.Head) -> None:
        if self._upstream_key is not None and self._upstream_key != key:
            # kubectl keeps one connection per server URL: another cluster
            # on the same connection gets a channel of its own.
            self._drop_upstream()
        self._upstream_key = key
        self._to_upstream(head.serialize())

    def _endpoint(self, key: tuple):
        source = format_source(self.remote_addr, 0) if self.remote_addr else None
        if key[0] == "leaf":
            extra = {"source": source} if source else {}
            return self.proxy.router.route(key[1], key[2], "kube", **extra)
        found = self.proxy.directory.find(key[1])
        if found is None:
            raise errors.NodeOffline(f"the agent of Kubernetes cluster {key[1]} is offline")
        return TunnelChannelEndpoint(found[0], "kube", key[1], source=source)

    def _to_upstream(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.write(data)
            return
        self._pending.hold(data, self.transport)
        if self._connecting is None:
            try:
                endpoint = self._endpoint(self._upstream_key)
                self._connecting = endpoint.connect(Factory.forProtocol(_Upstream))
            except errors.EdgeError as e:
                self._upstream_failed(e)
                return
            self._connecting.addCallbacks(self._attach, lambda f: self._upstream_failed(f.value))

    def _attach(self, upstream: _Upstream) -> None:
        self._connecting = None
        if self._lost:
            upstream.transport.loseConnection()
            return
        self.upstream = upstream
        upstream.attach(self)
        self._pending.attach(self.transport, upstream.transport)

    def _upstream_failed(self, error: Exception) -> None:
        self._connecting = None
        self._pending.discard()
        if self._lost:
            return
        if not isinstance(error, errors.EdgeError):
            _log.warn("kube proxy: cannot reach the agent: {error}", error=error)
            error = errors.NodeOffline("the Kubernetes agent is unreachable")
        code = 503 if isinstance(error, (errors.NodeOffline, errors.ClusterOffline)) else \
            error.http_status
        _log.info("kube proxy: {user} to {kube}: {reason}",
                  user=self.user.name if self.user else "?",
                  kube=(self.current or {}).get("kube"), reason=error)
        if self.current is not None and self.current.get("info") is not None:
            self._audit(code, reason=str(error))
        self._local(code, str(error), close=True)

    def _drop_upstream(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.owner = None
            upstream.transport.loseConnection()
        self._upstream_key = None

    def answer_head(self, head: httpwire.Head, raw: bytes) -> None:
        self.transport.write(raw)
        status = head.status
        if self.current is not None and "code" not in self.current:
            self.current["code"] = status
            self._audit(status)
        if status == 101 and self.current is not None:
            self.reader.switch_to_raw()
            if self.tap is not None:
                self.tap.started(head)

    def answer_body(self, data: bytes) -> None:
        self.transport.write(data)

    def answer_raw(self, data: bytes) -> None:
        if self.tap is not None and self.reader.raw:
            self.tap.from_server(data)
        self.transport.write(data)

    def request_method(self) -> bytes:
        return self.current["method"] if self.current else b"GET"

    def answer_end(self) -> None:
        self.current = None
        self.reader.release()

    def answer_flush(self) -> None:
        pass  # writes to kubectl's TLS are gathered until the read ends

    def answer_garbage(self, error: httpwire.BadMessage, head_sent: bool) -> None:
        self.upstream = None
        _log.warn("kube proxy: the agent answered garbage: {reason}", reason=error)
        if not head_sent:
            self._local(502, "the Kubernetes agent sent an invalid answer", close=True)
        else:
            self.transport.loseConnection()

    def answer_lost(self, clean_end: bool) -> None:
        self.upstream = None
        if self._lost:
            return
        if self.tap is not None:
            self.tap.ended()
            self.tap = None
        if self.reader.raw or clean_end:
            self.transport.loseConnection()
        elif not self.reader.idle or self.current is not None:
            if self.current is not None and "code" not in self.current and \
                    self.current.get("info") is not None:
                self._audit(502, reason="the agent closed the connection")
            self._local(502, "the Kubernetes agent closed the connection", close=True)

    def connectionLost(self, reason) -> None:
        self._lost = True
        if self.live_session is not None:
            self.live_session.unregister()
            self.live_session = None
        if self.tap is not None:
            self.tap.ended()
            self.tap = None
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.owner = None
            upstream.transport.loseConnection()
        if self._connecting is not None:
            self._connecting.cancel()

    # --- audit -------------------------------------------------------------------------

    def _audit(self, code: int, reason: str | None = None) -> None:
        current = self.current or {}
        info: RequestInfo | None = current.get("info")
        if info is None:
            return
        imp = current.get("imp")
        self.proxy.emit(
            "kube.request", user=current.get("user"),
            kube_cluster=current.get("kube"), leaf_cluster=current.get("leaf"),
            verb=info.verb, namespace=info.namespace or None,
            resource=info.resource or None, name=info.name or None,
            subresource=info.subresource or None, path=info.path[:1024],
            method=current["method"].decode("latin-1"), response_code=code,
            success=200 <= code < 400, remote_addr=self.remote_addr or None,
            kube_user=imp.user if imp else None,
            kube_groups=list(imp.groups) if imp else None,
            root_cluster=self.forwarded_from, reason=reason)


class _Upstream(httpwire.AnswerReader):
    """The proxy's end of a ``kube`` channel (or a leaf's ``cluster`` channel)."""


class RoleCacheService(service.Service):
    """Keeps a :class:`RoleCache` fresh while the proxy runs."""

    def __init__(self, roles: RoleCache) -> None:
        self.roles = roles

    def startService(self) -> None:
        super().startService()
        self.roles.start()

    def stopService(self):
        self.roles.stop()
        return super().stopService()
