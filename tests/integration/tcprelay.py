"""A tiny TCP relay for end-to-end tests: forwards connections and can cut them.

In process::

    relay = TcpRelay(target=("127.0.0.1", 3024)).start()
    relay.addr            # "127.0.0.1:PORT", what clients dial
    relay.cut_all()       # reset every relayed connection (both sides), keep listening
    relay.close()

As a subprocess: ``python tests/integration/tcprelay.py --target HOST:PORT``
prints ``listening on HOST:PORT`` once ready; ``SIGUSR1`` cuts every
connection, ``SIGTERM`` stops it.

The target may be a callable returning ``(host, port)``, read for each new
connection, so a relay can be started before the server it forwards to
(and its address given to that server, e.g. ``--tunnel-public-addr``).
A cut sends RST on both sockets (``SO_LINGER`` 0): both peers see the
connection reset at once while their processes stay alive.
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

    def __init__(self, downstream: socket.socket, upstream: socket.socket) -> None:
        self.downstream = downstream
        self.upstream = upstream
        self._lock = threading.Lock()
        self._closed = False
        self._half_closed = 0

    def pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(256 * 1024)
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
        try:
            target = self._resolve_target()
            if target is None:
                raise OSError("no target")
            upstream = socket.create_connection(target, timeout=10)
            upstream.settimeout(None)
        except OSError:
            _reset(downstream)
            return
        for sock in (downstream, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(downstream, upstream)
        with self._lock:
            if self._stopping:
                pair.cut()
                return
            self._pairs = [p for p in self._pairs if not p.closed] + [pair]
            self.forwarded += 1
        threading.Thread(target=pair.pump, args=(upstream, downstream),
                         name="tcprelay-up", daemon=True).start()
        pair.pump(downstream, upstream)

    def active(self) -> int:
        """How many relayed connections are open now."""
        with self._lock:
            return sum(1 for p in self._pairs if not p.closed)

    def cut_all(self) -> int:
        """Reset every relayed connection (the relay keeps listening); returns how many."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        return sum(1 for pair in pairs if pair.cut())

    def close(self) -> None:
        """Stop listening and reset every connection."""
        self._stopping = True
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
