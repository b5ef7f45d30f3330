"""A small web app to publish with ``--app`` (``make run``, the tests, the benchmark).

``python -m edgeaccess.apps.demo --listen 127.0.0.1:0 [--jwks URL --jwks-ca FILE]``
prints ``PORT N`` once it listens, then serves:

- ``/``: a page greeting the user the ``Edge-Jwt-Assertion`` names (verified);
- ``/api/whoami``: JSON with the verified claims (or why they are not) and the
  headers the request arrived with;
- ``/api/echo`` (POST): the body back, with its SHA-256 in ``x-body-sha256``;
- ``/api/bytes/N``: N bytes, streamed with a producer;
- ``/api/small``: a few bytes (for request-rate benchmarks);
- ``/api/redirect``: a redirect to this app's own URI (``/api/landed``);
- ``/ws``: a WebSocket echo (when ``wsproto`` is installed).

The assertion is verified against the JWKS at ``--jwks`` (fetched in a
thread, again when an unknown ``kid`` shows up), with ``aud`` = ``--audience``.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import ssl
import sys
import urllib.request

from twisted.internet import threads
from twisted.web import resource, server

_PATTERN = bytes(range(256)) * 256  # 64 KiB


class _JWKS:
    def __init__(self, url: str | None, ca_file: str | None, audience: str | None) -> None:
        self.url = url
        self.ca_file = ca_file
        self.audience = audience
        self.keys: dict[str, object] = {}

    def _fetch(self) -> dict:
        context = ssl.create_default_context(cafile=self.ca_file)
        with urllib.request.urlopen(self.url, context=context, timeout=10) as answer:
            return json.load(answer)

    async def verify(self, token: str) -> dict:
        import jwt

        if not self.url:
            raise ValueError("no --jwks URL configured")
        kid = jwt.get_unverified_header(token).get("kid")
        if kid not in self.keys:
            document = await threads.deferToThread(self._fetch)
            self.keys = {k["kid"]: jwt.PyJWK(k).key for k in document["keys"]}
        if kid not in self.keys:
            raise ValueError(f"unknown key id {kid!r}")
        options = {"require": ["exp", "iat", "nbf", "iss", "aud", "sub"]}
        if not self.audience:
            options["verify_aud"] = False  # no --audience: the demo cannot know its URI
        return jwt.decode(token, self.keys[kid], algorithms=["ES256"],
                          audience=self.audience or None, options=options)


class _Whoami(resource.Resource):
    isLeaf = True

    def __init__(self, jwks: _JWKS, page: bool) -> None:
        super().__init__()
        self.jwks = jwks
        self.page = page

    def render_GET(self, request):
        from twisted.internet.defer import Deferred

        headers = {k.decode(): [v.decode() for v in vs]
                   for k, vs in request.requestHeaders.getAllRawHeaders()}
        token = request.getHeader(b"edge-jwt-assertion")

        async def answer():
            result = {"headers": headers, "verified": False}
            try:
                if token is None:
                    raise ValueError("no Edge-Jwt-Assertion header")
                result["claims"] = await self.jwks.verify(token.decode("ascii"))
                result["verified"] = True
            except Exception as e:  # shown to the caller: this is a demo
                result["error"] = f"{type(e).__name__}: {e}"
            if self.page:
                request.setHeader(b"content-type", b"text/html; charset=utf-8")
                who = result.get("claims", {}).get("username", "stranger")
                body = (f"<!doctype html><title>edgeaccess demo app</title>"
                        f"<h1 id=hello>Hello {html.escape(who)}</h1>"
                        f"<p id=verified>verified: {str(result['verified']).lower()}</p>"
                        f"<pre>{html.escape(json.dumps(result, indent=2))}</pre>")
                request.write(body.encode("utf-8"))
            else:
                request.setHeader(b"content-type", b"application/json")
                request.write(json.dumps(result, sort_keys=True).encode())
            request.finish()

        Deferred.fromCoroutine(answer())
        return server.NOT_DONE_YET


class _Echo(resource.Resource):
    isLeaf = True

    def render_POST(self, request):
        body = request.content.read()
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"x-body-sha256", hashlib.sha256(body).hexdigest().encode())
        return body


class _BytesProducer:
    def __init__(self, request, total: int) -> None:
        self.request = request
        self.left = total
        self.paused = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        while not self.paused and self.left > 0:
            piece = _PATTERN[: min(self.left, len(_PATTERN))]
            self.left -= len(piece)
            self.request.write(piece)
        if self.left == 0 and self.request is not None:
            request, self.request = self.request, None
            request.unregisterProducer()
            request.finish()

    def stopProducing(self):
        self.left = 0
        self.request = None


class _Bytes(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        try:
            total = int(request.postpath[0])
        except (IndexError, ValueError):
            request.setResponseCode(400)
            return b"use /api/bytes/N\n"
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", str(total).encode())
        producer = _BytesProducer(request, total)
        request.registerProducer(producer, True)
        producer.resumeProducing()
        return server.NOT_DONE_YET


class _Redirect(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        host = (request.getHeader(b"host") or b"localhost").decode("latin-1")
        request.redirect(f"http://{host}/api/landed".encode("latin-1"))
        return b""


class _Text(resource.Resource):
    isLeaf = True

    def __init__(self, text: bytes) -> None:
        super().__init__()
        self.text = text

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        return self.text


def _websocket():
    try:
        from twisted.web.websocket import WebSocketResource
    except ImportError:
        return None

    class Echo:
        def negotiationStarted(self, transport) -> None:
            self.transport = transport

        def negotiationFinished(self) -> None:
            pass

        def textMessageReceived(self, message: str) -> None:
            self.transport.sendTextMessage(message)

        def bytesMessageReceived(self, data) -> None:
            self.transport.sendBytesMessage(bytes(data))

        def pongReceived(self, payload: bytes) -> None:
            pass

        def connectionLost(self, reason) -> None:
            pass

    class Factory:
        def buildProtocol(self, request):
            return Echo()

    return WebSocketResource(Factory())


def make_site(jwks_url=None, jwks_ca=None, audience=None) -> server.Site:
    jwks = _JWKS(jwks_url, jwks_ca, audience)
    root = resource.Resource()
    root.putChild(b"", _Whoami(jwks, page=True))
    api = resource.Resource()
    api.putChild(b"whoami", _Whoami(jwks, page=False))
    api.putChild(b"echo", _Echo())
    api.putChild(b"bytes", _Bytes())
    api.putChild(b"small", _Text(b"ok\n"))
    api.putChild(b"redirect", _Redirect())
    api.putChild(b"landed", _Text(b"landed\n"))
    root.putChild(b"api", api)
    ws = _websocket()
    if ws is not None:
        root.putChild(b"ws", ws)
    site = server.Site(root)
    site.displayTracebacks = False
    return site


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="edgeaccess demo web app")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--jwks", help="JWKS URL of the proxy (/.well-known/jwks.json)")
    parser.add_argument("--jwks-ca", help="CA file to verify the JWKS URL with")
    parser.add_argument("--audience", help="expected aud claim (the app's URI)")
    args = parser.parse_args(argv)
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint

    host, _, port = args.listen.rpartition(":")
    endpoint = TCP4ServerEndpoint(reactor, int(port), interface=host or "127.0.0.1")

    def listening(p) -> None:
        sys.stdout.write(f"PORT {p.getHost().port}\n")
        sys.stdout.flush()

    endpoint.listen(make_site(args.jwks, args.jwks_ca, args.audience)).addCallbacks(
        listening, lambda f: (print(f, file=sys.stderr), reactor.stop()))
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
