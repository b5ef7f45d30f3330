"""Fast data frames: negotiation, fallback to AMP Data boxes, and hostile frames."""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols import amp
from twisted.test import iosim

from edgeaccess.tunnel.agent import AgentTunnelProtocol
from edgeaccess.tunnel.framing import (
    FRAME_DATA,
    FRAME_WINDOW_ADJUST,
    MAX_FAST_FRAME,
    FramedBoxReader,
    data_frame,
    window_adjust_frame,
)
from edgeaccess.tunnel.protocol import FAST_DATA_CAPABILITY, MAX_FRAME, PROTOCOL_VERSION, Inventory

from tests.logwatch import LoudLog

from .support import Acceptor, Collecting, make_server_factory
from .test_channels import open_channel


def pair(agent_offers: bool = True, proxy_offers: bool = True) -> tuple:
    clock = MemoryReactorClock()
    acceptor = Acceptor()
    factory = make_server_factory(clock)
    agent = AgentTunnelProtocol(clock=clock, inventory=Inventory(name="node-1"),
                                accept_channel=acceptor)
    agent.fast_data_offered = agent_offers
    server = factory.buildProtocol(None)
    server.fast_data_offered = proxy_offers
    pump = iosim.connect(server, iosim.makeFakeServer(server), agent,
                         iosim.makeFakeClient(agent), greet=False, clock=clock)
    pump.flush(advanceClock=False)
    clock.advance(0)
    pump.flush(advanceClock=False)
    assert agent.ready.called
    return agent, server, pump, acceptor


def hello_box(capabilities: tuple[str, ...]) -> bytes:
    return amp.AmpBox(
        _command=b"Hello", _ask=b"1", protocol_version=b"%d" % PROTOCOL_VERSION,
        capabilities=b"".join(struct.pack(">H", len(c)) + c.encode() for c in capabilities),
        inventory=Inventory(name="node-1").to_json().encode(),
    ).serialize()


def fast_server(capabilities: tuple[str, ...] = (FAST_DATA_CAPABILITY,)) -> tuple:
    """A proxy-side tunnel fed raw bytes, Hello done, with channel 2 open to us."""
    clock = MemoryReactorClock()
    server = make_server_factory(clock).buildProtocol(None)
    transport = StringTransport()
    server.makeConnection(transport)
    server.dataReceived(hello_box(capabilities))
    clock.advance(0)
    transport.clear()
    factory = Collecting()
    opened: list[Any] = []
    server.connect_channel("ssh", "node-1:22", factory).addBoth(opened.append)
    (box,) = amp.parseString(transport.value())
    assert box[b"_command"] == b"OpenChannel" and box[b"channel"] == b"2"
    server.dataReceived(amp.AmpBox(_answer=box[b"_ask"], window=b"1048576").serialize())
    assert opened == [factory.built[0]]
    transport.clear()
    return server, transport, factory.built[0]


@pytest.mark.parametrize("agent_offers, proxy_offers", [(True, True), (True, False), (False, True)])
def test_bytes_flow_both_ways_with_or_without_fast_frames(agent_offers, proxy_offers) -> None:
    agent, server, pump, acceptor = pair(agent_offers, proxy_offers)
    fast = agent_offers and proxy_offers
    assert agent._fast_out is fast and server._fast_out is fast
    assert agent.fast_frames_in is fast and server.fast_frames_in is fast
    assert (FAST_DATA_CAPABILITY in agent.proxy_capabilities) is fast
    proxy_end = open_channel(server, pump)
    node_end = acceptor.protocols[0]
    rng = random.Random(3)
    down = rng.randbytes(3 * 1024 * 1024 + 17)
    up = rng.randbytes(2 * 1024 * 1024 + 5)
    proxy_end.transport.write(down)
    node_end.transport.write(up)
    pump.flush()
    assert bytes(node_end.received) == down
    assert bytes(proxy_end.received) == up


