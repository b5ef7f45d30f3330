"""Hello, identities, and the guards against malformed or hostile boxes."""

from __future__ import annotations

import random

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols import amp
from twisted.test import iosim

from edgeaccess.errors import AccessDenied, BadRequest
from edgeaccess.pki.x509ca import Identity
from edgeaccess.tunnel import agent as agent_module
from edgeaccess.tunnel.agent import AgentTunnelProtocol
from edgeaccess.tunnel.protocol import (
    MAX_BOX_BYTES,
    PROTOCOL_VERSION,
    App,
    Hello,
    Inventory,
)

from tests.logwatch import LoudLog

from .support import NODE, connected_pair, make_server_factory


def hello_box(name: str = "node-1", version: int = PROTOCOL_VERSION) -> bytes:
    inventory = Inventory(name=name).to_json()
    return amp.AmpBox(
        _command=b"Hello",
        _ask=b"1",
        protocol_version=b"%d" % version,
        capabilities=b"",
        inventory=inventory.encode(),
    ).serialize()


def raw_server(identity: Identity = NODE) -> tuple:
    """A proxy-side tunnel fed raw bytes through a StringTransport."""
    clock = MemoryReactorClock()
    factory = make_server_factory(clock, identity)
    server = factory.buildProtocol(None)
    transport = StringTransport()
    server.makeConnection(transport)
    return server, transport, factory, clock


def test_inventory_round_trips_through_json() -> None:
    inventory = Inventory(
        name="node-1",
        labels={"env": "prod"},
        kube_clusters=("k1",),
        apps=(App(name="grafana", uri="http://127.0.0.1:3000", labels={"team": "ops"}),),
    )
    assert Inventory.from_json(inventory.to_json()) == inventory


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"name": ""}',
        '{"name": "a b"}',
        '{"name": "n", "labels": {"k": 1}}',
        '{"name": "n", "labels": []}',
        '{"name": "n", "apps": [{"name": "../x"}]}',
        '{"name": "n", "kube_clusters": "k"}',
    ],
)
def test_malformed_inventory_is_refused(text: str) -> None:
    with pytest.raises(BadRequest):
        Inventory.from_json(text)


def test_hello_registers_agent_by_name_and_uuid() -> None:
    agent, server, pump, factory = connected_pair(
        inventory=Inventory(name="node-1", labels={"env": "dev"})
    )
    assert agent.ready.called
    assert factory.registry.lookup("root", "node-1") is server
    assert factory.registry.lookup("root", "uuid-1") is server
    assert factory.registry.lookup("other", "node-1") is None
    assert factory.registry.connected() == [server]
    assert server.inventory.labels == {"env": "dev"}


def test_registry_forgets_a_closed_tunnel_and_tells_subscribers() -> None:
    agent, server, pump, factory = connected_pair()
    events = []
    factory.registry.subscribe(lambda t: events.append(("up", t)), lambda t: events.append(("down", t)))
    agent.disconnect("test")
    pump.flush()
    assert factory.registry.lookup("root", "node-1") is None
    assert events == [("down", server)]


def test_hello_with_another_nodes_name_is_refused() -> None:
    agent, server, pump, factory = connected_pair(inventory=Inventory(name="node-2"))
    failures = []
    agent.ready.addErrback(failures.append)
    pump.flush()
    assert failures and failures[0].check(AccessDenied)
    assert "node-1" in str(failures[0].value) and "node-2" in str(failures[0].value)
    assert factory.registry.connected() == []
    assert server.when_lost().called and agent.when_lost().called


def test_user_identity_may_not_open_a_tunnel() -> None:
    user = Identity(kind="user", name="alice", cluster="root")
    server, transport, factory, clock = raw_server(user)
    server.dataReceived(hello_box("alice"))
    clock.advance(0)
    assert transport.disconnecting
    assert b"ACCESS_DENIED" in transport.value()
    assert factory.registry.connected() == []


def test_version_mismatch_is_refused_with_a_clear_message_by_the_proxy(monkeypatch) -> None:
    monkeypatch.setattr(agent_module, "PROTOCOL_VERSION", PROTOCOL_VERSION + 1)
    agent, server, pump, factory = connected_pair()
    failures = []
    agent.ready.addErrback(failures.append)
    assert failures and failures[0].check(BadRequest)
    message = str(failures[0].value)
    assert f"version {PROTOCOL_VERSION + 1} is not supported" in message
    assert f"speaks version {PROTOCOL_VERSION}" in message
    assert factory.registry.connected() == []
    assert server.when_lost().called


class FutureProxy(amp.AMP):
    """A proxy from the future, answering Hello with version 99."""

    @Hello.responder
    def hello(self, protocol_version, capabilities, inventory):
        return {"protocol_version": 99, "capabilities": [], "heartbeat_interval": 30.0}


def test_version_mismatch_is_refused_with_a_clear_message_by_the_agent() -> None:
    clock = MemoryReactorClock()
    agent = AgentTunnelProtocol(clock=clock, inventory=Inventory(name="node-1"))
    proxy = FutureProxy()
    pump = iosim.connect(proxy, iosim.makeFakeServer(proxy), agent, iosim.makeFakeClient(agent), greet=False)
    failures = []
    agent.ready.addErrback(failures.append)
    pump.flush()
    assert failures and failures[0].check(BadRequest)
    assert "version 99" in str(failures[0].value)
    assert agent.when_lost().called


