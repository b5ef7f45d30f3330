"""The leaf side of cluster trust.

Creating a ``trusted_cluster`` resource runs the exchange with the root
(:meth:`LeafTrust.before_upsert`): the root is verified by its CA pin,
the token authorises the exchange, and the leaf keeps the root's user CA,
the role map and a root-signed ``cluster`` identity. :class:`LeafLinks`
then keeps one reverse tunnel to each enabled root (same protocol and
reconnect rules as nodes) and relays the root's channels to leaf nodes.
Disabling or deleting the trust stops the tunnel at once, which also cuts
every session relayed through it.
"""

from __future__ import annotations

import functools
import json
import random

from cryptography.hazmat.primitives import serialization
from klein import Klein
from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from edgeaccess import clusterclient, errors
from edgeaccess.cluster.trusted import map_roles
from edgeaccess.httpapi import EdgeSite
from edgeaccess.httpclient import split_addr
from edgeaccess.pki import keys, x509ca
from edgeaccess.proxy.splice import SpliceFactory

_log = Logger()

STATE_PREFIX = "/trusted_state/"


def _dumps(value) -> bytes:
    return json.dumps(value, sort_keys=True).encode("utf-8")


async def exchange_with_root(tc, *, leaf_name: str, host_ca_lines: list[str], tls_ca_pem: str,
                             tunnel_key, connect_cluster) -> dict:
    """The CA exchange with the root.

    The root's CA is fetched and checked against the pin; from then on the
    leaf talks only to a proxy of cluster ``tc.name`` (the root's name, as
    the resource says) whose certificate names ``tc.web_proxy_addr``'s host:
    an impostor holding any other certificate of the root's CA gets no token.

    :param connect_cluster: see :func:`edgeaccess.clusterclient.connect`
        (without the reactor).
    """
    root_ca = await clusterclient.fetch_pinned_ca(connect_cluster, tc.web_proxy_addr,
                                                  tc.ca_pin)
    client = connect_cluster(tc.web_proxy_addr, default_port=3080,
                             ca_certs=[x509ca.load_certificate_pem(root_ca.encode())],
                             cluster=tc.name)
    try:
        # Check the name before the join: the root stores the leaf when it accepts.
        ping = await client.get_json("/v1/ping")
        _check_root_name(tc, ping.get("cluster_name") if isinstance(ping, dict) else None)
        answer = await client.post_json("/v1/trusted_clusters/join", {
            "token": tc.token,
            "leaf_name": leaf_name,
            "host_ca": host_ca_lines,
            "tls_ca": tls_ca_pem,
            "tunnel_public_key": tunnel_key.public_key().public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii"),
        })
    finally:
        await client.close()
    if not isinstance(answer, dict):
        raise errors.EdgeError(f"the cluster at {tc.web_proxy_addr} sent a malformed answer")
    _check_root_name(tc, answer.get("cluster_name"))
    user_cas = answer.get("ssh_user_ca")
    if (not isinstance(user_cas, list) or not user_cas
            or not all(isinstance(l, str) for l in user_cas)
            or not isinstance(answer.get("tls_certificate"), str)):
        raise errors.EdgeError(f"the cluster at {tc.web_proxy_addr} sent an incomplete answer")
    return {"root_tls_ca": root_ca, "ssh_user_ca": answer["ssh_user_ca"],
            "cluster_certificate": answer["tls_certificate"]}


def _check_root_name(tc, name) -> None:
    if name != tc.name:
        raise errors.BadResource(
            f"the cluster at {tc.web_proxy_addr} is {name!r}, not {tc.name!r} "
            f"(metadata.name must be the root cluster's name)")


class LeafTrust:
    """The resource hook (AuthServer.resource_hooks["trusted_cluster"]) and
    the trust data the leaf's nodes need."""

    def __init__(self, auth, reactor, connect_cluster=None) -> None:
        self.auth = auth
        self.reactor = reactor
        self.links: LeafLinks | None = None
        if connect_cluster is None:
            connect_cluster = functools.partial(clusterclient.connect, reactor)
        self._connect_cluster = connect_cluster

    async def before_upsert(self, tc) -> None:
        previous = await self.state(tc.name)
        reuse = (previous is not None and previous["web_proxy_addr"] == tc.web_proxy_addr
                 and previous["ca_pin"] == tc.ca_pin)
        if reuse:
            state = dict(previous)
        else:
            tunnel_key = keys.generate_private_key()
            authority = self.auth.authority
            result = await exchange_with_root(
                tc, leaf_name=self.auth.cluster_name,
                host_ca_lines=[authority.host_ca_public_line],
                tls_ca_pem=authority.tls_ca_pem, tunnel_key=tunnel_key,
                connect_cluster=self._connect_cluster)
            state = {**result, "tunnel_key": keys.private_key_pem(tunnel_key).decode()}
            _log.info("trust established with root cluster {root} at {addr}",
                      root=tc.name, addr=tc.web_proxy_addr)
        state.update({
            "name": tc.name, "enabled": tc.enabled, "ca_pin": tc.ca_pin,
            "web_proxy_addr": tc.web_proxy_addr, "tunnel_addr": tc.tunnel_addr,
            "role_map": [{"remote": m.remote, "local": list(m.local)} for m in tc.role_map],
        })
        await self.auth.backend.put(STATE_PREFIX + tc.name, _dumps(state))
        if not tc.enabled:
            _log.info("trust with root cluster {root} disabled", root=tc.name)

    async def after_delete(self, name: str) -> None:
        try:
            await self.auth.backend.delete(STATE_PREFIX + name)
        except errors.NotFound:
            pass
        _log.info("trust with root cluster {root} removed", root=name)

    async def after_change(self, name: str) -> None:
        if self.links is not None:
            await self.links.reconcile()

    async def state(self, name: str) -> dict | None:
        try:
            return json.loads((await self.auth.backend.get(STATE_PREFIX + name)).value)
        except errors.NotFound:
            return None

    async def states(self) -> list[dict]:
        return [json.loads(i.value) for i in await self.auth._range(STATE_PREFIX)]

    async def node_trust(self) -> list[dict]:
        """What leaf nodes need: each enabled root's user CA and role map."""
        return [{"name": s["name"], "ssh_user_ca": s["ssh_user_ca"], "role_map": s["role_map"]}
                for s in await self.states() if s.get("enabled")]


