"""AMP commands of the reverse tunnel, with their arguments, answers and errors.

The tunnel is one AMP connection over mutual TLS (ALPN ``edge-tunnel/1``).
Control commands are answered; the data commands (``Data``,
``WindowAdjust``, ``EndOfFile``) are not, so a bulk transfer is a stream of
boxes with no round trip (measured ~270-290 MB/s against ~93 MB/s for
answered calls awaited one by one, see DESIGN.md).

Every argument received is checked here (:func:`check_channel_id`,
:func:`check_kind`, :meth:`Inventory.from_json`...) before anything acts on it.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import struct
from typing import Any

import attrs
from twisted.protocols import amp

from edgeaccess.errors import (
    AccessDenied,
    BadRequest,
    NodeOffline,
    NotFound,
)
from edgeaccess.tunnel.scheduler import PRIORITIES

#: The one protocol version this code speaks.
PROTOCOL_VERSION = 1
#: ALPN protocol name negotiated on the TLS connection.
ALPN_PROTOCOL = b"edge-tunnel/1"
#: Data and WindowAdjust as fast frames between boxes (see :mod:`edgeaccess.tunnel.framing`).
FAST_DATA_CAPABILITY = "fast-data/1"
#: The proxy pushes the control state (:class:`ControlUpdate`).
CONTROL_CAPABILITY = "control/1"
#: Channels outlive their tunnel: re-attached on the agent's next tunnel
#: (``Hello(session)`` then :class:`ResumeChannels`, see :mod:`edgeaccess.tunnel.resume`).
RESUME_CAPABILITY = "resume/1"
#: With RESUME_CAPABILITY the agent also lists ``resume-session/<id>``, its
#: resumable session (a capability string, not a new argument: a proxy
#: without resumption ignores capabilities it does not know, but would
#: refuse a Hello with an argument it does not know).
RESUME_SESSION_PREFIX = "resume-session/"
#: Capabilities this implementation announces in ``Hello``.
#: ``ChannelPriority`` is understood (see :mod:`edgeaccess.tunnel.scheduler`).
PRIORITY_CAPABILITY = "priority/1"
CAPABILITIES = ("channels", "half-close", "window-adjust", FAST_DATA_CAPABILITY,
                CONTROL_CAPABILITY, PRIORITY_CAPABILITY, RESUME_CAPABILITY)
#: Largest piece of a control message in one ControlUpdate box.
MAX_CONTROL_PIECE = 48 * 1024

#: Every channel kind, and who may open which.
CHANNEL_KINDS = frozenset({"ssh", "kube", "app", "auth", "cluster"})
#: Kinds an agent may open towards its proxy (node -> auth service).
AGENT_OPENABLE_KINDS = frozenset({"auth"})
#: Kinds a proxy may open towards an agent.
PROXY_OPENABLE_KINDS = frozenset({"ssh", "kube", "app", "cluster"})

#: AMP values are limited to 65,535 bytes; Data frames stay well below.
MAX_FRAME = 60 * 1024
#: Default per-channel receive window (unacknowledged bytes), like SSH.
DEFAULT_WINDOW = 1024 * 1024
#: The largest window a peer may announce (bounds the memory it can make us hold).
MAX_WINDOW = 16 * 1024 * 1024
#: Channel ids are positive 31-bit integers; the agent uses odd, the proxy even.
MAX_CHANNEL_ID = 2**31 - 1
#: Limits on one incoming box (key count and total bytes), checked while parsing.
MAX_BOX_KEYS = 16
MAX_BOX_BYTES = 72 * 1024
#: Limits on text arguments.
MAX_TARGET_LENGTH = 1024
#: Longest channel source (``"[v6 address%zone]:port"`` fits).
MAX_SOURCE_LENGTH = 64
MAX_REASON_LENGTH = 1024
MAX_PROXIES = 64
MAX_RECONNECT_DELAY = 3600.0
#: A resumable session's id: 32 lower-case hex digits (128 random bits).
_SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
#: Most channel states in one ResumeChannels box (21 bytes each).
MAX_RESUME_CHANNELS = 2048

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
#: A ``Host`` value: a name or address and an optional port ("" allowed).
_HOST = re.compile(r"^[A-Za-z0-9._\[\]:-]{0,262}$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")


class ProtocolViolation(Exception):
    """The peer broke the tunnel protocol: the tunnel is closed.

    Internal to the tunnel (never crosses the wire as such); the message is a
    short reason for the log line.
    """


def check_channel_id(channel: int) -> int:
    """Return ``channel`` if it is a valid channel id, else raise ProtocolViolation."""
    if not isinstance(channel, int) or not 1 <= channel <= MAX_CHANNEL_ID:
        raise ProtocolViolation(f"invalid channel id {channel!r}")
    return channel


def check_kind(kind: str) -> str:
    """Return ``kind`` if it names a channel kind, else raise BadRequest."""
    if kind not in CHANNEL_KINDS:
        raise BadRequest(f"unknown channel kind {kind[:32]!r}")
    return kind


def check_target(target: str) -> str:
    """Return ``target`` if it is an acceptable channel target, else raise BadRequest."""
    if len(target) > MAX_TARGET_LENGTH or any(ord(c) < 32 for c in target):
        raise BadRequest("invalid channel target")
    return target


def parse_source(source: str) -> tuple[str, int]:
    """Split a channel source ``"ip:port"`` (``"[v6]:port"`` for IPv6) into host and port.

    :raises BadRequest: unless it is an IP address and a port (0-65535), at
        most :data:`MAX_SOURCE_LENGTH` characters.
    """
    if not isinstance(source, str) or not source or len(source) > MAX_SOURCE_LENGTH:
        raise BadRequest("invalid channel source")
    host, sep, port = source.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise BadRequest("invalid channel source")  # an IPv6 address needs brackets
    if not sep or not port.isdigit() or len(port) > 5 or int(port) > 65535:
        raise BadRequest("invalid channel source")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise BadRequest("invalid channel source") from None
    return host, int(port)


def check_source(source: str | None) -> str | None:
    """Return ``source`` (None: unknown) if it is a valid channel source, else raise BadRequest."""
    if source is not None:
        parse_source(source)
    return source


def format_source(host: str, port: int) -> str | None:
    """``"ip:port"`` for an address, or None if ``host`` is no IP address (not a source)."""
    try:
        address = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return None
    if not isinstance(port, int) or not 0 <= port <= 65535:
        return None
    text = f"[{host}]:{port}" if address.version == 6 else f"{host}:{port}"
    return text if len(text) <= MAX_SOURCE_LENGTH else None


def check_window(window: int) -> int:
    """Return ``window`` if it is an acceptable receive window, else raise BadRequest."""
    if not 1 <= window <= MAX_WINDOW:
        raise BadRequest(f"invalid window {window}")
    return window


def check_session_id(session: str) -> str:
    """Return ``session`` if it is a well-formed resumable session id, else raise BadRequest."""
    if not isinstance(session, str) or not _SESSION_ID.match(session):
        raise BadRequest("invalid session id")
    return session


@attrs.frozen
class ChannelState:
    """One end's account of a channel, exchanged to re-attach it on a new tunnel.

    :ivar channel: the channel id.
    :ivar received: bytes this end received from the peer on the channel.
    :ivar granted: credit this end granted the peer in total (every
        ``WindowAdjust``, including those a cut may have lost).
    :ivar eof: whether this end received the peer's end of file.
    """

    channel: int
    received: int
    granted: int
    eof: bool = False


_STATE = struct.Struct(">IQQB")


class ChannelStates(amp.Argument):
    """A list of :class:`ChannelState`, packed (21 bytes each) in one AMP value,
    so every channel of a tunnel fits in one box; checked while parsed."""

    def toString(self, states: list[ChannelState]) -> bytes:
        return b"".join(_STATE.pack(s.channel, s.received, s.granted, 1 if s.eof else 0)
                        for s in states)

    def fromString(self, data: bytes) -> list[ChannelState]:
        if len(data) % _STATE.size or len(data) > MAX_RESUME_CHANNELS * _STATE.size:
            raise ProtocolViolation("malformed channel states")
        states = []
        seen: set[int] = set()
        for channel, received, granted, flags in _STATE.iter_unpack(data):
            if not 1 <= channel <= MAX_CHANNEL_ID or channel in seen or flags > 1:
                raise ProtocolViolation("malformed channel states")
            if granted > received:
                raise ProtocolViolation(f"channel {channel}: credit granted beyond "
                                        f"the bytes received")
            seen.add(channel)
            states.append(ChannelState(channel, received, granted, bool(flags)))
        return states


def check_reason(reason: str) -> str:
    """Truncate a peer-given reason and strip control characters (it is logged)."""
    return "".join(c if ord(c) >= 32 else "?" for c in reason[:MAX_REASON_LENGTH])


def check_priority(priority: str) -> str:
    """A channel priority from the peer must be one we know."""
    if priority not in PRIORITIES:
        raise ProtocolViolation(f"unknown channel priority {priority[:32]!r}")
    return priority


def check_delay(delay: float) -> float:
    """Return ``delay`` if it is a sane Reconnect delay, else raise BadRequest."""
    if not math.isfinite(delay) or not 0.0 <= delay <= MAX_RECONNECT_DELAY:
        raise BadRequest(f"invalid reconnect delay {delay!r}")
    return delay


def check_proxies(proxies: list[str]) -> list[str]:
    """Return the list of proxy addresses if each is ``host:port``, else raise BadRequest."""
    if len(proxies) > MAX_PROXIES:
        raise BadRequest("too many proxy addresses")
    for address in proxies:
        host, sep, port = address.rpartition(":")
        if not sep or not host or len(address) > 255 or not port.isdigit():
            raise BadRequest("invalid proxy address")
        if not 0 < int(port) < 65536 or any(ord(c) <= 32 for c in address):
            raise BadRequest("invalid proxy address")
    return proxies


@attrs.frozen
class App:
    """An application a node serves: name, URI, labels, and the ``Host`` it wants."""

    name: str
    uri: str = ""
    labels: dict[str, str] = attrs.field(factory=dict, hash=False)
    #: ``Host`` header the app gets ("": the host of its URI).
    rewrite_host: str = ""


@attrs.frozen
class Inventory:
    """What an agent announces in ``Hello``: its name, labels, kube clusters, apps."""

    name: str
    labels: dict[str, str] = attrs.field(factory=dict, hash=False)
    kube_clusters: tuple[str, ...] = ()
    apps: tuple[App, ...] = ()
    #: Labels of each Kubernetes cluster (``--kube-labels``), by name.
    kube_labels: dict[str, dict[str, str]] = attrs.field(factory=dict, hash=False)

    def to_json(self) -> str:
        """Serialize for the ``Hello`` command."""
        return json.dumps(
            {
                "name": self.name,
                "labels": self.labels,
                "kube_clusters": list(self.kube_clusters),
                "kube_labels": self.kube_labels,
                "apps": [
                    {"name": a.name, "uri": a.uri, "labels": a.labels,
                     "rewrite_host": a.rewrite_host} for a in self.apps
                ],
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Inventory:
        """Parse and validate an inventory received from a peer.

        :raises BadRequest: on anything malformed.
        """
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            raise BadRequest("inventory is not JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("inventory is not an object")
        name = _check_name(data.get("name"), "node name")
        labels = _check_labels(data.get("labels", {}))
        kube = data.get("kube_clusters", [])
        if not isinstance(kube, list) or len(kube) > 256:
            raise BadRequest("invalid kube_clusters")
        kube_labels_in = data.get("kube_labels", {})
        if not isinstance(kube_labels_in, dict) or len(kube_labels_in) > 256:
            raise BadRequest("invalid kube_labels")
        kube_labels = {_check_name(k, "kube cluster name"): _check_labels(v)
                       for k, v in kube_labels_in.items()}
        apps_in = data.get("apps", [])
        if not isinstance(apps_in, list) or len(apps_in) > 256:
            raise BadRequest("invalid apps")
        apps = []
        for item in apps_in:
            if not isinstance(item, dict):
                raise BadRequest("invalid app")
            uri = item.get("uri", "")
            if not isinstance(uri, str) or len(uri) > 2048 or any(ord(c) <= 32 for c in uri):
                raise BadRequest("invalid app uri")
            rewrite_host = item.get("rewrite_host", "")
            if not isinstance(rewrite_host, str) or not _HOST.match(rewrite_host):
                raise BadRequest("invalid app rewrite_host")
            apps.append(
                App(
                    name=_check_name(item.get("name"), "app name"),
                    uri=uri,
                    labels=_check_labels(item.get("labels", {})),
                    rewrite_host=rewrite_host,
                )
            )
        return cls(
            name=name,
            labels=labels,
            kube_clusters=tuple(_check_name(k, "kube cluster name") for k in kube),
            apps=tuple(apps),
            kube_labels=kube_labels,
        )


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise BadRequest(f"invalid {what}")
    return value


def _check_labels(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > 64:
        raise BadRequest("invalid labels")
    for key, item in value.items():
        if not _LABEL_KEY.match(key) or not isinstance(item, str) or len(item) > 253:
            raise BadRequest("invalid label")
        if any(ord(c) < 32 for c in item):
            raise BadRequest("invalid label")
    return dict(value)


class TunnelCommand(amp.Command):
    """Base of every tunnel command: a box whose arguments do not parse
    (missing, not a number, not UTF-8, a broken list) is a ProtocolViolation,
    logged as one line like every other, not an error of ours."""

    @classmethod
    def parseArguments(cls, box: amp.AmpBox, protocol: Any) -> dict[str, Any]:
        try:
            return super().parseArguments(box, protocol)
        except Exception as error:  # only parsing runs here: all of it is the peer's
            raise ProtocolViolation(
                f"malformed {cls.commandName!r} box ({type(error).__name__})") from None


# -- control commands (answered) -------------------------------------------


class Hello(TunnelCommand):
    """First command of a tunnel, agent -> proxy: versions, capabilities, inventory.

    The proxy answers with the version it will speak and the heartbeat
    interval the agent must use. A version it does not speak is refused with
    ``BAD_REQUEST`` and a message naming both versions; the tunnel then closes.
    """

    arguments = [
        (b"protocol_version", amp.Integer()),
        (b"capabilities", amp.ListOf(amp.Unicode())),
        (b"inventory", amp.Unicode()),
    ]
    response = [
        (b"protocol_version", amp.Integer()),
        (b"capabilities", amp.ListOf(amp.Unicode())),
        (b"heartbeat_interval", amp.Float()),
        # With RESUME_CAPABILITY (optional: old agents ignore them, old
        # proxies leave them out): whether the proxy still holds the session
        # (the agent then sends ResumeChannels; if not, its channels are lost),
        # and how often the agent probes while channels are open.
        (b"resumed", amp.Boolean(optional=True)),
        (b"probe_interval", amp.Float(optional=True)),
    ]
    # A refused Hello closes the tunnel once the answer is out.
    fatalErrors = {AccessDenied: b"ACCESS_DENIED", BadRequest: b"BAD_REQUEST"}


class Heartbeat(TunnelCommand):
    """Agent -> proxy, every heartbeat interval; the answer proves the proxy alive."""

    arguments: list = []
    response: list = []


class OpenChannel(TunnelCommand):
    """Open a channel of ``kind`` to ``target``; ``window`` is the opener's receive window.

    ``source`` (optional, so peers without it interoperate) is the address
    (``"ip:port"``) of the user the channel is opened for, as the proxy saw
    it; only a proxy may assert it (the tunnel is mutually authenticated),
    and the accepting side then reports it as the channel's peer address.
    The answer carries the acceptor's receive window. The acceptor decides
    (kind and target) and may refuse with ``ACCESS_DENIED`` or ``NOT_FOUND``.
    """

    arguments = [
        (b"channel", amp.Integer()),
        (b"kind", amp.Unicode()),
        (b"target", amp.Unicode()),
        (b"window", amp.Integer()),
        (b"source", amp.Unicode(optional=True)),
    ]
    response = [(b"window", amp.Integer())]
    errors = {
        AccessDenied: b"ACCESS_DENIED",
        NotFound: b"NOT_FOUND",
        BadRequest: b"BAD_REQUEST",
        NodeOffline: b"NODE_OFFLINE",
    }


class CloseChannel(TunnelCommand):
    """Close a channel in both directions; unknown or already closed ids are ignored."""

    arguments = [(b"channel", amp.Integer()), (b"reason", amp.Unicode())]
    response: list = []


class ResumeChannels(TunnelCommand):
    """Each end's account of every channel of a resumed session.

    The agent sends it once, right after a ``Hello`` answered ``resumed``;
    the proxy sends its own back, for the channels both hold. Each end sends
    nothing on the session's channels before it sent its account (the
    agent: before it got the proxy's); right after it, it sends again what
    the other has not received (from the peer's ``received`` offset) and
    closes (locally) the channels the other no longer holds. Not answered:
    the resent bytes follow the account on the one ordered stream. A second
    one, or one without a resumed session, closes the tunnel.
    """

    arguments = [(b"channels", ChannelStates())]
    requiresAnswer = False


class Discover(TunnelCommand):
    """Proxy -> agent: every proxy address of the cluster (``host:port``)."""

    arguments = [(b"proxies", amp.ListOf(amp.Unicode()))]
    response: list = []
    errors = {BadRequest: b"BAD_REQUEST"}


class Reconnect(TunnelCommand):
    """Proxy -> agent: close this tunnel and dial again after ``delay`` seconds."""

    arguments = [(b"delay", amp.Float()), (b"reason", amp.Unicode())]
    response: list = []
    errors = {BadRequest: b"BAD_REQUEST"}


class ControlUpdate(amp.Command):
    """Proxy -> agent: a piece of one control message (JSON, see
    :mod:`edgeaccess.controlplane.state`); ``more`` says another piece of the
    same message follows. Not answered: messages keep their order on the
    one connection, and a tunnel lost mid-message loses only that message
    (the next tunnel starts with a fresh init)."""

    arguments = [(b"data", amp.String()), (b"more", amp.Boolean())]
    requiresAnswer = False


# -- data commands (not answered; ordered with each other on the one connection)


class Data(TunnelCommand):
    """Bytes for a channel, at most :data:`MAX_FRAME` per box, within the window."""

    arguments = [(b"channel", amp.Integer()), (b"data", amp.String())]
    requiresAnswer = False


class WindowAdjust(TunnelCommand):
    """The receiver's consumer took ``credit`` more bytes: the sender may send them."""

    arguments = [(b"channel", amp.Integer()), (b"credit", amp.Integer())]
    requiresAnswer = False


class EndOfFile(TunnelCommand):
    """Half-close: the sender will send no more Data on this channel."""

    arguments = [(b"channel", amp.Integer())]
    requiresAnswer = False


class ChannelPriority(TunnelCommand):
    """The sender classed a channel (``interactive`` or ``bulk``, e.g. the
    node saw a PTY requested): the receiver sends its own data on that
    channel in the same class. Only to a peer that offered
    :data:`PRIORITY_CAPABILITY`."""

    arguments = [(b"channel", amp.Integer()), (b"priority", amp.Unicode())]
    requiresAnswer = False


#: Commands an agent may send to a proxy.
AGENT_COMMANDS = frozenset(
    c.commandName
    for c in (Hello, Heartbeat, OpenChannel, CloseChannel, Data, WindowAdjust, EndOfFile,
              ChannelPriority, ResumeChannels)
)
#: Commands a proxy may send to an agent.
PROXY_COMMANDS = frozenset(
    c.commandName
    for c in (OpenChannel, CloseChannel, Discover, Reconnect, Data, WindowAdjust, EndOfFile,
              ControlUpdate, ChannelPriority, ResumeChannels)
)
