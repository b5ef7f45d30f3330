"""Steps several end-to-end modules take the same way, with their checks.

Each step drives the real client (kubectl, curl, a WebSocket, OpenSSH under
pexpect) and asserts what every caller expects of it; a module keeps only
what is its own (which user, which node, which cluster it goes through).
"""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pexpect

from edgeaccess.devcluster import ProxyProcess, wait_for
from tests.apps.appkit import (
    PUBLIC_HOST,
    WebSocketClient,
    curl,
    tls_socket,
    web_login,
    web_port,
    ws_echo_script,
)
from tests.kube_world import KUBECTL


def _cluster_name(module_name: str) -> str:
    """A valid cluster name from a test module's name (``test_cluster_core`` -> ``cluster-core``)."""
    name = re.sub(r"[^a-z0-9-]+", "-", module_name.lower().removeprefix("test_"))
    return name.strip("-")[:40] or "test"


def module_proxy(request, tmp_path_factory, extra_args: Sequence[str] = ()) -> Iterator[ProxyProcess]:
    """For a module-scoped fixture (``yield from``): one ``twistd -n edgeproxy``
    for the module, its cluster named after it, stopped at the end; its log
    is printed if it fails to start."""
    import pytest

    base = tmp_path_factory.mktemp("proxy")
    process = ProxyProcess(base / "proxy", base / "proxy.log",
                           cluster=_cluster_name(request.module.__name__.rpartition(".")[2]),
                           extra_args=list(extra_args))
    try:
        process.start()
    except Exception:
        process.kill()
        pytest.fail(f"proxy did not start; log:\n{process.log()[-4000:]}")
    yield process
    process.stop()


@contextmanager
def upper_echo_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that answers each read upper-cased (a pod's
    port); yields its port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    def handle(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data.upper())

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


# --- Kubernetes ------------------------------------------------------------------------