class LeafLinks(service.MultiService):
    """One reverse tunnel to each enabled root cluster."""

    def __init__(self, trust: LeafTrust, local_router, reactor, rng=None,
                 heartbeat_interval: float = 30.0, control=None, kube=None,
                 apps=None, resume_budget: float = 0.0) -> None:
        """
        :param control: the proxy's control plane (``root_control(root,
            data)``, ``root_gone(root)``): what each root pushes down our
            tunnel is relayed to our nodes.
        :param kube: this proxy's :class:`~edgeaccess.kube.proxy.KubeProxy`
            (serves ``kube:NAME`` channels from a root), or None.
        :param apps: the :class:`~edgeaccess.apps.sessions.AppGateway` (apps
            of this leaf), or None.
        :param resume_budget: seconds the channels of each root's tunnel (its
            users' sessions to our nodes, Kubernetes and apps) outlive an
            outage of that tunnel (the proxy's ``--resume-budget``; 0: they
            end with the tunnel).
        """
        super().__init__()
        self.control = control
        self.kube = kube
        self.apps = apps
        self.trust = trust
        trust.links = self
        self.router = local_router
        self.reactor = reactor
        self.rng = rng or random.SystemRandom()
        self.heartbeat_interval = heartbeat_interval
        self.resume_budget = resume_budget
        self.agents: dict[str, tuple[str, object]] = {}
        self.current: dict[str, dict] = {}
        self._poll = LoopingCall(lambda: defer.Deferred.fromCoroutine(self.reconcile())
                                 .addErrback(lambda f: _log.failure("reconcile", f)))
        self._poll.clock = reactor

    def startService(self) -> None:
        super().startService()
        # Several proxies may share one backend: pick up changes made elsewhere.
        self._poll.start(5, now=True)

    def stopService(self):
        if self._poll.running:
            self._poll.stop()
        return super().stopService()

    async def reconcile(self) -> None:
        states = {s["name"]: s for s in await self.trust.states() if s.get("enabled")}
        self.current = states
        for name, (fingerprint, agent) in list(self.agents.items()):
            if name not in states or _fingerprint(states[name]) != fingerprint:
                del self.agents[name]
                if self.control is not None:
                    self.control.root_gone(name)
                _log.info("closing the tunnel to root cluster {root}", root=name)
                await defer.maybeDeferred(agent.disownServiceParent)
        for name, state in states.items():
            if name not in self.agents and self.running:
                self.agents[name] = (_fingerprint(state), self._start_agent(state))

    def _start_agent(self, state: dict):
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

        from edgeaccess import tls
        from edgeaccess.tunnel.agent import TunnelAgent
        from edgeaccess.tunnel.protocol import ALPN_PROTOCOL, Inventory

        root = state["name"]
        ca_certs = x509ca.load_certificates_pem(state["root_tls_ca"].encode())
        cert = x509ca.load_certificate_pem(state["cluster_certificate"].encode())
        key = keys.load_private_key(state["tunnel_key"].encode())
        host, port = split_addr(state["tunnel_addr"], 3024)

        def endpoint_factory():
            # Only the root's own proxy, named by the address dialled.
            options = tls.client_options(host, ca_certs, cluster=root, key=key, cert=cert,
                                         alpn=[ALPN_PROTOCOL])
            return wrapClientTLS(options, HostnameEndpoint(self.reactor, host, port,
                                                           timeout=10))

        agent = TunnelAgent(
            endpoint_factory=endpoint_factory,
            inventory=Inventory(name=self.trust.auth.cluster_name),
            clock=self.reactor, rng=self.rng,
            accept_channel=lambda kind, target: self._accept(root, kind, target),
            heartbeat_interval=self.heartbeat_interval, max_channels=1024,
            resume_budget=self.resume_budget,
            on_control=(None if self.control is None
                        else lambda data: self.control.root_control(root, data)))
        agent.setServiceParent(self)
        _log.info("dialing root cluster {root} at {addr}", root=root,
                  addr=state["tunnel_addr"])
        return agent

    def _accept(self, root: str, kind: str, target: str):
        """Channels the root opens: ``ssh:NODE`` to a leaf node, ``web`` for
        the root's questions (node listings)."""
        state = self.current.get(root)
        if state is None:
            raise errors.AccessDenied(f"cluster {root} is not trusted")
        if kind != "cluster":
            raise errors.AccessDenied(f"{kind} channels are not served by a leaf proxy")
        if target == "web":
            return EdgeSite(LeafInternalAPI(self.trust, root, self.kube,
                                            apps=self.apps).app.resource())
        what, _, name = target.partition(":")
        if what == "kube" and name and self.kube is not None:
            _log.info("serving Kubernetes cluster {name} to root cluster {root}",
                      name=name, root=root)
            return self.kube.forwarded_factory(root)
        if what == "app" and name and self.apps is not None:
            from edgeaccess.apps.service import relayed_app_factory

            return relayed_app_factory(self.apps, self.trust, root, name)
        if what != "ssh" or not name:
            raise errors.NotFound(f"no such target {target!r}")
        cluster = self.trust.auth.cluster_name
        _log.info("relaying a connection from root cluster {root} to node {node}",
                  root=root, node=name)
        def route(peer=None):
            # The root proxy asserted the user's address on the channel (the
            # tunnel is mutually authenticated): the leaf node sees it too.
            source = getattr(peer, "source", None)
            if source is None:
                return self.router.route(cluster, name, "ssh")
            return self.router.route(cluster, name, "ssh", source=source)

        return SpliceFactory(route, description=f"{name}.{cluster}", with_peer=True)


