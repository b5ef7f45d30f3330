"""SPDY/3.1 for the Kubernetes API stand-in: exec/attach fallback and port-forward.

What kubelet's side of ``k8s.io/apimachinery/pkg/util/httpstream/spdy`` does,
enough for kubectl 1.32: the server answers the client's SYN_STREAMs, reads
their ``streamtype`` (``error``, ``stdin``, ``stdout``, ``stderr``, ``resize``;
``data``/``error`` with ``port`` and ``requestID`` for port-forward), and
exchanges DATA frames on them. Header blocks are zlib-compressed with the
SPDY/3 dictionary, one compression context per direction. Used over a plain
upgraded connection (``Upgrade: SPDY/3.1``) and inside WebSocket messages
(``SPDY/3.1+portforward.k8s.io``).
"""

from __future__ import annotations

import json
import struct
import zlib

from twisted.internet import protocol
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.protocols.policies import ProtocolWrapper

from edgeaccess.kube.spdy import DICTIONARY  # noqa: E402  (the SPDY/3 dictionary)

SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = (
    1, 2, 3, 4, 6, 7, 8, 9)
FLAG_FIN = 0x01
MAX_DATA = 32 * 1024


def _header_block(headers: dict[str, str]) -> bytes:
    out = struct.pack(">I", len(headers))
    for name, value in headers.items():
        out += struct.pack(">I", len(name)) + name.encode()
        out += struct.pack(">I", len(value)) + value.encode()
    return out


def _parse_header_block(data: bytes) -> dict[str, str]:
    count = struct.unpack(">I", data[:4])[0]
    offset, headers = 4, {}
    for _ in range(count):
        n = struct.unpack(">I", data[offset:offset + 4])[0]
        name = data[offset + 4:offset + 4 + n].decode()
        offset += 4 + n
        n = struct.unpack(">I", data[offset:offset + 4])[0]
        headers[name.lower()] = data[offset + 4:offset + 4 + n].decode()
        offset += 4 + n
    return headers


class Stream:
    def __init__(self, connection: SpdyConnection, stream_id: int, headers: dict) -> None:
        self.connection = connection
        self.id = stream_id
        self.headers = headers
        self.kind = headers.get("streamtype", "")
        self.on_data = lambda data: None
        self.on_fin = lambda: None
        self.closed_local = False

    def write(self, data: bytes) -> None:
        self.connection.send_data(self.id, data)

    def close(self) -> None:
        if not self.closed_local:
            self.closed_local = True
            self.connection.send_data(self.id, b"", fin=True)


class SpdyConnection:
    """The server end of a SPDY/3.1 session over ``write``."""

    def __init__(self, write, on_stream, on_close=lambda: None) -> None:
        self._write = write
        self._on_stream = on_stream
        self._on_close = on_close
        self._buffer = b""
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)
        self._deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY,
                                         zdict=DICTIONARY)
        self.streams: dict[int, Stream] = {}
        self.closed = False

    def _control(self, kind: int, flags: int, payload: bytes) -> None:
        self._write(struct.pack(">HHI", 0x8003, kind, (flags << 24) | len(payload)) + payload)

    def send_data(self, stream_id: int, data: bytes, fin: bool = False) -> None:
        if self.closed:
            return
        view = memoryview(data)
        while True:
            piece, view = view[:MAX_DATA], view[MAX_DATA:]
            last = not len(view)
            flags = FLAG_FIN if fin and last else 0
            self._write(struct.pack(">II", stream_id & 0x7FFFFFFF,
                                    (flags << 24) | len(piece)) + bytes(piece))
            if last:
                return

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 8:
            length = int.from_bytes(self._buffer[5:8], "big")
            if len(self._buffer) < 8 + length:
                return
            frame, self._buffer = self._buffer[:8 + length], self._buffer[8 + length:]
            flags = frame[4]
            payload = frame[8:]
            if frame[0] & 0x80:
                self._control_frame(struct.unpack(">H", frame[2:4])[0], flags, payload)
            else:
                stream_id = struct.unpack(">I", frame[:4])[0] & 0x7FFFFFFF
                stream = self.streams.get(stream_id)
                if stream is None:
                    continue
                if payload:
                    stream.on_data(payload)
                    self._control(WINDOW_UPDATE, 0, struct.pack(">II", stream_id,
                                                                len(payload)))
                if flags & FLAG_FIN:
                    stream.on_fin()

    def _control_frame(self, kind: int, flags: int, payload: bytes) -> None:
        if kind == SYN_STREAM:
            stream_id = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF
            block = self._inflate.decompress(payload[10:])
            headers = _parse_header_block(block)
            stream = Stream(self, stream_id, headers)
            self.streams[stream_id] = stream
            reply = self._deflate.compress(_header_block({})) + \
                self._deflate.flush(zlib.Z_SYNC_FLUSH)
            self._control(SYN_REPLY, 0, struct.pack(">I", stream_id) + reply)
            self._on_stream(stream)
            if flags & FLAG_FIN:
                stream.on_fin()
        elif kind == PING:
            self._control(PING, 0, payload)
        elif kind == GOAWAY:
            self.close()
        elif kind == RST_STREAM:
            stream_id = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.on_fin()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._on_close()


