"""The real auth service and its Klein API in memory, as nodes reach it.

:class:`InMemoryCluster` is an :class:`~edgeaccess.auth.service.AuthServer`
(memory backend, real CAs, real audit log) behind the real
:class:`~edgeaccess.auth.api.AuthAPI`, served through ``treq.testing.StubTreq``.
Its :meth:`~InMemoryCluster.connect` has the signature of
:func:`edgeaccess.clusterclient.connect`, so a :class:`NodeService` given
``connect_cluster=cluster.connect`` talks to it through the real
:class:`~edgeaccess.clusterclient.ClusterClient`. Mutual TLS is not
simulated: each request carries the client certificate the node's
credentials give, as the TLS handshake would hand it to the API after
verifying it. The server side's certificate checks are tested over real
TLS (tests/test_clusterclient.py, tests/integration/test_impostors_e2e.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlsplit

from OpenSSL import crypto
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.web.resource import Resource

from edgeaccess.audit.log import AuditLog
from edgeaccess.auth.api import AuthAPI
from edgeaccess.auth.service import AuthServer
from edgeaccess.backend.memory import MemoryBackend
from edgeaccess.clusterclient import ClusterClient

sys.path.insert(0, str(Path(__file__).parent.parent / "auth"))
from authkit import InlineReactor, InlineThreadPool, make_authority, resolve  # noqa: E402


class _AsCaller(Resource):
    """Serves ``inner`` as if the client had presented ``credentials()``'s
    certificate over TLS."""

    isLeaf = True

    def __init__(self, inner, credentials) -> None:
        super().__init__()
        self._inner = inner
        self._credentials = credentials

    def render(self, request):
        if self._credentials is not None:
            _key, cert = self._credentials()
            peer = crypto.X509.from_cryptography(cert)
            request.transport.getPeerCertificate = lambda: peer
        return self._inner.render(request)


class _Flushing:
    """A StubTreq whose requests are pumped at once (the in-memory API
    answers synchronously), and that can be "down"."""

    def __init__(self, cluster: "InMemoryCluster", stub: StubTreq) -> None:
        self._cluster = cluster
        self._stub = stub

    def request(self, method, url, **kwargs):
        self._cluster.calls.append((method, urlsplit(url).path))
        if self._cluster.down:
            return defer.fail(ConnectionRefusedError("the auth service is down"))
        kwargs.pop("allow_redirects", None)
        kwargs.pop("unbuffered", None)
        d = self._stub.request(method, url, **kwargs)
        self._stub.flush()
        return d


class InMemoryCluster:
    """An auth service with its API, reachable through :meth:`connect`."""

    def __init__(self, clock, cluster_name: str = "home") -> None:
        self.clock = clock
        self.authority = make_authority(cluster_name)
        backend = MemoryBackend(clock)
        self.audit = AuditLog(backend, cluster_name, clock)
        self.auth = AuthServer(self.authority, backend, clock, reactor=InlineReactor(),
                               threadpool=InlineThreadPool(), audit=self.audit)
        resolve(self.auth.bootstrap())
        self.resource = AuthAPI(self.auth).resource()
        self.down = False
        self.calls: list[tuple[str, str]] = []
        self.clients: list[ClusterClient] = []

    def connect(self, addr, *, default_port=3025, ca_certs=None, cluster=None,
                credentials=None, **_):
        """Like :func:`edgeaccess.clusterclient.connect`, to this service."""
        if ca_certs is not None:
            assert self.authority.tls_ca_cert in ca_certs, "the node must trust this CA"
            assert cluster == self.authority.cluster_name
        stub = StubTreq(_AsCaller(self.resource, credentials))
        client = ClusterClient(addr, _Flushing(self, stub), self.clock,
                               default_port=default_port, timeout=10)
        self.clients.append(client)
        return client

    def token(self) -> str:
        return resolve(self.auth.create_token("node"))["token"]

    def put_role(self, name: str, env: str) -> dict:
        doc = role(name, env)
        resolve(self.auth.upsert_resource(doc, force=True))
        return doc

    def delete_role(self, name: str) -> None:
        resolve(self.auth.delete_resource("role", name))

    def nodes(self) -> list[dict]:
        return resolve(self.auth.list_nodes())

    def events(self) -> list[dict]:
        return resolve(self.audit.search(limit=1000))


def role(name: str, env: str) -> dict:
    return {"kind": "role", "version": "v1", "metadata": {"name": name},
            "spec": {"allow": {"logins": ["root"], "node_labels": {"env": [env]}}}}
