"""The app proxy's connection protocol in memory: rewriting, ordering, timeouts."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from edgeaccess import errors
from edgeaccess.apps.proxy import HEAD_TIMEOUT, RESPONSE_TIMEOUT, AppAccess, AppProxyProtocol


class FakeEndpoint:
    def __init__(self) -> None:
        self.transport = StringTransport()
        self.protocol = None

    def connect(self, factory):
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return defer.succeed(self.protocol)


def connection(check=lambda: None):
    clock = Clock()
    endpoint = FakeEndpoint()
    access = AppAccess(app="demo", user="alice", endpoint=endpoint,
                       expected_hosts=frozenset({"demo.edge.localhost:3080"}),
                       public_origin="https://demo.edge.localhost:3080",
                       app_uri="http://10.0.0.5:8080", upstream_host=b"10.0.0.5:8080",
                       client_ip="192.0.2.7", assertion=lambda: b"signed", check=check)
    protocol = AppProxyProtocol(lambda p, preamble: defer.succeed(access), clock)
    client = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5000))
    protocol.makeConnection(client)
    return protocol, client, endpoint, clock


REQUEST = (b"GET /x HTTP/1.1\r\nHost: demo.edge.localhost:3080\r\n"
           b"X-Forwarded-For: 6.6.6.6\r\nEdge-Jwt-Assertion: forged\r\n\r\n")


def test_requests_are_rewritten_and_responses_relocated():
    protocol, client, endpoint, _clock = connection()
    protocol.dataReceived(REQUEST)
    sent = endpoint.transport.value()
    assert sent.startswith(b"GET /x HTTP/1.1\r\nHost: 10.0.0.5:8080\r\n")
    assert b"6.6.6.6" not in sent and b"forged" not in sent
    assert b"X-Forwarded-For: 192.0.2.7\r\n" in sent
    assert b"X-Forwarded-Host: demo.edge.localhost:3080\r\n" in sent
    assert b"Edge-Jwt-Assertion: signed\r\n" in sent
    endpoint.protocol.dataReceived(
        b"HTTP/1.1 302 Found\r\nLocation: http://10.0.0.5:8080/next?a=1\r\n"
        b"Content-Length: 0\r\n\r\n")
    assert b"Location: https://demo.edge.localhost:3080/next?a=1\r\n" in client.value()


def test_a_refused_request_is_answered_after_the_responses_before_it():
    protocol, client, endpoint, _clock = connection()
    protocol.dataReceived(REQUEST + b"GET /y HTTP/1.1\r\nHost: other.edge.localhost:3080\r\n\r\n")
    assert endpoint.transport.value().count(b"GET ") == 1
    assert client.value() == b""
    endpoint.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    answer = client.value()
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert b"HTTP/1.1 421 Misdirected Request" in answer
    assert client.disconnecting


def test_per_request_check_refuses_once_access_ends():
    allowed = [True]
    protocol, client, endpoint, _clock = connection(
        check=lambda: None if allowed[0] else errors.AccessDenied("your app session has ended"))
    protocol.dataReceived(REQUEST)
    endpoint.protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    allowed[0] = False
    protocol.dataReceived(REQUEST)
    assert b"HTTP/1.1 403 Forbidden" in client.value()
    assert b"session has ended" in client.value()


def test_slow_clients_and_slow_apps_time_out():
    protocol, client, endpoint, clock = connection()
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: demo")
    clock.advance(HEAD_TIMEOUT + 1)
    assert client.value().startswith(b"HTTP/1.1 408")
    protocol, client, endpoint, clock = connection()
    protocol.dataReceived(REQUEST)
    clock.advance(RESPONSE_TIMEOUT + 1)
    assert client.value().startswith(b"HTTP/1.1 504")


def test_garbage_from_the_app_is_a_502():
    protocol, client, endpoint, _clock = connection()
    protocol.dataReceived(REQUEST)
    endpoint.protocol.dataReceived(b"NOT HTTP AT ALL\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 502")


def test_upgrade_splices_bytes_after_101():
    protocol, client, endpoint, _clock = connection()
    protocol.dataReceived(b"GET /ws HTTP/1.1\r\nHost: demo.edge.localhost:3080\r\n"
                          b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x02hi")
    assert b"\x81\x02hi" not in endpoint.transport.value()  # held until the answer
    endpoint.protocol.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                   b"Connection: Upgrade\r\n\r\n\x81\x02yo")
    assert endpoint.transport.value().endswith(b"\x81\x02hi")
    assert client.value().endswith(b"\x81\x02yo")
    protocol.dataReceived(b"GET / HTTP/1.1\r\n")  # raw now: not parsed
    assert endpoint.transport.value().endswith(b"GET / HTTP/1.1\r\n")


def test_a_stalled_request_body_is_a_408_but_a_long_upload_is_no_504():
    protocol, client, endpoint, clock = connection()
    head = (b"POST /up HTTP/1.1\r\nHost: demo.edge.localhost:3080\r\n"
            b"Content-Length: 1000\r\n\r\n")
    protocol.dataReceived(head + b"x" * 100)
    # The upload goes on slowly for longer than the response timeout: the
    # app cannot answer before it has the body, so that is no 504.
    for _ in range(int(RESPONSE_TIMEOUT / 10) + 3):
        clock.advance(10)
        protocol.dataReceived(b"x" * 10)
    assert client.value() == b""
    # Then the client stops sending: after the head timeout, a 408 page.
    clock.advance(HEAD_TIMEOUT + 1)
    assert client.value().startswith(b"HTTP/1.1 408"), client.value()
    assert b"request body did not arrive in time" in client.value()
    assert client.disconnecting and endpoint.transport.disconnecting


def test_an_app_that_reads_a_body_slowly_is_no_stalled_client():
    protocol, client, endpoint, clock = connection()
    protocol.dataReceived(b"POST /up HTTP/1.1\r\nHost: demo.edge.localhost:3080\r\n"
                          b"Content-Length: 1000\r\n\r\n" + b"x" * 100)
    endpoint.transport.producer.pauseProducing()  # the app's side is full
    assert client.producerState == "paused"
    clock.advance(HEAD_TIMEOUT * 2)
    assert client.value() == b""  # waiting for the app is no stalled client
    endpoint.transport.producer.resumeProducing()
    assert client.producerState == "producing"
    clock.advance(HEAD_TIMEOUT - 1)
    assert client.value() == b""
    clock.advance(HEAD_TIMEOUT)  # now the client is the one silent
    assert client.value().startswith(b"HTTP/1.1 408")


def test_the_response_timeout_starts_when_the_request_is_complete():
    protocol, client, endpoint, clock = connection()
    protocol.dataReceived(b"POST /up HTTP/1.1\r\nHost: demo.edge.localhost:3080\r\n"
                          b"Content-Length: 4\r\n\r\nab")
    clock.advance(HEAD_TIMEOUT - 1)
    protocol.dataReceived(b"cd")
    clock.advance(RESPONSE_TIMEOUT - 5)  # past RESPONSE_TIMEOUT since the head
    assert client.value() == b""
    clock.advance(HEAD_TIMEOUT + 6)  # (checked every HEAD_TIMEOUT at least)
    assert client.value().startswith(b"HTTP/1.1 504")


def test_timeouts_are_configurable():
    from edgeaccess.apps.proxy import AppTimeouts

    assert AppTimeouts.parse("response=5s,idle=1m") == AppTimeouts(head=HEAD_TIMEOUT,
                                                                  response=5, idle=60)
    assert AppTimeouts.parse(None) == AppTimeouts()
    for bad in ("response=0s", "slow=5s", "response=5s,response=6s", "response=soon"):
        with pytest.raises(errors.BadRequest):
            AppTimeouts.parse(bad)
    clock = Clock()
    endpoint = FakeEndpoint()
    access = AppAccess(app="demo", user="alice", endpoint=endpoint,
                       expected_hosts=frozenset({"demo.edge.localhost:3080"}),
                       upstream_host=b"10.0.0.5:8080")
    protocol = AppProxyProtocol(lambda p, preamble: defer.succeed(access), clock,
                                timeouts=AppTimeouts(response=3))
    client = StringTransport()
    protocol.makeConnection(client)
    protocol.dataReceived(REQUEST)
    clock.advance(3.6)
    assert client.value().startswith(b"HTTP/1.1 504")
