"""``twistd edgenode`` options of the agent port (``--agent-listen``)."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from edgeaccess import internals
from edgeaccess.node import tap


def _service(monkeypatch, tmp_path, *args):
    monkeypatch.setattr(internals, "self_check", lambda: None)
    monkeypatch.setattr(tap, "tune_for_streaming", lambda: None)
    options = tap.Options()
    options.parseOptions(["--data-dir", str(tmp_path), "--auth-server", "127.0.0.1:3025",
                          "--nodename", "node-1", *args])
    reactor = MemoryReactorClock()
    node = tap.makeService(options, reactor=reactor)
    return node, reactor


def _bound(reactor, node):
    node._agent_listen(object())
    host, port = reactor.tcpServers[-1][3], reactor.tcpServers[-1][0]
    return host, port


@pytest.mark.parametrize("args, listen, advertise", [
    ((), ("0.0.0.0", 3027), "0.0.0.0:3027"),
    (("--ssh-listen", "10.0.0.5:3022"), ("10.0.0.5", 3027), "10.0.0.5:3027"),
    (("--ssh-listen", "127.0.0.1:0"), ("127.0.0.1", 0), "127.0.0.1:0"),
    (("--ssh-listen", "10.0.0.5:3022", "--advertise-addr", "node1.lan:3022"),
     ("10.0.0.5", 3027), "node1.lan:3027"),
    (("--agent-listen", "10.0.0.6:4000"), ("10.0.0.6", 4000), "10.0.0.6:4000"),
    (("--agent-listen", "4000", "--agent-advertise-addr", "gw.lan:14000"),
     ("0.0.0.0", 4000), "gw.lan:14000"),
])
def test_the_agent_port_defaults_to_the_ssh_host_and_3027(monkeypatch, tmp_path, args, listen,
                                                          advertise):
    node, reactor = _service(monkeypatch, tmp_path, *args)
    assert node.agent_advertise == advertise
    assert _bound(reactor, node) == listen
    assert node.serves_agent  # its SSH, at least


def test_a_node_with_kubernetes_or_apps_serves_the_agent_port(monkeypatch, tmp_path):
    node, _ = _service(monkeypatch, tmp_path, "--app", "name=web,uri=http://127.0.0.1:8080")
    assert node.serves_agent
    node, _ = _service(monkeypatch, tmp_path, "--no-ssh", "--app",
                       "name=web,uri=http://127.0.0.1:8080")
    assert node.serves_agent


def test_a_node_with_nothing_to_serve_opens_no_agent_port(monkeypatch, tmp_path):
    node, _ = _service(monkeypatch, tmp_path, "--no-ssh")
    assert not node.serves_agent


@pytest.mark.parametrize("off", ["off", "OFF"])
def test_agent_listen_off_turns_the_agent_port_off(monkeypatch, tmp_path, off):
    node, _ = _service(monkeypatch, tmp_path, "--agent-listen", off, "--app",
                       "name=web,uri=http://127.0.0.1:8080")
    assert node._agent_listen is None and node.agent_advertise is None
    assert not node.serves_agent


def test_a_malformed_agent_address_is_refused():
    options = tap.Options()
    with pytest.raises(usage.UsageError, match="--agent-listen"):
        options.parseOptions(["--data-dir", "d", "--auth-server", "127.0.0.1:3025",
                              "--nodename", "node-1", "--agent-listen", "10.0.0.5:port"])
