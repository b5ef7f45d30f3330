"""WebSocket exec/attach (``v5.channel.k8s.io``, ``v4.channel.k8s.io``) of the
Kubernetes API stand-in (:mod:`tests.kube_standin`), with autobahn.

The command runs as a real local process (in a PTY for ``tty=true``); each
binary message starts with its channel: 0 stdin, 1 stdout, 2 stderr, 3 the
final ``Status``, 4 resize (``{"Width": W, "Height": H}``, applied to the PTY
and logged); ``ff 00`` closes stdin (v5). Port-forward over WebSocket
(``SPDY/3.1+portforward.k8s.io``) hands the messages to the SPDY server of
:mod:`tests.kube_spdy`.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import termios
from pathlib import Path

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import protocol

EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
PORTFORWARD_PROTOCOL = "SPDY/3.1+portforward.k8s.io"


def log_event(config: dict, entry: dict) -> None:
    with open(Path(config["dir"]) / "sessions.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def exit_status(code: int) -> dict:
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    return {"metadata": {}, "status": "Failure",
            "message": f"command terminated with non-zero exit code: exit status {code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


def command_for(sub: str, query: dict) -> list[str]:
    if sub == "attach":
        return ["/bin/sh"]
    return query.get("command") or ["/bin/sh"]


class _Process(protocol.ProcessProtocol):
    def __init__(self, session) -> None:
        self.session = session

    def childDataReceived(self, fd, data) -> None:
        self.session.output(1 if fd == 1 else 2, data)

    def processEnded(self, reason) -> None:
        code = getattr(reason.value, "exitCode", None)
        if code is None:
            code = 128 + (getattr(reason.value, "signal", 0) or 0)
        self.session.ended(code)


def spawn(reactor, session, command: list[str], tty: bool, stdin: bool):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "xterm", "HOME": "/tmp",
           "PS1": "$ "}
    return reactor.spawnProcess(_Process(session), command[0], command, env=env,
                                usePTY=tty, childFDs=None if tty else {0: "w", 1: "r", 2: "r"})


def stream_from(transport, process) -> None:
    """The process's output is read only as fast as the connection takes it (so a
    pong is never queued behind megabytes: kubectl's reads time out on pongs)."""
    try:
        transport.unregisterProducer()  # twisted.web's channel, from before the upgrade
    except Exception:
        pass
    transport.registerProducer(ProcessOutput(process), True)


class ProcessOutput:
    """A process's output as a push producer. A non-PTY ``Process`` pauses and
    resumes its pipes but has no ``stopProducing``, which a transport calls
    when the connection is lost (an "Unhandled Error" there, and the rest of
    ``connectionLost``, killing the process, never ran): the client is gone,
    so the process is killed, as after a close."""

    def __init__(self, process) -> None:
        self.process = process

    def pauseProducing(self) -> None:
        self.process.pauseProducing()

    def resumeProducing(self) -> None:
        self.process.resumeProducing()

    def stopProducing(self) -> None:
        if self.process.pid:
            try:
                self.process.signalProcess("KILL")
            except Exception:
                pass


def resize_pty(process, width: int, height: int) -> None:
    fd = getattr(process, "fd", None)
    if fd is not None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


class ExecSocket(WebSocketServerProtocol):
    def onConnect(self, request):
        self.query = request.params
        self.sub = "attach" if request.path.rstrip("/").endswith("/attach") else "exec"
        if self.sub == "exec" and request.path.rstrip("/").endswith("/portforward"):
            self.sub = "portforward"
        if request.path.rstrip("/").endswith("/portforward"):
            self.sub = "portforward"
            if PORTFORWARD_PROTOCOL in request.protocols:
                self.chosen = PORTFORWARD_PROTOCOL
                return self.chosen
            raise ConnectionDeny(400, "no supported port-forward protocol")
        for chosen in EXEC_PROTOCOLS:
            if chosen in request.protocols:
                self.chosen = chosen
                return chosen
        raise ConnectionDeny(400, "no supported exec protocol")

    def onOpen(self):
        config = self.factory.config
        if self.sub == "portforward":
            from tests.kube_spdy import PortForwardSession

            self.spdy = PortForwardSession(self.factory.reactor, config,
                                           lambda data: self.sendMessage(data, isBinary=True),
                                           self.sendClose)
            return
        q = self.query
        self.tty = q.get("tty", [""])[0] in ("true", "1")
        self.command = command_for(self.sub, q)
        log_event(config, {"event": "start", "sub": self.sub, "command": self.command,
                           "tty": self.tty, "protocol": self.chosen})
        self.process = spawn(self.factory.reactor, self, self.command, self.tty,
                             q.get("stdin", [""])[0] in ("true", "1"))
        stream_from(self.transport, self.process)

    def output(self, channel: int, data: bytes) -> None:
        self.sendMessage(bytes([channel]) + data, isBinary=True)

    def ended(self, code: int) -> None:
        log_event(self.factory.config, {"event": "end", "command": self.command,
                                        "exit_code": code})
        if self.state != self.STATE_OPEN:
            return  # killed because the client went away: nobody to tell
        self.sendMessage(b"\x03" + json.dumps(exit_status(code)).encode(), isBinary=True)
        self.sendClose(1000)

    def onMessage(self, payload, isBinary):
        if self.sub == "portforward":
            self.spdy.feed(payload)
            return
        if not payload:
            return
        channel, data = payload[0], payload[1:]
        if channel == 0 and data:
            self.process.write(data)
        elif channel == 4:
            size = json.loads(data)
            log_event(self.factory.config, {"event": "resize", "width": size["Width"],
                                            "height": size["Height"]})
            if self.tty:
                resize_pty(self.process, int(size["Width"]), int(size["Height"]))
        elif channel == 255 and data[:1] == b"\x00":
            if self.tty:
                self.process.write(b"\x04")
            else:
                self.process.closeStdin()

    def onClose(self, wasClean, code, reason):
        process = getattr(self, "process", None)
        if process is not None and process.pid:
            try:
                process.signalProcess("KILL")
            except Exception:
                pass
        spdy = getattr(self, "spdy", None)
        if spdy is not None:
            spdy.close()


def upgrade(request, sub, query, config, reactor):
    factory = WebSocketServerFactory()
    factory.protocol = ExecSocket
    factory.config = config
    factory.reactor = reactor
    factory.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=10)
    return WebSocketResource(factory).render(request)
