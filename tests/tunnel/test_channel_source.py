"""The user's address through the tunnel: OpenChannel's optional ``source``."""

from __future__ import annotations

from typing import Any

import pytest

from edgeaccess.errors import AccessDenied, BadRequest
from edgeaccess.tunnel.channels import TunnelAddress
from edgeaccess.tunnel.endpoints import TunnelChannelEndpoint
from edgeaccess.tunnel.protocol import (
    DEFAULT_WINDOW,
    OpenChannel,
    check_source,
    format_source,
    parse_source,
)

from .support import Acceptor, Collecting, connected_pair

MALFORMED = [
    "",
    "tunnel",
    "127.0.0.1",
    "127.0.0.1:",
    "127.0.0.1:65536",
    "127.0.0.1:-1",
    "127.0.0.1:22x",
    "host.example:22",
    "2001:db8::1:22",  # IPv6 without brackets
    "[2001:db8::1]",
    "127.0.0.1:22\n",
    "1" * 60 + ".0.0.1:22",
    "[" + "1" * 70 + "]:22",
]


def pair() -> tuple:
    acceptor = Acceptor()
    agent, server, pump, factory = connected_pair(accept_channel=acceptor)
    return agent, server, pump, acceptor, factory


def connect(endpoint: Any, pump: Any) -> Any:
    results: list[Any] = []
    endpoint.connect(Collecting()).addBoth(results.append)
    pump.flush()
    assert results, "connect did not complete"
    return results[0]


def test_the_source_a_proxy_gives_is_the_peer_address_at_the_node() -> None:
    agent, server, pump, acceptor, _ = pair()
    connect(TunnelChannelEndpoint(server, "ssh", "uuid-1", source="203.0.113.7:52100"), pump)
    [node_end] = acceptor.protocols
    peer = node_end.transport.getPeer()
    assert (peer.host, peer.port, peer.source) == ("203.0.113.7", 52100, "203.0.113.7:52100")
    assert (peer.kind, peer.target) == ("ssh", "uuid-1")


def test_an_ipv6_source_is_carried() -> None:
    agent, server, pump, acceptor, _ = pair()
    connect(TunnelChannelEndpoint(server, "ssh", "uuid-1", source="[2001:db8::7]:2200"), pump)
    peer = acceptor.protocols[0].transport.getPeer()
    assert (peer.host, peer.port) == ("2001:db8::7", 2200)


def test_without_a_source_the_peer_is_the_tunnel_and_the_channel_id() -> None:
    agent, server, pump, acceptor, _ = pair()
    connect(TunnelChannelEndpoint(server, "ssh", "uuid-1"), pump)
    transport = acceptor.protocols[0].transport
    peer = transport.getPeer()
    assert (peer.host, peer.port, peer.source) == ("tunnel", transport.id, None)


def test_each_channel_keeps_its_own_source() -> None:
    agent, server, pump, acceptor, _ = pair()
    for source in ("192.0.2.1:1000", None, "192.0.2.2:2000"):
        connect(TunnelChannelEndpoint(server, "ssh", "uuid-1", source=source), pump)
    assert [p.transport.getPeer().host for p in acceptor.protocols] == [
        "192.0.2.1", "tunnel", "192.0.2.2"]


@pytest.mark.parametrize("source", MALFORMED)
def test_a_malformed_source_from_the_proxy_refuses_the_channel(source: str) -> None:
    agent, server, pump, acceptor, _ = pair()
    results: list[Any] = []
    # Sent as raw OpenChannel, past the opener's own check: the node checks too.
    server.call(OpenChannel, channel=2, kind="ssh", target="uuid-1",
                window=DEFAULT_WINDOW, source=source).addBoth(results.append)
    pump.flush()
    assert results[0].check(BadRequest)
    assert acceptor.protocols == [] and not agent.mux.channels
    # The tunnel itself survives the refusal.
    connect(TunnelChannelEndpoint(server, "ssh", "uuid-1", source="192.0.2.9:9"), pump)
    assert acceptor.protocols[0].transport.getPeer().host == "192.0.2.9"


@pytest.mark.parametrize("source", ["127.0.0.1", "tunnel", "10.0.0.1:99999"])
def test_the_opener_refuses_a_malformed_source_before_sending(source: str) -> None:
    agent, server, pump, acceptor, _ = pair()
    failure = connect(TunnelChannelEndpoint(server, "ssh", "uuid-1", source=source), pump)
    assert failure.check(BadRequest)
    assert acceptor.requests == []


def test_an_agent_may_not_assert_a_source() -> None:
    agent, server, pump, acceptor, factory = pair()
    proxy_acceptor = Acceptor()
    factory.accept_channel = proxy_acceptor
    failure = connect(TunnelChannelEndpoint(agent, "auth", "", source="127.0.0.1:22"), pump)
    assert failure.check(AccessDenied)
    assert proxy_acceptor.protocols == []
    # Without a source the same channel opens: only the assertion is refused.
    opened = connect(TunnelChannelEndpoint(agent, "auth", ""), pump)
    assert opened.transport is not None
    assert proxy_acceptor.protocols[0].transport.getPeer().host == "tunnel"


def test_an_absent_source_is_left_out_of_the_box_for_older_peers() -> None:
    arguments = dict(channel=2, kind="ssh", target="t", window=1)
    box = OpenChannel.makeArguments({**arguments, "source": None}, None)
    assert b"source" not in box
    assert OpenChannel.makeArguments({**arguments, "source": "192.0.2.1:5"}, None)[
        b"source"] == b"192.0.2.1:5"


@pytest.mark.parametrize("source", MALFORMED)
def test_check_source_refuses_what_is_not_an_ip_and_a_port(source: str) -> None:
    with pytest.raises(BadRequest):
        check_source(source)


@pytest.mark.parametrize("host, port, text", [
    ("127.0.0.1", 40000, "127.0.0.1:40000"),
    ("::1", 22, "[::1]:22"),
    ("tunnel", 3, None),
    ("127.0.0.1", 70000, None),
])
def test_format_source_round_trips_through_parse_source(host: str, port: int,
                                                        text: str | None) -> None:
    assert format_source(host, port) == text
    if text is not None:
        assert parse_source(text) == (host, port)
        assert check_source(text) == text


def test_an_address_without_source_reads_as_before() -> None:
    address = TunnelAddress("proxy", "ssh", "n", 4)
    assert (address.host, address.port) == ("tunnel", 4)
