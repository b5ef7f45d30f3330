"""The push to LAN nodes: one long-lived ``GET /v1/watch`` on the auth API.

The node calls ``GET /v1/watch`` on 3025 with its node certificate
(mutual TLS; the server is verified against the cluster CA and its name);
the answer never ends: one JSON control message per line (the init
first, then updates), and a ``{"type":"ping"}`` line every
:data:`PING_INTERVAL` seconds. A node that hears nothing for three
intervals drops the stream and dials again (capped exponential backoff
with full jitter); every new stream starts with a fresh init, so nothing
missed while it was away is lost.

:class:`WatchStreams` is the server side (one ping timer for all streams);
:class:`ControlStreamClient` the node side.
"""

from __future__ import annotations

import random
from typing import Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import Agent, ResponseDone
from twisted.web.http_headers import Headers

from edgeaccess.controlplane import state as cstate
from edgeaccess.tunnel.backoff import backoff_delay

_log = Logger()

PING_INTERVAL = 15.0
MAX_LINE = cstate.MAX_MESSAGE_BYTES
_PING = cstate.encode({"type": "ping"}) + b"\n"


class WatchStreams:
    """The open ``/v1/watch`` answers, as sinks of the publisher."""

    def __init__(self, publisher, clock, ping_interval: float = PING_INTERVAL) -> None:
        from twisted.internet.task import LoopingCall

        self.publisher = publisher
        self._requests: dict[object, None] = {}
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = clock
        self._ping_interval = ping_interval

    def serve(self, request, node_name: str) -> defer.Deferred[None]:
        """Stream to ``request`` until the node hangs up (a Klein route returns this)."""
        request.setHeader(b"content-type", b"application/x-ndjson")
        request.setHeader(b"cache-control", b"no-store")
        finished = request.notifyFinish()
        self._requests[request] = None
        if not self._pinger.running:
            self._pinger.start(self._ping_interval, now=False)

        def write(data: bytes) -> None:
            request.write(data + b"\n")

        self.publisher.add_sink(request, write)
        _log.info("control stream open to node {node}", node=node_name)
        done: defer.Deferred[None] = defer.Deferred()

        def closed(_: object) -> None:
            self.publisher.remove_sink(request)
            self._requests.pop(request, None)
            _log.info("control stream to node {node} closed", node=node_name)
            if not done.called:
                done.callback(None)

        finished.addBoth(closed)
        return done

    def _ping(self) -> None:
        for request in list(self._requests):
            try:
                request.write(_PING)
            except Exception:
                self._requests.pop(request, None)

    def stop(self) -> None:
        if self._pinger.running:
            self._pinger.stop()
        for request in list(self._requests):
            try:
                request.finish()
            except Exception:
                pass


class _Lines(Protocol):
    """Reads an answer body as lines; each complete line goes to ``on_line``."""

    def __init__(self, on_line: Callable[[bytes], None], on_data: Callable[[], None]) -> None:
        self._on_line = on_line
        self._on_data = on_data
        self._buffer = b""
        self.done: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._on_data()
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line:
                self._on_line(line)
        if len(self._buffer) > MAX_LINE:
            self.transport.stopProducing()

    def connectionLost(self, reason) -> None:
        if reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)


class ControlStreamClient(Service):
    """Keeps ``GET /v1/watch`` open to the auth API, forever.

    :param url: ``https://HOST:PORT/v1/watch``.
    :param policy: an ``IPolicyForHTTPS`` presenting the node certificate
        and trusting only the cluster CA (:class:`edgeaccess.tls.ClusterPolicy`).
    :param on_message: given each decoded message (init, update).
    :param reactor: connects and times; :param rng: backoff jitter.
    """

    def __init__(self, url: str, policy, on_message: Callable[[dict], None], reactor,
                 rng: random.Random | None = None, ping_interval: float = PING_INTERVAL,
                 backoff_cap: float = 30.0) -> None:
        self.url = url.encode("ascii")
        self._agent = Agent(reactor, contextFactory=policy, connectTimeout=10)
        self._on_message = on_message
        self._reactor = reactor
        self._rng = rng or random.SystemRandom()
        self._ping_interval = ping_interval
        self._backoff_cap = backoff_cap
        self._failures = 0
        self._loop: defer.Deferred[None] | None = None
        self._current = None
        self._lines: _Lines | None = None
        self._watchdog = None
        self._heard = False
        #: How many streams were opened (tests, logs).
        self.streams = 0
        self.connected = False

    def startService(self) -> None:
        super().startService()
        self._loop = defer.Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: None if f.check(defer.CancelledError)
                              else _log.failure("control stream stopped", f))

    def stopService(self):
        super().stopService()
        self._stop_watchdog()
        if self._lines is not None and self._lines.transport is not None:
            self._lines.transport.stopProducing()
        if self._current is not None:
            self._current.cancel()
        if self._loop is not None:
            self._loop.cancel()

    async def _run(self) -> None:
        while self.running:
            try:
                await self._stream_once()
                reason = "the proxy ended the stream"
            except defer.CancelledError:
                if not self.running:
                    return
                reason = "nothing heard for three ping intervals"
            except Exception as error:  # the network, TLS, an answer we cannot read
                reason = str(error) or type(error).__name__
            finally:
                self._stop_watchdog()
            self.connected = False
            if not self.running:
                return
            delay = backoff_delay(self._failures, self._rng, 1.0, self._backoff_cap)
            self._failures += 1
            _log.warn("control stream lost ({reason}); dialing again in {delay:.1f} s",
                      reason=reason, delay=delay)
            self._current = deferLater(self._reactor, delay, lambda: None)
            await self._current

    async def _stream_once(self) -> None:
        from twisted.internet.error import ConnectionLost

        self._current = self._agent.request(b"GET", self.url, Headers({b"accept": [b"application/x-ndjson"]}))
        self._heard = True
        self._start_watchdog()
        response = await self._current
        if response.code != 200:
            raise ConnectionLost(f"the auth API answered {response.code} to /v1/watch")
        lines = self._lines = _Lines(self._line, self._data)
        self._current = None
        response.deliverBody(lines)
        try:
            await lines.done
        finally:
            self._lines = None

    def _data(self) -> None:
        self._heard = True

    def _line(self, line: bytes) -> None:
        try:
            message = cstate.decode(line)
        except Exception as error:
            _log.warn("ignoring a malformed control message: {error}", error=error)
            return
        if message["type"] == "init":
            if not self.connected:
                _log.info("control stream up: {url}", url=self.url.decode())
            self.connected = True
            self.streams += 1
            self._failures = 0
        try:
            self._on_message(message)
        except Exception:
            _log.failure("applying a control message failed")

    def _start_watchdog(self) -> None:
        self._stop_watchdog()
        self._watchdog = self._reactor.callLater(self._ping_interval * 3, self._check)

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None

    def _check(self) -> None:
        self._watchdog = None
        if not self._heard:
            # Silent for three intervals: a dead link or a frozen proxy.
            if self._lines is not None and self._lines.transport is not None:
                self._lines.transport.stopProducing()  # aborts: the loop dials again
            elif self._current is not None:
                self._current.cancel()
            return
        self._heard = False
        self._watchdog = self._reactor.callLater(self._ping_interval * 3, self._check)
