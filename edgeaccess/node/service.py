"""``edgenode``: join the cluster once, then serve SSH and keep in touch.

In direct mode the node listens on ``--ssh-listen`` and talks to the auth
API; the proxy dials the node. Everything is retried with capped
exponential backoff and jitter, forever: losing the auth service or the
network never stops a node.
"""

from __future__ import annotations

import functools
import json
import random
import uuid as uuidlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger

from edgeaccess import __version__, clusterclient, errors
from edgeaccess.controlplane import state as cstate
from edgeaccess.controlplane.sessions import LiveSessions
from edgeaccess.controlplane.state import PersistedControlState
from edgeaccess.httpclient import pin_of_pem
from edgeaccess.identity import locks as lockdocs
from edgeaccess.node.authorizer import RoleAuthorizer
from edgeaccess.node.identity import NodeIdentity
from edgeaccess.pki import keys

_log = Logger()

#: Renew certificates when less than this fraction of their life is left.
RENEW_FRACTION = 1 / 3
NODE_CERT_TTL = timedelta(hours=24)


def backoff_delay(attempt: int, rng: random.Random, base: float = 1.0,
                  cap: float = 60.0) -> float:
    """Capped exponential backoff with full jitter."""
    return rng.uniform(0, min(cap, base * 2 ** min(attempt, 30)))