# --- exec and attach -------------------------------------------------------------------


class ExecSession:
    """Kubernetes remotecommand (``v4.channel.k8s.io``) over SPDY streams."""

    def __init__(self, reactor, config, query, sub, close) -> None:
        from tests.kube_ws import command_for

        self.reactor = reactor
        self.config = config
        self.tty = query.get("tty", [""])[0] in ("true", "1")
        flags = {name: query.get(name, [""])[0] in ("true", "1")
                 for name in ("stdin", "stdout", "stderr")}
        self.expected = {"error"} | {n for n, on in flags.items() if on}
        if self.tty:
            self.expected.discard("stderr")
            self.expected.add("resize")
        self.command = command_for(sub, query)
        self.streams: dict[str, Stream] = {}
        self.process = None
        self.transport = None
        self._close = close
        self._resize = b""

    def on_stream(self, stream: Stream) -> None:
        self.streams[stream.kind] = stream
        if stream.kind == "stdin":
            stream.on_data = lambda data: self.process and self.process.write(data)
            stream.on_fin = lambda: self.process and (
                self.process.write(b"\x04") if self.tty else self.process.closeStdin())
        elif stream.kind == "resize":
            stream.on_data = self._resize_data
        if self.expected <= set(self.streams) and self.process is None:
            from tests.kube_ws import log_event, spawn

            log_event(self.config, {"event": "start", "sub": "exec", "command": self.command,
                                    "tty": self.tty, "protocol": "SPDY/3.1"})
            self.process = spawn(self.reactor, self, self.command, self.tty, True)
            if self.transport is not None:
                from tests.kube_ws import stream_from

                stream_from(self.transport, self.process)

    def _resize_data(self, data: bytes) -> None:
        from tests.kube_ws import log_event, resize_pty

        self._resize += data
        decoder = json.JSONDecoder()
        while self._resize.strip():
            try:
                size, end = decoder.raw_decode(self._resize.decode().lstrip())
            except ValueError:
                return
            self._resize = self._resize.decode().lstrip()[end:].encode()
            log_event(self.config, {"event": "resize", "width": size["Width"],
                                    "height": size["Height"], "protocol": "SPDY/3.1"})
            if self.tty and self.process is not None:
                resize_pty(self.process, int(size["Width"]), int(size["Height"]))

    def output(self, channel: int, data: bytes) -> None:
        stream = self.streams.get("stdout" if channel == 1 or self.tty else "stderr")
        if stream is not None:
            stream.write(data)

    def ended(self, code: int) -> None:
        from tests.kube_ws import exit_status, log_event

        log_event(self.config, {"event": "end", "command": self.command, "exit_code": code,
                                "protocol": "SPDY/3.1"})
        for kind in ("stdout", "stderr"):
            if kind in self.streams:
                self.streams[kind].close()
        error = self.streams.get("error")
        if error is not None:
            error.write(json.dumps(exit_status(code)).encode())
            error.close()
        self.reactor.callLater(0.5, self._close)

    def close(self) -> None:
        if self.process is not None and self.process.pid:
            try:
                self.process.signalProcess("KILL")
            except Exception:
                pass


