"""The TLS-routing ProxyCommand (``edgeaccess/client/tlsroute.py``).

The relay runs as ssh runs it (``python -I -S tlsroute.py ...``, a real
process with pipes) against a real TLS 1.3 server on 127.0.0.1 (the standard
library's, in a thread) that checks the client certificate, records the
server name and ALPN, and echoes or streams bytes.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from edgeaccess.client import tlsroute
from edgeaccess.pki.keys import private_key_pem
from edgeaccess.pki.x509ca import certificate_pem
from tests.pkitools import Identity, issue_identities, issue_legacy_certificate

ALPN = "edge-ssh/1"
DEADLINE = 60


def _write_pair(directory: Path, name: str, key, cert) -> tuple[str, str]:
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    key_path.write_bytes(private_key_pem(key))
    cert_path.write_bytes(certificate_pem(cert))
    return str(key_path), str(cert_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("tlsroute-pki")
    issued = issue_identities([
        ("proxy", Identity(kind="proxy", name="proxy.test", cluster="root"),
         ("proxy.example",), ("127.0.0.1",)),
        ("alice", Identity(kind="user", name="alice", cluster="root"), ()),
        ("node", Identity(kind="node", name="n1", cluster="root", uuid="u-1"), ()),
    ])
    # A user's certificate in the shape the CA issued before server
    # identities (both usages), with the dialled address in its SAN.
    issued["mallory"] = issue_legacy_certificate(
        issued, Identity(kind="user", name="mallory", cluster="root"), ips=("127.0.0.1",))
    other = issue_identities([], cluster="other")
    (directory / "ca.pem").write_bytes(certificate_pem(issued["ca"]))
    (directory / "other-ca.pem").write_bytes(certificate_pem(other["ca"]))
    out: dict[str, Any] = {"ca": str(directory / "ca.pem"),
                           "other_ca": str(directory / "other-ca.pem")}
    for label in ("proxy", "alice", "node", "mallory"):
        out[label] = _write_pair(directory, label, *issued[label])
    return out


class TLSServer:
    """One-connection TLS 1.3 server: mutual, ALPN, records SNI. ``mode`` is
    ``echo`` (then ``echo_size`` bytes back, then close, as the proxy closes
    when the node's side ends) or an int (bytes to stream, then close)."""

    def __init__(self, pki: dict[str, Any], mode: Any = "echo", alpn: str | None = ALPN,
                 echo_size: int = 0, holder: str = "proxy") -> None:
        self.echo_size = echo_size
        self.received = b""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(pki[holder][1], pki[holder][0])
        context.load_verify_locations(cafile=pki["ca"])
        context.verify_mode = ssl.CERT_REQUIRED
        if alpn:
            context.set_alpn_protocols([alpn])
        self.server_names: list[str | None] = []
        context.sni_callback = lambda sslobj, name, ctx: self.server_names.append(name)
        self.context = context
        self.mode = mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.alpn: str | None = None
        self.peer: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            raw, _ = self.listener.accept()
            with self.context.wrap_socket(raw, server_side=True) as conn:
                self.alpn = conn.selected_alpn_protocol()
                self.peer = conn.getpeercert()
                if self.mode == "echo":
                    echoed = 0
                    while echoed < self.echo_size and (data := conn.recv(65536)):
                        conn.sendall(data)
                        echoed += len(data)
                elif self.mode == "record":
                    while data := conn.recv(65536):
                        self.received += data
                else:
                    chunk = bytes(range(256)) * 256
                    left = self.mode
                    while left:
                        piece = chunk[:min(left, len(chunk))]
                        conn.sendall(piece)
                        left -= len(piece)
        except (OSError, ssl.SSLError) as error:
            self.error = error
        finally:
            self.listener.close()


def relay_argv(pki: dict[str, Any], port: int, *, ca: str | None = None,
               verify_host: str = "127.0.0.1", servername: str = "node-1.root",
               cluster: str = "root") -> list[str]:
    key, cert = pki["alice"]
    return [sys.executable, "-I", "-S", tlsroute.__file__, "--ca", ca or pki["ca"],
            "--cert", cert, "--key", key, "--verify-host", verify_host, "--alpn", ALPN,
            "--cluster", cluster,
            "--servername", servername, "--connect", f"127.0.0.1:{port}"]


def test_bytes_cross_the_relay_both_ways_unchanged(pki) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    server = TLSServer(pki, "echo", echo_size=len(payload))
    relay = subprocess.Popen(relay_argv(pki, server.port), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    received = bytearray()

    def read() -> None:
        while len(received) < len(payload):
            data = relay.stdout.read1(65536)
            if not data:
                return
            received.extend(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    relay.stdin.write(payload)
    relay.stdin.flush()
    relay.stdin.close()  # like s_client -quiet: the relay goes on until the proxy closes
    reader.join(DEADLINE)
    assert relay.wait(DEADLINE) == 0
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert relay.stderr.read() == b""  # quiet on the user's terminal
    server.thread.join(DEADLINE)
    assert server.server_names == ["node-1.root"]  # the target rides in the SNI
    assert server.alpn == ALPN
    assert server.peer is not None  # the user's certificate was presented


def test_a_download_ends_when_the_proxy_closes(pki) -> None:
    size = 5 * 1024 * 1024 + 3
    server = TLSServer(pki, size)
    result = subprocess.run(relay_argv(pki, server.port, verify_host="proxy.example"),
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=DEADLINE)
    assert result.returncode == 0, result.stderr
    expected = (bytes(range(256)) * (size // 256 + 1))[:size]
    assert result.stdout == expected


@pytest.mark.parametrize("case, why", [
    ("host", "does not name 10.9.9.9"),
    ("ca", "certificate verify failed"),
    ("alpn", "does not serve edge-ssh/1"),
])
def test_the_relay_refuses_a_proxy_it_cannot_trust(pki, case: str, why: str) -> None:
    server = TLSServer(pki, "echo", alpn=None if case == "alpn" else ALPN)
    argv = relay_argv(pki, server.port,
                      verify_host="10.9.9.9" if case == "host" else "127.0.0.1",
                      ca=pki["other_ca"] if case == "ca" else None)
    result = subprocess.run(argv, input=b"SSH-2.0-secret\r\n", capture_output=True,
                            timeout=DEADLINE)
    assert result.returncode == 255
    assert result.stdout == b""
    assert why in result.stderr.decode()
    server.thread.join(DEADLINE)


@pytest.mark.parametrize("holder, cluster, why", [
    ("mallory", "root", "is not a proxy of cluster root"),
    ("node", "root", "certificate verify failed"),  # OpenSSL: not for servers
    ("proxy", "other", "is not a proxy of cluster other"),
])
def test_a_server_that_is_not_a_proxy_of_the_cluster_gets_no_byte(pki, holder, cluster,
                                                                  why) -> None:
    server = TLSServer(pki, "record", holder=holder)
    argv = relay_argv(pki, server.port, cluster=cluster)
    result = subprocess.run(argv, input=b"SSH-2.0-secret\r\n", capture_output=True,
                            timeout=DEADLINE)
    assert result.returncode == 255
    assert why in result.stderr.decode()
    server.thread.join(DEADLINE)
    assert server.received == b""


def test_arguments_are_all_required_and_checked() -> None:
    with pytest.raises(tlsroute.RouteError, match="missing --ca"):
        tlsroute.parse_args(["--cert", "c"])
    with pytest.raises(tlsroute.RouteError, match="unknown argument"):
        tlsroute.parse_args(["--bogus", "x"])
    with pytest.raises(tlsroute.RouteError, match="needs a value"):
        tlsroute.parse_args(["--ca"])
    assert tlsroute.split_host_port("[::1]:3024") == ("::1", 3024)
    assert tlsroute.split_host_port("proxy.example:3024") == ("proxy.example", 3024)
    for bad in ("proxy", "proxy:0", "proxy:http", "proxy:70000"):
        with pytest.raises(tlsroute.RouteError):
            tlsroute.split_host_port(bad)


def test_certificate_names_host_matches_ip_and_dns_sans_only() -> None:
    cert = {"subjectAltName": (("DNS", "proxy.example"), ("DNS", "*.edge.example"),
                               ("IP Address", "127.0.0.1"), ("IP Address", "::1"))}
    names = tlsroute.certificate_names_host
    assert names(cert, "127.0.0.1") and names(cert, "::1") and names(cert, "0:0::1")
    assert names(cert, "PROXY.example.") and names(cert, "a.edge.example")
    assert not names(cert, "10.0.0.1")
    assert not names(cert, "a.b.edge.example")  # a wildcard is one label
    assert not names(cert, "edge.example")
    assert not names(cert, "other.example")
    assert not names({"subject": ((("commonName", "proxy.example"),),)}, "proxy.example")


@pytest.mark.parametrize("private", [True, False])
def test_both_tls_engines_complete_a_checked_handshake(pki, private: bool) -> None:
    """``_ssl``'s own objects (the fast start) and the public ``ssl`` module
    (the fallback on another CPython) behave alike."""
    import _ssl

    server = TLSServer(pki, "echo", echo_size=5)
    sock = tlsroute.connect("127.0.0.1", server.port)
    try:
        incoming, outgoing = _ssl.MemoryBIO(), _ssl.MemoryBIO()
        key, cert = pki["alice"]
        tls = tlsroute.open_tls(pki["ca"], cert, key, ALPN, "node-9.root", incoming, outgoing,
                                private=private)
        assert (type(tls).__module__ == "_ssl") is private
        tlsroute.handshake(sock, tls, incoming, outgoing)
        assert tls.selected_alpn_protocol() == ALPN
        assert tlsroute.certificate_names_host(tls.getpeercert(), "127.0.0.1")
        tls.write(b"hello")
        sock.sendall(outgoing.read())
        echoed = b""
        while len(echoed) < 5:
            incoming.write(sock.recv(65536))
            try:
                echoed += tls.read(100)
            except _ssl.SSLWantReadError:
                continue
        assert echoed == b"hello"
    finally:
        sock.close()
    server.thread.join(DEADLINE)
    assert server.server_names == ["node-9.root"]


#: Runs tlsroute.py as ssh does (``-I -S``) after making the private names
#: its fast path uses fail (``ssl`` and ``socket`` hold their own references).
WITHOUT_PRIVATE_NAMES = """
import sys, _socket, _ssl, socket, ssl
def forbidden(*args, **kwargs):
    raise AssertionError("a private _ssl/_socket name was used")
_ssl._SSLContext = _socket.inet_pton = forbidden
path = sys.argv[1]
sys.argv = sys.argv[1:]
exec(compile(open(path).read(), path, "exec"), {"__name__": "__main__", "__file__": path})
"""


@pytest.mark.parametrize("stock", [True, False])
def test_the_stock_path_relays_without_the_private_modules(pki, stock: bool) -> None:
    """``--stock`` (what ``edge`` writes when the ``cpython-tls-route`` reach
    is off) relays through ``ssl`` and ``socket`` alone; the fast path is
    what the forbidden names break."""
    server = TLSServer(pki, "echo", echo_size=11)
    argv = relay_argv(pki, server.port) + (["--stock"] if stock else [])
    argv[3:4] = ["-c", WITHOUT_PRIVATE_NAMES, tlsroute.__file__]
    result = subprocess.run(argv, input=b"hello stock", capture_output=True, timeout=DEADLINE)
    if stock:
        assert (result.returncode, result.stdout, result.stderr) == (0, b"hello stock", b"")
        server.thread.join(DEADLINE)
        assert server.server_names == ["node-1.root"] and server.alpn == ALPN
    else:
        assert result.returncode != 0 and b"private _ssl/_socket name" in result.stderr
        assert result.stdout == b""


def test_the_probe_reports_a_changed_private_context(monkeypatch) -> None:
    import _ssl

    from edgeaccess import internals

    probe = internals._REACHES["cpython-tls-route"].probe
    assert probe() is None
    class Renamed:  # another CPython's context, without the private methods
        def __init__(self, protocol: int) -> None:
            self.protocol = protocol

    monkeypatch.setattr(_ssl, "_SSLContext", Renamed)
    assert "private context API differs" in probe()
    monkeypatch.delattr(_ssl, "PROTO_TLSv1_3")
    assert "lack PROTO_TLSv1_3" in probe()


def test_the_proxycommand_edge_writes_with_the_reach_off_connects(pki, monkeypatch,
                                                                   tmp_path) -> None:
    """The whole fallback: the probe fails, ``edge`` writes ``--stock``, and
    that command (as ssh runs it, the private names made to fail) relays."""
    import shlex
    import shutil

    from edgeaccess import internals
    from edgeaccess.client.profile import render_tls_routing_command

    monkeypatch.setattr(internals, "TLS_ROUTE_SOCKET_NAMES",
                        internals.TLS_ROUTE_SOCKET_NAMES + ("_gone",))
    internals.reset("cpython-tls-route")
    try:
        server = TLSServer(pki, "echo", echo_size=8)
        shutil.copy(pki["ca"], tmp_path / "ca.pem")
        shutil.copy(pki["alice"][1], tmp_path / "tls.crt")
        shutil.copy(pki["alice"][0], tmp_path / "tls.key")
        command = render_tls_routing_command(tmp_path, f"127.0.0.1:{server.port}", "root")
        argv = [a.replace("%h", "node-2.root").replace("%%", "%") for a in shlex.split(command)]
        assert argv[:4] == [sys.executable, "-I", "-S", tlsroute.__file__]
        argv[3:4] = ["-c", WITHOUT_PRIVATE_NAMES, tlsroute.__file__]
        result = subprocess.run(argv, input=b"fallback", capture_output=True, timeout=DEADLINE)
        assert (result.returncode, result.stdout, result.stderr) == (0, b"fallback", b"")
        server.thread.join(DEADLINE)
        assert server.server_names == ["node-2.root"]
    finally:
        internals.reset("cpython-tls-route")
