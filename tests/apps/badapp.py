"""An app that misbehaves on purpose (a real process): ``python badapp.py``.

Paths: ``/garbage`` answers bytes that are no HTTP; ``/midbody`` promises
100,000 bytes, sends 1,000 and closes; ``/slow`` never answers; anything
else ``200 ok``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.serverscript import serve_on_ephemeral_port  # noqa: E402


class Bad(Protocol):
    def connectionMade(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        path = head.split(b" ")[1]
        if path == b"/garbage":
            self.transport.write(b"SPLAT SPLAT\r\n\r\n")
            self.transport.loseConnection()
        elif path == b"/slow":
            pass  # keeps the connection, never answers
        elif path == b"/midbody":
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n"
                                 + b"x" * 1000)
            self.transport.loseConnection()
        else:
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")


if __name__ == "__main__":
    serve_on_ephemeral_port(reactor, Factory.forProtocol(Bad))
