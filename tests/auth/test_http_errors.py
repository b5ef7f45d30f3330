"""HTTP errors as users expect them, on every Klein app and on the channel.

Unknown paths are 404, wrong methods 405 with ``Allow``, an oversized request
line, headers or body 414/431/413, malformed JSON 400: all in the JSON error
shape, never a 500, and never more than an info line in the log.
"""

from __future__ import annotations

import json

import pytest
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher

from edgeaccess import httpapi
from edgeaccess.auth.api import AuthAPI
from edgeaccess.httpapi import EdgeSite
from edgeaccess.proxy.web import ProxyWeb

WEB = "https://127.0.0.1:3080"


def _addresses() -> dict:
    return {"web": "127.0.0.1:3080", "ssh": "127.0.0.1:3023"}


@pytest.fixture
def log_levels():
    """The levels of every log event during the test (checked: nothing above info)."""
    levels: list = []

    def observe(event) -> None:
        levels.append((event.get("log_level"), event.get("log_format")))

    globalLogPublisher.addObserver(observe)
    yield levels
    globalLogPublisher.removeObserver(observe)


def _loud(levels) -> list:
    return [(level, text) for level, text in levels if level not in (LogLevel.debug, LogLevel.info)]


@pytest.fixture(params=["web", "auth"])
def app(request, auth):
    """The resource of each public Klein app."""
    if request.param == "web":
        return ProxyWeb(auth, _addresses, "127.0.0.1").resource()
    return AuthAPI(auth).resource()


def _request(resource, method: str, path: str, body: bytes | None = None):
    stub = StubTreq(resource)
    d = stub.request(method, WEB + path, data=body,
                     headers={b"content-type": [b"application/json"]})
    stub.flush()
    responses: list = []
    d.addBoth(responses.append)
    response = responses[0]
    content: list = []
    stub.content(response).addBoth(content.append)
    stub.flush()
    return response, content[0]


@pytest.mark.parametrize("path", ["/web/login", "/metrics", "/v1/nope", "/v1/ping/extra",
                                  "/..%2f..%2fetc/passwd"])
def test_unknown_path_is_a_json_404_without_a_loud_log(app, path, log_levels) -> None:
    response, body = _request(app, "GET", path)
    assert response.code == 404
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert json.loads(body)["error"]["code"] == "not_found"
    assert _loud(log_levels) == []


def test_wrong_method_is_405_with_allow(auth, log_levels) -> None:
    web = ProxyWeb(auth, _addresses, "127.0.0.1").resource()
    response, body = _request(web, "DELETE", "/v1/login")
    assert response.code == 405
    assert response.headers.getRawHeaders(b"allow") == [b"POST"]
    error = json.loads(body)["error"]
    assert error["code"] == "method_not_allowed" and "POST" in error["message"]
    response, _ = _request(web, "POST", "/v1/ping")
    assert response.code == 405
    assert response.headers.getRawHeaders(b"allow") == [b"GET, HEAD"]
    assert _loud(log_levels) == []


@pytest.mark.parametrize("raw", [b"{", b"\xff\xfe", b"[]", b'"x"', b"null", b"1e999999"])
def test_malformed_json_is_400(auth, raw, log_levels) -> None:
    web = ProxyWeb(auth, _addresses, "127.0.0.1").resource()
    response, body = _request(web, "POST", "/v1/login", raw)
    assert response.code == 400
    assert json.loads(body)["error"]["code"] == "bad_request"
    assert _loud(log_levels) == []


def test_body_over_the_limit_is_413_from_the_route(auth) -> None:
    web = ProxyWeb(auth, _addresses, "127.0.0.1").resource()
    response, body = _request(web, "POST", "/v1/login", b" " * (httpapi.MAX_BODY + 1))
    assert response.code == 413
    assert json.loads(body)["error"]["code"] == "payload_too_large"


def test_a_fault_of_ours_is_still_a_logged_500(auth, log_levels) -> None:
    def broken() -> dict:
        raise RuntimeError("a bug")

    web = ProxyWeb(auth, broken, "127.0.0.1").resource()
    response, body = _request(web, "GET", "/")
    assert response.code == 500
    assert json.loads(body)["error"]["code"] == "internal"
    assert [level for level, _ in _loud(log_levels)] == [LogLevel.critical]