def test_data_and_credit_go_out_as_fast_frames_once_negotiated() -> None:
    server, transport, protocol = fast_server()
    protocol.transport.write(b"hello")
    assert transport.value() == data_frame(2, b"hello")
    transport.clear()
    server.dataReceived(data_frame(2, b"x" * MAX_FAST_FRAME))
    # 256 KiB delivered, below the 1 MiB window: credit is granted as a frame
    assert len(protocol.received) == MAX_FAST_FRAME
    kind, channel, credit = struct.unpack(">BII", transport.value())
    assert (kind, channel, credit) == (FRAME_WINDOW_ADJUST, 2, MAX_FAST_FRAME)


def test_without_the_capability_data_stays_in_amp_boxes() -> None:
    server, transport, protocol = fast_server(capabilities=())
    protocol.transport.write(b"hello")
    (box,) = amp.parseString(transport.value())
    assert box == {b"_command": b"Data", b"channel": b"2", b"data": b"hello"}


def test_fast_frame_without_negotiation_closes_the_tunnel() -> None:
    server, transport, protocol = fast_server(capabilities=())
    server.dataReceived(data_frame(2, b"x"))
    assert transport.disconnecting and server.closed_reason
    assert protocol.received == bytearray()


@pytest.mark.parametrize(
    "frame, reason",
    [
        (struct.pack(">BII", FRAME_DATA, 2, MAX_FAST_FRAME + 1),
         f"data frame of {MAX_FAST_FRAME + 1} bytes"),
        (struct.pack(">BII", 7, 2, 0), "unknown frame kind 7"),
        (data_frame(4, b"x"), "no channel 4"),
        (data_frame(0, b"x"), "invalid channel id 0"),
        (data_frame(2**32 - 1, b"x"), "invalid channel id 4294967295"),
        (window_adjust_frame(2, 0), "invalid window adjust 0 on channel 2"),
        (window_adjust_frame(2, 2**31), "invalid window adjust 2147483648 on channel 2"),
        (window_adjust_frame(5, 10), "no channel 5"),
    ],
    ids=["oversized", "unknown-kind", "unknown-channel", "zero-id", "huge-id",
         "zero-credit", "credit-beyond-window", "adjust-unknown-channel"],
)
def test_malformed_fast_frame_closes_the_tunnel_with_a_reason(frame: bytes, reason: str) -> None:
    server, transport, protocol = fast_server()
    server.dataReceived(frame)
    assert transport.disconnecting
    assert server.closed_reason == reason


def test_data_beyond_the_window_closes_the_tunnel() -> None:
    server, transport, protocol = fast_server()
    protocol.transport.pauseProducing()  # no credit is granted back
    for _ in range(4):
        server.dataReceived(data_frame(2, b"x" * MAX_FAST_FRAME))
    assert not transport.disconnecting
    server.dataReceived(data_frame(2, b"x"))
    assert server.closed_reason == "peer exceeded the window of channel 2"


def test_garbage_after_negotiation_is_refused_without_an_error_of_ours() -> None:
    # Nothing ever raises out of dataReceived (it logs and closes): the log
    # must stay quiet for the test to mean anything.
    rng = random.Random(11)
    with LoudLog() as loud:
        for _ in range(200):
            server, transport, protocol = fast_server()
            for _ in range(5):
                first = bytes([rng.choice([0, 1, 2, 9])])
                server.dataReceived(first + rng.randbytes(rng.randrange(1, 300)))
            assert server.closed_reason != "internal error"
    loud.assert_quiet()


