"""``twistd edgeproxy``: options and service composition.

``makeService`` builds the whole proxy from its options: it does the file
I/O (CAs, identities, backend file) and hands finished objects to the
services' constructors.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

from twisted.application import service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from edgeaccess import errors, internals, tls
from edgeaccess.httpapi import EdgeSite
from edgeaccess.auth.api import AuthAPI
from edgeaccess.auth.service import AuthServer
from edgeaccess.backend import backend_from_url
from edgeaccess.config import apply_config_file, listen_endpoint, parse_seconds
from edgeaccess.httpclient import is_ip, split_addr
from edgeaccess.memory import HeapTrimmer, share_tcp_server_attributes, tune_for_streaming
from edgeaccess.pki import keys, x509ca
from edgeaccess.pki.authority import CertificateAuthority
from edgeaccess.cluster.leaf import LeafLinks, LeafTrust
from edgeaccess.cluster.root import RootClusters
from edgeaccess.proxy.router import Router
from edgeaccess.proxy.lanagents import CombinedRegistry, LanAgentDirectory, LanAgentPool
from edgeaccess.proxy.sshproxy import make_proxy_ssh_factory
from edgeaccess.proxy.tlsrouting import ALPN_SSH, tls_routing_factory
from edgeaccess.proxy.web import ProxyWeb
from edgeaccess.tunnel.endpoints import TunnelChannelEndpoint
from edgeaccess.tunnel.protocol import ALPN_PROTOCOL
from edgeaccess.tunnel.server import LiveTunnelNodes, TunnelServerFactory

_log = Logger()

SERVICE_CERT_TTL = timedelta(days=30)

#: A DNS name the proxy's certificate may carry (a leftmost ``*.`` allowed).
_HOST_NAME = re.compile(r"(\*\.)?[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))*")


class Options(usage.Options):
    """Command line of ``twistd edgeproxy``."""

    synopsis = "[options]"
    longdesc = ("Runs one cluster's auth service and proxy: web/login API, SSH entry, "
                "reverse-tunnel server and auth API.")
    optParameters = [
        ["data-dir", "d", None, "directory for CAs, identities and the SQLite backend"],
        ["cluster-name", None, None, "name of this cluster (fixed at the first start)"],
        ["public-addr", None, None, "HOST[:PORT] users and nodes reach the web port at"],
        ["web-listen", None, "0.0.0.0:3080", "web/login API listen address"],
        ["ssh-listen", None, "0.0.0.0:3023", "SSH entry listen address"],
        ["tunnel-listen", None, "0.0.0.0:3024", "reverse tunnel listen address"],
        ["auth-listen", None, "0.0.0.0:3025", "auth API listen address (mutual TLS)"],
        ["kube-listen", None, "0.0.0.0:3026", "Kubernetes proxy listen address"],
        ["diag-listen", None, None,
         "HOST:PORT of the diagnostics address (plain HTTP: /metrics, /healthz, /readyz); "
         "off by default, e.g. 127.0.0.1:3000"],
        ["tunnel-public-addr", None, None,
         "HOST:PORT nodes should dial for the tunnel (default: public host and the "
         "tunnel port), e.g. a load balancer in front of several proxies"],
        ["server-names", None, None,
         "comma-separated further host names and addresses clients dial the proxy at "
         "(its certificate names them; --public-addr, --tunnel-public-addr and the "
         "listen hosts are always named)"],
        ["apps-domain", None, None,
         "DNS name web apps are reached under, https://NAME.DOMAIN:WEB_PORT (default: the "
         "public host; needs a wildcard DNS record)"],
        ["app-request-audit", None, None,
         "audit every request to web apps as app.request events: '*' for every app, "
         "or app names separated by commas (default: off; sessions are always audited)"],
        ["app-timeouts", None, None,
         "web app connections: head=30s (request head, stalled request body), "
         "response=60s (the app's answer), idle=5m (keep-alive); e.g. response=5m"],
        ["backend", None, None, "storage: sqlite: (default, in the data dir) or a URL"],
        ["resume-budget", None, "60s",
         "how long a node's channels (users' SSH sessions...) are held through an "
         "outage of its tunnel or of the connection to a LAN node's agent port, "
         "e.g. 60s or 2m; 0 turns resumption off (a leaf proxy's tunnels to its "
         "roots resume the same way)"],
        ["backend-pool", None, None,
         "connections (and query threads) of a PostgreSQL backend (default 4)"],
        ["ca-key-file", None, None,
         "file holding the key that seals the cluster's CA private keys in the backend "
         "(every proxy of a cluster needs the same; default: $EDGE_CA_KEY, else "
         "DATA_DIR/ca.key, created by the first start)"],
        ["recordings-dir", None, None,
         "directory of session recordings (default DATA_DIR/recordings); proxies sharing "
         "a backend share it too (e.g. an NFS mount), so any of them plays any recording"],
        ["config", "c", None, "YAML file with any of these options"],
    ]

    def postOptions(self) -> None:
        if self["config"]:
            apply_config_file(self, self["config"],
                              {p[0] for p in self.optParameters} - {"config"})
        for required in ("data-dir", "cluster-name"):
            if not self[required]:
                raise usage.UsageError(f"--{required} is required")
        from edgeaccess.identity.resources import validate_resource_name
        from edgeaccess import errors

        try:
            validate_resource_name(self["cluster-name"], "cluster")
        except errors.EdgeError as e:
            raise usage.UsageError(str(e))
        self["resume-budget"] = parse_seconds(self["resume-budget"], "resume-budget",
                                              high=3600.0)
        if not self["public-addr"]:
            self["public-addr"] = "localhost"
        pool = self["backend-pool"]
        if pool is not None and (not str(pool).isdigit() or not 1 <= int(pool) <= 64):
            raise usage.UsageError("--backend-pool: a number of connections from 1 to 64")
        from edgeaccess.apps.requestaudit import parse_selection

        try:
            parse_selection(self["app-request-audit"])
        except errors.EdgeError as e:
            raise usage.UsageError(f"--app-request-audit: {e}")
        from edgeaccess.apps.proxy import AppTimeouts

        try:
            AppTimeouts.parse(self["app-timeouts"])
        except errors.EdgeError as e:
            raise usage.UsageError(f"--app-timeouts: {e}")
        for name in (self["server-names"] or "").split(","):
            name = name.strip().strip("[]")
            if name and not (is_ip(name) or _HOST_NAME.fullmatch(name)):
                raise usage.UsageError(f"--server-names: {name!r} is not a host name or address")


class _Startup:
    """The proxy's start-up: fires its waiters once the CAs are loaded and
    the proxy's own certificates issued (listeners wait for it)."""

    def __init__(self) -> None:
        self.done = False
        self._waiters: list[defer.Deferred] = []

    def when_ready(self) -> defer.Deferred:
        if self.done:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def ready(self) -> None:
        self.done = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)


