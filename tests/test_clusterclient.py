"""The daemons' cluster client: JSON calls, errors, streams, timeouts and
cancellation over StubTreq (no sockets); and over real TLS on loopback,
that it accepts only a proxy of the expected cluster named by the address
dialled, and keeps one persistent connection for many calls."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
import pytest_twisted
from klein import Klein
from treq.testing import StubTreq
from twisted.internet import defer, protocol
from twisted.internet.task import Clock
from twisted.web.server import Site

from edgeaccess import clusterclient, errors, tls
from edgeaccess.clusterclient import ClusterClient
from tests.pkitools import Identity, issue_identities, issue_legacy_certificate


class App:
    """A small API in the shape of ours (JSON bodies, JSON errors)."""

    app = Klein()

    def __init__(self) -> None:
        self.received: list = []
        self.pending: list = []
        self.streams: list = []

    @app.route("/v1/echo", methods=["POST", "PUT"])
    def echo(self, request):
        body = request.content.read()
        self.received.append((request.method, request.getHeader(b"content-type"), body))
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"got": body.decode("latin-1")})

    @app.route("/v1/ping", methods=["GET"])
    def ping(self, request):
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"pong": True})

    @app.route("/v1/denied", methods=["GET"])
    def denied(self, request):
        request.setResponseCode(403)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"error": {"code": "access_denied", "message": "not you"}})

    @app.route("/v1/hang", methods=["GET"])
    def hang(self, request):
        self.pending.append(request)
        return defer.Deferred()  # never answered

    @app.route("/v1/watch", methods=["GET"])
    def watch(self, request):
        request.setHeader(b"content-type", b"application/x-ndjson")
        request.write(b'{"n": 1}\n{"n"')
        finished: defer.Deferred = defer.Deferred()
        self.streams.append((request, finished))
        return finished


def outcome(d: defer.Deferred):
    results: list = []
    d.addBoth(results.append)
    return results


@pytest.fixture
def served():
    app = App()
    stub = StubTreq(app.app.resource())
    clock = Clock()
    return app, stub, clock, ClusterClient("127.0.0.1:3025", stub, clock, timeout=10)


def test_json_calls_round_trip_and_errors_become_edge_errors(served):
    app, stub, _clock, client = served
    got = outcome(client.post_json("/v1/echo", {"a": [1, 2]}))
    stub.flush()
    assert got == [{"got": '{"a": [1, 2]}'}]
    assert app.received[-1][:2] == (b"POST", b"application/json")
    got = outcome(client.put_bytes("/v1/echo", b"\x00\x01raw"))
    stub.flush()
    assert app.received[-1] == (b"PUT", b"application/octet-stream", b"\x00\x01raw")
    assert got == [{"got": "\x00\x01raw"}]
    got = outcome(client.get_json("/v1/denied"))
    stub.flush()
    assert got[0].check(errors.AccessDenied) and "not you" in str(got[0].value)
    got = outcome(client.get_json("/v1/nowhere"))
    stub.flush()
    assert got[0].check(errors.NotFound)


def test_a_call_that_takes_too_long_fails_with_a_timeout(served):
    app, stub, clock, client = served
    got = outcome(client.get_json("/v1/hang"))
    stub.flush()
    assert app.pending and not got
    clock.advance(10)
    assert got[0].check(errors.EdgeError)
    assert "did not answer within 10s" in str(got[0].value)


def test_close_cancels_calls_in_flight_and_refuses_new_ones(served):
    app, stub, _clock, client = served
    got = outcome(client.get_json("/v1/hang"))
    stream = outcome(client.stream_lines("/v1/watch", lambda line: None))
    stub.flush()
    assert not got and not stream
    outcome(client.close())
    assert got[0].check(errors.EdgeError) and "cancelled" in str(got[0].value)
    assert stream[0].check(errors.EdgeError)
    late = outcome(client.get_json("/v1/ping"))
    assert late[0].check(errors.EdgeError) and "closed" in str(late[0].value)


def test_a_stream_delivers_each_line_as_it_arrives(served):
    app, stub, _clock, client = served
    lines: list = []
    done = outcome(client.stream_lines("/v1/watch", lines.append))
    stub.flush()
    assert lines == [b'{"n": 1}']
    [(request, finished)] = app.streams
    request.write(b': 2}\n')
    stub.flush()
    assert lines == [b'{"n": 1}', b'{"n": 2}']
    request.write(b'{"n": 3}\n')
    finished.callback(b"")
    stub.flush()
    assert lines[-1] == b'{"n": 3}' and done == [None]


def test_a_stream_stops_when_its_consumer_fails(served):
    app, stub, _clock, client = served

    def consumer(line):
        raise errors.BadRequest(f"cannot use {line!r}")

    done = outcome(client.stream_lines("/v1/watch", consumer))
    stub.flush()
    assert done[0].check(errors.BadRequest)


def test_lines_iterate_a_stream_as_it_arrives_and_end_with_it(served):
    app, stub, _clock, client = served
    taken: list = []

    async def consume():
        async for line in client.lines("/v1/watch", max_queued=2):
            taken.append(line)
        return "ended"

    done = outcome(defer.Deferred.fromCoroutine(consume()))
    stub.flush()
    assert taken == [b'{"n": 1}']
    [(request, finished)] = app.streams
    request.write(b': 2}\n{"n": 3}\n{"n": 4}\n')
    stub.flush()
    assert taken == [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}', b'{"n": 4}']
    assert not done
    finished.callback(b"")
    stub.flush()
    assert done == ["ended"]


def test_a_closed_line_stream_stops_the_loop_with_the_reason(served):
    app, stub, _clock, client = served
    stream = client.lines("/v1/watch")

    async def consume():
        return [line async for line in stream]

    done = outcome(defer.Deferred.fromCoroutine(consume()))
    stub.flush()
    assert not done
    stream.close()
    assert done[0].check(defer.CancelledError)


def test_the_audit_uploader_built_on_the_client_is_an_audit_uploader(served):
    from zope.interface.verify import verifyObject

    from edgeaccess.audit.interfaces import IAuditUploader
    from edgeaccess.audit.uploader import HTTPSAuditUploader

    _app, _stub, _clock, client = served
    assert verifyObject(IAuditUploader, HTTPSAuditUploader(lambda: client))


# --- over real TLS ------------------------------------------------------------

NOW = datetime.now(timezone.utc)


@pytest.fixture(scope="module")
def pki():
    issued = issue_identities([
        ("proxy", Identity(kind="proxy", name="proxy.test", cluster="root"),
         ("proxy.test", "localhost"), ("127.0.0.1",)),
        ("proxy-elsewhere", Identity(kind="proxy", name="proxy.test", cluster="root"),
         ("proxy.test",)),
        ("proxy-unnamed", Identity(kind="proxy", name="proxy.test", cluster="root"), ()),
        ("node", Identity(kind="node", name="n1", cluster="root", uuid="u-1"), ()),
    ], now=NOW)
    # A user certificate in the shape the CA issued before server identities
    # (both usages, with SANs): the chain verifies, the kind must not.
    issued["legacy-user"] = issue_legacy_certificate(
        issued, Identity(kind="user", name="mallory", cluster="root"),
        dns=("localhost",), ips=("127.0.0.1",), now=NOW)
    # A proxy of another cluster signed by this CA (a CA shared by mistake).
    issued["other-proxy"] = issue_legacy_certificate(
        issued, Identity(kind="proxy", name="proxy.other", cluster="other"),
        dns=("localhost",), ips=("127.0.0.1",), now=NOW)
    return issued


class Recording(protocol.Protocol):
    """Counts connections; keeps every application byte received."""

    def connectionMade(self):  # noqa: N802
        self.factory.connections += 1

    def dataReceived(self, data):  # noqa: N802
        self.factory.received += data


def serve(reactor, pki, label: str, app: App):
    """An HTTPS server on 127.0.0.1 holding ``label``'s certificate, serving ``app``."""
    from twisted.protocols.policies import WrappingFactory

    key, cert = pki[label]
    site = Site(app.app.resource())

    class Counting(WrappingFactory):
        connections = 0
        received = b""

        def buildProtocol(self, addr):  # noqa: N802
            self.connections += 1
            inner = super().buildProtocol(addr)
            original = inner.dataReceived

            def record(data):
                self.received += data
                return original(data)

            inner.dataReceived = record
            return inner

    counting = Counting(site)
    options = tls.server_options(key, cert, [pki["ca"]], client_certificates="optional")
    from twisted.protocols.tls import TLSMemoryBIOFactory

    port = reactor.listenTCP(0, TLSMemoryBIOFactory(options, False, counting),
                             interface="127.0.0.1")
    return port, counting