class NodeService(service.MultiService):
    """The node agent.

    :param listen: callable ``(factory) -> Deferred[port]`` starting the
        SSH listener (so tests and the tap choose the endpoint).
    :param connect_cluster: ``(addr, *, default_port, ca_certs, cluster,
        credentials) -> ClusterClient`` (default
        :func:`edgeaccess.clusterclient.connect` on ``reactor``); every call
        to the cluster (join, heartbeat, roles, renewal, audit) goes through
        the clients it makes.
    """

    def __init__(self, *, data_dir: Path, auth_server: str, token: str | None,
                 ca_pin: str | None, nodename: str, labels: dict, listen,
                 advertise_addr: str, reactor, heartbeat_interval: float = 30.0,
                 env_allow=(), rng: random.Random | None = None,
                 connect_cluster=None, kube=None, serve_ssh: bool = True,
                 apps=(), resume_budget: float = 60.0, proxy_spread: float = 3.0,
                 agent_listen=None, agent_advertise: str | None = None) -> None:
        """
        :param kube: ``(name, labels, AgentConfig)`` of the Kubernetes API to
            publish (``--kube-cluster``), or None.
        :param serve_ssh: False for a node that serves no SSH (``--no-ssh``).
        :param apps: the web apps to publish (``--app``).
        :param resume_budget: seconds the tunnel's channels outlive a tunnel
            outage (``--resume-budget``; 0: they end with the tunnel).
        :param proxy_spread: a proxy learnt of while a tunnel is up is dialed
            after a random wait of up to this many seconds (no herd).
        :param agent_listen: ``(factory) -> Deferred[port]`` starting the agent
            port (``--agent-listen``) where the proxy dials a LAN node for its
            SSH, Kubernetes and apps (:mod:`edgeaccess.node.lanagent`); None
            (``--agent-listen off``): no agent port, SSH over plain TCP.
        :param agent_advertise: ``HOST:PORT`` the proxy dials for it (port 0:
            the port bound).
        """
        super().__init__()
        self.kube = kube
        self.serve_ssh = serve_ssh
        self.kube_agent = None
        if connect_cluster is None:
            connect_cluster = functools.partial(clusterclient.connect, reactor)
        self._connect_cluster = connect_cluster
        #: The client to the auth service (set once the identity is known).
        self.cluster_client: clusterclient.ClusterClient | None = None
        self._joining: clusterclient.ClusterClient | None = None
        self._main = None
        self.data_dir = data_dir
        self.auth_server = auth_server
        self.token = token
        self.ca_pin = ca_pin
        self.nodename = nodename
        self.labels = labels
        self._listen = listen
        self.advertise_addr = advertise_addr
        self.reactor = reactor
        self.heartbeat_interval = heartbeat_interval
        self.resume_budget = resume_budget
        self.env_allow = tuple(env_allow)
        self.rng = rng or random.SystemRandom()
        self.identity: NodeIdentity | None = None
        self.control: PersistedControlState | None = None
        #: Live SSH connections, ended by locks (the seam other session kinds use too).
        self.sessions: LiveSessions | None = None
        self.control_link = None
        self.factory = None
        self.port = None
        self._agent_listen = agent_listen
        self.agent_advertise = agent_advertise
        #: The agent port, once listening (LAN nodes).
        self.agent_port = None
        self._running = False
        self._failures = 0
        self._sleeping = None
        #: The tunnel agents, one per proxy (:class:`~edgeaccess.tunnel.pool.TunnelAgentPool`).
        self.agent = None
        #: Seconds over which tunnels to newly learnt proxies are spread.
        self.proxy_spread = proxy_spread
        #: The web apps this node publishes (:class:`~edgeaccess.apps.agent.AppAgent`).
        self.apps = None
        if apps:
            from edgeaccess.apps.agent import AppAgent

            self.apps = AppAgent(list(apps), reactor)

    @property
    def roles(self) -> dict[str, dict]:
        return self.control.roles if self.control is not None else {}

    @property
    def trusted(self) -> list[dict]:
        return self.control.trusted if self.control is not None else []

    # --- lifecycle -------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._running = True
        self._main = d = defer.Deferred.fromCoroutine(self._run())
        d.addErrback(self._fatal)

    def stopService(self):
        self._running = False
        if self._sleeping is not None and not self._sleeping.called:
            self._sleeping.cancel()
        d = super().stopService()
        # Whatever is in flight to the auth service is cancelled, not waited for.
        for client in (self.cluster_client, self._joining):
            if client is not None:
                d.addCallback(lambda _, c=client: c.close())
        if self._main is not None and not self._main.called:
            self._main.cancel()
        if self.agent is not None and self.factory is not None:
            d.addCallback(lambda _: self.factory.doStop())
        ports = [p for p in (self.port, self.agent_port) if p is not None]
        if ports:
            return defer.gatherResults(
                [*(defer.maybeDeferred(p.stopListening) for p in ports), d])
        return d

    def _fatal(self, failure) -> None:
        if failure.check(defer.CancelledError):
            return
        if failure.check(errors.EdgeError):
            _log.critical("node cannot start: {reason}", reason=failure.value)
        else:
            _log.failure("node cannot start", failure)
        if self.reactor.running:
            # twistd exits 0 after reactor.stop(): make the failure visible to
            # service managers with a non-zero status once shutdown is done.
            self.reactor.addSystemEventTrigger("after", "shutdown", _exit_failed)
            self.reactor.stop()

    async def _sleep(self, seconds: float) -> None:
        self._sleeping = deferLater(self.reactor, seconds, lambda: None)
        await self._sleeping

    async def _run(self) -> None:
        self.identity = NodeIdentity.load(self.data_dir)
        if self.identity is None:
            self.identity = await self._join_with_retries()
            self.cluster_client = self._open_cluster_client()
        else:
            self.cluster_client = self._open_cluster_client()
            _log.info("node {name} ({uuid}) of cluster {cluster}: identity loaded from "
                      "{dir}", name=self.identity.name, uuid=self.identity.uuid,
                      cluster=self.identity.cluster, dir=self.data_dir)
            if self.identity.name != self.nodename:
                _log.warn("--nodename {given} differs from the joined name {name}; "
                          "keeping {name}", given=self.nodename, name=self.identity.name)
        self._load_control_state()
        await self._start_ssh()
        while self._running:
            try:
                await self._heartbeat()
                if self._failures:
                    _log.info("auth service reachable again after {n} failed attempts",
                              n=self._failures)
                    self.audit.shipper.link_restored()
                self._failures = 0
                delay = self.heartbeat_interval
            except defer.CancelledError:
                raise
            except Exception as e:
                # Whatever went wrong (the network, or an answer we could not
                # read), the node keeps serving and tries again.
                self._failures += 1
                delay = min(self.heartbeat_interval,
                            backoff_delay(self._failures, self.rng, cap=self.heartbeat_interval))
                if not isinstance(e, errors.EdgeError):
                    _log.failure("heartbeat failed unexpectedly")
                _log.warn("heartbeat failed ({reason}); retrying in {delay:.1f}s",
                          reason=e, delay=delay)
            if self._running:
                await self._sleep(delay)

    # --- joining ---------------------------------------------------------

    async def _join_with_retries(self) -> NodeIdentity:
        if not self.token:
            raise errors.BadRequest(
                f"no identity in {self.data_dir} and no --token to join with")
        attempt = 0
        while True:
            try:
                return await self._join()
            except (errors.TokenInvalid, errors.CertificateInvalid, errors.BadRequest):
                raise
            except (errors.EdgeError, KeyError, TypeError, ValueError) as e:
                attempt += 1
                delay = backoff_delay(attempt, self.rng)
                _log.warn("join failed ({reason}); retrying in {delay:.1f}s",
                          reason=e, delay=delay)
                await self._sleep(delay)

    async def _join(self) -> NodeIdentity:
        """Fetch and pin the CA, then trade the token for an identity, talking
        only to a proxy of that CA's cluster from then on."""
        from edgeaccess.pki import x509ca

        if self.ca_pin:
            ca_pem = await clusterclient.fetch_pinned_ca(
                self._connect_cluster, self.auth_server, self.ca_pin, default_port=3025)
        else:
            ca_pem = await self._fetch_unpinned_ca()
            _log.warn("joining without --ca-pin: trusting the CA the auth server sent "
                      "({pin}); pass --ca-pin to be safe from impersonation",
                      pin=pin_of_pem(ca_pem))
        ca_cert = x509ca.load_certificate_pem(ca_pem.encode())
        cluster = x509ca.ca_cluster_name(ca_cert)
        self._joining = client = self._connect_cluster(
            self.auth_server, default_port=3025, ca_certs=[ca_cert], cluster=cluster)
        try:
            return await self._join_through(client)
        finally:
            self._joining = None
            await client.close()

    async def _fetch_unpinned_ca(self) -> str:
        client = self._connect_cluster(self.auth_server, default_port=3025, ca_certs=None)
        try:
            answer = await client.get_json("/v1/cluster/ca")
        finally:
            await client.close()
        pems = answer.get("tls_ca") if isinstance(answer, dict) else None
        if not isinstance(pems, list) or not pems or not isinstance(pems[0], str):
            raise errors.EdgeError(f"{self.auth_server} did not send its CA certificate")
        return pems[0]

    async def _join_through(self, client) -> NodeIdentity:
        info = await client.get_json("/v1/cluster/ca")
        # The proxy's web address means: no inbound port, a reverse tunnel.
        mode = "tunnel" if info.get("service") == "proxy" else "direct"
        ssh_key = keys.generate_private_key()
        tls_key = keys.generate_private_key()
        node_uuid = str(uuidlib.uuid4())
        answer = await client.post_json("/v1/join", {
            "token": self.token,
            "name": self.nodename,
            "uuid": node_uuid,
            "ssh_public_key": keys.public_key_openssh(ssh_key).decode(),
            "tls_public_key": _pem_public(tls_key),
            "addresses": [] if mode == "tunnel" else self._advertised_hosts(),
            "agent_server": mode != "tunnel" and self.serves_agent,
        })
        identity = NodeIdentity(
            uuid=answer["uuid"], name=answer["name"], cluster=answer["cluster_name"],
            auth_server=self.auth_server, mode=mode, ssh_key=ssh_key,
            ssh_certificate=answer["ssh_host_certificate"], tls_key=tls_key,
            tls_certificate=answer["tls_certificate"], ca_pem=answer["tls_ca"],
            user_ca_lines=answer["ssh_user_ca"], valid_before=answer["valid_before"],
            tls_server_certificate=answer.get("tls_server_certificate"))
        identity.save(self.data_dir)
        _log.info("joined cluster {cluster} as node {name} ({uuid}) in {mode} mode",
                  cluster=identity.cluster, name=identity.name, uuid=identity.uuid,
                  mode=mode)
        return identity

    def _open_cluster_client(self) -> clusterclient.ClusterClient:
        """The client to the auth service: the cluster CA, a proxy of our
        cluster only, our node certificate (the current one: renewals apply
        to the next connection)."""
        from edgeaccess.pki import x509ca

        def credentials():
            return (self.identity.tls_key,
                    x509ca.load_certificate_pem(self.identity.tls_certificate.encode()))

        return self._connect_cluster(
            self.identity.auth_server, default_port=3025,
            ca_certs=x509ca.load_certificates_pem(self.identity.ca_pem.encode()),
            cluster=self.identity.cluster, credentials=credentials)

    # --- SSH -------------------------------------------------------------

    async def _start_ssh(self) -> None:
        from edgeaccess.ssh.server import make_node_ssh_factory

        from edgeaccess.audit.node import NodeAudit

        # Audit: events and recordings go to an on-disk spool, shipped to
        # the auth service by a child service (edgeaccess.audit).
        self.audit = await NodeAudit.open(self.data_dir / "audit-spool", self.identity,
                                          lambda: self.cluster_client, self.reactor,
                                          rng=self.rng)
        self.audit.shipper.setServiceParent(self)
        authorizer = self.audit.guard(RoleAuthorizer(
            self.identity.cluster, lambda: self.roles, lambda: self.labels, self.reactor,
            user_cas=self._own_user_cas, lock_check=self._check_locks,
            trusted_clusters=lambda: self.trusted))
        self.sessions = LiveSessions(self.identity.cluster)
        self.control.subscribe(self._control_changed)
        self.factory = make_node_ssh_factory(
            self.identity.ssh_key, self.identity.host_certificate,
            self._trusted_user_cas, authorizer,
            self.identity.name, self.reactor, env_allow=self.env_allow,
            observer=self.audit.observer, reactor=self.reactor,
            sessions=self.sessions, node_ids=[self.identity.uuid])
        if self.kube is not None:
            await self._start_kube()
        if self.identity.mode == "tunnel":
            await self._start_tunnel()
            return
        self._start_control_stream()
        await self._start_agent_port()
        if not self.serve_ssh:
            _log.info("node {name} serves no SSH (--no-ssh)", name=self.identity.name)
            return
        self.port = await self._listen(self.factory)
        _log.info("node {name} SSH service listening on {addr}", name=self.identity.name,
                  addr=self.port.getHost())

    # --- Kubernetes ----------------------------------------------------------

    async def _start_kube(self) -> None:
        from edgeaccess.kube.agent import KubeAgent, make_decider
        from edgeaccess.pki import x509ca

        name, labels, config = self.kube
        ca_certs = x509ca.load_certificates_pem(self.identity.ca_pem.encode())
        self.kube_agent = KubeAgent(
            name=name, labels=labels, config=config, reactor=self.reactor,
            decide=make_decider(cluster_name=self.identity.cluster,
                                role_documents=lambda: self.roles,
                                trusted_clusters=lambda: self.trusted),
            ca_certs=lambda: ca_certs, cluster_name=self.identity.cluster,
            lock_check=self._check_locks, sessions=lambda: self.sessions)
        await self.kube_agent.start()
        self.reactor.addSystemEventTrigger("before", "shutdown", self.kube_agent.stop)
        _log.info("node {node} publishes Kubernetes cluster {name} ({server})",
                  node=self.identity.name, name=name, server=config.server)

    # --- reverse tunnel ----------------------------------------------------

    async def _start_tunnel(self) -> None:
        """Keep a reverse tunnel to every proxy of the cluster, forever: the
        first is the one the proxy we joined through names, the others come
        with the proxies' ``Discover`` (one agent each, edgeaccess.tunnel.pool)."""
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
        from twisted.internet.interfaces import IStreamClientEndpoint
        from zope.interface import implementer

        from edgeaccess import tls
        from edgeaccess.httpclient import split_addr
        from edgeaccess.pki import x509ca
        from edgeaccess.tunnel.agent import TunnelAgent
        from edgeaccess.tunnel.pool import TunnelAgentPool
        from edgeaccess.tunnel.protocol import ALPN_PROTOCOL

        attempt = 0
        while self._running:
            try:
                first_addr = await self._ask_tunnel_addr()
                break
            except (errors.EdgeError, KeyError, TypeError) as e:
                attempt += 1
                delay = backoff_delay(attempt, self.rng)
                _log.warn("cannot ask the proxy for its tunnel address ({reason}); "
                          "retrying in {delay:.1f}s", reason=e, delay=delay)
                await self._sleep(delay)
        if not self._running:
            return
        ca_certs = x509ca.load_certificates_pem(self.identity.ca_pem.encode())

        def dial(addr):
            host, port = split_addr(addr, 3024)
            options = tls.client_options(
                host, ca_certs, cluster=self.identity.cluster, key=self.identity.tls_key,
                cert=x509ca.load_certificate_pem(self.identity.tls_certificate.encode()),
                alpn=[ALPN_PROTOCOL])
            return wrapClientTLS(options, HostnameEndpoint(self.reactor, host, port,
                                                           timeout=10))

        node = self

        @implementer(IStreamClientEndpoint)
        class AskFirst:
            """Ask the proxy where its tunnel server is now (a new address gets
            an agent of its own), then dial this agent's address."""

            def __init__(self, addr):
                self.addr = addr

            def connect(self, factory):
                asking = defer.Deferred.fromCoroutine(node._refresh_tunnel_addr())
                return asking.addCallback(lambda _: dial(self.addr).connect(factory))

        dials_since_up: dict[str, int] = {}
        inventory = self._inventory()

        def make_agent(addr):
            def endpoint_factory():
                # The first dial after a tunnel is lost goes where it was; later
                # ones ask the web address first: the tunnel address may have
                # moved (another port, relay or load balancer).
                dials_since_up[addr] = dials_since_up.get(addr, 0) + 1
                return dial(addr) if dials_since_up[addr] == 1 else AskFirst(addr)

            return TunnelAgent(
                endpoint_factory=endpoint_factory, inventory=inventory,
                clock=self.reactor, rng=self.rng, accept_channel=self._accept_channel,
                heartbeat_interval=self.heartbeat_interval,
                on_discover=lambda addresses: self.agent.set_proxies(addresses),
                on_control=self._control_pushed, max_channels=256,
                resume_budget=self.resume_budget)

        def tunnel_up(addr, tunnel) -> None:
            dials_since_up[addr] = 0
            # A proxy is back: deliver the audit spool now, not after the
            # shipper's backoff (it reaches the same proxy's web address).
            self.audit.shipper.link_restored()

        # No listening port in tunnel mode: start the SSH factory by hand
        # (Conch loads its key-exchange groups in startFactory).
        self.factory.doStart()
        self.agent = TunnelAgentPool(make_agent, self.reactor, self.rng,
                                     spread=self.proxy_spread)
        self.agent.subscribe(tunnel_up)
        self.agent.add(first_addr)
        self.agent.setServiceParent(self)
        _log.info("node {name} reachable through a reverse tunnel to {addr}",
                  name=self.identity.name, addr=first_addr)

    @property
    def tunnel_addrs(self) -> list[str]:
        """The proxies' tunnel addresses this node keeps a tunnel to."""
        return self.agent.addresses if self.agent is not None else []

    def _inventory(self):
        """What this node announces: to a proxy in ``Hello`` (tunnel and agent
        port), in its heartbeat for a LAN node's agent port."""
        from edgeaccess.tunnel.protocol import Inventory

        return Inventory(
            name=self.identity.name, labels=dict(self.labels),
            kube_clusters=(self.kube[0],) if self.kube else (),
            kube_labels={self.kube[0]: dict(self.kube[1])} if self.kube else {},
            apps=self.apps.inventory() if self.apps else ())

    # --- the agent port (LAN nodes) ------------------------------------------

    @property
    def serves_agent(self) -> bool:
        """Whether this node listens for the proxy's ssh, kube and app channels
        (unless ``--agent-listen off``)."""
        return self._agent_listen is not None and (
            self.serve_ssh or self.kube is not None or self.apps is not None)

    async def _start_agent_port(self) -> None:
        """LAN mode: listen for the proxy on the agent port (mutual TLS,
        proxies of this cluster only); its channels resume across a broken
        connection for ``resume_budget`` seconds."""
        if not self.serves_agent or self.agent_port is not None:
            return
        if not self.identity.tls_server_certificate:
            # Joined before agent ports existed: the next renewal brings the
            # server certificate; the heartbeat renews at once for it.
            _log.warn("node {name} has no server certificate for its agent port yet; "
                      "asking for one", name=self.identity.name)
            return
        from edgeaccess.node.lanagent import (
            AgentServerTLS, LanAgentFactory, agent_server_factory)
        from edgeaccess.pki import x509ca

        loaded: dict[str, tuple] = {}

        def credentials():
            # Parsed once per certificate: a renewal applies from the next connection.
            identity = self.identity
            pem = identity.tls_server_certificate
            if pem not in loaded:
                loaded.clear()
                loaded[pem] = (identity.tls_key, x509ca.load_certificate_pem(pem.encode()),
                               x509ca.load_certificates_pem(identity.ca_pem.encode()))
            return loaded[pem]

        factory = LanAgentFactory(
            clock=self.reactor, inventory=self._inventory, accept_channel=self._accept_channel,
            heartbeat_interval=self.heartbeat_interval, resume_budget=self.resume_budget)
        self.agent_port = await self._agent_listen(
            agent_server_factory(factory, AgentServerTLS(credentials, self.identity.cluster)))
        served = (["SSH"] if self.serve_ssh else []) + \
            ([f"Kubernetes cluster {self.kube[0]}"] if self.kube else []) + \
            ([f"apps {', '.join(self.apps.apps)}"] if self.apps else [])
        _log.info("node {name} agent port listening on {addr} for the proxy ({served})",
                  name=self.identity.name, addr=self.agent_port.getHost(),
                  served="; ".join(served))

    def _agent_address(self) -> str | None:
        if self.agent_port is None or not self.agent_advertise:
            return None
        host, _, port = self.agent_advertise.rpartition(":")
        if port == "0":
            port = str(self.agent_port.getHost().port)
        return f"{host}:{port}"

    async def _ask_tunnel_addr(self) -> str:
        ping = await self.cluster_client.get_json("/v1/ping")
        addr = ping["proxy"]["tunnel_addr"]
        if not isinstance(addr, str) or not addr:
            raise errors.NotFound("the proxy announces no tunnel address")
        return addr

    async def _refresh_tunnel_addr(self) -> None:
        """Follow the tunnel address /v1/ping gives; keep the known ones if it fails."""
        try:
            addr = await self._ask_tunnel_addr()
        except (errors.EdgeError, KeyError, TypeError) as e:
            _log.debug("cannot ask the proxy for its tunnel address ({reason}); dialing "
                      "{addrs}", reason=e, addrs=", ".join(self.tunnel_addrs))
            return
        if addr not in self.tunnel_addrs:
            _log.info("the proxy's tunnel address is now {addr}", addr=addr)
            self.agent.add(addr)

    def _accept_channel(self, kind: str, target: str):
        """The node checks every channel the proxy opens: its own SSH, its
        Kubernetes cluster, its apps."""
        if kind == "kube" and self.kube_agent is not None:
            if target != self.kube_agent.name:
                raise errors.NotFound(f"node {self.identity.name} serves no Kubernetes "
                                      f"cluster {target}")
            return self.kube_agent.channel_factory()
        if kind == "app" and self.apps is not None:
            return self.apps.accept(target)
        if kind == "ssh" and not self.serve_ssh:
            raise errors.AccessDenied(f"node {self.identity.name} serves no SSH")
        if kind != "ssh":
            raise errors.AccessDenied(f"node {self.identity.name} serves no {kind} channels")
        if target not in (self.identity.uuid, self.identity.name):
            raise errors.NotFound(f"this is node {self.identity.name}, not {target}")
        return self.factory

    # --- keeping in touch ------------------------------------------------

    def _address(self) -> str:
        if self.identity.mode == "tunnel" or self.port is None:
            return "tunnel"
        host, _, port = self.advertise_addr.rpartition(":")
        if port == "0":
            port = str(self.port.getHost().port)
        return f"{host}:{port}"

    async def _heartbeat(self) -> None:
        client = self.cluster_client
        record = {"name": self.identity.name, "uuid": self.identity.uuid,
                  "address": self._address(), "labels": self.labels,
                  "version": __version__}
        agent_address = self._agent_address()
        if agent_address is not None:
            record["agent"] = {"address": agent_address,
                               "inventory": json.loads(self._inventory().to_json())}
        await client.post_json("/v1/nodes/heartbeat", record)
        # Roles, CAs, trusted roots and locks are pushed (the tunnel or the
        # /v1/watch stream, each new link starting with the whole state);
        # the heartbeat is liveness only. The safety net: while no push link
        # is up, the heartbeat re-reads them too.
        if not self._control_link_up():
            await self._resync(client)
        await self._renew_if_needed(client)

    async def _resync(self, client) -> None:
        answer = await client.get_json("/v1/nodes/roles")
        if not self._control_link_up():
            self._apply_control(cstate.init_message(resync_state(answer)), "re-read")

    # --- the pushed control state -------------------------------------------

    def _load_control_state(self) -> None:
        self.control = PersistedControlState(self.data_dir, self.reactor)
        # A node upgraded from role polling starts from what it had.
        self.control.seed(_read_json(self.data_dir / "roles.json", {}),
                          _read_json(self.data_dir / "trusted_clusters.json", []),
                          self.identity.user_ca_lines)

    def _control_link_up(self) -> bool:
        if self.identity.mode == "tunnel":
            tunnel = self.agent.tunnel if self.agent is not None else None
            return tunnel is not None and self.control.synced
        return self.control_link is not None and self.control_link.connected

    def _control_pushed(self, data: bytes) -> None:
        """A control message from the proxy, over the tunnel."""
        try:
            message = cstate.decode(data)
        except errors.EdgeError as error:
            _log.warn("ignoring a malformed control message: {error}", error=error)
            return
        self._apply_control(message, "tunnel")

    def _apply_control(self, message: dict, source: str) -> None:
        roots_before = sorted(t["name"] for t in self.trusted)
        try:
            changed = self.control.apply(message)
        except errors.EdgeError as error:
            _log.warn("ignoring a control message from the {source}: {error}",
                      source=source, error=error)
            return
        if message.get("type") == "init":
            _log.info("control state from the {source}: roles {roles}, {locks} locks, "
                      "trusted roots {roots}", source=source, roles=sorted(self.roles),
                      locks=len(self.control.locks),
                      roots=sorted(t["name"] for t in self.trusted) or "none")
        elif changed:
            _log.info("control update from the {source}: {changes}", source=source,
                      changes=", ".join(f"{k} {n}" for k, n in changed))
        roots = sorted(t["name"] for t in self.trusted)
        if roots != roots_before:
            _log.info("trusted root clusters: {names}", names=roots or "none")

    def _control_changed(self, state, changed) -> None:
        """Locks come into force on live sessions at once."""
        if any(kind in ("lock", "*") for kind, _ in changed):
            self.sessions.enforce(self.control.locks, self.reactor.seconds())

    def _check_locks(self, identity) -> None:
        lock = lockdocs.matching_lock(
            self.control.locks, self.reactor.seconds(), user=identity.username,
            user_cluster=identity.cluster, local_cluster=self.identity.cluster,
            node_names=(self.identity.name, self.identity.uuid))
        if lock is not None:
            raise lockdocs.refusal(lock)

    def _start_control_stream(self) -> None:
        """LAN mode: one long-lived GET /v1/watch to the auth API."""
        from edgeaccess.controlplane.stream import ControlStreamClient

        self.control_link = ControlStreamClient(
            lambda on_line: self.cluster_client.stream_lines("/v1/watch", on_line),
            lambda message: self._apply_control(message, "stream"),
            self.reactor, rng=self.rng)
        self.control_link.setServiceParent(self)

    def _wants_agent_server(self) -> bool:
        return self.identity.mode != "tunnel" and self.serves_agent

    async def _renew_if_needed(self, client) -> None:
        now = datetime.fromtimestamp(self.reactor.seconds(), timezone.utc)
        left = self.identity.valid_before_datetime() - now
        missing = self._wants_agent_server() and not self.identity.tls_server_certificate
        if left > NODE_CERT_TTL * RENEW_FRACTION and not missing:
            return
        ssh_key = keys.generate_private_key()
        tls_key = keys.generate_private_key()
        answer = await client.post_json("/v1/nodes/renew", {
            "ssh_public_key": keys.public_key_openssh(ssh_key).decode(),
            "tls_public_key": _pem_public(tls_key),
            "addresses": [] if self.identity.mode == "tunnel"
            else self._advertised_hosts(),
            "agent_server": self._wants_agent_server()})
        self.identity.ssh_key = ssh_key
        self.identity.ssh_certificate = answer["ssh_host_certificate"]
        self.identity.tls_key = tls_key
        self.identity.tls_certificate = answer["tls_certificate"]
        self.identity.valid_before = answer["valid_before"]
        self.identity.tls_server_certificate = answer.get("tls_server_certificate")
        self.identity.save(self.data_dir)
        if missing:
            await self._start_agent_port()
        from edgeaccess.ssh.hostkeys import host_keys

        self.factory.publicKeys, self.factory.privateKeys = host_keys(
            ssh_key, self.identity.host_certificate)
        _log.info("certificates renewed, valid until {until}", until=answer["valid_before"])

    def _advertised_hosts(self) -> list[str]:
        """The hosts a direct node is dialled at (its SSH and agent ports):
        in its host certificate's principals and its agent server certificate."""
        hosts = _advertised_hosts(self.advertise_addr)
        if self.serves_agent and self.agent_advertise:
            hosts += [h for h in _advertised_hosts(self.agent_advertise) if h not in hosts]
        return hosts

    def _own_user_cas(self) -> list[str]:
        """This cluster's user CAs: as pushed, else as joined."""
        return list(self.control.user_cas or self.identity.user_ca_lines)

    def _trusted_user_cas(self) -> list[str]:
        """This cluster's user CAs and those of root clusters it trusts (the
        authorizer then checks each certificate's CA against its cluster)."""
        found = self._own_user_cas()
        for trusted in self.trusted:
            found += [l for l in trusted.get("ssh_user_ca", []) if isinstance(l, str)]
        return found


def resync_state(answer: dict) -> dict:
    """The control state in a ``/v1/nodes/roles`` answer (the safety net)."""
    roles = {d["metadata"]["name"]: d for d in answer.get("roles", [])
             if isinstance(d, dict) and isinstance(d.get("metadata"), dict)
             and isinstance(d["metadata"].get("name"), str)}
    trusted = {t["name"]: t for t in answer.get("trusted_clusters") or []
               if isinstance(t, dict) and isinstance(t.get("name"), str)}
    locks = {l["id"]: l for l in answer.get("locks") or []
             if isinstance(l, dict) and isinstance(l.get("id"), str)}
    return {"roles": roles, "ssh_user_ca": list(answer.get("ssh_user_ca") or []),
            "trusted_clusters": trusted, "locks": locks}


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return default


def _exit_failed() -> None:
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _pem_public(key) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _advertised_hosts(addr: str) -> list[str]:
    host = addr.rpartition(":")[0].strip("[]")
    return [host] if host and host not in ("0.0.0.0", "::") else []