class _Listener(service.Service):
    """Listen on an endpoint once the proxy is ready; remember the bound port.

    ``endpoint`` and ``factory`` are zero-argument callables, called when
    ``startup`` is ready: the TLS options need the proxy's certificates,
    issued by the CAs loaded from the backend at start.
    """

    def __init__(self, name: str, endpoint, factory, on_listening,
                 startup: _Startup | None = None) -> None:
        self.name = name
        self._make_endpoint = endpoint
        self._make_factory = factory
        self.endpoint = None
        self.factory = None
        self.port = None
        self._on_listening = on_listening
        self._startup = startup

    def startService(self) -> None:
        super().startService()
        ready = self._startup.when_ready() if self._startup is not None else defer.succeed(None)
        ready.addCallback(lambda _: self._listen() if self.running else None)

    def _listen(self) -> None:
        self.endpoint = self._make_endpoint()
        self.factory = self._make_factory()
        d = self.endpoint.listen(self.factory)

        def listening(port):
            self.port = port
            _log.info("{name} listening on {addr}", name=self.name, addr=port.getHost())
            self._on_listening()

        def failed(failure):
            _log.failure("cannot listen for {name}", failure, name=self.name)
            from twisted.internet import reactor

            reactor.stop()

        d.addCallbacks(listening, failed)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()


