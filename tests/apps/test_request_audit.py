"""Per-request ``app.request`` events: off by default, recorded by the app
proxy for answered, refused and unanswered requests, and appended to the
audit log in batches (a timer or a full batch), not on the request path."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from edgeaccess import errors
from edgeaccess.apps.proxy import AppAccess, AppProxyProtocol
from edgeaccess.apps.requestaudit import RequestAudit, parse_selection, request_fields
from edgeaccess.audit.log import AuditLog
from edgeaccess.backend.memory import MemoryBackend
from tests.apps.test_app_proxy_protocol import FakeEndpoint


def connection(audit_request, check=lambda: None):
    clock = Clock()
    endpoint = FakeEndpoint()
    access = AppAccess(app="demo", user="alice", endpoint=endpoint,
                       expected_hosts=frozenset({"demo.edge.localhost:3080"}),
                       public_origin="https://demo.edge.localhost:3080",
                       app_uri="http://10.0.0.5:8080", upstream_host=b"10.0.0.5:8080",
                       client_ip="192.0.2.7", assertion=lambda: b"signed", check=check,
                       audit_request=audit_request)
    protocol = AppProxyProtocol(lambda p, preamble: defer.succeed(access), clock)
    client = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5000))
    protocol.makeConnection(client)
    return protocol, client, endpoint


def request(method: bytes, target: bytes, host: bytes = b"demo.edge.localhost:3080") -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"


def test_each_answered_request_is_recorded_with_its_status_in_order():
    seen = []
    protocol, client, endpoint = connection(lambda *a: seen.append(a))
    protocol.dataReceived(request(b"GET", b"/a?token=secret") + request(b"POST", b"/b"))
    assert seen == []  # recorded when the status is known
    endpoint.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                                   b"HTTP/1.1 100 Continue\r\n\r\n"
                                   b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert seen == [(b"GET", b"/a?token=secret", 200), (b"POST", b"/b", 201)]
    fields = request_fields(user="alice", app="demo", cluster="prod", method=b"GET",
                            target=b"/a?token=secret", status=200, remote_addr="192.0.2.7",
                            session_id="s1")
    assert fields["path"] == "/a"  # the query string may carry secrets: not audited


def test_refused_and_unanswered_requests_are_recorded_too():
    seen = []
    allowed = [True]
    protocol, client, endpoint = connection(
        lambda *a: seen.append(a),
        check=lambda: None if allowed[0] else errors.AccessDenied("no"))
    protocol.dataReceived(request(b"GET", b"/x", host=b"other.edge.localhost:3080"))
    assert seen == [(b"GET", b"/x", 421)]
    seen.clear()
    protocol, client, endpoint = connection(lambda *a: seen.append(a),
                                            check=lambda: errors.AccessDenied("no"))
    protocol.dataReceived(request(b"DELETE", b"/y"))
    assert seen == [(b"DELETE", b"/y", 403)]
    seen.clear()
    protocol, client, endpoint = connection(lambda *a: seen.append(a))
    protocol.dataReceived(request(b"GET", b"/z"))
    endpoint.protocol.connectionLost(None)
    assert seen == [(b"GET", b"/z", 502)]
    assert client.value().startswith(b"HTTP/1.1 502")


def test_nothing_is_recorded_when_requests_are_not_audited():
    protocol, client, endpoint = connection(None)
    protocol.dataReceived(request(b"GET", b"/a"))
    endpoint.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert protocol._targets is None
    assert parse_selection(None) == frozenset() and parse_selection("") == frozenset()
    assert parse_selection("*") is None
    assert parse_selection("a, b") == frozenset({"a", "b"})
    with pytest.raises(errors.BadRequest):
        parse_selection("Not-An-App!")


def one(n: int) -> dict:
    return request_fields(user="alice", app="demo", cluster="prod", method=b"GET",
                          target=f"/{n}".encode(), status=200, remote_addr="192.0.2.7",
                          session_id="s1")


@pytest_twisted.ensureDeferred
async def test_events_reach_the_audit_log_in_batches():
    clock = Clock()
    clock.advance(1_800_000_000)
    log = AuditLog(MemoryBackend(clock), "prod", clock)
    appends = []
    real_append = log.append_made

    def counting_append(events):
        appends.append(len(events))
        return real_append(events)

    log.append_made = counting_append
    audit = RequestAudit(log, clock, None, max_batch=50)
    assert audit.covers("anything")
    for n in range(7):
        audit.record(one(n))
    assert appends == []  # nothing appended on the request path itself
    clock.advance(0)  # the end of the reactor iteration: one append for all seven
    await audit.flush()
    assert appends == [7]
    for n in range(120):
        audit.record(one(n))
    clock.advance(0)
    await audit.flush()
    assert appends[1:] == [50, 50, 20]
    events = await log.search(types=["app.request"])
    assert len(events) == 127
    assert {e["user"] for e in events} == {"alice"}
    assert {e["path"] for e in events} >= {"/0", "/119"}
    assert all(e["status"] == 200 and e["remote_addr"] == "192.0.2.7" for e in events)
    assert (await log.verify()).ok


def test_a_stuck_audit_log_bounds_the_queue():
    clock = Clock()
    log = AuditLog(MemoryBackend(clock), "prod", clock)
    log.append_made = lambda events: defer.Deferred()  # never answers
    audit = RequestAudit(log, clock, frozenset({"demo"}), max_batch=10, max_pending=25)
    assert audit.covers("demo") and not audit.covers("other")
    for n in range(100):
        audit.record(one(n))
    assert (audit.pending, audit.dropped) == (25, 75)
    clock.advance(1)  # one batch of 10 taken (never stored), 15 wait
    for n in range(100):
        audit.record(one(n))
    clock.advance(1)
    assert audit.pending == 25 and audit.dropped == 165
