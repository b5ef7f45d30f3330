"""A slow, long link for the unstable-link benchmarks: the node behind it, the proxy in front.

:class:`LinkLab` puts the node's uplink on a shaped link, in one of two modes
(the results say which was used, ``"shaping"``):

* ``netns`` (root, iproute2): two network namespaces made for the run,
  ``NAME-node`` (the node's host) and ``NAME-uplink``, joined by a veth pair
  whose ends both shape their egress with ``tc qdisc tbf`` (``rate``, each way,
  a bottleneck queue of ``queue_ms``). The proxy stays in the root namespace
  on 127.0.0.1; a :class:`relay <_relay_main>` process listens inside the
  uplink namespace on the veth address and passes each connection on to the
  proxy's loopback ports, delaying every byte by ``delay_ms`` each way
  (the RTT: all of it on the way back to the proxy, none on the way onto
  the link, which it reads from the proxy only while its socket onto the
  link holds less than 4 KiB, :class:`_Relayed`; a 4 KiB ``SO_RCVBUF``
  toward the proxy: the kernel's smallest stalled an upload to 17 kbit/s,
  its window too small for the sender's segments). So in an upload the proxy's own tunnel socket meets the link's
  backpressure, as it would on a real link (the relay's own TCP over the
  tbf still keeps a few segments in flight, ~5 KB, that nobody controls).
  The kernel on this machine has no ``netem`` (``tc qdisc
  add ... netem`` answers "Specified qdisc kind is unknown"), so the delay is
  the relay's; the rate and the queue in front of it are the kernel's, so
  the node's tunnel socket meets a real slow link (its send buffer,
  ``TCP_NOTSENT_LOWAT`` and the tbf queue all behave as on one).
* ``relay`` (no namespaces): the relay alone, on 127.0.0.1, shaping in user
  space as well: it reads each direction at ``rate`` at most, with a small
  receive buffer, so the sender's socket fills as on a slow link.

The node dials the relay (``--auth-server``, and the proxy's
``--tunnel-public-addr``), never the proxy directly. Everything is removed on
the way out, on Ctrl-C and SIGTERM too (namespaces, veth, relay process).
Addresses are those of the namespaces made here (``10.213.N.0/30``) and
127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections import deque
from pathlib import Path

CLONE_NEWNET = 0x40000000
_SIOCOUTQ = 0x5411
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=check)


def netns_available() -> str | None:
    """None if namespaces with a tbf-shaped veth can be made here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    name = f"lp-probe-{os.getpid()}"
    try:
        made = _run("ip", "netns", "add", name, check=False)
        if made.returncode != 0:
            return f"ip netns add: {made.stderr.strip()}"
        link = _run("ip", "link", "add", f"{name[:8]}a", "type", "veth", "peer", "name",
                    f"{name[:8]}b", check=False)
        if link.returncode != 0:
            return f"veth: {link.stderr.strip()}"
        tbf = _run("tc", "qdisc", "add", "dev", f"{name[:8]}a", "root", "tbf", "rate", "1mbit",
                   "burst", "4kb", "latency", "20ms", check=False)
        if tbf.returncode != 0:
            return f"tc tbf: {tbf.stderr.strip()}"
        return None
    finally:
        _run("ip", "link", "del", f"{name[:8]}a", check=False)
        _run("ip", "netns", "del", name, check=False)


