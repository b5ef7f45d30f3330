"""edgeaccess.internals: every reach fits the installed versions (this module
runs at the newest versions in ``make test`` and at the floors in ``make
test-floor``), each fallback is the stock path working end to end, and
swapping pyOpenSSL's memory BIOs frees nothing twice."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from OpenSSL._util import ffi, lib
from twisted.conch.unix import SFTPServerForUnixConchUser
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from edgeaccess import internals, memory, tls
from edgeaccess.tunnel.agent import AgentTunnelProtocol
from edgeaccess.tunnel.protocol import ALPN_PROTOCOL, Inventory
from edgeaccess.tunnel.server import TunnelServerFactory
from tests.pkitools import Identity, issue_identities
from tests.tunnel.support import Acceptor, Collecting

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_probes():
    """Every test starts and ends with nothing probed (a forced failure
    never outlives its test)."""
    internals.reset()
    yield
    internals.reset()


@pytest.fixture(scope="module")
def pki() -> dict[str, Any]:
    return issue_identities([
        ("proxy", Identity(kind="proxy", name="proxy.test", cluster="root"), ("proxy.test",)),
        ("node", Identity(kind="node", name="node-1", cluster="root", uuid="u-1"), ()),
    ])


def test_every_reach_fits_the_installed_versions():
    assert internals.self_check() == {name: True for name in internals.reaches()}, (
        "a reach does not fit these versions: see the warnings; for pyOpenSSL "
        "outside PYOPENSSL_CHECKED, re-check the BIO ownership (the tests "
        "below) before widening the range")


def test_a_misfit_logs_one_warning_and_stays_off(monkeypatch):
    monkeypatch.setattr(internals, "AMP_INIT_ATTRIBUTES", frozenset({"_ampInitialized"}))
    with capturedLogs() as events:
        assert internals.available("amp-lean-init") is False
        assert internals.available("amp-lean-init") is False
        assert internals.self_check()["amp-lean-init"] is False
    warnings = [e for e in events if "amp-lean-init" in str(e.get("reach"))]
    assert len(warnings) == 1
    assert "amp.AMP.__init__" in warnings[0]["reason"]


def test_a_required_reach_that_does_not_fit_stops_start_up(monkeypatch):
    monkeypatch.delattr(SFTPServerForUnixConchUser, "_getAttrs")
    with pytest.raises(internals.InternalsMismatch, match="_getAttrs"):
        internals.self_check()


@pytest.mark.parametrize("tap", ["edgeaccess.proxy.tap", "edgeaccess.node.tap"])
def test_both_daemons_run_the_self_check_at_start_up(monkeypatch, tmp_path, tap):
    import importlib

    class Checked(Exception):
        pass

    def self_check():
        raise Checked()

    monkeypatch.setattr(internals, "self_check", self_check)
    module = importlib.import_module(tap)
    options = module.Options()
    data_dir = tmp_path / "data"
    options.parseOptions(
        ["--data-dir", str(data_dir), "--cluster-name", "root"] if tap.endswith("proxy.tap")
        else ["--data-dir", str(data_dir), "--auth-server", "127.0.0.1:3025",
              "--nodename", "node-1"])
    with pytest.raises(Checked):
        module.makeService(options, reactor=MemoryReactorClock())
    assert not data_dir.exists()  # checked before anything else is done


# -- tls-buffers: the BIO swap is safe for the pyOpenSSL it runs on --------------------------


def test_pyopenssl_frees_its_memory_bios_only_through_ssl_free():
    # What shrink_tls_buffers relies on, read from the installed pyOpenSSL:
    # the BIOs are plain BIO_new pointers handed to SSL_set_bio, the SSL
    # object alone is garbage-collected (SSL_free frees its BIOs), and
    # nothing in Connection frees a BIO.
    source = inspect.getsource(SSL.Connection)
    assert "self._ssl = _ffi.gc(ssl, _lib.SSL_free)" in source
    assert "self._into_ssl = _lib.BIO_new(_lib.BIO_s_mem())" in source
    assert "self._from_ssl = _lib.BIO_new(_lib.BIO_s_mem())" in source
    assert "_lib.SSL_set_bio(self._ssl, self._into_ssl, self._from_ssl)" in source
    assert "BIO_free" not in source


def _churn(mode: str, count: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, MALLOC_CHECK_="3", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "tests" / "bio_churn.py"), mode, str(count)],
                          cwd=ROOT, env=env, capture_output=True, timeout=240)


def test_swapped_bios_are_freed_once_under_glibc_heap_checks():
    result = _churn("safe", 60)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert result.stdout.split() == [b"swapped", b"60"]


def test_the_churn_sees_a_double_free_when_pyopenssl_owns_the_bios():
    # The negative control of the test above: BIOs freed twice kill the child.
    result = _churn("owned", 5)
    assert result.returncode != 0
    assert b"swapped" not in result.stdout


def _tls_pair(pki: dict[str, Any]) -> tuple[Any, Any, Any, MemoryReactorClock]:
    """A mutual TLS 1.3 connection in memory, handshake done:
    (server TLS, client TLS, pump, clock)."""
    key, cert = pki["proxy"]
    node_key, node_cert = pki["node"]
    clock = MemoryReactorClock()
    server = TLSMemoryBIOFactory(
        tls.server_options(key, cert, [pki["ca"]], client_certificates="required"), False,
        Factory.forProtocol(Protocol), clock=clock).buildProtocol(None)
    client = TLSMemoryBIOFactory(
        tls.client_options("proxy.test", [pki["ca"]], cluster="root", key=node_key, cert=node_cert), True,
        Factory.forProtocol(Protocol), clock=clock).buildProtocol(None)
    _, _, pump = iosim.connectedServerAndClient(lambda: server, lambda: client)
    for _ in range(3):
        clock.advance(0)
        pump.flush()
    return server, client, pump, clock


def test_bios_owned_by_pyopenssl_are_never_swapped(pki):
    server, _, _, _ = _tls_pair(pki)
    connection = server.getHandle()
    owned_in = connection._into_ssl = ffi.gc(connection._into_ssl, lib.BIO_free)
    owned_out = connection._from_ssl = ffi.gc(connection._from_ssl, lib.BIO_free)
    try:
        assert tls.shrink_tls_buffers(server) is False
        assert (connection._into_ssl, connection._from_ssl) == (owned_in, owned_out)
    finally:  # give ownership back to SSL_free before the connection goes
        connection._into_ssl = ffi.cast("BIO *", ffi.gc(owned_in, None) or owned_in)
        connection._from_ssl = ffi.cast("BIO *", ffi.gc(owned_out, None) or owned_out)


# -- each fallback: the stock path, end to end ----------------------------------------------


def _force_misfit(monkeypatch, reach: str) -> None:
    """Make ``reach``'s probe fail for real (it expects a shape that is not there)."""
    if reach == "tls-buffers":
        monkeypatch.setattr(internals, "PYOPENSSL_CHECKED", ((0, 0), (0, 1)))
    elif reach == "fast-tls":
        monkeypatch.setattr(internals, "_TLS_INTERNALS", internals._TLS_INTERNALS + ("_gone",))
    elif reach == "eager-tcp":
        monkeypatch.setattr(internals, "_TCP_INTERNALS", internals._TCP_INTERNALS + ("_gone",))
    elif reach == "amp-lean-init":
        monkeypatch.setattr(internals, "AMP_INIT_ATTRIBUTES", frozenset())
    elif reach == "conch-transport":
        monkeypatch.setattr(internals, "_CONCH_TRANSPORT_NAMES",
                            internals._CONCH_TRANSPORT_NAMES + ("_gone",))
    elif reach == "glibc-malloc":
        monkeypatch.setattr(internals, "_libc_function", lambda *args: None)
    elif reach == "cpython-tls-route":
        monkeypatch.setattr(internals, "TLS_ROUTE_SOCKET_NAMES",
                            internals.TLS_ROUTE_SOCKET_NAMES + ("_gone",))
    elif reach == "cpython-shared-keys":
        monkeypatch.setattr(internals.sys, "implementation",
                            type("Implementation", (), {"name": "other"})())
    else:
        raise AssertionError(reach)
    assert internals.self_check()[reach] is False