class _ThreadPoolService(service.Service):
    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class _BackendService(service.Service):
    """Closes the backend at shutdown (after ``before_close``: last writes
    such as this proxy's record deleted); at start opens it, loads (or
    creates) the cluster's CAs from it, lets the listeners start, then runs
    the auth bootstrap. Without its CAs the proxy stops, with the reason in
    its log."""

    def __init__(self, backend, auth, clusters, load_authority=None, startup=None,
                 reactor=None) -> None:
        self.backend = backend
        self.auth = auth
        self.clusters = clusters
        self._load_authority = load_authority
        self._startup = startup
        self._reactor = reactor
        self.before_close: list = []
        self._last_writes = None

    async def _start(self) -> None:
        try:
            start = getattr(self.backend, "start", None)
            if start is not None:  # opens (migrates) the database before the bootstrap
                await start()
            if self._load_authority is not None:
                await self._load_authority()
        except Exception as error:
            if isinstance(error, errors.EdgeError):
                _log.critical("cannot start: {error}", error=error)
            else:
                _log.failure("cannot start: the cluster's CAs could not be loaded")
            if self._reactor is not None and self._reactor.running:
                self._reactor.stop()
            return
        if self._startup is not None:
            self._startup.ready()
        await self.auth.bootstrap()
        await self.clusters.load()

    def startService(self) -> None:
        super().startService()
        # Ahead of the backend's own shutdown trigger (a PostgreSQL backend
        # closes itself "before shutdown"; it lets calls under way finish).
        if self._reactor is not None:
            self._reactor.addSystemEventTrigger("before", "shutdown", self._begin_last_writes)
        d = defer.Deferred.fromCoroutine(self._start())
        d.addErrback(lambda f: _log.failure("bootstrap failed", f))

    def _begin_last_writes(self):
        if self._last_writes is None:
            self._last_writes = defer.DeferredList(
                [defer.maybeDeferred(f) for f in self.before_close], consumeErrors=True)
        return self._last_writes

    def stopService(self):
        super().stopService()
        last = self._begin_last_writes()
        return last.addCallback(lambda _: self.backend.close())


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _load_or_create_key(path: Path):
    if path.exists():
        return keys.load_private_key(path.read_bytes())
    key = keys.generate_private_key()
    keys.write_secret(path, keys.private_key_openssh(key))
    return key