class LinkLab:
    """The shaped uplink: use as a context manager.

    :param rate_kbit: the link's rate, each way.
    :param delay_ms: one-way delay (RTT = 2x).
    :param queue_ms: the bottleneck queue in front of the link (tbf ``latency``).
    :param mode: ``"netns"``, ``"relay"`` or ``"auto"`` (netns when possible).
    """

    def __init__(self, rate_kbit: int = 1000, delay_ms: float = 50.0, queue_ms: float = 50.0,
                 mode: str = "auto", log_dir: Path | None = None) -> None:
        self.rate_kbit = rate_kbit
        self.delay_ms = delay_ms
        self.queue_ms = queue_ms
        self.log_dir = log_dir
        if mode == "auto":
            why = netns_available()
            mode = "netns" if why is None else "relay"
            self.why_not_netns = why
        else:
            self.why_not_netns = None
        self.mode = mode
        tag = os.getpid() % 10000
        self.name = f"lp{tag}"
        self.node_ns = f"{self.name}-node"
        self.uplink_ns = f"{self.name}-uplink"
        octet = 1 + tag % 250
        self.uplink_addr = f"10.213.{octet}.1"
        self.node_addr = f"10.213.{octet}.2"
        self._relay: subprocess.Popen | None = None
        self._made_ns: list[str] = []
        self._old_handlers: dict[int, object] = {}
        #: listening port of the relay for each proxy port (filled by :meth:`relay`).
        self.ports: dict[int, int] = {}

    # -- description --------------------------------------------------------

    @property
    def shaping(self) -> str:
        if self.mode == "netns":
            return (f"netns+veth, tc tbf {self.rate_kbit} kbit/s each way (queue "
                    f"{self.queue_ms:g} ms), relay delay {2 * self.delay_ms:g} ms node->proxy "
                    "(no netem in this kernel)")
        return (f"userspace relay: {self.rate_kbit} kbit/s each way, delay "
                f"{self.delay_ms:g} ms each way" + (
                    f" (netns unavailable: {self.why_not_netns})" if self.why_not_netns else ""))

    @property
    def dial_host(self) -> str:
        """The address the node dials for the proxy (the relay's)."""
        return self.uplink_addr if self.mode == "netns" else "127.0.0.1"

    def node_command(self, argv: list[str]) -> list[str]:
        """``argv`` run on the node's host (inside its namespace in netns mode)."""
        if self.mode == "netns":
            return ["ip", "netns", "exec", self.node_ns, *argv]
        return argv

    # -- set-up and clean-up -------------------------------------------------

    def __enter__(self) -> "LinkLab":
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[signum] = signal.signal(signum, self._interrupted)
        try:
            if self.mode == "netns":
                self._make_namespaces()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _interrupted(self, signum: int, frame: object) -> None:
        self.close()
        raise KeyboardInterrupt(f"signal {signum}")

    def _make_namespaces(self) -> None:
        for ns in (self.node_ns, self.uplink_ns):
            _run("ip", "netns", "del", ns, check=False)  # left over from a killed run
            _run("ip", "netns", "add", ns)
            self._made_ns.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        a, b = f"{self.name}n", f"{self.name}u"
        _run("ip", "link", "add", a, "netns", self.node_ns, "type", "veth", "peer", "name", b,
             "netns", self.uplink_ns)
        for ns, dev, addr in ((self.node_ns, a, self.node_addr),
                              (self.uplink_ns, b, self.uplink_addr)):
            _run("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            # The bottleneck: tbf at the link's rate, a queue of queue_ms in front.
            # No offloads: tbf must see wire-sized packets (a 64 KiB GSO
            # burst would be one "packet" larger than the bucket).
            _run("ip", "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off",
                 "gro", "off", check=False)
            _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
                 "rate", f"{self.rate_kbit}kbit", "burst", "3kb",
                 "latency", f"{self.queue_ms:g}ms")

    def reserve_port(self) -> int:
        """A port for the relay to listen on (free on :attr:`dial_host`)."""
        return _free_port()

    def relay(self, mapping: dict[int, int]) -> None:
        """Start the relay: it listens on :attr:`dial_host` at each key of
        ``mapping`` and passes connections on to 127.0.0.1 at its value."""
        argv = [sys.executable, "-m", "benchmarks._linklab", "relay",
                "--delay-ms", str(self.delay_ms),
                "--listen-host", self.dial_host,
                "--map", ",".join(f"{listen}={target}" for listen, target in mapping.items())]
        if self.mode == "netns":
            argv += ["--netns", self.uplink_ns, "--link-kbit", str(self.rate_kbit)]
        else:
            argv += ["--rate-kbit", str(self.rate_kbit)]
        log = open(self.log_dir / "relay.log", "ab") if self.log_dir else subprocess.DEVNULL
        self._relay = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       cwd=str(Path(__file__).resolve().parent.parent))
        line = self._relay.stdout.readline()  # "ready" once every port listens
        if not line.startswith(b"ready"):
            raise RuntimeError(f"the link relay did not start: {line!r}")
        self.ports = dict(mapping)

    def stop_relay(self) -> None:
        """Stop the relay (a new :meth:`relay` may follow)."""
        relay, self._relay = self._relay, None
        if relay is not None and relay.poll() is None:
            try:
                os.killpg(relay.pid, signal.SIGTERM)
                relay.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(relay.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def cut(self) -> None:
        """Cut the link: every connection through it is reset, new ones are
        refused, until :meth:`restore`."""
        assert self._relay is not None
        self._relay.send_signal(signal.SIGUSR1)

    def restore(self) -> None:
        """The link is back."""
        assert self._relay is not None
        self._relay.send_signal(signal.SIGUSR2)

    def close(self) -> None:
        self.stop_relay()
        while self._made_ns:
            ns = self._made_ns.pop()
            # Whatever still runs in it (a node the caller did not stop).
            pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run("ip", "netns", "del", ns, check=False)  # takes its veth end along
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._old_handlers.clear()

    # -- measuring what the link holds ----------------------------------------

    def queue_bytes(self, side: str = "node") -> int | None:
        """Bytes waiting in the tbf queue now (netns mode) of the node's side
        (``"node"``: toward the proxy) or the uplink's (``"uplink"``: toward the node)."""
        if self.mode != "netns":
            return None
        ns, dev = ((self.node_ns, f"{self.name}n") if side == "node"
                   else (self.uplink_ns, f"{self.name}u"))
        out = _run("tc", "-n", ns, "-s", "qdisc", "show", "dev", dev, check=False).stdout
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("backlog"):
                value = line.split()[1]
                return _bytes(value)
        return None


def _bytes(text: str) -> int:
    units = {"b": 1, "kb": 1000, "mb": 1000000, "k": 1000, "m": 1000000}
    for unit in ("kb", "mb", "b", "k", "m"):
        if text.lower().endswith(unit):
            return int(float(text[: -len(unit)]) * units[unit])
    return int(text)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the relay process ------------------------------------------------------------------------


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


class _Line:
    """One direction of one relayed connection: bytes leave ``delay`` after
    they arrived (in order), at ``rate`` bytes/s at most when shaping."""

    def __init__(self, loop, delay: float, rate: float | None) -> None:
        # Pause reading past this much in the line: what the link holds in
        # flight (shaping in user space: that and a short queue).
        self.HOLD = int(rate * (delay + 0.05)) + 1500 if rate else 64 * 1024
        self.loop = loop
        self.delay = delay
        self.rate = rate
        self.out: asyncio.Transport | None = None
        self.source: asyncio.Transport | None = None
        self.held = 0
        self.free_at = 0.0
        self.closed = False
        #: The output's write buffer is full: reading waits for it too.
        self.blocked = False

    def push(self, data: bytes) -> None:
        now = self.loop.time()
        if self.rate:
            start = max(now, self.free_at)
            self.free_at = start + len(data) / self.rate
            due = self.free_at + self.delay
        else:
            due = now + self.delay
        self.held += len(data)
        self.loop.call_at(due, self._deliver, data)
        if self.held > self.HOLD and self.source is not None:
            self.source.pause_reading()

    def _deliver(self, data: bytes) -> None:
        self.held -= len(data)
        if self.out is not None and not self.out.is_closing():
            self.out.write(data)
        if (self.held <= self.HOLD // 2 and self.source is not None and not self.closed
                and not self.blocked):
            try:
                self.source.resume_reading()
            except (AttributeError, RuntimeError):
                pass

    def finish(self) -> None:
        self.closed = True
        due = max(self.loop.time(), self.free_at) + self.delay
        self.loop.call_at(due, self._close)

    def _close(self) -> None:
        if self.out is not None and not self.out.is_closing():
            if self.out.can_write_eof():
                self.out.write_eof()
            else:
                self.out.close()


class _Half(asyncio.Protocol):
    def __init__(self, line: _Line, peer_line: _Line) -> None:
        self.line = line  # what this side reads goes into it
        self.peer_line = peer_line  # what the other side reads comes out here
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        _outage.live.add(transport)
        self.line.source = transport
        self.peer_line.out = transport
        # What this side sends waits here, not in a deep buffer: past 16 KiB
        # the other side's reading pauses.
        transport.set_write_buffer_limits(high=16 * 1024)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, 16 * 1024)
            except OSError:
                pass

    def pause_writing(self) -> None:
        self.peer_line.blocked = True
        if self.peer_line.source is not None:
            self.peer_line.source.pause_reading()

    def resume_writing(self) -> None:
        self.peer_line.blocked = False
        if self.peer_line.source is not None and self.peer_line.held <= self.peer_line.HOLD:
            try:
                self.peer_line.source.resume_reading()
            except RuntimeError:
                pass

    def data_received(self, data: bytes) -> None:
        self.line.push(data)

    def eof_received(self) -> bool:
        self.line.finish()
        return True

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        _outage.live.discard(self.transport)
        self.line.finish()


