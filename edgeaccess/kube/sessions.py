"""exec and attach through the proxy: audit events and recordings.

After the API accepts the upgrade the proxy splices bytes; a tap reads
along without changing them:

- WebSocket (``v5.channel.k8s.io``, ``v4.channel.k8s.io``): frames are
  parsed in both directions; each message's first byte is its channel (0
  stdin, 1 stdout, 2 stderr, 3 status, 4 resize). An interactive session
  (``tty=true``) is recorded as asciicast v2 from stdout/stderr and resizes
  (``edge play`` replays it) between ``session.start`` and ``session.end``;
  a non-interactive one is audited as ``exec`` with its command and exit
  code (from the status channel's ``Status``).
- SPDY/3.1 (kubectl's fallback, ``v4.channel.k8s.io`` over SPDY streams):
  read along the same way (:mod:`edgeaccess.kube.spdy`): the streams named
  ``stdout``/``stderr`` feed the recording, ``resize`` its resizes, ``error``
  the final ``Status`` (exit code).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

from twisted.internet import defer
from twisted.logger import Logger

from edgeaccess.audit.recording import AsciicastWriter
from edgeaccess.tunnel.scheduler import prioritize

_log = Logger()

#: Largest status or resize message read (they are small JSON objects).
_MAX_CONTROL = 64 * 1024
#: Largest recording kept in memory before it is stored (then cut).
MAX_RECORDING = 64 * 1024 * 1024

STDIN, STDOUT, STDERR, STATUS, RESIZE = range(5)


class FrameReader:
    """Incremental RFC 6455 frame parser for one direction; calls
    ``on_data(channel, data)`` for the payload pieces of the channels
    ``wanted(channel)`` accepts (the others are skipped without a copy: an
    exec's stdout passes through untouched unless it is recorded)."""

    def __init__(self, on_data, wanted=None) -> None:
        self._on_data = on_data
        self._wanted = wanted or (lambda channel: True)
        self._buffer = b""
        self._left = 0
        self._mask = b""
        self._mask_offset = 0
        self._channel: int | None = None
        self._control = False
        self.broken = False

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        if self._buffer:
            data, self._buffer = self._buffer + data, b""
        try:
            self._run(data)
        except Exception:
            _log.failure("kube session tap: unreadable WebSocket frame; not audited further")
            self.broken = True
            self._buffer = b""

    def _run(self, data: bytes) -> None:
        position, end = 0, len(data)
        while position < end:
            if self._left == 0:
                position = self._header(data, position)
                if position < 0:
                    return
                continue
            start = position
            position = min(end, position + self._left)
            self._left -= position - start
            if self._control:
                continue
            mask, offset = self._mask, self._mask_offset
            if mask:
                self._mask_offset = (offset + position - start) % 4
            if self._channel is None:
                self._channel = data[start] ^ mask[offset] if mask else data[start]
                start += 1
                offset = (offset + 1) % 4
                if start == position:
                    continue
            if self._wanted(self._channel):
                piece = data[start:position]
                if mask:
                    piece = _unmask(piece, mask, offset)
                self._on_data(self._channel, piece)

    def _header(self, buf: bytes, at: int) -> int:
        """Read the frame header at ``buf[at:]``: where its payload starts, or
        -1 (the header is incomplete: what is left is kept for the next feed)."""
        if len(buf) - at < 2:
            self._buffer = buf[at:]
            return -1
        opcode = buf[at] & 0x0F
        masked = buf[at + 1] & 0x80
        length = buf[at + 1] & 0x7F
        offset = at + 2
        if length == 126:
            offset = at + 4
            if len(buf) < offset:
                self._buffer = buf[at:]
                return -1
            length = int.from_bytes(buf[at + 2:offset], "big")
        elif length == 127:
            offset = at + 10
            if len(buf) < offset:
                self._buffer = buf[at:]
                return -1
            length = int.from_bytes(buf[at + 2:offset], "big")
        if masked:
            if len(buf) < offset + 4:
                self._buffer = buf[at:]
                return -1
            self._mask = buf[offset:offset + 4]
            offset += 4
        else:
            self._mask = b""
        self._mask_offset = 0
        self._left = length
        self._control = opcode >= 8
        if not self._control and opcode != 0:  # a new data message
            self._channel = None
        return offset


def _unmask(data: bytes, mask: bytes, offset: int) -> bytes:
    key = (mask[offset:] + mask[:offset]) * (len(data) // 4 + 1)
    return (int.from_bytes(data, "big") ^ int.from_bytes(key[:len(data)], "big")).to_bytes(
        len(data), "big")


class ExecTap:
    """Reads along an upgraded exec/attach stream; audits (and records) it."""

    def __init__(self, connection, info, user, kube: str, protocol: str) -> None:
        self.connection = connection
        self.proxy = connection.proxy
        self.info = info
        self.user = user
        self.kube = kube
        self.protocol = protocol
        query = info.query
        self.command = [c for c in query.get("command", [])]
        self.container = (query.get("container") or [""])[0]
        self.tty = (query.get("tty") or [""])[0] in ("true", "1")
        self.session_id = str(uuid.uuid4())
        self.status: dict | None = None
        self._status_bytes = b""
        self._resize_bytes = b""
        self._writer: AsciicastWriter | None = None
        self._cast: list[bytes] = []
        self._cast_size = 0
        self._started = False
        self._ended = False
        self._websocket = False
        self._client = FrameReader(self._client_data, lambda channel: channel == RESIZE)
        self._server = FrameReader(self._server_data, self._server_wants)
        self._spdy = False

    def _common(self) -> dict:
        return dict(user=self.user.name, kube_cluster=self.kube,
                    namespace=self.info.namespace or None, pod=self.info.name or None,
                    container=self.container or None, command=" ".join(self.command) or None,
                    remote_addr=self.connection.remote_addr or None,
                    protocol=self.protocol, session_id=self.session_id,
                    subresource=self.info.subresource)

    def started(self, head=None) -> None:
        self._started = True
        chosen = (head.get(b"sec-websocket-protocol") or b"").decode("latin-1") if head else ""
        self._websocket = chosen.endswith("channel.k8s.io") and not chosen.startswith("base64")
        stream_protocol = (head.get(b"x-stream-protocol-version") or b"") if head else b""
        if self.protocol == "spdy" and stream_protocol.endswith(b"channel.k8s.io"):
            from edgeaccess.kube.spdy import SpdyReader

            self._spdy = True
            streams: dict[int, str] = {}
            self._client = SpdyReader(streams, self._spdy_client_data)
            self._server = SpdyReader(streams, self._spdy_server_data)
        if self.tty:
            # A terminal: ahead of bulk data on the node's tunnel (the node is told).
            prioritize(getattr(self.connection.upstream, "transport", None))
        if self.tty and (self._websocket or self._spdy):
            self._writer = AsciicastWriter(self._sink, self.proxy.reactor, 80, 24,
                                           title=f"{self.user.name}@{self.kube}/"
                                                 f"{self.info.namespace}/{self.info.name}")
            self.proxy.emit("session.start", interactive=True, **self._common())

    def _sink(self, line: bytes) -> None:
        if self._cast_size + len(line) > MAX_RECORDING:
            return
        self._cast.append(line)
        self._cast_size += len(line)

    def from_client(self, data: bytes) -> None:
        if self._websocket or self._spdy:
            self._client.feed(data)

    def from_server(self, data: bytes) -> None:
        if self._websocket or self._spdy:
            self._server.feed(data)

    _SPDY_CHANNELS = {"stdin": STDIN, "stdout": STDOUT, "stderr": STDERR, "error": STATUS,
                      "resize": RESIZE}

    def _spdy_client_data(self, kind: str, data: bytes) -> None:
        channel = self._SPDY_CHANNELS.get(kind)
        if channel is not None:
            self._client_data(channel, data)

    def _spdy_server_data(self, kind: str, data: bytes) -> None:
        channel = self._SPDY_CHANNELS.get(kind)
        if channel is not None:
            self._server_data(channel, data)

    def _client_data(self, channel: int, data: bytes) -> None:
        if channel == RESIZE:
            self._resize_bytes = (self._resize_bytes + data)[-_MAX_CONTROL:]
            try:
                size = json.loads(self._resize_bytes)
            except ValueError:
                return
            self._resize_bytes = b""
            if self._writer is not None and isinstance(size, dict):
                try:
                    self._writer.resize(int(size.get("Width", 80)), int(size.get("Height", 24)))
                except (TypeError, ValueError):
                    pass

    def _server_wants(self, channel: int) -> bool:
        return channel == STATUS or (self._writer is not None and channel in (STDOUT, STDERR))

    def _server_data(self, channel: int, data: bytes) -> None:
        if channel in (STDOUT, STDERR):
            if self._writer is not None:
                self._writer.output(data)
        elif channel == STATUS:
            self._status_bytes = (self._status_bytes + data)[-_MAX_CONTROL:]
            try:
                self.status = json.loads(self._status_bytes)
            except ValueError:
                pass

    def exit_code(self) -> int | None:
        status = self.status
        if not isinstance(status, dict):
            return None
        if status.get("status") == "Success":
            return 0
        for cause in (status.get("details") or {}).get("causes") or []:
            if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
                try:
                    return int(cause.get("message"))
                except (TypeError, ValueError):
                    return None
        return None

    def ended(self) -> None:
        if self._ended or not self._started:
            return
        self._ended = True
        code = self.exit_code()
        fields = self._common()
        if self._writer is not None:
            self._writer.close()
            self.proxy.emit("session.end", interactive=True, exit_code=code, **fields)
            self._store_recording()
        else:
            self.proxy.emit("exec", exit_code=code,
                            success=None if code is None else code == 0, **fields)

    def _store_recording(self) -> None:
        store = getattr(self.proxy.audit, "recordings", None)
        if store is None:
            return
        data = b"".join(self._cast)
        self._cast = []
        meta = {"user": self.user.name, "cluster": self.proxy.cluster_name,
                "node": f"kube:{self.kube}",
                "started": datetime.fromtimestamp(self._writer._start, timezone.utc)
                .strftime("%Y-%m-%dT%H:%M:%SZ")}

        # The store does its I/O off the reactor thread; both calls fire
        # once what they stored is durable.
        d = defer.maybeDeferred(store.append, self.session_id, 0, data, meta)
        d.addCallback(lambda length: store.complete(self.session_id, length))
        d.addErrback(lambda f: _log.failure("recording of kube session {id} not stored", f,
                                            id=self.session_id))


def tap_for(connection, head, info, user, kube: str):
    """A tap for an exec/attach upgrade, or None for other upgrades (port-forward)."""
    if info.subresource not in ("exec", "attach"):
        return None
    upgrade = (head.get(b"upgrade") or b"").lower()
    protocol = "websocket" if upgrade == b"websocket" else "spdy"
    return ExecTap(connection, info, user, kube, protocol)
