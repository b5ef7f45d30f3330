"""The root side of cluster trust: admitting a leaf, listing leaves,
routing to their nodes through their tunnels.

A leaf proves itself once with a ``trusted_cluster`` token; the root
then stores the leaf's host CA (so root users' clients trust leaf nodes)
and signs a ``cluster`` identity the leaf's proxy uses to dial the
root's tunnel server.
"""

from __future__ import annotations

import json
from datetime import timedelta

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from edgeaccess import errors
from edgeaccess.identity.resources import validate_resource_name
from edgeaccess.pki import x509ca

_log = Logger()

CLUSTER_CERT_TTL = timedelta(days=365)


def _dumps(value) -> bytes:
    return json.dumps(value, sort_keys=True).encode("utf-8")


class RootClusters:
    """Leaves that trust this cluster, and their tunnels.

    :param auth: the :class:`~edgeaccess.auth.service.AuthServer`.
    """

    def __init__(self, auth) -> None:
        self.auth = auth
        self.known: set[str] = set()
        self.tunnels: dict[str, object] = {}

    async def load(self) -> None:
        self.known = {json.loads(i.value)["name"]
                      for i in await self.auth.backend.get_range("/remote_clusters/")}

    async def accept_leaf(self, *, token: str, leaf_name: str, host_ca: list,
                          tls_ca: str, tunnel_public_key: str, remote_addr: str = "") -> dict:
        """Admit a leaf cluster presenting a valid ``trusted_cluster`` token."""
        auth = self.auth
        try:
            await auth.check_token(token, "trusted_cluster")
        except errors.TokenInvalid as e:
            _log.warn("trusted cluster join refused for {leaf} from {addr}: {reason}",
                      leaf=leaf_name, addr=remote_addr, reason=e)
            auth._emit("trusted_cluster.join", cluster_name=leaf_name, success=False,
                       remote_addr=remote_addr, error=str(e))
            raise
        validate_resource_name(leaf_name, "cluster")
        if leaf_name == auth.cluster_name:
            raise errors.BadRequest("a cluster cannot trust itself")
        if not isinstance(host_ca, list) or not host_ca or not all(
                isinstance(l, str) and l.startswith("ssh-") and len(l) < 1024 for l in host_ca):
            raise errors.BadRequest("host_ca must be a list of OpenSSH public keys")
        try:
            x509ca.load_certificates_pem(tls_ca.encode("ascii"))
            key = serialization.load_pem_public_key(tunnel_public_key.encode("ascii"))
        except (ValueError, TypeError, UnicodeError, AttributeError, UnsupportedAlgorithm):
            raise errors.BadRequest("tls_ca or tunnel_public_key is not valid PEM")
        try:
            existing = json.loads((await auth.backend.get(f"/remote_clusters/{leaf_name}")).value)
        except errors.NotFound:
            existing = None
        if existing is not None and (existing.get("ssh_host_ca") != host_ca
                                     or existing.get("tls_ca") != tls_ca):
            # A token must not let anyone take over a known leaf's name.
            _log.warn("trusted cluster join refused for {leaf} from {addr}: a cluster of "
                      "that name with other CAs is already trusted", leaf=leaf_name,
                      addr=remote_addr)
            raise errors.AlreadyExists(
                f"a leaf cluster named {leaf_name} with other certificate authorities "
                f"already trusts this cluster")
        record = {"name": leaf_name, "ssh_host_ca": host_ca, "tls_ca": tls_ca,
                  "joined": auth.now().isoformat()}
        await auth.backend.put(f"/remote_clusters/{leaf_name}", _dumps(record))
        self.known.add(leaf_name)
        cert = auth.authority.sign_tls(
            key, x509ca.Identity(kind="cluster", name=leaf_name, cluster=auth.cluster_name),
            now=auth.now(), ttl=CLUSTER_CERT_TTL)
        _log.info("leaf cluster {leaf} now trusts this cluster (from {addr})",
                  leaf=leaf_name, addr=remote_addr)
        auth._emit("trusted_cluster.join", cluster_name=leaf_name, success=True,
                   remote_addr=remote_addr)
        return {
            "cluster_name": auth.cluster_name,
            "ssh_user_ca": [auth.authority.user_ca_public_line],
            "tls_ca": auth.authority.tls_ca_pem,
            "tls_certificate": x509ca.certificate_pem(cert).decode("ascii"),
        }

    async def remote_clusters(self) -> list[dict]:
        found = []
        for item in await self.auth.backend.get_range("/remote_clusters/"):
            record = json.loads(item.value)
            record["status"] = "online" if record["name"] in self.tunnels else "offline"
            found.append(record)
        return found

    def accepts_tunnel(self, identity) -> bool:
        """Whether a ``cluster`` identity may hold a tunnel here."""
        return identity.cluster == self.auth.cluster_name and identity.name in self.known

    def tunnel_up(self, tunnel) -> None:
        self.tunnels[tunnel.identity.name] = tunnel
        _log.info("leaf cluster {leaf} is online", leaf=tunnel.identity.name)

    def tunnel_down(self, tunnel) -> None:
        if self.tunnels.get(tunnel.identity.name) is tunnel:
            del self.tunnels[tunnel.identity.name]
            _log.info("leaf cluster {leaf} is offline", leaf=tunnel.identity.name)

    def leaf_router(self, cluster: str):
        """For the router: an object routing into ``cluster``, or None when
        no such leaf trusts us."""
        if cluster not in self.known:
            return None
        return _LeafRoute(self, cluster)


class _LeafRoute:
    def __init__(self, clusters: RootClusters, name: str) -> None:
        self._clusters = clusters
        self.name = name

    def route(self, cluster: str, name: str, kind: str = "ssh",
              source: str | None = None) -> IStreamClientEndpoint:
        from edgeaccess.tunnel.endpoints import TunnelChannelEndpoint

        tunnel = self._clusters.tunnels.get(self.name)
        if tunnel is None:
            return _Offline(self.name)
        # The user's address goes along: the leaf passes it on to its node.
        return TunnelChannelEndpoint(tunnel, "cluster", f"{kind}:{name}", source=source)


@implementer(IStreamClientEndpoint)
class _Offline:
    def __init__(self, name: str) -> None:
        self.name = name

    def connect(self, factory):
        return defer.fail(errors.ClusterOffline(f"cluster {self.name} is offline"))


async def leaf_request(reactor, tunnel, path: str, identity) -> object:
    """GET ``path`` from a leaf's internal API through its tunnel, on behalf
    of a root user (``identity``: the user's X.509 identity)."""
    from twisted.web.client import Agent, readBody
    from twisted.web.http_headers import Headers

    from edgeaccess.tunnel.endpoints import TunnelChannelEndpoint

    class _Endpoints:
        def endpointForURI(self, uri):
            return TunnelChannelEndpoint(tunnel, "cluster", "web")

    agent = Agent.usingEndpointFactory(reactor, _Endpoints())
    forwarded = json.dumps({"user": identity.name, "roles": list(identity.roles),
                            "traits": identity.traits, "cluster": identity.cluster})
    response = await agent.request(
        b"GET", b"http://leaf" + path.encode("ascii"),
        Headers({b"x-edge-identity": [forwarded.encode("utf-8")]}))
    body = await readBody(response)
    try:
        decoded = json.loads(body)
    except ValueError:
        raise errors.EdgeError(f"the leaf cluster answered {response.code} with a non-JSON body")
    if response.code >= 400:
        err = decoded.get("error", {}) if isinstance(decoded, dict) else {}
        raise errors.error_from_code(str(err.get("code")), str(err.get("message")))
    return decoded
