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
from twisted.internet.task import deferLater
from twisted.logger import Logger

from edgeaccess.controlplane import state as cstate
from edgeaccess.tunnel.backoff import backoff_delay

_log = Logger()

PING_INTERVAL = 15.0
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


class ControlStreamClient(Service):
    """Keeps ``GET /v1/watch`` open to the auth API, forever.

    :param open_stream: ``(on_line) -> Deferred`` opening the stream (the
        node's :meth:`ClusterClient.stream_lines
        <edgeaccess.clusterclient.ClusterClient.stream_lines>` on
        ``/v1/watch``: mutual TLS, the cluster CA, a proxy of our cluster);
        it fires when the answer ends, fails when it breaks, and cancelling
        it closes the connection.
    :param on_message: given each decoded message (init, update).
    :param reactor: times; :param rng: backoff jitter.
    """

    def __init__(self, open_stream: Callable[[Callable[[bytes], None]], defer.Deferred],
                 on_message: Callable[[dict], None], reactor,
                 rng: random.Random | None = None, ping_interval: float = PING_INTERVAL,
                 backoff_cap: float = 30.0) -> None:
        self._open_stream = open_stream
        self._on_message = on_message
        self._reactor = reactor
        self._rng = rng or random.SystemRandom()
        self._ping_interval = ping_interval
        self._backoff_cap = backoff_cap
        self._failures = 0
        self._loop: defer.Deferred[None] | None = None
        self._current: defer.Deferred | None = None
        self._watchdog = None
        self._heard = False
        self._silent = False
        #: How many streams delivered an init (tests, logs).
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
        if self._current is not None:
            self._current.cancel()
        if self._loop is not None:
            self._loop.cancel()

    async def _run(self) -> None:
        while self.running:
            self._silent = False
            try:
                self._current = self._open_stream(self._line)
                self._heard = True
                self._start_watchdog()
                await self._current
                reason = "the proxy ended the stream"
            except defer.CancelledError:
                if not self.running:
                    return
                reason = "nothing heard for three ping intervals"
            except Exception as error:  # the network, TLS, an answer we cannot read
                reason = str(error) or type(error).__name__
            finally:
                self._stop_watchdog()
                self._current = None
            if self._silent:
                reason = "nothing heard for three ping intervals"
            self.connected = False
            if not self.running:
                return
            delay = backoff_delay(self._failures, self._rng, 1.0, self._backoff_cap)
            self._failures += 1
            _log.warn("control stream lost ({reason}); dialing again in {delay:.1f} s",
                      reason=reason, delay=delay)
            self._current = deferLater(self._reactor, delay, lambda: None)
            try:
                await self._current
            finally:
                self._current = None

    def _line(self, line: bytes) -> None:
        self._heard = True
        if not line:
            return
        try:
            message = cstate.decode(line)
        except Exception as error:
            _log.warn("ignoring a malformed control message: {error}", error=error)
            return
        if message["type"] == "init":
            if not self.connected:
                _log.info("control stream up")
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
            self._silent = True
            if self._current is not None:
                self._current.cancel()  # closes the connection; the loop dials again
            return
        self._heard = False
        self._watchdog = self._reactor.callLater(self._ping_interval * 3, self._check)