def test_command_before_hello_closes_the_tunnel() -> None:
    server, transport, factory, clock = raw_server()
    box = amp.AmpBox(_command=b"OpenChannel", _ask=b"1", channel=b"1", kind=b"auth", target=b"", window=b"100")
    server.dataReceived(box.serialize())
    assert transport.disconnecting
    assert b"PROTOCOL_ERROR" in transport.value()
    assert "before Hello" in server.closed_reason


@pytest.mark.parametrize("command", [b"Reconnect", b"Discover", b"StartTLS", b"NoSuchCommand"])
def test_command_not_meant_for_agents_closes_the_tunnel(command: bytes) -> None:
    server, transport, factory, clock = raw_server()
    server.dataReceived(hello_box())
    assert not transport.disconnecting
    transport.clear()
    server.dataReceived(amp.AmpBox(_command=command, _ask=b"2", delay=b"0", reason=b"x").serialize())
    assert transport.disconnecting
    assert b"PROTOCOL_ERROR" in transport.value()
    assert "not allowed" in server.closed_reason


def test_second_hello_closes_the_tunnel() -> None:
    server, transport, factory, clock = raw_server()
    server.dataReceived(hello_box())
    server.dataReceived(hello_box())
    assert transport.disconnecting


@pytest.mark.parametrize(
    "box",
    [
        amp.AmpBox(_command=b"Data", channel=b"abc", data=b"x"),
        amp.AmpBox(_command=b"Data", channel=b"1"),
        amp.AmpBox(_command=b"Data", channel=b"0", data=b"x"),
        amp.AmpBox(_command=b"Data", channel=b"99", data=b"x"),
        amp.AmpBox(_command=b"WindowAdjust", channel=b"1", credit=b"-5"),
        amp.AmpBox(_command=b"EndOfFile", channel=b"-1"),
        amp.AmpBox(_command=b"OpenChannel", _ask=b"5", channel=b"2", kind=b"auth", target=b"", window=b"10"),
        amp.AmpBox(_answer=b"12345"),
        amp.AmpBox(_error=b"777", _error_code=b"X", _error_description=b"y"),
        amp.AmpBox(nothing=b"here"),
    ],
    ids=[
        "non-integer-id", "missing-data", "zero-id", "unknown-channel", "negative-credit",
        "negative-id", "even-id-from-agent", "unknown-answer", "unknown-error", "no-command",
    ],
)
def test_malformed_box_closes_the_tunnel_without_raising(box: amp.AmpBox) -> None:
    server, transport, factory, clock = raw_server()
    server.dataReceived(hello_box())
    server.dataReceived(box.serialize())
    assert transport.disconnecting
    assert server.closed_reason


def test_box_with_too_many_keys_closes_the_tunnel() -> None:
    server, transport, factory, clock = raw_server()
    box = amp.AmpBox({b"k%d" % i: b"v" for i in range(40)})
    server.dataReceived(box.serialize())
    assert transport.disconnecting
    assert server.closed_reason == "box with too many keys"


def test_oversized_box_closes_the_tunnel() -> None:
    server, transport, factory, clock = raw_server()
    value = b"x" * 65000
    box = amp.AmpBox(_command=b"Hello", a=value, b=value)
    assert len(box.serialize()) > MAX_BOX_BYTES
    server.dataReceived(box.serialize())
    assert transport.disconnecting
    assert server.closed_reason == "oversized box"


def test_overlong_key_closes_the_tunnel() -> None:
    server, transport, factory, clock = raw_server()
    server.dataReceived(b"\x01\x00" + b"k" * 256)
    assert transport.disconnecting


def test_garbage_is_refused_without_an_error_of_ours() -> None:
    # dataReceived never lets an exception out (it logs it and closes the
    # tunnel), so "nothing raised" proves nothing: the log must be quiet too,
    # and every closed tunnel must say which rule the bytes broke.
    rng = random.Random(7)
    with LoudLog() as loud:
        for _ in range(200):
            server, transport, factory, clock = raw_server()
            server.dataReceived(hello_box())
            for _ in range(5):
                server.dataReceived(rng.randbytes(rng.randrange(1, 300)))
            assert server.closed_reason != "internal error"
            assert not transport.disconnecting or server.closed_reason
    loud.assert_quiet()


def test_boxes_with_garbled_arguments_are_refused_without_an_error_of_ours() -> None:
    rng = random.Random(8)
    commands = [b"Hello", b"Heartbeat", b"OpenChannel", b"CloseChannel", b"Data",
                b"WindowAdjust", b"EndOfFile"]
    keys = [b"channel", b"kind", b"target", b"window", b"source", b"data", b"credit",
            b"reason", b"protocol_version", b"capabilities", b"inventory", b"_ask"]
    values = [b"", b"0", b"1", b"3", b"-1", b"abc", b"\xff\xfe", b"99999999999999999999",
              b"\x00\x05ab", b"ssh", b"nan", b"{}"]
    with LoudLog() as loud:
        for _ in range(300):
            server, transport, factory, clock = raw_server()
            server.dataReceived(hello_box())
            box = amp.AmpBox(_command=rng.choice(commands))
            for key in rng.sample(keys, rng.randrange(0, 6)):
                box[key] = rng.choice(values)
            server.dataReceived(box.serialize())
            clock.advance(0)
            assert server.closed_reason != "internal error"
    loud.assert_quiet()


def test_bytes_after_a_violation_are_ignored() -> None:
    server, transport, factory, clock = raw_server()
    server.dataReceived(hello_box())
    bad = amp.AmpBox(_command=b"Data", channel=b"99", data=b"x").serialize()
    transport.clear()
    server.dataReceived(bad + hello_box())
    assert transport.value() == b""