def _fingerprint(state: dict) -> str:
    return json.dumps({k: state.get(k) for k in (
        "tunnel_addr", "cluster_certificate", "root_tls_ca", "tunnel_key")}, sort_keys=True)


class LeafInternalAPI:
    """Served only inside the root's tunnel (never on a port): the root asks
    on behalf of one of its users, whose identity it forwards; the leaf
    applies its own roles through the role map."""

    app = Klein()

    def __init__(self, trust: LeafTrust, root: str, kube=None, apps=None) -> None:
        self.trust = trust
        self.root = root
        self.kube = kube
        self.apps = apps

    @app.handle_errors(Exception)
    def _errors(self, request, failure):
        from edgeaccess import httpapi

        return httpapi.error_response(request, failure)

    async def _forwarded(self, request) -> tuple[dict, list[str], dict]:
        """The root's user as its proxy forwards it (``x-edge-identity``):
        ``(identity, local roles mapped from its root roles, traits)``."""
        raw = request.getHeader(b"x-edge-identity") or b"{}"
        try:
            identity = json.loads(raw)
            remote_roles = [r for r in identity.get("roles", []) if isinstance(r, str)]
            traits = identity.get("traits") or {}
        except (ValueError, AttributeError, RecursionError):
            raise errors.BadRequest("malformed forwarded identity")
        state = await self.trust.state(self.root)
        if state is None or not state.get("enabled"):
            raise errors.AccessDenied(f"cluster {self.root} is not trusted")
        return identity, map_roles(state["role_map"], remote_roles), traits

    async def _checker(self, request):
        from edgeaccess.identity import rbac

        _, local, traits = await self._forwarded(request)
        return rbac.AccessChecker(await self.trust.auth.get_roles(local), traits)

    @app.route("/v1/apps", methods=["GET"])
    async def apps_list(self, request):
        """The apps of this leaf the root's user may reach (the leaf's roles, mapped)."""
        from edgeaccess.httpapi import json_response

        checker = await self._checker(request)
        return json_response(request, self.apps.local_apps(checker) if self.apps else [])

    @app.route("/v1/nodes", methods=["GET"])
    async def nodes(self, request):
        from edgeaccess.httpapi import json_response

        checker = await self._checker(request)
        nodes = [n for n in await self.trust.auth.list_nodes()
                 if checker.can_access_node(n["labels"])]
        return json_response(request, nodes)


@LeafInternalAPI.app.route("/v1/kube/clusters", methods=["GET"])
async def _leaf_kube_clusters(self, request):
    """The leaf's Kubernetes clusters a root's user may reach (its mapped roles)."""
    from edgeaccess.httpapi import json_response
    from edgeaccess.kube.listing import allowed_kube_clusters
    from edgeaccess.pki import x509ca

    forwarded, local, traits = await self._forwarded(request)
    name = str(forwarded.get("name") or forwarded.get("user") or "")
    identity = x509ca.Identity(kind="user", name=name or "root-user", cluster=self.root,
                               roles=tuple(local), traits=dict(traits))
    return json_response(request, allowed_kube_clusters(self.kube, identity))
