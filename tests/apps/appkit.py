"""What the app tests share: a cluster whose public host is ``edge.localhost``
(curl and Chromium resolve ``*.localhost`` themselves; Python connects to
127.0.0.1 with the name as SNI and ``Host``), the demo app, curl and a
WebSocket client with an app certificate."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from edgeaccess.devcluster import ProxyProcess, run_edge, stop_process

PUBLIC_HOST = "edge.localhost"
TESTS = Path(__file__).resolve().parent


def browser_trusting_web_ca(proxy: ProxyProcess, tmp_path_factory):
    """Debian's Chromium (Playwright) trusting ``proxy``'s web CA and nothing else
    of ours: the app hosts' certificates are verified, no error is ignored.
    A generator for a module fixture (``yield from``)."""
    from tests import browser as chromium

    missing = chromium.available()
    if missing:
        pytest.skip(missing)
    with chromium.browser_trusting(tmp_path_factory.mktemp("nss"),
                                   [chromium.web_ca_of(proxy)]) as browser:
        yield browser


def web_login(page, ui: str, user: str, password: str) -> None:
    """Log in to the web UI at ``ui`` in ``page``."""
    page.goto(ui + "/")
    page.fill("#user", user)
    page.fill("#password", password)
    page.click("#login")
    page.wait_for_selector("#logout")


def ws_echo_script(url: str) -> str:
    """Page script: open a WebSocket to ``url``, echo once; ``window.appSocketClosed``."""
    return f"""() => new Promise((resolve) => {{
        const ws = new WebSocket({json.dumps(url)});
        window.appSocket = ws;
        window.appSocketClosed = false;
        ws.onclose = () => {{ window.appSocketClosed = true; }};
        ws.onopen = () => ws.send("from the browser");
        ws.onmessage = (m) => resolve(m.data);
        ws.onerror = () => resolve("error");
    }})"""


def start_proxy(base: Path, cluster: str, *extra: str) -> ProxyProcess:
    """A proxy whose public host is ``edge.localhost`` and whose tunnel address is
    127.0.0.1 (nodes are Python: they cannot resolve ``*.localhost``)."""
    proxy = ProxyProcess(base / "proxy", base / "proxy.log", cluster=cluster,
                         extra_args=["--public-addr", PUBLIC_HOST,
                                     "--tunnel-public-addr", "127.0.0.1", *extra])
    try:
        proxy.start()
    except Exception:
        proxy.kill()
        raise
    return proxy


def web_listen(proxy: ProxyProcess) -> str:
    """``127.0.0.1:PORT`` of the web port (what Python clients and nodes dial)."""
    return proxy.runtime()["listen"]["web"]


def web_port(proxy: ProxyProcess) -> int:
    return int(web_listen(proxy).rpartition(":")[2])


def ca_file(proxy: ProxyProcess) -> Path:
    return proxy.data_dir / "ca" / "tls_ca.crt"


def start_demo_app(proxy: ProxyProcess) -> tuple[subprocess.Popen, int]:
    """The demo app verifying assertions against ``proxy``'s JWKS (no audience check)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeaccess.apps.demo", "--listen", "127.0.0.1:0",
         "--jwks", f"https://{web_listen(proxy)}/.well-known/jwks.json",
         "--jwks-ca", str(ca_file(proxy))], stdout=subprocess.PIPE)
    line = process.stdout.readline().decode()
    if not line.startswith("PORT "):
        stop_process(process)
        raise RuntimeError(f"demo app did not start: {line!r}")
    return process, int(line.split()[1])


def start_bad_app() -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, str(TESTS / "badapp.py")],
                               stdout=subprocess.PIPE)
    line = process.stdout.readline().decode()
    if not line.startswith("PORT "):
        stop_process(process)
        raise RuntimeError(f"bad app did not start: {line!r}")
    return process, int(line.split()[1])


def edge_login(proxy: ProxyProcess, home: Path, user: str, password: str) -> Path:
    result = run_edge(home, "login", "--proxy", web_listen(proxy), "--user", user,
                      "--password-stdin", "--ca-pin", proxy.pin(), input=password + "\n")
    assert result.returncode == 0, result.stderr
    return home


def app_login(home: Path, app: str, *extra: str, ttl: str | None = None) -> dict:
    """``edge apps login APP`` then ``edge apps config APP --format json``."""
    result = run_edge(home, "apps", "login", app, *extra, *(["--ttl", ttl] if ttl else []))
    assert result.returncode == 0, result.stderr
    result = run_edge(home, "apps", "config", app, "--format", "json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def curl(config: dict, path: str, *args: str, url: str | None = None,
         timeout: float = 60, input: bytes | None = None) -> subprocess.CompletedProcess:
    """curl with the app certificate (strict verification against the cluster CA)."""
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(int(timeout)), "--cacert", config["ca"],
         "--cert", config["cert"], "--key", config["key"], *args,
         (url or config["url"]) + path], capture_output=True, timeout=timeout + 10,
        input=input)


def tls_socket(proxy: ProxyProcess, host: str, config: dict | None) -> ssl.SSLSocket:
    """A TLS connection to the web port for ``host`` (SNI), with the app certificate."""
    context = ssl.create_default_context(cafile=str(ca_file(proxy)))
    if config is not None:
        context.load_cert_chain(config["cert"], config["key"])
    raw = socket.create_connection(("127.0.0.1", web_port(proxy)), timeout=30)
    return context.wrap_socket(raw, server_hostname=host)


class WebSocketClient:
    """A blocking WebSocket client (wsproto) over :func:`tls_socket`."""

    def __init__(self, sock: ssl.SSLSocket, host: str, path: str = "/ws") -> None:
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import Request

        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)
        sock.sendall(self.ws.send(Request(host=host, target=path)))
        self.events = []
        self._wait(lambda e: type(e).__name__ == "AcceptConnection")

    def _wait(self, predicate):
        while True:
            for index, event in enumerate(self.events):
                if predicate(event):
                    del self.events[index]
                    return event
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed")
            self.ws.receive_data(data)
            for event in self.ws.events():
                if type(event).__name__ == "RejectConnection":
                    raise ConnectionError(f"upgrade refused: {event.status_code}")
                self.events.append(event)

    def send_text(self, text: str) -> None:
        from wsproto.events import TextMessage

        self.sock.sendall(self.ws.send(TextMessage(data=text)))

    def send_bytes(self, data: bytes) -> None:
        from wsproto.events import BytesMessage

        self.sock.sendall(self.ws.send(BytesMessage(data=data)))

    def receive(self):
        """The next whole message (str or bytes)."""
        parts = []
        while True:
            event = self._wait(lambda e: type(e).__name__ in
                               ("TextMessage", "BytesMessage", "CloseConnection"))
            if type(event).__name__ == "CloseConnection":
                raise ConnectionError("closed by the peer")
            parts.append(event.data)
            if event.message_finished:
                return "".join(parts) if isinstance(parts[0], str) else b"".join(parts)

    def wait_closed(self, timeout: float) -> None:
        """Wait until the peer closes the connection (a timeout is a failure)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                self.receive()
        except TimeoutError:
            raise AssertionError(f"the WebSocket was still open after {timeout}s") from None
        except (ConnectionError, ssl.SSLError, OSError):
            return