# --- the channel: what Twisted would drop or answer with a bare 400 -----------

def _serve(auth, raw: bytes) -> bytes:
    """Everything the proxy's web port answers to ``raw`` (in memory)."""
    site = EdgeSite(ProxyWeb(auth, _addresses, "127.0.0.1").resource())
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    value = transport.value()
    channel.connectionLost(None)
    return value


def _status_and_error(answer: bytes) -> tuple[bytes, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], json.loads(body)["error"]


def test_long_query_string_is_414(auth, log_levels) -> None:
    answer = _serve(auth, b"GET /v1/ping?" + b"q" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    status, error = _status_and_error(answer)
    assert status == b"HTTP/1.1 414 URI Too Long"
    assert error["code"] == "uri_too_long"
    assert _loud(log_levels) == []


def test_request_line_without_end_is_414(auth) -> None:
    # Past Twisted's line limit with no CRLF yet: it used to drop silently.
    answer = _serve(auth, b"GET /" + b"a" * 100_000)
    assert answer.startswith(b"HTTP/1.1 414 ")


def test_huge_headers_are_431(auth, log_levels) -> None:
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 4000) for i in range(20))
    answer = _serve(auth, b"GET /v1/ping HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    status, error = _status_and_error(answer)
    assert status == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert error["code"] == "headers_too_large"
    assert _loud(log_levels) == []


def test_one_overlong_header_line_is_431(auth) -> None:
    answer = _serve(auth, b"GET /v1/ping HTTP/1.1\r\nCookie: " + b"c" * 100_000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_declared_body_over_the_limit_is_413_before_it_is_read(auth) -> None:
    answer = _serve(auth, b"POST /v1/login HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                    % (10 * 1024 * 1024) + b"{")
    status, error = _status_and_error(answer)
    assert status == b"HTTP/1.1 413 Content Too Large"
    assert error["code"] == "payload_too_large"


def test_chunked_body_over_the_limit_is_413(auth) -> None:
    chunk = b"%x\r\n%s\r\n" % (60_000, b"x" * 60_000)
    answer = _serve(auth, b"POST /v1/login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + chunk * 6)
    assert answer.startswith(b"HTTP/1.1 413 ")


def test_non_utf8_path_is_a_json_400_without_a_traceback(auth, log_levels) -> None:
    answer = _serve(auth, b"GET /%ff HTTP/1.1\r\nHost: x\r\n\r\n")
    status, error = _status_and_error(answer)
    assert status == b"HTTP/1.1 400 Bad Request"
    assert error["code"] == "bad_request"
    assert _loud(log_levels) == []


def test_requests_within_the_limits_still_work_and_pipeline(auth) -> None:
    ping = b"GET /v1/ping?" + b"q" * 4000 + b" HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 30_000 + b"\r\n\r\n"
    answer = _serve(auth, ping + ping)
    assert answer.count(b"HTTP/1.1 200 OK") == 2


@pytest.mark.parametrize("raw", [
    b"NONSENSE\r\n\r\n",                                   # no method, path, version
    b"GET /v1/ping HTTP/1.1\r\nNo-Colon-Here\r\n\r\n",         # header without ':'
    b"GET /v1/ping HTTP/1.1\r\nX\x00Bad: v\r\n\r\n",            # invalid header name
    b"POST /v1/login HTTP/1.1\r\nContent-Length: 12\r\nContent-Length: 13\r\n\r\n",
    b"POST /v1/login HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
], ids=["request-line", "header-line", "header-name", "two-lengths", "bad-chunk"])
def test_malformed_requests_are_a_json_400(auth, raw, log_levels) -> None:
    status, error = _status_and_error(_serve(auth, raw))
    assert status == b"HTTP/1.1 400 Bad Request"
    assert error == {"code": "bad_request", "message": "malformed HTTP request"}
    assert _loud(log_levels) == []


def test_with_the_reach_off_a_malformed_request_gets_twisteds_bare_400(auth) -> None:
    from edgeaccess import internals

    internals.switch_off("http-bad-request", "test")
    try:
        answer = _serve(auth, b"NONSENSE\r\n\r\n")
    finally:
        internals.reset("http-bad-request")
    assert answer == b"HTTP/1.1 400 Bad Request\r\n\r\n"
