"""A tiny TCP relay for end-to-end tests: forwards connections and can cut them.

In process::

    relay = TcpRelay(target=("127.0.0.1", 3024)).start()
    relay.addr            # "127.0.0.1:PORT", what clients dial
    relay.cut_all()       # reset every relayed connection (both sides), keep listening
    relay.cut_all(hold=True)  # ... and reset every new one too, until resume()
    relay.stall_all()     # black hole: nothing forwarded either way, nothing closed;
                          # new connections are accepted and go nowhere, until resume()
    relay.resume()        # the link is back: forward again
    relay.close()

As a subprocess: ``python tests/integration/tcprelay.py --target HOST:PORT``
prints ``listening on HOST:PORT`` once ready; ``SIGUSR1`` cuts every
connection, ``SIGTERM`` stops it.

The target may be a callable returning ``(host, port)``, read for each new
connection, so a relay can be started before the server it forwards to
(and its address given to that server, e.g. ``--tunnel-public-addr``).
A cut sends RST on both sockets (``SO_LINGER`` 0): both peers see the
connection reset at once while their processes stay alive. A stall stops
reading and writing (each direction keeps at most the one piece it had in
hand): the peers' writes fill the socket buffers, nothing arrives, nothing
is reset, as on a link that drops every packet.
"""

from __future__ import annotations

import argparse
import signal
import socket
import struct
import sys
import threading
from typing import Callable

Target = tuple[str, int]


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST rather than a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _Pair:
    """One relayed connection: the client's socket and ours to the target."""

    def __init__(self, downstream: socket.socket, upstream: socket.socket,
                 flowing: threading.Event | None = None) -> None:
        self.flowing = flowing
        self.downstream = downstream
        self.upstream = upstream
        self._lock = threading.Lock()
        self._closed = False
        self._half_closed = 0

    def pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(256 * 1024)
                if self.flowing is not None and not self.flowing.is_set():
                    self.flowing.wait()  # stalled: hold the piece, read nothing more
                if not data:
                    if self._closed:  # woken by cut(): no FIN, the RST follows
                        return
                    break
                sink.sendall(data)
        except OSError:
            self.cut()
            return
        # A clean EOF: pass the half-close on, close once both ways are done.
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with self._lock:
            self._half_closed += 1
            done = self._half_closed == 2
        if done:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for sock in (self.downstream, self.upstream):
            try:
                sock.close()
            except OSError:
                pass

    def cut(self) -> bool:
        """Reset both sides; False if the pair was already closed."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
        # SHUT_RD wakes the pump threads blocked in recv() without sending
        # anything (close() alone would not wake them); then close with RST.
        for sock in (self.downstream, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        for sock in (self.downstream, self.upstream):
            _reset(sock)
        return True

    @property
    def closed(self) -> bool:
        return self._closed


class TcpRelay:
    """Accept on ``listen``, forward each connection to ``target``.

    :param target: ``(host, port)`` or a callable returning it, read for
        every new connection (None: refuse connections until it is set).
    :ivar accepted: connections accepted so far.
    :ivar forwarded: connections whose upstream connect succeeded.
    """

    def __init__(self, target: Target | Callable[[], Target] | None = None,
                 listen: Target = ("127.0.0.1", 0)) -> None:
        self.target = target
        self._listen_on = listen
        self._server: socket.socket | None = None
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._stopping = False
        #: Set while forwarding; cleared by stall_all() until resume().
        self._flowing = threading.Event()
        self._flowing.set()
        #: New connections are reset (after cut_all(hold=True)) until resume().
        self._refusing = False
        #: The address new upstream connections come from (None: the
        #: kernel's choice); change it to move the "client" to a new address
        #: (NAT rebinding: the server sees a new IP and port).
        self.source_host: str | None = None
        self.accepted = 0
        self.forwarded = 0

    def start(self) -> "TcpRelay":
        """Bind and start accepting in a daemon thread."""
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(self._listen_on)
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept_loop, name="tcprelay-accept",
                         daemon=True).start()
        return self

    @property
    def address(self) -> Target:
        """Where clients connect."""
        assert self._server is not None, "start() the relay first"
        host, port = self._server.getsockname()[:2]
        return host, port

    @property
    def addr(self) -> str:
        """``host:port`` where clients connect."""
        host, port = self.address
        return f"{host}:{port}"

    def _resolve_target(self) -> Target | None:
        target = self.target
        return target() if callable(target) else target

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._stopping:
            try:
                downstream, _ = self._server.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(downstream,), name="tcprelay-conn",
                             daemon=True).start()

    def _serve(self, downstream: socket.socket) -> None:
        if self._refusing:
            _reset(downstream)
            return
        if not self._flowing.is_set():
            self._flowing.wait()  # a black hole: the connection goes nowhere meanwhile
            if self._stopping:
                _reset(downstream)
                return
        try:
            target = self._resolve_target()
            if target is None:
                raise OSError("no target")
            source = (self.source_host, 0) if self.source_host else None
            upstream = socket.create_connection(target, timeout=10, source_address=source)
            upstream.settimeout(None)
        except OSError:
            _reset(downstream)
            return
        for sock in (downstream, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(downstream, upstream, self._flowing)
        with self._lock:
            if self._stopping:
                pair.cut()
                return
            self._pairs = [p for p in self._pairs if not p.closed] + [pair]
            self.forwarded += 1
        threading.Thread(target=pair.pump, args=(upstream, downstream),
                         name="tcprelay-up", daemon=True).start()
        pair.pump(downstream, upstream)

    def upstream_sources(self) -> set[str]:
        """The source addresses of the open relayed connections, as the server sees them."""
        with self._lock:
            pairs = [p for p in self._pairs if not p.closed]
        found = set()
        for pair in pairs:
            try:
                found.add(pair.upstream.getsockname()[0])
            except OSError:
                pass
        return found

    def active(self) -> int:
        """How many relayed connections are open now."""
        with self._lock:
            return sum(1 for p in self._pairs if not p.closed)

    def cut_all(self, hold: bool = False) -> int:
        """Reset every relayed connection (the relay keeps listening); returns how many.

        :param hold: reset every new connection too, until :meth:`resume`
            (an outage that lasts, not a blip).
        """
        if hold:
            self._refusing = True
        with self._lock:
            pairs, self._pairs = self._pairs, []
        return sum(1 for pair in pairs if pair.cut())

    def stall_all(self) -> None:
        """Black-hole every connection, open and new, until :meth:`resume`:
        nothing is forwarded and nothing closed."""
        self._flowing.clear()

    def resume(self) -> None:
        """End an outage: new connections are forwarded, stalled ones flow again."""
        self._refusing = False
        self._flowing.set()

    @property
    def stalled(self) -> bool:
        """Whether a stall is in force."""
        return not self._flowing.is_set()

    def close(self) -> None:
        """Stop listening and reset every connection."""
        self._stopping = True
        self._flowing.set()
        if self._server is not None:
            try:
                self._server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._server.close()
        self.cut_all()

    def __enter__(self) -> "TcpRelay":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _parse_addr(text: str) -> Target:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    """Run a relay until SIGTERM; SIGUSR1 cuts every connection."""
    parser = argparse.ArgumentParser(description="TCP relay whose connections can be cut.")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    args = parser.parse_args(argv)
    relay = TcpRelay(_parse_addr(args.target), _parse_addr(args.listen)).start()
    stop = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: print(f"cut {relay.cut_all()} connections",
                                                   flush=True))
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"listening on {relay.addr}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    relay.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
