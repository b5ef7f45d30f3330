"""The streaming HTTP/1.1 reader of the Kubernetes and app relays (edgeaccess.httpwire):
framing, limits, smuggling refusals, holds, interim answers, upgrades."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeaccess import httpwire as http1
from edgeaccess.kube.status import status_response


class Recorder:
    def __init__(self, request: bool = True, method: bytes = b"GET") -> None:
        self.events: list = []
        self.request = request
        self.method = method

    def message_head(self, head, raw):
        assert raw.endswith(b"\r\n\r\n") and http1.parse_head(raw[:-4], self.request).start \
            == head.start
        self.events.append(("head", head.start, list(head.headers)))
        if self.request:
            return http1.request_framing(head)
        return http1.response_framing(head, self.method)

    def message_body(self, data):
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + data)
        else:
            self.events.append(("body", data))

    def message_end(self):
        self.events.append(("end",))

    def raw(self, data):
        self.events.append(("raw", data))


def feed(data: bytes, request: bool = True, pieces: int = 1) -> list:
    recorder = Recorder(request)
    reader = http1.MessageReader(request=request, handler=recorder)
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        reader.feed(data[i:i + step])
    return recorder.events


def test_requests_with_length_and_chunked_bodies_are_passed_on_as_framed():
    stream = (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
              b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"3;ext=1\r\nabc\r\n0\r\nTrailer: t\r\n\r\n"
              b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
    for pieces in (1, 7, len(stream)):
        events = feed(stream, pieces=pieces)
        assert [e[0] for e in events] == ["head", "body", "end", "head", "body", "end",
                                          "head", "end"]
        assert events[1] == ("body", b"hello")
        assert events[4] == ("body", b"3;ext=1\r\nabc\r\n0\r\nTrailer: t\r\n\r\n")
        assert events[6][1] == (b"GET", b"/c", b"HTTP/1.1")


@pytest.mark.parametrize("head, status", [
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nBad Name: a\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET  / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET /\x7f HTTP/1.1\r\nX: \x01\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\nb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + b"X: a\r\n" * 130 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * (70 * 1024) + b"\r\n\r\n", 431),
])
def test_malformed_or_smuggling_requests_are_refused(head, status):
    with pytest.raises(http1.BadMessage) as caught:
        feed(head)
    assert caught.value.status == status


def test_a_head_without_end_is_refused_once_too_large():
    recorder = Recorder()
    reader = http1.MessageReader(request=True, handler=recorder)
    reader.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(http1.BadMessage) as caught:
        for _ in range(100):
            reader.feed(b"X-Filler: " + b"a" * 1000 + b"\r\n")
    assert caught.value.status == 431


def test_response_framing_depends_on_the_request():
    recorder = Recorder(request=False, method=b"HEAD")
    reader = http1.MessageReader(request=False, handler=recorder)
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert recorder.events[-1] == ("end",)  # a HEAD response has no body
    recorder = Recorder(request=False)
    reader = http1.MessageReader(request=False, handler=recorder)
    reader.feed(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
    assert recorder.events[-1] == ("body", b"until close")
    assert reader.eof() is True
    assert recorder.events[-1] == ("end",)


def test_hold_keeps_bytes_until_released_or_switched_to_raw():
    recorder = Recorder()
    reader = http1.MessageReader(request=True, handler=recorder)
    reader.feed(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
    reader.hold()
    reader.feed(b"\x81\x05hello")
    assert [e[0] for e in recorder.events] == ["head", "end"]
    reader.switch_to_raw()
    reader.feed(b"more")
    assert recorder.events[-2:] == [("raw", b"\x81\x05hello"), ("raw", b"more")]
    recorder = Recorder()
    reader = http1.MessageReader(request=True, handler=recorder)
    reader.feed(b"GET /a HTTP/1.1\r\n\r\n")
    reader.hold()
    reader.feed(b"GET /b HTTP/1.1\r\n\r\n")
    assert len([e for e in recorder.events if e[0] == "head"]) == 1
    reader.release()
    assert len([e for e in recorder.events if e[0] == "head"]) == 2


def test_header_rewriting_helpers():
    head = http1.parse_head(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\n"
                            b"edge-jwt-assertion: x", request=True)
    head.remove_if(lambda name: name.startswith(b"x-forwarded-") or name == b"edge-jwt-assertion")
    head.set(b"Host", b"b")
    assert head.serialize() == b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=50))
def test_arbitrary_bytes_never_crash_the_reader(data, pieces):
    try:
        feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + data, pieces=pieces)
        feed(data, pieces=pieces)
        feed(data, request=False, pieces=pieces)
    except http1.BadMessage:
        pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8), st.integers(1, 40))
def test_chunked_bodies_pass_through_unchanged(chunks, pieces):
    body = b"".join(b"%x\r\n" % len(c) + c + b"\r\n" for c in chunks) + b"0\r\n\r\n"
    events = feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + body,
                  pieces=pieces)
    assert events[1] == ("body", body)
    assert events[-1] == ("end",)


def test_a_held_reader_keeps_the_next_request_until_released():
    """The Kubernetes relays answer one request at a time: they hold the reader
    in each head and release it when the answer is out."""
    class Holding(Recorder):
        reader = None

        def message_head(self, head, raw):
            self.reader.hold()
            return super().message_head(head, raw)

    wire = (b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
            b"PATCH /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;x=y\r\nabc\r\n0\r\nTrailer: 1\r\n\r\n")
    for step in (len(wire), 1):
        recorder = Holding()
        reader = recorder.reader = http1.MessageReader(request=True, handler=recorder)
        for i in range(0, len(wire), step):
            reader.feed(wire[i:i + step])
        assert [e[0] for e in recorder.events] == ["head", "body", "end"]
        assert reader.idle is False  # the next request is buffered
        reader.release()
        assert recorder.events[3][1] == (b"PATCH", b"/b", b"HTTP/1.1")
        assert recorder.events[4] == ("body", b"3;x=y\r\nabc\r\n0\r\nTrailer: 1\r\n\r\n")
        assert recorder.events[5] == ("end",)
        reader.release()
        assert reader.idle


def test_too_much_data_behind_a_held_request_is_refused():
    recorder = Recorder()
    reader = http1.MessageReader(request=True, handler=recorder, max_head=1024)
    reader.feed(b"GET / HTTP/1.1\r\n\r\n")
    reader.hold()
    with pytest.raises(http1.BadMessage) as caught:
        for _ in range(10):
            reader.feed(b"x" * 1000)
    assert caught.value.status == 400


def test_interim_answers_go_to_the_handler_and_an_upgrade_switches_to_raw():
    class Upgrading(Recorder):
        reader = None

        def interim(self, head, raw):
            self.events.append(("interim", raw))

        def message_head(self, head, raw):
            framing = super().message_head(head, raw)
            if head.status == 101:
                self.reader.switch_to_raw()
            return framing

    recorder = Upgrading(request=False)
    reader = recorder.reader = http1.MessageReader(request=False, handler=recorder)
    reader.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n"
                b"Upgrade: websocket\r\n\r\n\x81\x00raw")
    assert recorder.events[0] == ("interim", b"HTTP/1.1 100 Continue\r\n\r\n")
    assert recorder.events[1][1] == (b"HTTP/1.1", b"101", b"Switching Protocols")
    assert recorder.events[2:] == [("raw", b"\x81\x00raw")]  # no end: the stream goes on
    assert reader.raw
    reader.feed(b"more")
    assert recorder.events[-1] == ("raw", b"more")


@pytest.mark.parametrize("wire", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
    b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
])
def test_malformed_or_ambiguous_responses_are_refused(wire):
    with pytest.raises(http1.BadMessage):
        feed(wire, request=False)


def test_a_response_with_another_last_coding_is_read_until_close():
    events = feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc",
                  request=False)
    assert events[-1] == ("body", b"abc")


def test_a_status_answer_is_a_kubernetes_status_object():
    import json

    raw = status_response(403, "no", close=True)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden") and b"Connection: close" in head
    assert json.loads(body) == {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Failure", "message": "no", "reason": "Forbidden",
                                "code": 403}


class _Owner:
    """Records what an AnswerReader hands on."""

    def __init__(self, method=b"GET") -> None:
        self.method = method
        self.calls: list = []

    def request_method(self):
        return self.method

    def answer_head(self, head, raw):
        self.calls.append(("head", head.status, raw))

    def answer_body(self, data):
        self.calls.append(("body", data))

    def answer_raw(self, data):
        self.calls.append(("raw", data))

    def answer_end(self):
        self.calls.append(("end",))

    def answer_flush(self):
        self.calls.append(("flush",))

    def answer_garbage(self, error, head_sent):
        self.calls.append(("garbage", error.status, head_sent))

    def answer_lost(self, clean):
        self.calls.append(("lost", clean))


def _answer_reader(owner):
    from twisted.internet.testing import StringTransport

    reader = http1.AnswerReader()
    reader.makeConnection(StringTransport())
    reader.attach(owner)
    return reader


def test_an_answer_reader_hands_on_interim_answers_heads_bodies_and_the_end():
    owner = _Owner()
    reader = _answer_reader(owner)
    reader.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                        b"\r\nok")
    assert owner.calls == [("body", b"HTTP/1.1 100 Continue\r\n\r\n"),
                           ("head", 200, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"),
                           ("body", b"ok"), ("end",), ("flush",)]
    owner.calls.clear()
    owner.method = b"HEAD"
    reader.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert owner.calls == [("head", 200, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
                           ("end",), ("flush",)]


def test_an_answer_reader_goes_raw_after_a_101_and_reports_a_clean_end():
    owner = _Owner()
    reader = _answer_reader(owner)
    reader.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\nabc")
    reader.dataReceived(b"def")
    assert owner.calls[1:] == [("raw", b"abc"), ("flush",), ("raw", b"def"), ("flush",)]
    owner = _Owner()
    reader = _answer_reader(owner)
    reader.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nstream")
    reader.connectionLost(None)
    assert owner.calls[-2:] == [("end",), ("lost", True)]


def test_an_answer_reader_detaches_its_owner_on_garbage():
    owner = _Owner()
    reader = _answer_reader(owner)
    reader.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert owner.calls == [("garbage", 400, False)]
    assert reader.owner is None and reader.transport.disconnecting
    reader.connectionLost(None)
    assert owner.calls == [("garbage", 400, False)]  # told once


_NAME = st.one_of(st.sampled_from([b"Host", b"content-length", b"X-A", b"", b"a b", b"\x0b",
                                   b"a\x7f"]), st.binary(max_size=4))
_VALUE = st.one_of(st.sampled_from([b" v ", b"\tv", b"a:b", b"\xff", b"", b"\x0b", b"\x00",
                                    b"\x7f", b"x\ry", b"x\ny", b"\x1f", b"\x0c"]),
                   st.binary(max_size=4))
_SEPARATOR = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"\r\n "])
_START = st.sampled_from([b"GET / HTTP/1.1", b"HTTP/1.1 200 OK", b"HTTP/1.0 404", b"GET  / HTTP/1.1",
                          b"GET /\x0b HTTP/1.1", b"HTTP/1.1 200 O\x0bK", b"HTTP/1.1 200 O\tK",
                          b"GET / HTTP/2", b""])


@settings(max_examples=600, deadline=None)
@given(_START, st.lists(st.tuples(_SEPARATOR, _NAME, st.sampled_from([b":", b"", b" :"]),
                                  _VALUE), max_size=6), st.booleans())
def test_the_one_match_path_parses_as_the_line_by_line_one(start, fields, request):
    """parse_head's fast path (one match of every header line) accepts and
    reads exactly what the line-by-line checks do, and refuses the rest with
    their answer."""
    raw = start + b"".join(b"".join(field) for field in fields)
    try:
        expected = http1._parse_head_by_line(raw, request)
    except http1.BadMessage as e:
        with pytest.raises(http1.BadMessage) as refused:
            http1.parse_head(raw, request)
        assert (refused.value.status, refused.value.message) == (e.status, e.message)
    else:
        head = http1.parse_head(raw, request)
        assert (head.start, head.headers) == (expected.start, expected.headers)


def test_header_lookups_ignore_case_and_the_fast_path_counts_fields():
    head = http1.parse_head(b"GET / HTTP/1.1\r\nHOST: a\r\nContent-Length: 0\r\nhost: b",
                               True)
    assert head.get(b"Host") == b"a" and head.get_all(b"host") == [b"a", b"b"]
    assert head.get(b"hos") is None and head.get_all(b"content-length") == [b"0"]
    many = b"GET / HTTP/1.1" + b"\r\nx: y" * (http1.MAX_HEADERS + 1)
    with pytest.raises(http1.BadMessage) as refused:
        http1.parse_head(many, True)
    assert refused.value.status == 431
    assert len(http1.parse_head(b"GET / HTTP/1.1" + b"\r\nx: y" * http1.MAX_HEADERS,
                                   True).headers) == http1.MAX_HEADERS


def test_every_byte_in_a_name_value_or_start_line_is_judged_alike_by_both_paths():
    for byte in range(256):
        b = bytes([byte])
        for raw, request in ((b"GET / HTTP/1.1\r\nX-A: v" + b + b"w", True),
                             (b"GET / HTTP/1.1\r\nX" + b + b"A: v", True),
                             (b"GET /" + b + b" HTTP/1.1\r\nX-A: v", True),
                             (b"HTTP/1.1 200 O" + b + b"K\r\nX-A: v", False)):
            try:
                expected = http1._parse_head_by_line(raw, request)
            except http1.BadMessage as e:
                with pytest.raises(http1.BadMessage) as refused:
                    http1.parse_head(raw, request)
                assert (refused.value.status, refused.value.message) == (e.status, e.message)
            else:
                head = http1.parse_head(raw, request)
                assert (head.start, head.headers) == (expected.start, expected.headers), raw
