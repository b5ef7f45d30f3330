"""The diagnostics address (``--diag-listen``): Prometheus metrics and health checks.

Off unless asked for, and never on the public web port: like Teleport's
``--diag-addr`` it is plain HTTP meant for 127.0.0.1 or a monitoring
network. It serves

- ``/metrics``: the Prometheus text format (``prometheus-client``): the
  process (CPU, memory, file descriptors), the Python runtime (GC), and
  edgeaccess's own gauges, read when scraped;
- ``/healthz``: 200 while the process answers;
- ``/readyz``: 200 once every listener is bound, 503 before.

Anything else is a 404 in the project's JSON error shape.
"""

from __future__ import annotations

import json
from typing import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from twisted.web.resource import Resource

from edgeaccess import __version__, errors, httpapi


class EdgeCollector:
    """edgeaccess's gauges, computed at each scrape (nothing is kept).

    :param cluster: the cluster's name.
    :param tunnels: returns the live tunnels (objects with ``identity.kind``).
    """

    def __init__(self, cluster: str, tunnels: Callable[[], Iterable]) -> None:
        self._cluster = cluster
        self._tunnels = tunnels

    def collect(self):
        info = InfoMetricFamily("edgeaccess_build", "edgeaccess version and cluster")
        info.add_metric([], {"version": __version__, "cluster": self._cluster})
        yield info
        counts = {"node": 0, "cluster": 0}
        for tunnel in self._tunnels():
            kind = getattr(getattr(tunnel, "identity", None), "kind", "node")
            counts[kind] = counts.get(kind, 0) + 1
        gauge = GaugeMetricFamily("edgeaccess_tunnels_connected",
                                  "reverse tunnels connected to this proxy", labels=["kind"])
        for kind, count in sorted(counts.items()):
            gauge.add_metric([kind], count)
        yield gauge


def make_registry(*collectors) -> CollectorRegistry:
    """A registry of its own (not prometheus-client's global one) with the
    process, platform and GC collectors and ``collectors``."""
    registry = CollectorRegistry()
    # These register themselves with the registry they are given.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry


def _not_found(request) -> Resource:
    shown = request.path[:200].decode("utf-8", "replace")
    return httpapi.ErrorResource(errors.NotFound(f"no such path: {shown}"))


class _Endpoint(Resource):
    """One path exactly: anything below it is a 404."""

    def getChild(self, path: bytes, request) -> Resource:
        return _not_found(request)


class _Metrics(_Endpoint):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return generate_latest(self._registry)


class _Health(_Endpoint):
    def __init__(self, check: Callable[[], bool]) -> None:
        super().__init__()
        self._check = check

    def render_GET(self, request) -> bytes:
        ok = self._check()
        request.setResponseCode(200 if ok else 503)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"status": "ok" if ok else "starting"}).encode() + b"\n"


class DiagResource(Resource):
    """The root of the diagnostics address.

    :param registry: what ``/metrics`` exposes.
    :param ready: whether the process is ready (``/readyz``).
    """

    def __init__(self, registry: CollectorRegistry, ready: Callable[[], bool]) -> None:
        super().__init__()
        self.putChild(b"metrics", _Metrics(registry))
        self.putChild(b"healthz", _Health(lambda: True))
        self.putChild(b"readyz", _Health(ready))

    def getChild(self, path: bytes, request) -> Resource:
        return _not_found(request)

    def render(self, request) -> bytes:
        return _not_found(request).render(request)
