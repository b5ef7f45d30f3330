"""Composition of app access on a proxy (called by ``edgeaccess.proxy.tap``)."""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from edgeaccess import errors
from edgeaccess.apps.api import AppsAPI, WebRouting
from edgeaccess.apps.jwt import AppSigningKeys
from edgeaccess.apps.proxy import AppProxyProtocol, AppTimeouts, WebPortFactory
from edgeaccess.apps.requestaudit import RequestAudit
from edgeaccess.apps.sessions import AppGateway, AppIndex, AppSessions

_log = Logger()

#: Seconds between two reads of the assertion keys (a rotation elsewhere is
#: followed within this).
KEY_RELOAD = 5.0


class _AppService(service.Service):
    """Loads (on a new cluster: creates) the assertion keys at start and reads
    them again every :data:`KEY_RELOAD` seconds (rotations through any proxy);
    ends app sessions that are over every second (``AppGateway.sweep``)."""

    def __init__(self, keys: AppSigningKeys, gateway: AppGateway, clock,
                 request_audit=None, when_ready=None) -> None:
        self.keys = keys
        self._when_ready = when_ready
        self.gateway = gateway
        self.clock = clock
        self.request_audit = request_audit
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = clock
        self._reloaded = clock.seconds()

    def _sweep(self):
        d = defer.Deferred.fromCoroutine(self._tick())
        return d.addErrback(lambda f: _log.failure("app session sweep failed", f))

    async def _tick(self) -> None:
        if self.keys.loaded and self.clock.seconds() - self._reloaded >= KEY_RELOAD:
            self._reloaded = self.clock.seconds()
            try:
                await self.keys.reload()
            except Exception:
                _log.failure("reading the app assertion keys again failed")
        await self.gateway.sweep()

    def startService(self) -> None:
        super().startService()
        # The keys are sealed with the CA key: loaded once the CAs are.
        d = self._when_ready() if self._when_ready is not None else defer.succeed(None)
        d.addCallback(lambda _: defer.Deferred.fromCoroutine(self.keys.load()))
        d.addErrback(self._load_failed)
        self._sweeper.start(1.0, now=False)

    def _load_failed(self, failure) -> None:
        if failure.check(errors.EdgeError):
            _log.error("cannot load the app assertion keys: {why}; apps are refused until "
                       "this is fixed", why=failure.value)
        else:
            _log.failure("cannot load the app assertion keys", failure)

    def stopService(self):
        if self._sweeper.running:
            self._sweeper.stop()
        self.gateway.sessions.stop()
        super().stopService()
        if self.request_audit is not None:
            return self.request_audit.flush()
        return None


class AppAccessParts:
    """What :func:`build` made: the web port's factory, the gateway, a service to start."""

    def __init__(self, factory, gateway, service_) -> None:
        self.factory = factory
        self.gateway = gateway
        self.service = service_


def build(*, auth, registry, clusters, public_host: str, web_addr, site, reactor,
          web_sessions=None, ui_host: str | None = None,
          request_audit_apps: frozenset[str] | None = frozenset(),
          timeouts: AppTimeouts | None = None, when_ready=None) -> AppAccessParts:
    """Put app access in front of the web UI's ``site`` (its resource is wrapped).

    :param registry: the tunnel server's registry (tunnelled nodes and their apps).
    :param clusters: :class:`~edgeaccess.cluster.root.RootClusters` (leaves).
    :param web_sessions: the web UI's session store: browsers without an app
        certificate launch the app through it (None: app certificates only).
    :param ui_host: the web UI's host name (the launcher's), default ``public_host``.
    :param request_audit_apps: the apps whose requests are audited (``app.request``;
        None: every app; empty: none, the default).
    :param timeouts: the app connections' :class:`~edgeaccess.apps.proxy.AppTimeouts`.
    :param when_ready: ``() -> Deferred`` fired once the proxy's CAs are loaded
        (``auth.ca_key`` then returns the CA key the assertion keys are sealed with).
    """
    from edgeaccess.cluster.root import leaf_request

    keys = AppSigningKeys(auth.backend, auth.cluster_name, reactor, auth.ca_key)
    sessions = AppSessions(auth.backend, reactor, auth._emit, web_sessions=web_sessions)
    request_audit = None
    if (request_audit_apps is None or request_audit_apps) and auth.audit is not None:
        request_audit = RequestAudit(auth.audit, reactor, request_audit_apps)
    gateway = AppGateway(auth=auth, index=AppIndex(registry), sessions=sessions, keys=keys,
                         public_host=public_host, web_addr=web_addr, clock=reactor,
                         leaf_tunnel=lambda name: clusters.tunnels.get(name),
                         leaf_names=lambda: sorted(clusters.tunnels),
                         web_sessions=web_sessions, ui_host=ui_host,
                         request_audit=request_audit)

    async def ask_leaf(cluster, path, identity):
        tunnel = clusters.tunnels.get(cluster)
        if tunnel is None:
            raise errors.ClusterOffline(f"cluster {cluster} is offline")
        return await leaf_request(reactor, tunnel, path, identity)

    api = AppsAPI(gateway, leaf_request=ask_leaf, leaf_known=lambda name: name in clusters.known)
    site.resource = WebRouting(site.resource, api)
    gateway.timeouts = timeouts or AppTimeouts()
    return AppAccessParts(WebPortFactory(site, gateway, reactor, gateway.timeouts), gateway,
                          _AppService(keys, gateway, reactor, request_audit, when_ready))


def relayed_app_factory(gateway: AppGateway, trust, root: str, app: str):
    """For a leaf proxy: the factory of a ``cluster`` channel ``app:NAME`` from root ``root``."""
    from edgeaccess.cluster.trusted import map_roles

    async def mapped_roles(root_name, remote_roles):
        state = await trust.state(root_name)
        if state is None or not state.get("enabled"):
            raise errors.AccessDenied(f"cluster {root_name} is not trusted")
        return map_roles(state["role_map"], remote_roles)

    authorize = gateway.relayed_authorizer(root, mapped_roles)

    def build_protocol():
        protocol = AppProxyProtocol(authorize, gateway.clock, needs_preamble=True,
                                    description=f"to {app} relayed by cluster {root}",
                                    timeouts=gateway.timeouts)
        protocol.app_name = app
        return protocol

    return Factory.forProtocol(build_protocol)
