"""SPDY/3.1 for the Kubernetes API stand-in (exec fallback and port-forward). Filled in below."""

from __future__ import annotations


def upgrade(request, sub, query, config, reactor):
    request.setResponseCode(400)
    return b'{"kind":"Status","apiVersion":"v1","status":"Failure","message":"SPDY not yet","code":400}'


class PortForwardSession:
    def __init__(self, reactor, config, send, close) -> None:
        close()

    def feed(self, data):
        pass

    def close(self):
        pass
