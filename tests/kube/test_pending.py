"""The request bytes a kube hop holds while its far side is being connected."""

from __future__ import annotations

from twisted.internet.testing import StringTransport

from edgeaccess.kube.pending import PendingRequestBytes


def test_held_bytes_reach_the_far_side_in_order_when_it_is_attached() -> None:
    client, far = StringTransport(), StringTransport()
    pending = PendingRequestBytes(high_water=100)
    pending.hold(b"GET / HTTP/1.1\r\n", client)
    pending.hold(b"\r\n", client)
    assert client.producerState == "producing" and far.value() == b""
    pending.attach(client, far)
    assert far.value() == b"GET / HTTP/1.1\r\n\r\n"
    # Backpressure both ways from now on.
    assert far.producer is not None and client.producer is not None
    far.producer.pauseProducing()
    assert client.producerState == "paused"


def test_the_client_is_paused_past_the_high_water_mark_and_resumed_on_attach() -> None:
    client, far = StringTransport(), StringTransport()
    pending = PendingRequestBytes(high_water=10)
    pending.hold(b"x" * 10, client)
    assert client.producerState == "producing"
    pending.hold(b"y", client)
    assert client.producerState == "paused"
    pending.attach(client, far)
    assert client.producerState == "producing"
    assert far.value() == b"x" * 10 + b"y"


def test_discarded_bytes_are_not_written_by_a_later_attach() -> None:
    client, far = StringTransport(), StringTransport()
    pending = PendingRequestBytes()
    pending.hold(b"lost", client)
    pending.discard()
    pending.attach(client, far)
    assert far.value() == b""


def test_a_far_side_that_ends_does_not_stop_the_client() -> None:
    client, far = StringTransport(), StringTransport()
    pending = PendingRequestBytes()
    pending.attach(client, far)
    far.producer.stopProducing()  # a shim: a pooled connection outlives its user
    assert client.producerState == "producing"