def _load_or_create_web_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if path.exists():
        return load_pem_private_key(path.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    keys.write_secret(path, keys.private_key_pem(key))
    return key


class ProxyComponents:
    """The proxy's finished parts (kept for tests and tac files)."""


class _ProxyCertificates:
    """The proxy's own keys (files in its data dir, read before the reactor
    runs) and their certificates, issued at start by the shared CAs."""

    proxy_key = web_key = host_key = None
    proxy_cert = web_cert = host_cert = None
    #: The proxy's client certificate (same key as ``proxy_cert``): what it
    #: presents at LAN nodes' agent ports (docs/security.md, "Who trusts whom").
    client_cert = None
    web_chain: list = []
    public_host = cluster = ""
    dns_names: list = []
    ip_addresses: list = []

    def issue(self, authority, now) -> None:
        identity = x509ca.Identity(kind="proxy", name=self.public_host, cluster=self.cluster)
        self.proxy_cert = authority.sign_tls(
            self.proxy_key.public_key(), identity, now=now, ttl=SERVICE_CERT_TTL,
            dns_names=self.dns_names, ip_addresses=self.ip_addresses)
        self.client_cert = authority.sign_tls(
            self.proxy_key.public_key(), identity, now=now, ttl=SERVICE_CERT_TTL,
            usage="client")
        self.web_cert, self.web_chain = authority.sign_web(
            self.web_key.public_key(), identity, now=now, ttl=SERVICE_CERT_TTL,
            dns_names=self.dns_names, ip_addresses=self.ip_addresses)
        self.host_cert = authority.sign_host(
            self.host_key.public_key(), host_id=f"proxy.{self.cluster}",
            principals=list(dict.fromkeys([self.public_host, self.cluster, "localhost",
                                           "127.0.0.1"])),
            now=now, ttl=SERVICE_CERT_TTL)


def makeService(options, reactor=None) -> service.MultiService:
    """Compose the proxy: auth, web, SSH entry, tunnel server, auth API."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    # What this Twisted/pyOpenSSL/CPython offers of the internals we use:
    # misfits take the stock path, with one warning (edgeaccess.internals).
    internals.self_check()
    data_dir = Path(options["data-dir"]).absolute()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cluster = options["cluster-name"]
    public_host, public_port = split_addr(options["public-addr"], 3080)
    now = _now()
    from edgeaccess.pki import castore

    # The CAs live in the backend, shared by every proxy of the cluster: read
    # at start (edgeaccess.pki.castore). What needs files is read here.
    try:
        ca_key = castore.CAKeySource.from_options(options["ca-key-file"], os.environ, data_dir)
        legacy_cas = castore.read_legacy_authority(data_dir / "ca", cluster)
    except errors.EdgeError as error:
        raise SystemExit(f"edgeproxy: {error}")
    authority = CertificateAuthority.pending(cluster)

    # Before any connection: thousands of tunnels' TCP transports then
    # share one attribute table (see edgeaccess.memory).
    share_tcp_server_attributes()
    # Relays stream bulk data: see edgeaccess.memory.
    tune_for_streaming()
    top = service.MultiService()
    pool = ThreadPool(minthreads=1, maxthreads=4, name="edgeproxy-crypto")
    _ThreadPoolService(pool).setServiceParent(top)
    backend = backend_from_url(options["backend"], reactor, str(data_dir), reactor,
                               pool_size=int(options["backend-pool"] or 0) or None)
    from edgeaccess.identity import kinds  # noqa: F401  (registers resource kinds)

    from edgeaccess.audit.log import AuditLog
    from edgeaccess.audit.recording import FileRecordingStore

    recordings_dir = Path(options["recordings-dir"] or data_dir / "recordings").absolute()
    audit = AuditLog(backend, cluster, reactor,
                     recordings=FileRecordingStore(recordings_dir, reactor))
    auth = AuthServer(authority, backend, reactor, reactor=reactor, threadpool=pool,
                      connector_factory=kinds.login_method_factory(reactor), audit=audit)
    auth.ca_key = lambda: ca_key.key  # set once load_authority ran (app assertion keys)
    clusters = RootClusters(auth)
    leaf_trust = LeafTrust(auth, reactor)
    auth.resource_hooks["trusted_cluster"] = leaf_trust
    auth.leaf_trust = leaf_trust
    startup = _Startup()
    certificates = _ProxyCertificates()

    async def load_authority() -> None:
        def write_key(path, data):
            return deferToThreadPool(reactor, pool, keys.write_secret, path, data)

        authority.adopt(await castore.load_or_create_authority(
            backend, cluster, now, ca_key, legacy=legacy_cas, write_key=write_key))
        certificates.issue(authority, _now())
        # The admin identity edgectl uses on this host, and public copies of the CAs.
        await deferToThreadPool(reactor, pool, _write_admin_identity, data_dir, authority,
                                _now())
        await deferToThreadPool(reactor, pool, castore.write_public_copies, data_dir / "ca",
                                authority)

    backend_service = _BackendService(backend, auth, clusters, load_authority, startup,
                                      reactor)
    backend_service.setServiceParent(top)

    # The proxy's own identities: TLS for 3080/3025, SSH host cert for 3023.
    listen_hosts = {split_addr(options[k], 0)[0] for k in
                    ("web-listen", "auth-listen", "ssh-listen", "tunnel-listen")}
    if options["tunnel-public-addr"]:
        # Users' TLS routing (ProxyCommand s_client) verifies this name.
        listen_hosts.add(split_addr(options["tunnel-public-addr"], 3024)[0])
    listen_hosts |= {n.strip().strip("[]") for n in (options["server-names"] or "").split(",")
                     if n.strip()}
    dns = sorted({h for h in {public_host, "localhost", cluster} | listen_hosts
                  if not is_ip(h)})
    apps_domain = (options["apps-domain"] or public_host).lower().rstrip(".")
    if not is_ip(apps_domain):
        # Apps are reached at https://NAME.<apps domain> (edgeaccess.apps).
        dns += [f"*.{apps_domain}"] + ([apps_domain] if apps_domain not in dns else [])
    ips = sorted({"127.0.0.1", "::1"} | {h for h in listen_hosts | {public_host}
                                         if is_ip(h) and h not in ("0.0.0.0", "::")})
    # Each proxy has its own keys; the shared CAs certify them at start.
    certificates.proxy_key = _load_or_create_key(data_dir / "proxy" / "tls.key")
    # Browsers (Chromium's BoringSSL) verify no Ed25519 signature: the web
    # port's certificate has an ECDSA P-256 key (same names) signed by the
    # web CA, sent with the web CA's link to the X.509 CA (edgeaccess.pki).
    certificates.web_key = _load_or_create_web_key(data_dir / "proxy" / "web_tls.key")
    certificates.host_key = _load_or_create_key(data_dir / "proxy" / "ssh_host_key")
    certificates.public_host, certificates.cluster = public_host, cluster
    certificates.dns_names, certificates.ip_addresses = dns, ips

    listeners: dict[str, _Listener] = {}

    def addresses() -> dict:
        found = {}
        for name, listener in listeners.items():
            if listener.port is not None:
                found[name] = f"{public_host}:{listener.port.getHost().port}"
        if options["tunnel-public-addr"]:
            tunnel_host, _, tunnel_port = options["tunnel-public-addr"].rpartition(":")
            if (not tunnel_port.isdigit() or not tunnel_host) and "tunnel" in found:
                # A host alone: that host and the port the tunnel server is bound to.
                found["tunnel"] = (f"{options['tunnel-public-addr']}:"
                                   f"{found['tunnel'].rpartition(':')[2]}")
            else:
                found["tunnel"] = options["tunnel-public-addr"]
        found.setdefault("web", f"{public_host}:{public_port}")
        found.setdefault("ssh", f"{public_host}:3023")
        return found

    def on_listening() -> None:
        if all(l.port is not None for l in listeners.values()):
            _write_runtime(data_dir, cluster, listeners, addresses())

    # Every proxy of the cluster, from their records in the backend: what
    # Discover tells agents (edgeaccess.controlplane.proxies).
    membership = None
    tunnels = _tunnel_server(reactor, auth, addresses, clusters,
                             proxies=lambda: membership.tunnel_addresses(),
                             resume_budget=options.get("resume-budget", 60.0))
    # The live control plane: the cache every read comes from, the push to
    # every node and leaf (edgeaccess.controlplane), locks at the proxy.
    from edgeaccess.controlplane.proxy import ProxyControlPlane

    control = ProxyControlPlane(auth, backend, reactor, tunnels.registry,
                                lambda: [authority.user_ca_public_line])
    control.setServiceParent(top)
    membership = _membership(reactor, backend, control.cache, data_dir, cluster, addresses,
                             listeners, tunnels)
    membership.setServiceParent(top)
    backend_service.before_close.append(membership.withdraw)
    # LAN nodes' agent ports (SSH, Kubernetes, apps), dialled on demand (the
    # proxy's client certificate: docs/security.md, "Who trusts whom"),
    # their channels resumable; beside the tunnelled agents for the kube
    # directory and the app index, and the router's way to LAN nodes' SSH.
    lan_pool = LanAgentPool(reactor=reactor, cluster=cluster,
                            ca_certs=lambda: [authority.tls_ca_cert],
                            credentials=lambda: (certificates.proxy_key,
                                                 certificates.client_cert),
                            resume_budget=options.get("resume-budget", 60.0))
    router = _router(reactor, auth, cluster, tunnels.registry, clusters, lan_pool)
    lan_agents = LanAgentDirectory(control.cache, lan_pool, reactor)
    lan_agents.setServiceParent(top)
    agents = CombinedRegistry(tunnels.registry, lan_agents)
    kube = _kube_proxy(reactor, auth, audit, cluster, agents, router, clusters,
                       leaf_trust, top, control)
    web = ProxyWeb(auth, addresses, public_host, clusters, kube=kube,
                   ui=_web_ui(reactor, auth, router, clusters, addresses))
    def web_options():
        return tls.server_options(certificates.web_key, certificates.web_cert,
                                  [authority.tls_ca_cert], chain=certificates.web_chain,
                                  client_certificates="optional")
    from edgeaccess.apps.proxy import AppTimeouts
    from edgeaccess.apps.requestaudit import parse_selection
    from edgeaccess.apps.service import build as build_app_access

    # The web port also serves apps on NAME.<public host> (edgeaccess.apps).
    apps = build_app_access(auth=auth, registry=agents, clusters=clusters,
                            public_host=apps_domain, web_addr=lambda: addresses()["web"],
                            site=EdgeSite(web.resource()), reactor=reactor,
                            web_sessions=getattr(web.ui, "sessions", None),
                            ui_host=public_host,
                            request_audit_apps=parse_selection(
                                options.get("app-request-audit")),
                            timeouts=AppTimeouts.parse(options.get("app-timeouts")),
                            when_ready=startup.when_ready)
    apps.service.setServiceParent(top)
    if web.ui is not None:
        from edgeaccess.web import sections

        ask_leaf = sections.leaf_asker(clusters, reactor)
        web.ui.resource_sections += [sections.app_section(apps.gateway, ask_leaf),
                                     sections.kube_section(kube, ask_leaf, cluster)]
    listeners["web"] = _Listener(
        "web", lambda: listen_endpoint(reactor, options["web-listen"], 3080, web_options()),
        lambda: apps.factory, on_listening, startup)

    api = AuthAPI(auth)

    def proxy_options(client_certificates, alpn=None):
        return tls.server_options(certificates.proxy_key, certificates.proxy_cert,
                                  [authority.tls_ca_cert],
                                  client_certificates=client_certificates, alpn=alpn)

    listeners["auth"] = _Listener(
        "auth", lambda: listen_endpoint(reactor, options["auth-listen"], 3025,
                                        proxy_options("optional")),
        lambda: EdgeSite(api.resource()), on_listening, startup)

    # kubectl offers h2 and http/1.1: without an ALPN answer OpenSSL aborts.
    kube_factory = kube.factory()
    listeners["kube"] = _Listener(
        "kube", lambda: listen_endpoint(reactor, options["kube-listen"], 3026,
                                        proxy_options("required", [b"http/1.1"]),
                                        backlog=1024),
        lambda: kube_factory, on_listening, startup)
    # The tunnel port also serves users' SSH streams (ALPN edge-ssh/1, routed
    # by the TLS server name): the OpenSSH ProxyCommand mode of TLS routing.
    tunnel_factory = tls_routing_factory(tunnels, router, cluster, reactor,
                                         tunnel_alpn=ALPN_PROTOCOL)
    listeners["tunnel"] = _Listener(
        "tunnel", lambda: listen_endpoint(reactor, options["tunnel-listen"], 3024,
                                          proxy_options("required", [ALPN_PROTOCOL, ALPN_SSH]),
                                          backlog=4096),
        lambda: tunnel_factory, on_listening, startup)
    _TunnelShutdown(tunnels).setServiceParent(top)
    # Freed handshake state of a burst of agents goes back to the system.
    HeapTrimmer(reactor).setServiceParent(top)

    from edgeaccess.proxy.sshproxy import LockAuthorizer

    def ssh_factory():
        return make_proxy_ssh_factory(
            certificates.host_key, certificates.host_cert,
            lambda: [authority.ssh_user_ca.public_key()], router, reactor,
            authorizer=LockAuthorizer(control.check_user), sessions=control.sessions,
            target_check=control.check_target)

    LeafLinks(leaf_trust, router, reactor, control=control, kube=kube,
              apps=apps.gateway,
              resume_budget=options.get("resume-budget", 60.0)).setServiceParent(top)
    listeners["ssh"] = _Listener(
        "ssh", lambda: listen_endpoint(reactor, options["ssh-listen"], 3023),
        ssh_factory, on_listening, startup)

    if options["diag-listen"]:
        from edgeaccess import diag

        registry = diag.make_registry(diag.EdgeCollector(cluster, tunnels.registry.connected))
        ready = lambda: all(l.port is not None for l in listeners.values())  # noqa: E731
        diag_site = EdgeSite(diag.DiagResource(registry, ready))
        listeners["diag"] = _Listener(
            "diag", lambda: listen_endpoint(reactor, options["diag-listen"], 3000),
            lambda: diag_site, on_listening, startup)

    for listener in listeners.values():
        listener.setServiceParent(top)
    top.auth = auth
    top.control = control
    return top


def _membership(reactor, backend, cache, data_dir: Path, cluster, addresses, listeners,
                tunnels):
    """This proxy's record in the backend (refreshed, deleted at a graceful
    stop) and the others': a change of the proxy list is sent to every agent."""
    from edgeaccess import __version__
    from edgeaccess.controlplane.proxies import ProxyMembership

    def record():
        if not listeners or any(l.port is None for l in listeners.values()):
            return None
        found = addresses()
        return {"cluster": cluster, "tunnel_addr": found.get("tunnel", ""),
                "web_addr": found.get("web", ""), "ssh_addr": found.get("ssh", ""),
                "version": __version__}

    return ProxyMembership(backend, cache, reactor, proxy_id=_proxy_id(data_dir),
                           record=record, on_change=lambda _: tunnels.announce_proxies())