class Recording(FramedBoxReader):
    """A bare reader: records strings and frames (state as in AMP's parser)."""

    MAX_LENGTH = 255
    paused = False
    state = "init"

    def __init__(self) -> None:
        self.fast_frames_in = True
        self.events: list[tuple] = []

    def stringReceived(self, string: bytes) -> None:
        self.events.append(("string", string))
        # a two-string "box": key then value, then back to a box boundary
        self.state = "value" if self.state == "init" else "init"

    def lengthLimitExceeded(self, length: int) -> None:
        self.events.append(("too-long", length))

    def fast_frame_received(self, kind: int, channel: int, value: int, payload: bytes) -> None:
        self.events.append(("frame", kind, channel, value, payload))

    def joined_events(self) -> list[tuple]:
        """Events with the pieces of each data frame joined. Two frames of
        one channel in a row would be joined too: the test streams never
        have them."""
        out: list[tuple] = []
        for event in self.events:
            if event[0] == "frame" and event[1] == FRAME_DATA:
                if out and out[-1][0] == "data" and out[-1][1] == event[2]:
                    out[-1] = ("data", event[2], out[-1][2] + event[4])
                    continue
                out.append(("data", event[2], event[4]))
                continue
            out.append(event)
        return out


def test_reader_splits_interleaved_boxes_and_frames_whatever_the_chunking() -> None:
    stream = (b"\x00\x03key\x00\x05value" + data_frame(3, b"p" * 1000)
              + window_adjust_frame(3, 77) + b"\x00\x01k\x00\x00" + data_frame(5, b"")
              + data_frame(3, b"q" * 300))
    expected = [("string", b"key"), ("string", b"value"),
                ("data", 3, b"p" * 1000),
                ("frame", FRAME_WINDOW_ADJUST, 3, 77, b""),
                ("string", b"k"), ("string", b""), ("data", 5, b""), ("data", 3, b"q" * 300)]
    rng = random.Random(5)
    for chunk_limit in (1, 2, 9, 10, 700, len(stream)):
        reader = Recording()
        position = 0
        while position < len(stream):
            size = rng.randrange(1, chunk_limit + 1)
            reader.feed(stream[position:position + size])
            position += size
        assert reader.joined_events() == expected, chunk_limit
        pieces = [e for e in reader.events if e[0] == "frame" and e[1] == FRAME_DATA]
        assert all(e[3] == len(e[4]) for e in pieces)  # value is the piece's length
        assert all(e[4] for e in pieces if e[2] == 3)  # no empty piece of a non-empty frame


def test_a_payload_is_handed_on_as_it_arrives() -> None:
    reader = Recording()
    frame = data_frame(7, bytes(range(200)))
    reader.feed(frame[:50])  # header and 41 payload bytes
    assert reader.events == [("frame", FRAME_DATA, 7, 41, bytes(range(41)))]
    rest = frame[50:] + window_adjust_frame(7, 5)
    reader.feed(rest)
    assert reader.events[1] == ("frame", FRAME_DATA, 7, 159, bytes(range(41, 200)))
    assert reader.events[2] == ("frame", FRAME_WINDOW_ADJUST, 7, 5, b"")


def test_a_read_inside_one_payload_is_passed_on_without_a_copy() -> None:
    reader = Recording()
    reader.feed(data_frame(1, b"a" * 100_000)[:9])
    middle = b"a" * 60_000
    reader.feed(middle)
    assert reader.events[-1][4] is middle


def test_fast_tls_leaves_other_transports_alone() -> None:
    from edgeaccess.tunnel.fasttls import install_fast_tls

    transport = StringTransport()
    assert install_fast_tls(transport) is False
    assert "_write" not in vars(transport)


@pytest.mark.parametrize("fast, limit", [(True, MAX_FAST_FRAME), (False, MAX_FRAME)])
def test_frames_never_exceed_the_negotiated_frame_size(fast: bool, limit: int) -> None:
    agent, server, pump, acceptor = pair(agent_offers=fast, proxy_offers=fast)
    sizes: list[int] = []
    original = agent.mux.data_received

    def spy(channel_id: int, data: bytes) -> None:
        sizes.append(len(data))
        original(channel_id, data)

    agent.mux.data_received = spy
    proxy_end = open_channel(server, pump)
    payload = bytes(range(256)) * ((3 * limit + 10) // 256 + 1)
    proxy_end.transport.write(payload)
    pump.flush()
    assert max(sizes) == limit and sum(sizes) == len(payload)
    node_end = acceptor.protocols[-1]
    assert bytes(node_end.received) == payload
