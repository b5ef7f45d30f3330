"""HTTP/1.1 framing of the Kubernetes proxy and agent (edgeaccess.kube.http1)."""

from __future__ import annotations

import pytest

from edgeaccess.kube import http1


class Sink:
    def __init__(self) -> None:
        self.events: list = []

    def message_head(self, head, raw):
        self.events.append(("head", head.start, raw))

    def message_body(self, data):
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + data)
        else:
            self.events.append(("body", data))

    def message_end(self):
        self.events.append(("end",))


def feed_bytewise(reader, data: bytes) -> None:
    for i in range(len(data)):
        reader.feed(data[i:i + 1])


@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-by-byte"])
def test_requests_with_length_and_chunked_bodies_pass_through_unchanged(split):
    wire = (b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
            b"PATCH /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;x=y\r\nabc\r\n0\r\nTrailer: 1\r\n\r\n")
    sink = Sink()
    reader = http1.MessageReader(True, sink)
    (feed_bytewise if split else http1.MessageReader.feed)(reader, wire)
    assert sink.events[0][1] == (b"POST", b"/a", b"HTTP/1.1")
    assert sink.events[1] == ("body", b"hello")
    assert sink.events[2] == ("end",)
    # The second request waits until the first one's answer is out.
    assert len(sink.events) == 3
    reader.release()
    assert sink.events[3][1] == (b"PATCH", b"/b", b"HTTP/1.1")
    assert sink.events[4] == ("body", b"3;x=y\r\nabc\r\n0\r\nTrailer: 1\r\n\r\n")
    assert sink.events[5] == ("end",)


def test_responses_without_body_until_close_and_after_an_upgrade():
    sink = Sink()
    methods = iter([b"HEAD", b"GET", b"GET"])
    current = {"m": b"GET"}

    def method():
        return current["m"]

    reader = http1.MessageReader(False, sink, request_method=method)
    current["m"] = next(methods)
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")  # HEAD: no body
    assert sink.events[-1] == ("end",)
    current["m"] = next(methods)
    reader.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n"
                b"Upgrade: websocket\r\n\r\n\x81\x00raw")
    assert reader.raw
    assert sink.events[-1] == ("body", b"\x81\x00raw")
    sink2 = Sink()
    until_close = http1.MessageReader(False, sink2)
    until_close.feed(b"HTTP/1.1 200 OK\r\n\r\nstream")
    assert until_close.until_close and until_close.finish()
    assert sink2.events[-1] == ("end",)


@pytest.mark.parametrize("wire, status", [
    (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 400),
    (b"GET /\x7f HTTP/1.1\r\nX: \x01\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 70000 + b"\r\n\r\n", 431),
])
def test_malformed_or_ambiguous_requests_are_refused(wire, status):
    reader = http1.MessageReader(True, Sink())
    with pytest.raises(http1.HTTPError) as raised:
        reader.feed(wire)
    assert raised.value.status == status


def test_a_status_answer_is_a_kubernetes_status_object():
    import json

    raw = http1.status_response(403, "no", close=True)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden") and b"Connection: close" in head
    assert json.loads(body) == {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Failure", "message": "no", "reason": "Forbidden",
                                "code": 403}