def _proxy_id(data_dir: Path) -> str:
    """This proxy's id, kept in its data dir (the same across restarts)."""
    import uuid

    path = data_dir / "proxy" / "id"
    try:
        found = path.read_text().strip()
        uuid.UUID(found)
        return found
    except (FileNotFoundError, ValueError):
        pass
    made = str(uuid.uuid4())
    keys.write_public(path, made.encode() + b"\n")
    return made


def _tunnel_server(reactor, auth, addresses, clusters, proxies,
                   resume_budget: float = 60.0) -> TunnelServerFactory:
    """The reverse-tunnel server: nodes behind NAT dial in and are listed
    (address ``tunnel``) while their tunnel is up; leaf clusters that trust
    this cluster dial in with a ``cluster`` identity."""

    def identity_for(transport):
        identity = tls.peer_identity(transport)
        if identity is None or identity.cluster != auth.cluster_name:
            return None
        if identity.kind == "cluster" and not clusters.accepts_tunnel(identity):
            _log.warn("refused a tunnel from cluster {name}: it is not a trusted leaf",
                      name=identity.name)
            return None
        return identity

    tunnels = TunnelServerFactory(
        clock=reactor, identity_for=identity_for,
        proxies=proxies,
        max_channels=256, resume_budget=resume_budget)

    def connected(tunnel) -> None:
        identity = tunnel.identity
        _log.info("tunnel up: {kind} {name} ({uuid})", kind=identity.kind,
                  name=identity.name, uuid=identity.uuid)
        if identity.kind == "cluster":
            clusters.tunnel_up(tunnel)

    def disconnected(tunnel) -> None:
        identity = tunnel.identity
        _log.info("tunnel down: {kind} {name} ({uuid})", kind=identity.kind,
                  name=identity.name, uuid=identity.uuid)
        if identity.kind == "cluster":
            clusters.tunnel_down(tunnel)

    tunnels.registry.subscribe(connected, disconnected)
    # While its tunnel is up a node is listed from the registry, in memory
    # (this process's registry is the truth about its tunnels): no backend
    # write per Hello (a SQLite commit each, in a reconnect storm 10,000 of
    # them) and no refresher rewriting 10,000 records every 2 minutes.
    auth.live_nodes = LiveTunnelNodes(tunnels.registry, auth.cluster_name)
    return tunnels