def kubectl_port_forward_round_trips(env: dict, pod_port: int, label: str, rounds: int = 1,
                                     repeat: int = 2000) -> None:
    """``kubectl port-forward pod/web-1 :POD_PORT`` with ``env``; then
    ``rounds`` connections through the same forward, each sending ``repeat``
    copies of a line and reading it back upper-cased (``upper_echo_server``)."""
    forward = subprocess.Popen([KUBECTL, "port-forward", "pod/web-1", f":{pod_port}"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = forward.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, line + forward.stderr.read() if forward.poll() is not None else line
        for round_ in range(rounds):
            with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=30) as c:
                payload = f"{label} {round_} ".encode() * repeat
                c.sendall(payload)
                received = b""
                while len(received) < len(payload):
                    chunk = c.recv(65536)
                    assert chunk, "the forwarded connection closed early"
                    received += chunk
                assert received == payload.upper()
    finally:
        forward.kill()
        forward.wait()


# --- web apps --------------------------------------------------------------------------


def app_post_streams_byte_exact(config: dict, directory: Path,
                                size: int = 5 * 1024 * 1024) -> None:
    """POST ``size`` random bytes to the demo app's ``/api/echo`` with the app
    certificate ``config``: the same bytes come back, and the app saw them
    (its ``x-body-sha256``)."""
    import os

    body = os.urandom(size)
    source = directory / "body.bin"
    source.write_bytes(body)
    out = directory / "out.bin"
    result = curl(config, "/api/echo", "--data-binary", f"@{source}", "-o", str(out),
                  "-D", "-", "-H", "content-type: application/octet-stream")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == body
    assert f"x-body-sha256: {hashlib.sha256(body).hexdigest()}" in result.stdout.decode().lower()


def app_websocket_echoes(proxy: ProxyProcess, app: str, config: dict, text: str,
                         blob: bytes | None = None) -> None:
    """A WebSocket to ``app`` through the proxy's web port (with the app
    certificate ``config``) echoes ``text``, then ``blob`` if given."""
    host = f"{app}.{PUBLIC_HOST}:{web_port(proxy)}"
    sock = tls_socket(proxy, f"{app}.{PUBLIC_HOST}", config)
    try:
        ws = WebSocketClient(sock, host)
        ws.send_text(text)
        assert ws.receive() == text
        if blob is not None:
            ws.send_bytes(blob)
            assert ws.receive() == blob
    finally:
        sock.close()


# --- SSH sessions and their audit -----------------------------------------------------------


def interactive_ssh(*ssh_args: str) -> pexpect.spawn:
    """``ssh -tt SSH_ARGS`` under pexpect, on a 100x30 terminal."""
    child = pexpect.spawn("ssh", ["-tt", *ssh_args], timeout=30, encoding="utf-8")
    child.setwinsize(30, 100)
    return child


def session_events(proxy: ProxyProcess, session_id: str, until_type: str = "session.end",
                   timeout: float = 30.0) -> list[dict]:
    """The audit events of ``session_id``, once one of them is ``until_type``."""
    def arrived():
        found = proxy.edgectl_json("audit", "search", "--session", session_id)
        return found if until_type in [e["event"] for e in found] else None

    return wait_for(arrived, timeout, f"{until_type} of session {session_id}", interval=0.3)


def browser_app_session_ended_by_ui_logout(context, ui: str, app: str, user: str,
                                           password: str, query: str) -> tuple[dict, dict]:
    """In Chromium (the browser ``context``): log in to the web UI at ``ui``
    as ``user``, then open the app at ``app + query`` with no app cookie (app
    host -> launcher -> app host -> the page): the page greets ``user`` with
    a verified identity, the proxy's cookies never reach the app, its
    WebSocket echoes. Logging out of the web UI then ends the app session:
    the WebSocket closes and the app host sends back to the login form.

    :returns: ``(the app host's cookie, the app's /api/whoami answer)``, for
        the caller's own checks.
    """
    import json

    page = context.new_page()
    web_login(page, ui, user, password)
    page.goto(app + query)
    try:
        page.wait_for_selector("#hello", timeout=20000)
    except Exception:
        raise AssertionError(f"the app page did not come: at {page.url}: "
                             f"{page.inner_text('body')[:500]}")
    assert page.inner_text("#hello") == f"Hello {user}"
    assert page.inner_text("#verified") == "verified: true"
    assert page.url == app + query
    (cookie,) = [c for c in context.cookies(app) if c["name"] == "__Host-edge-app"]
    assert cookie["secure"] and cookie["httpOnly"]
    answer = json.loads(page.evaluate("fetch('/api/whoami').then(r => r.text())"))
    assert "__Host-edge" not in json.dumps(answer["headers"])
    assert answer["claims"]["username"] == user
    wss = app.replace("https://", "wss://", 1) + "/ws"
    assert page.evaluate(ws_echo_script(wss)) == "from the browser"
    ui_page = context.new_page()
    ui_page.goto(ui + "/web/")
    ui_page.click("#logout")
    ui_page.wait_for_selector("#login-form")
    wait_for(lambda: page.evaluate("window.appSocketClosed"), 15,
             "the app WebSocket closed after logout")
    page.goto(app + "/api/whoami")
    page.wait_for_selector("#login-form")
    assert page.url.startswith(ui)
    return cookie, answer


# --- trusted clusters ------------------------------------------------------------------


def trusted_cluster_yaml(*, name: str, token: str, pin: str, web: str, tunnel: str,
                         role_map: dict[str, list[str]], enabled: bool = True) -> str:
    """The ``trusted_cluster`` document a leaf creates to trust the root
    ``name`` at ``web`` (the token exchange) and ``tunnel``; ``role_map``
    maps each root role to the leaf's roles."""
    mapped = "".join(f"    - {{remote: {remote}, local: [{', '.join(local)}]}}\n"
                     for remote, local in role_map.items())
    return f"""\
kind: trusted_cluster
version: v1
metadata: {{name: {name}}}
spec:
  enabled: {str(enabled).lower()}
  token: {token}
  ca_pin: {pin}
  web_proxy_addr: {web}
  tunnel_addr: {tunnel}
  role_map:
{mapped}"""