def _tls_tunnel(pki: dict[str, Any]):
    """An agent and a proxy tunnel over mutual TLS 1.3 in memory, Hello done."""
    clock = MemoryReactorClock()
    key, cert = pki["proxy"]
    node_key, node_cert = pki["node"]
    tunnels = TunnelServerFactory(clock=clock, identity_for=tls.peer_identity)
    acceptor = Acceptor()
    server_tls = TLSMemoryBIOFactory(
        tls.server_options(key, cert, [pki["ca"]], client_certificates="required",
                           alpn=[ALPN_PROTOCOL]), False, tunnels, clock=clock).buildProtocol(None)
    agent = AgentTunnelProtocol(clock=clock, inventory=Inventory(name="node-1"),
                                accept_channel=acceptor)
    client_tls = TLSMemoryBIOFactory(
        tls.client_options("proxy.test", [pki["ca"]], cluster="root", key=node_key, cert=node_cert,
                           alpn=[ALPN_PROTOCOL]), True, Factory.forProtocol(lambda: agent),
        clock=clock).buildProtocol(None)
    pump = iosim.connect(server_tls, iosim.makeFakeServer(server_tls), client_tls,
                         iosim.makeFakeClient(client_tls), greet=False, clock=clock)

    def flush() -> None:
        for _ in range(20):
            clock.advance(0)
            pump.flush(advanceClock=False)

    flush()
    server = tunnels.registry.lookup("root", "node-1")
    assert server is not None and agent.hello_done
    return server, server_tls, agent, acceptor, flush