#: A graceful stop spreads its agents' returns over 2 ms per tunnel (20 s
#: for 10,000), at most 30 s: a proxy restarted in place is not hit by all
#: of them in the same second.
RECONNECT_SPREAD_PER_TUNNEL = 0.002
RECONNECT_SPREAD_MAX = 30.0


class _TunnelShutdown(service.Service):
    """Graceful stop: ask every agent to reconnect, staggered (their tunnels
    to the other proxies of the cluster stay up meanwhile)."""

    def __init__(self, tunnels) -> None:
        self.tunnels = tunnels

    def stopService(self):
        super().stopService()
        spread = min(RECONNECT_SPREAD_MAX,
                     RECONNECT_SPREAD_PER_TUNNEL * len(self.tunnels.registry.connected()))
        return self.tunnels.shutdown(delay=0.0, reason="proxy shutting down", timeout=5.0,
                                     spread=spread)


def _web_ui(reactor, auth, router, clusters, addresses):
    """The web UI: sessions in the backend, terminals through the router."""
    from edgeaccess.web.app import WebUI
    from edgeaccess.web.sessions import WebSessionStore, lock_check_for
    from edgeaccess.web.terminal import TerminalOpener

    has_locks = callable(getattr(auth, "list_locks", None))
    return WebUI(auth, WebSessionStore(auth, reactor, lock_check=lock_check_for(auth)),
                 opener=TerminalOpener(auth, router, clusters, reactor),
                 clusters=clusters, addresses=addresses, clock=reactor,
                 lock_source=auth if has_locks else None)