# --- port-forward ------------------------------------------------------------------------


class _Forwarded(protocol.Protocol):
    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def dataReceived(self, data: bytes) -> None:
        self.stream.write(data)

    def connectionLost(self, reason) -> None:
        self.stream.close()


class PortForwardSession:
    """Port-forward streams (``data``/``error`` pairs per ``requestID``) to 127.0.0.1:PORT."""

    def __init__(self, reactor, config, send, close) -> None:
        self.reactor = reactor
        self.config = config
        self.spdy = SpdyConnection(send, self.on_stream, close)
        self.connections: dict[str, object] = {}

    def feed(self, data: bytes) -> None:
        self.spdy.feed(data)

    def on_stream(self, stream: Stream) -> None:
        from tests.kube_ws import log_event

        if stream.kind != "data":
            return
        port = int(stream.headers.get("port", "0"))
        log_event(self.config, {"event": "portforward", "port": port,
                                "request": stream.headers.get("requestid")})
        pending: list[bytes] = []
        state: dict = {"transport": None, "fin": False}

        def data(chunk: bytes) -> None:
            if state["transport"] is None:
                pending.append(chunk)
            else:
                state["transport"].write(chunk)

        def fin() -> None:
            state["fin"] = True
            if state["transport"] is not None:
                state["transport"].loseConnection()

        stream.on_data, stream.on_fin = data, fin

        def connected(proto) -> None:
            state["transport"] = proto.transport
            for chunk in pending:
                proto.transport.write(chunk)
            if state["fin"]:
                proto.transport.loseConnection()

        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", port)
        d = endpoint.connect(protocol.Factory.forProtocol(lambda: _Forwarded(stream)))
        d.addCallbacks(connected, lambda f: stream.close())

    def close(self) -> None:
        self.spdy.close()


# --- the upgrade -------------------------------------------------------------------------


class _SpdyProtocol(protocol.Protocol):
    def __init__(self, make_session) -> None:
        self._make_session = make_session
        self.session = None

    def connectionMade(self) -> None:
        self.session = self._make_session(self)

    def dataReceived(self, data: bytes) -> None:
        self.session.spdy.feed(data)

    def connectionLost(self, reason) -> None:
        self.session.close()


def upgrade(request, sub, query, config, reactor):
    """Answer ``101`` and speak SPDY on the connection from then on."""
    from twisted.web import server

    offered = [v.strip() for value in request.requestHeaders.getRawHeaders(
        b"x-stream-protocol-version", []) for v in value.decode().split(",")]
    chosen = "portforward.k8s.io" if sub == "portforward" else next(
        (p for p in ("v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io",
                     "channel.k8s.io") if p in offered), None)
    if chosen is None or (sub == "portforward" and chosen not in offered):
        request.setResponseCode(403)
        return b'{"kind":"Status","apiVersion":"v1","status":"Failure","code":403,' \
               b'"message":"no common stream protocol"}'
    transport, request.channel.transport = request.channel.transport, None

    def make_session(proto):
        def close():
            proto.transport.loseConnection()

        if sub == "portforward":
            session = PortForwardSession(reactor, config, proto.transport.write, close)
        else:
            session = ExecSession(reactor, config, query, sub, close)
            session.transport = proto.transport
            session.spdy = SpdyConnection(proto.transport.write, session.on_stream, close)
        return session

    proto = _SpdyProtocol(make_session)
    if isinstance(transport, ProtocolWrapper):
        transport.wrappedProtocol = proto
    else:
        transport.protocol = proto
    transport.write(("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                     f"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {chosen}\r\n\r\n")
                    .encode())
    proto.makeConnection(transport)
    # twisted.web paused the connection while the request was served (as
    # autobahn's WebSocketResource does, resume it).
    if hasattr(transport, "_networkProducer"):
        transport._networkProducer.resumeProducing()
    elif hasattr(transport, "resumeProducing"):
        transport.resumeProducing()
    return server.NOT_DONE_YET