def real_client(reactor, pki, port, host="127.0.0.1", cluster="root"):
    node_key, node_cert = pki["node"]
    return clusterclient.connect(reactor, f"{host}:{port.getHost().port}",
                                 ca_certs=[pki["ca"]], cluster=cluster,
                                 credentials=lambda: (node_key, node_cert), timeout=30)


@pytest_twisted.ensureDeferred
async def test_calls_to_the_proxy_share_one_persistent_tls_connection(pki):
    from twisted.internet import reactor

    app = App()
    port, counting = serve(reactor, pki, "proxy", app)
    client = real_client(reactor, pki, port)
    try:
        for i in range(3):
            assert await client.post_json("/v1/echo", {"i": i}) == {"got": json.dumps({"i": i})}
        assert counting.connections == 1
        # The name is checked too: "localhost" is in the proxy's SAN.
        named = real_client(reactor, pki, port, host="localhost")
        assert await named.get_json("/v1/ping") == {"pong": True}
        await named.close()
    finally:
        await client.close()
        await port.stopListening()


@pytest.mark.parametrize("label, cluster, reason", [
    ("legacy-user", "root", "it presented a user certificate (mallory of cluster root)"),
    ("node", "root", "it presented a node certificate (n1 of cluster root)"),
    ("other-proxy", "root", "not one of cluster root"),
    ("proxy-elsewhere", "root", "its certificate does not name 127.0.0.1"),
    # No SAN at all: Twisted 26.10's own hostname check lets this through
    # (service_identity raises CertificateError, which its verify callback
    # only logs); ours refuses it.
    ("proxy-unnamed", "root", "its certificate does not name 127.0.0.1"),
    ("proxy", "other", "not one of cluster other"),
])
@pytest_twisted.ensureDeferred
async def test_a_server_that_is_not_the_expected_proxy_gets_no_byte(pki, label, cluster,
                                                                   reason):
    from twisted.internet import reactor

    app = App()
    port, counting = serve(reactor, pki, label, app)
    client = real_client(reactor, pki, port, cluster=cluster)
    try:
        with pytest.raises(errors.CertificateInvalid) as caught:
            await client.post_json("/v1/echo", {"password": "secret"})
        assert reason in str(caught.value)
        assert app.received == [] and counting.received == b""
    finally:
        await client.close()
        await port.stopListening()