@pytest.mark.parametrize("reach", [None, "tls-buffers", "fast-tls", "amp-lean-init"])
def test_a_tls_tunnel_carries_a_channel_with_the_reach_in_use_or_off(monkeypatch, pki, reach):
    if reach is not None:
        _force_misfit(monkeypatch, reach)
    server, server_tls, agent, acceptor, flush = _tls_tunnel(pki)
    channels = Collecting()
    opened: list[Any] = []
    server.connect_channel("ssh", "node-1:22", channels).addCallback(opened.append)
    flush()
    assert len(opened) == 1
    down, up = os.urandom(3 * 1024 * 1024 + 5), os.urandom(1024 * 1024 + 3)
    opened[0].transport.write(down)
    acceptor.protocols[0].transport.write(up)
    flush()
    assert bytes(acceptor.protocols[0].received) == down
    assert bytes(channels.built[0].received) == up
    # Which path ran: the reach's, or the stock one.
    assert ("_fast_tls" in vars(server_tls)) is (reach != "fast-tls")
    assert ("_descriptors" in vars(server)) is (reach == "amp-lean-init")
    assert internals.available("tls-buffers") is (reach != "tls-buffers")


def test_shrinking_is_off_with_its_reach_and_the_connection_still_works(monkeypatch, pki):
    _force_misfit(monkeypatch, "tls-buffers")
    server, client, pump, clock = _tls_pair(pki)
    connection = server.getHandle()
    before = (connection._into_ssl, connection._from_ssl)
    assert tls.shrink_tls_buffers(server) is False
    assert (connection._into_ssl, connection._from_ssl) == before
    received: list[bytes] = []
    server.wrappedProtocol.dataReceived = received.append
    client.write(b"still works")
    clock.advance(0)
    pump.flush()
    assert b"".join(received) == b"still works"


def test_tcp_writes_wait_for_the_reactor_with_eager_tcp_off(monkeypatch):
    from tests.tunnel.test_fasttls import tcp_pair

    _force_misfit(monkeypatch, "eager-tcp")
    connection, theirs, reactor = tcp_pair()
    try:
        assert internals.eager_tcp_writes(connection) is False
        assert internals.tcp_send_now_possible(connection) is False
        connection.write(b"later")
        assert connection in reactor.getWriters()  # Twisted's stock write
        connection.doWrite()
        assert theirs.recv(10) == b"later"
    finally:
        connection.socket.close()
        theirs.close()


@pytest.mark.parametrize("reach_off", [False, True])
def test_ssh_negotiates_and_moves_packets_with_conch_s_packet_layer(monkeypatch, reach_off):
    from tests.ssh.test_transport import MSG_TEST, _connect

    if reach_off:
        _force_misfit(monkeypatch, "conch-transport")
        cipher = b"aes128-ctr"
    else:
        cipher = b"aes128-gcm@openssh.com"
    client, server, pump = _connect(cipher, b"hmac-sha2-256")
    assert server.currentEncryptions.outCipType == cipher
    # Stock Conch cannot do AES-GCM: with the reach off it is not offered.
    offered = b"aes128-gcm@openssh.com" in server.supportedCiphers
    assert offered is not reach_off
    assert (type(server.currentEncryptions).__name__ == "SSHCiphers") is reach_off
    payload = os.urandom(70_000)
    client.sendPacket(MSG_TEST, payload)
    pump.flush()
    assert client.echo.received == [(MSG_TEST, payload[::-1])]


def test_glibc_functions_off_leave_the_allocator_alone(monkeypatch):
    _force_misfit(monkeypatch, "glibc-malloc")
    assert memory.trim_supported() is False
    assert memory.trim_heap() is False
    assert memory.tune_for_streaming() is False
    trimmer = memory.HeapTrimmer(MemoryReactorClock())
    trimmer.startService()
    assert trimmer._loop is None
    trimmer.stopService()


def test_attribute_names_are_not_entered_where_dicts_share_no_keys(monkeypatch):
    _force_misfit(monkeypatch, "cpython-shared-keys")
    made: list[Any] = []

    class Counted:
        def __new__(cls, *args: Any) -> Any:
            instance = super().__new__(cls)
            made.append(instance)
            return instance

    memory.share_instance_attributes(Counted, ["a", "b"])
    assert made == []
    monkeypatch.undo()
    internals.reset()
    memory.share_instance_attributes(Counted, ["a", "b"])
    assert len(made) == 1


def test_the_tls_routing_proxycommand_asks_for_the_stock_modules_with_its_reach_off(
        monkeypatch, tmp_path):
    from edgeaccess.client.profile import render_tls_routing_command

    assert "--stock" not in render_tls_routing_command(tmp_path, "127.0.0.1:3024", "root")
    internals.reset()
    _force_misfit(monkeypatch, "cpython-tls-route")
    command = render_tls_routing_command(tmp_path, "127.0.0.1:3024", "root")
    assert " --stock " in command  # tests/client/test_tlsroute.py runs it
