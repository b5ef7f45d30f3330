"""The diagnostics address: Prometheus metrics and health checks (in memory)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from treq.testing import StubTreq

from edgeaccess import diag


def _get(resource, path: str):
    stub = StubTreq(resource)
    d = stub.get("http://127.0.0.1:3000" + path)
    stub.flush()
    responses: list = []
    d.addBoth(responses.append)
    content: list = []
    stub.content(responses[0]).addBoth(content.append)
    stub.flush()
    return responses[0], content[0]


def _resource(tunnels=(), ready=True):
    registry = diag.make_registry(diag.EdgeCollector("unit", lambda: list(tunnels)))
    return diag.DiagResource(registry, lambda: ready)


def test_metrics_are_prometheus_text_with_our_gauges() -> None:
    tunnels = [SimpleNamespace(identity=SimpleNamespace(kind=kind))
               for kind in ("node", "node", "cluster")]
    response, body = _get(_resource(tunnels), "/metrics")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    text = body.decode()
    assert 'edgeaccess_tunnels_connected{kind="node"} 2.0' in text
    assert 'edgeaccess_tunnels_connected{kind="cluster"} 1.0' in text
    assert 'edgeaccess_build_info{cluster="unit"' in text
    assert "process_cpu_seconds_total" in text and "python_gc_objects_collected_total" in text


def test_health_and_readiness() -> None:
    assert _get(_resource(), "/healthz")[0].code == 200
    assert _get(_resource(ready=True), "/readyz")[0].code == 200
    response, body = _get(_resource(ready=False), "/readyz")
    assert response.code == 503 and json.loads(body) == {"status": "starting"}


def test_anything_else_is_a_json_404() -> None:
    for path in ("/", "/metrics/x", "/debug/pprof"):
        response, body = _get(_resource(), path)
        assert response.code == 404, path
        assert json.loads(body)["error"]["code"] == "not_found"