class _Relayed:
    """One connection relayed onto a tbf-shaped link (netns mode), without
    asyncio's buffers: proxy -> node bytes are read only as the node-facing
    socket takes them (at most a segment waits in the relay, a 4 KiB
    ``SO_SNDBUF`` in its socket), so in an upload the proxy's own socket
    meets the link's backpressure; node -> proxy bytes wait out the round
    trip's delay (in order) and go to the proxy's loopback port."""

    SEGMENT = 1448
    #: Bytes the node-facing socket may hold (in flight + unsent) before the
    #: relay stops reading from the proxy: the kernel appends far past
    #: ``SO_SNDBUF`` and ``TCP_NOTSENT_LOWAT`` (measured: 11-60 KB), so the
    #: relay asks (``SIOCOUTQ``). About what the relay's TCP needs in flight
    #: to keep a 1 Mbit/s tbf busy (its RTT there is a segment's ~12 ms and
    #: the queue's; what a bulk sender's socket holds under the tunnel's cap).
    ONTO_LINK = 4096
    POLL = 0.002

    def __init__(self, loop, node: socket.socket, proxy: socket.socket, delay: float) -> None:
        self.loop, self.node, self.proxy, self.delay = loop, node, proxy, delay
        self.down_pending = b""  # proxy -> node, refused by the node's socket for now
        self.down_eof = False
        self.up_queue: deque[tuple[float, bytes | None]] = deque()  # (due, data; None: EOF)
        self.up_buffer = bytearray()  # due, refused by the proxy's socket for now
        self.up_timer = None
        self.up_eof = False
        self.closed = False
        self.down_waiting = None  # the poll while the node's socket holds ONTO_LINK
        for sock in (node, proxy):
            sock.setblocking(False)
        loop.add_reader(proxy, self._proxy_readable)
        loop.add_reader(node, self._node_readable)
        _outage.live.add(self)

    # -- proxy -> node: onto the link --------------------------------------

    def _onto_link(self) -> int:
        try:
            return struct.unpack("i", fcntl.ioctl(self.node.fileno(), _SIOCOUTQ, b"\0" * 4))[0]
        except OSError:
            return 0

    def _poll_down(self) -> None:
        self.down_waiting = None
        if self.closed or self.down_eof:
            return
        if self._onto_link() >= self.ONTO_LINK:
            self.down_waiting = self.loop.call_later(self.POLL, self._poll_down)
        else:
            self.loop.add_reader(self.proxy, self._proxy_readable)

    def _proxy_readable(self) -> None:
        if self._onto_link() >= self.ONTO_LINK:
            self.loop.remove_reader(self.proxy)
            self.down_waiting = self.loop.call_later(self.POLL, self._poll_down)
            return
        try:
            data = self.proxy.recv(self.SEGMENT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort()
            return
        if not data:
            self.down_eof = True
            self.loop.remove_reader(self.proxy)
            self._shut(self.node)
            return
        self._to_node(data)

    def _to_node(self, data: bytes) -> None:
        try:
            sent = self.node.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.abort()
            return
        if sent < len(data):
            self.down_pending = data[sent:]
            self.loop.remove_reader(self.proxy)
            self.loop.add_writer(self.node, self._node_writable)

    def _node_writable(self) -> None:
        self.loop.remove_writer(self.node)
        data, self.down_pending = self.down_pending, b""
        self._to_node(data)
        if not self.down_pending and not self.closed and not self.down_eof:
            self.loop.add_reader(self.proxy, self._proxy_readable)

    # -- node -> proxy: delayed ----------------------------------------------

    def _node_readable(self) -> None:
        try:
            data = self.node.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort()
            return
        if not data:
            self.loop.remove_reader(self.node)
        self.up_queue.append((self.loop.time() + self.delay, data or None))
        if self.up_timer is None:
            self.up_timer = self.loop.call_at(self.up_queue[0][0], self._up_due)

    def _up_due(self) -> None:
        self.up_timer = None
        now = self.loop.time()
        while self.up_queue and self.up_queue[0][0] <= now:
            _, data = self.up_queue.popleft()
            if data is None:
                self.up_eof = True
            else:
                self.up_buffer += data
        self._to_proxy()
        if self.up_queue and not self.closed:
            self.up_timer = self.loop.call_at(self.up_queue[0][0], self._up_due)

    def _to_proxy(self) -> None:
        if self.closed:
            return
        if self.up_buffer:
            try:
                sent = self.proxy.send(self.up_buffer)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.abort()
                return
            del self.up_buffer[:sent]
            if self.up_buffer:
                self.loop.add_writer(self.proxy, self._proxy_writable)
                return
        if self.up_eof:
            self._shut(self.proxy)

    def _proxy_writable(self) -> None:
        self.loop.remove_writer(self.proxy)
        self._to_proxy()

    # -- the end -------------------------------------------------------------

    def _shut(self, sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if self.down_eof and self.up_eof:
            self.close()

    def close(self, linger: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        _outage.live.discard(self)
        for timer in (self.up_timer, self.down_waiting):
            if timer is not None:
                timer.cancel()
        for sock in (self.node, self.proxy):
            self.loop.remove_reader(sock)
            self.loop.remove_writer(sock)
            if not linger:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            sock.close()

    def abort(self) -> None:
        """Reset both connections (a cut, or an error on one)."""
        self.close(linger=False)


class _Outage:
    """SIGUSR1 cuts every relayed connection (reset) and refuses new ones;
    SIGUSR2 restores the link."""

    def __init__(self) -> None:
        self.down = False
        self.live: set[asyncio.Transport] = set()

    def cut(self) -> None:
        self.down = True
        for transport in list(self.live):
            transport.abort()
        self.live.clear()

    def restore(self) -> None:
        self.down = False


_outage = _Outage()


async def _relay(listen_host: str, mapping: dict[int, int], delay: float,
                 rate: float | None, netns: str | None, hold_rate: float | None = None) -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, _outage.cut)
    loop.add_signal_handler(signal.SIGUSR2, _outage.restore)
    servers = []
    root = "/proc/self/ns/net"
    root_fd = os.open(root, os.O_RDONLY)

    async def handle(reader_sock: socket.socket, target: int) -> None:
        if hold_rate is not None:
            # Behind a tbf: the whole round trip's delay on the way back,
            # none on the way onto the link (a delay line there would be a
            # buffer the proxy's socket does not see). A round trip is the same.
            proxy = socket.socket()
            try:
                # What the relay has not read waits in the proxy's socket,
                # not in a deep receive buffer here (the kernel would
                # acknowledge megabytes: measured 8 s behind an upload).
                proxy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024)
                proxy.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                proxy.setblocking(False)
                await loop.sock_connect(proxy, ("127.0.0.1", target))
                # The kernel appends past TCP_NOTSENT_LOWAT; a small send
                # buffer (in flight + unsent, ~5 KB of data) refuses instead.
                reader_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024)
                reader_sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, 1024)
            except OSError:
                proxy.close()
                reader_sock.close()
                return
            _Relayed(loop, reader_sock, proxy, 2 * delay)
            return
        up = _Line(loop, delay, rate)  # node -> proxy
        down = _Line(loop, delay, rate)  # proxy -> node
        node_side = _Half(up, down)
        try:
            await loop.connect_accepted_socket(lambda: node_side, reader_sock)
            await loop.create_connection(lambda: _Half(down, up), "127.0.0.1", target)
        except OSError:
            reader_sock.close()

    async def accept_loop(listener: socket.socket, target: int) -> None:
        while True:
            conn, _ = await loop.sock_accept(listener)
            if _outage.down:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()  # reset: the link is cut
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if rate:
                # Shaping in user space: a small receive window, so the
                # sender's own socket fills as it would on a slow link.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            loop.create_task(handle(conn, target))

    try:
        for listen, target in mapping.items():
            if netns:
                _setns(f"/run/netns/{netns}")
            try:
                listener = socket.socket()
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if rate:
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
                listener.bind((listen_host, listen))
                listener.listen(64)
                listener.setblocking(False)
            finally:
                if netns:
                    libc = ctypes.CDLL(None, use_errno=True)
                    if libc.setns(root_fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns back")
            servers.append(loop.create_task(accept_loop(listener, target)))
        print("ready", flush=True)
        await asyncio.gather(*servers)
    finally:
        os.close(root_fd)


def _relay_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._linklab relay")
    parser.add_argument("--listen-host", required=True)
    parser.add_argument("--map", required=True, help="LISTEN=TARGET,...")
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--rate-kbit", type=float, default=0.0)
    parser.add_argument("--netns", default=None)
    parser.add_argument("--link-kbit", type=float, default=0.0,
                        help="the tbf's rate (netns): buffers toward the node sized for it")
    args = parser.parse_args(argv)
    mapping = {int(a): int(b) for a, b in (item.split("=") for item in args.map.split(","))}
    rate = args.rate_kbit * 1000 / 8 if args.rate_kbit else None
    hold_rate = args.link_kbit * 1000 / 8 if args.link_kbit else None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        asyncio.run(_relay(args.listen_host, mapping, args.delay_ms / 1000.0, rate, args.netns,
                           hold_rate))
    except (KeyboardInterrupt, SystemExit):
        pass
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["relay"]:
        sys.exit(_relay_main(sys.argv[2:]))
    print(json.dumps({"netns": netns_available() or "available"}))
    sys.exit(0)
