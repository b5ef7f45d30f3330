"""A real proxy answers oversized and unknown requests on real sockets.

Raw TLS sockets (no HTTP client library, which would refuse to send such
requests) against ``twistd -n edgeproxy``; the status line is checked, and
the proxy's log holds no traceback for any of these client mistakes.
"""

from __future__ import annotations

import json
import socket
import ssl
import urllib.request

import pytest

from tests.integration.steps import module_proxy

DEADLINE = 20.0


@pytest.fixture(scope="module")
def proxy(request, tmp_path_factory):
    """This module's proxy, with the diagnostics address on (off by default)."""
    yield from module_proxy(request, tmp_path_factory, ["--diag-listen", "127.0.0.1:0"])


@pytest.fixture(scope="module")
def tls_context(proxy):
    context = ssl.create_default_context(cafile=str(proxy.data_dir / "ca" / "tls_ca.crt"))
    context.check_hostname = False  # the proxy certificate names its public address, an IP
    return context


def _exchange(proxy, context, port_name: str, raw: bytes) -> bytes:
    """Send ``raw`` and read the answer until the proxy closes the connection."""
    with socket.create_connection(("127.0.0.1", proxy.ports[port_name]), timeout=DEADLINE) as tcp:
        with context.wrap_socket(tcp) as conn:
            try:
                conn.sendall(raw)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass  # the proxy may answer and close before it has read it all
            answer = b""
            while True:
                try:
                    piece = conn.recv(65536)
                except (ConnectionResetError, ssl.SSLError):
                    break
                if not piece:
                    break
                answer += piece
    return answer


def _status(answer: bytes) -> bytes:
    return answer.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("port_name", ["web", "auth"])
def test_oversized_requests_get_an_answer(proxy, tls_context, port_name) -> None:
    long_query = b"GET /v1/ping?q=" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = _exchange(proxy, tls_context, port_name, long_query)
    assert _status(answer) == b"HTTP/1.1 414 URI Too Long"
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "uri_too_long"

    huge_headers = (b"GET /v1/ping HTTP/1.1\r\nHost: x\r\n"
                    + b"".join(b"X-Big-%d: %s\r\n" % (i, b"b" * 8000) for i in range(12)) + b"\r\n")
    answer = _exchange(proxy, tls_context, port_name, huge_headers)
    assert _status(answer) == b"HTTP/1.1 431 Request Header Fields Too Large"

    big_body = (b"POST /v1/join HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 50000000\r\n\r\n{")
    answer = _exchange(proxy, tls_context, port_name, big_body)
    assert _status(answer) == b"HTTP/1.1 413 Content Too Large"


def test_unknown_path_and_wrong_method_on_the_web_port(proxy, tls_context) -> None:
    for path in (b"/v1/nothing", b"/metrics"):
        answer = _exchange(proxy, tls_context, "web",
                           b"GET %s HTTP/1.0\r\nHost: x\r\n\r\n" % path)
        assert _status(answer) == b"HTTP/1.0 404 Not Found"
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "not_found"
    # The web UI's pages (/web/...) answer a browser with an HTML page.
    answer = _exchange(proxy, tls_context, "web", b"GET /web/nothing HTTP/1.0\r\nHost: x\r\n\r\n")
    assert _status(answer) == b"HTTP/1.0 404 Not Found"
    assert b"text/html" in answer.partition(b"\r\n\r\n")[0]
    answer = _exchange(proxy, tls_context, "web",
                       b"PUT /v1/ping HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                       b"Connection: close\r\n\r\n")
    assert _status(answer) == b"HTTP/1.1 405 Method Not Allowed"
    assert b"\r\nAllow: GET, HEAD\r\n" in answer


def test_metrics_are_on_the_diagnostics_address_only(proxy, tls_context) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.ports['diag']}/metrics",
                                timeout=DEADLINE) as response:
        text = response.read().decode()
    assert 'edgeaccess_tunnels_connected{kind="node"} 0.0' in text
    assert "process_resident_memory_bytes" in text
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.ports['diag']}/readyz",
                                timeout=DEADLINE) as response:
        assert response.status == 200
    answer = _exchange(proxy, tls_context, "web", b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    assert _status(answer) == b"HTTP/1.0 404 Not Found"


def test_none_of_it_left_a_traceback(proxy, tls_context) -> None:
    # Runs after the tests above, in file order.
    _exchange(proxy, tls_context, "web", b"GET /%ff HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    log = proxy.log()
    assert "refused a request" in log  # the one info line each
    assert "Traceback" not in log and "#critical]" not in log, log[-3000:]