def _kube_proxy(reactor, auth, audit, cluster, registry, router, clusters, leaf_trust, top,
                control):
    """The Kubernetes proxy (3026): local clusters from the tunnels' inventories,
    leaves' through their tunnels; roles from a cache refreshed every second."""
    from edgeaccess.cluster.trusted import map_roles
    from edgeaccess.kube.proxy import KubeDirectory, KubeProxy, RoleCache, RoleCacheService

    roles = RoleCache(auth, reactor)
    RoleCacheService(roles).setServiceParent(top)

    def leaf_roles(root, remote_roles):
        links = leaf_trust.links
        state = links.current.get(root) if links is not None else None
        return map_roles(state["role_map"], remote_roles) if state else []

    return KubeProxy(cluster_name=cluster, directory=KubeDirectory(registry), roles=roles,
                     router=router, audit=audit, reactor=reactor, leaf_roles=leaf_roles,
                     known_leaf=lambda name: name in clusters.known,
                     check_user=control.check_user, sessions=control.sessions)


def _router(reactor, auth, cluster, registry, clusters, lan_pool=None):
    """Names to endpoints: LAN nodes through their agent port (else TCP),
    tunnelled nodes through their tunnel, leaf clusters' nodes through the
    leaf's tunnel."""

    def node_lookup(name):
        return defer.Deferred.fromCoroutine(auth.find_node(name))

    def tunnel_endpoint(cluster_name, node, kind="ssh", source=None):
        uuid = node["uuid"] if isinstance(node, dict) else getattr(node, "uuid", None)
        tunnel = registry.lookup(cluster_name, uuid)
        return TunnelChannelEndpoint(tunnel, kind, uuid, source=source)

    return Router(cluster, node_lookup, tunnel_lookup=tunnel_endpoint,
                  leaf_lookup=clusters.leaf_router, reactor=reactor,
                  agent_lookup=lan_pool.endpoint if lan_pool is not None else None)




def _write_admin_identity(data_dir: Path, authority, now) -> None:
    key = keys.generate_private_key()
    cert = authority.sign_tls(
        key.public_key(),
        x509ca.Identity(kind="admin", name="admin", cluster=authority.cluster_name),
        now=now, ttl=SERVICE_CERT_TTL)
    keys.write_secret(
        data_dir / "admin" / "identity.pem",
        keys.private_key_pem(key) + x509ca.certificate_pem(cert)
        + x509ca.certificate_pem(authority.tls_ca_cert))


def _write_runtime(data_dir: Path, cluster, listeners, addresses) -> None:
    runtime = {
        "cluster_name": cluster,
        "pid": os.getpid(),
        "listen": {name: f"{l.port.getHost().host}:{l.port.getHost().port}"
                   for name, l in listeners.items()},
        "addresses": addresses,
    }
    keys.write_public(data_dir / "runtime.json",
                      json.dumps(runtime, indent=2, sort_keys=True).encode() + b"\n")
    _log.info("proxy of cluster {cluster} ready: {addresses}", cluster=cluster,
              addresses=addresses)
