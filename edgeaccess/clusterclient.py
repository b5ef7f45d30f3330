"""The daemons' asynchronous client for the cluster's HTTPS APIs.

One :class:`ClusterClient` talks to one address (the auth API, or a
proxy's web port) over treq with a persistent connection pool, so a node's
heartbeat, role fetch and audit batches reuse one TLS connection instead of
a handshake each. Its TLS policy (:class:`edgeaccess.tls.ClusterPolicy`)
accepts only a proxy of the expected cluster whose certificate names the
address dialled; every call has a timeout; :meth:`ClusterClient.close`
cancels whatever is in flight (services call it from ``stopService``).

Calls: :meth:`~ClusterClient.get_json`, :meth:`~ClusterClient.post_json`,
:meth:`~ClusterClient.put_bytes`, :meth:`~ClusterClient.post_bytes` (each a
Deferred of the JSON answer), :meth:`~ClusterClient.stream_lines` (a
callback per line of a long-lived answer) or :meth:`~ClusterClient.lines`
(the same as an async iterator), :meth:`~ClusterClient.close`. Build one
with :func:`connect`.

The HTTP side is any treq ``HTTPClient``-like object, so tests give it
``treq.testing.StubTreq`` over the real Klein apps (see
``tests/node/nodekit.py``).

Answers are JSON. An HTTP error with the API's JSON error body becomes the
matching :mod:`edgeaccess.errors` exception; a failure to connect, a
timeout or a refused server certificate an :class:`~edgeaccess.errors.EdgeError`
(:class:`~edgeaccess.errors.CertificateInvalid` for the latter) naming the
address.
"""

from __future__ import annotations

import collections
import json
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent, HTTPConnectionPool, PotentialDataLoss, ResponseDone, ResponseFailed)
from twisted.web.http_headers import Headers

from edgeaccess import errors
from edgeaccess.httpclient import pinned_ca_from_answer, split_addr

_log = Logger()

#: Seconds a call may take, connection and whole answer included.
DEFAULT_TIMEOUT = 15.0
#: Largest answer body read (the API's own bodies are far smaller).
MAX_BODY = 16 * 1024 * 1024
#: Longest line of a streamed answer.
MAX_LINE = 1024 * 1024


class ClusterClient:
    """JSON over HTTPS to one cluster address.

    :param addr: ``HOST[:PORT]`` (``default_port`` when the port is left out).
    :param http: a treq ``HTTPClient`` (or ``StubTreq``); see :func:`connect`
        for the real one.
    :param clock: ``IReactorTime`` for the timeouts.
    :param pool: the connection pool to close with the client, if any.
    """

    def __init__(self, addr: str, http, clock, *, default_port: int = 3025,
                 timeout: float = DEFAULT_TIMEOUT, pool: HTTPConnectionPool | None = None) -> None:
        host, port = split_addr(addr, default_port)
        self.addr = f"{host}:{port}"
        self._base = f"https://{'[' + host + ']' if ':' in host else host}:{port}"
        self._http = http
        self._clock = clock
        self.timeout = timeout
        self._pool = pool
        self._in_flight: set[defer.Deferred] = set()
        self._closed = False

    # --- calls -----------------------------------------------------------

    def get_json(self, path: str, *, timeout: float | None = None) -> defer.Deferred:
        """``GET path``; fires with the decoded JSON answer."""
        return self._call(self._json_call("GET", path, None, None), timeout)

    def post_json(self, path: str, body: Any, *, timeout: float | None = None) -> defer.Deferred:
        """``POST path`` with ``body`` as JSON; fires with the JSON answer."""
        data = json.dumps(body).encode("utf-8")
        return self._call(self._json_call("POST", path, data, b"application/json"), timeout)

    def put_bytes(self, path: str, data: bytes, *, content_type: bytes = b"application/octet-stream",
                  timeout: float | None = None) -> defer.Deferred:
        """``PUT path`` with raw ``data``; fires with the JSON answer."""
        return self._call(self._json_call("PUT", path, bytes(data), content_type), timeout)

    def post_bytes(self, path: str, data: bytes, *, content_type: bytes = b"application/octet-stream",
                   timeout: float | None = None) -> defer.Deferred:
        """``POST path`` with raw ``data``; fires with the JSON answer."""
        return self._call(self._json_call("POST", path, bytes(data), content_type), timeout)

    def stream_lines(self, path: str, on_line: Callable[[bytes], None], *,
                     timeout: float | None = None, max_line: int = MAX_LINE) -> defer.Deferred:
        """``GET path`` and call ``on_line`` with each line of the answer as
        it arrives (without its ``\\n``), for long-lived answers (watch
        streams). ``timeout`` covers only the wait for the answer's headers.

        Fires with None when the server ends the answer, fails on an error
        (an error status, a lost connection, a line over ``max_line``, or an
        exception of ``on_line``: the stream is then closed). Cancelling it,
        or :meth:`close`, closes the connection.
        """
        if self._closed:
            return defer.fail(errors.EdgeError(f"the client for {self.addr} is closed"))
        return self._stream_call(path, on_line, timeout, max_line, None)

    def _stream_call(self, path, on_line, timeout, max_line, on_reader) -> defer.Deferred:
        if self._closed:
            return defer.fail(errors.EdgeError(f"the client for {self.addr} is closed"))
        d = defer.Deferred.fromCoroutine(self._stream(
            path, on_line, max_line, self.timeout if timeout is None else timeout, on_reader))
        d.addErrback(self._translate)
        self._track(d)
        return d

    def lines(self, path: str, *, timeout: float | None = None, max_line: int = MAX_LINE,
              max_queued: int = 256) -> "LineStream":
        """:meth:`stream_lines` as an async iterator::

            async for line in client.lines("/v1/watch"):
                ...

        Reading from the server pauses once ``max_queued`` lines wait to
        be taken (TCP backpressure; the lines of a piece already received
        are queued whole) and resumes when half of them are. Breaking out
        of the loop does not close the stream: call ``close()`` on it.
        """
        stream = LineStream(max_queued)
        ending = self._stream_call(path, stream._put, timeout, max_line, stream._attach)
        stream._begin(ending)
        return stream

    def close(self) -> defer.Deferred:
        """Cancel every call in flight and close the pooled connections."""
        self._closed = True
        for d in list(self._in_flight):
            d.cancel()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return defer.succeed(None)

    # --- inside ------------------------------------------------------------

    def _track(self, d: defer.Deferred) -> None:
        self._in_flight.add(d)

        def forget(result):
            self._in_flight.discard(d)
            return result

        d.addBoth(forget)

    def _call(self, coroutine, timeout: float | None) -> defer.Deferred:
        if self._closed:
            coroutine.close()
            return defer.fail(errors.EdgeError(f"the client for {self.addr} is closed"))
        d = defer.Deferred.fromCoroutine(coroutine)
        self._deadline(d, self.timeout if timeout is None else timeout)
        self._track(d)
        return d

    def _deadline(self, d: defer.Deferred, seconds: float) -> None:
        """Cancel ``d`` after ``seconds``; translate what it fails with."""
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            d.cancel()

        timer = self._clock.callLater(seconds, expire)

        def settle(result):
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(settle)
        d.addErrback(lambda failure: self._translate(
            failure, f"did not answer within {seconds:g}s" if expired else None))

    def _request(self, method: str, path: str, data: bytes | None, content_type: bytes | None):
        if not path.startswith("/"):
            raise errors.BadRequest(f"path {path!r} does not start with /")
        headers = Headers({b"accept": [b"application/json"]})
        if content_type is not None:
            headers.setRawHeaders(b"content-type", [content_type])
        return self._http.request(method, self._base + path, headers=headers, data=data,
                                  allow_redirects=False, unbuffered=True)

    async def _json_call(self, method: str, path: str, data: bytes | None,
                         content_type: bytes | None):
        response = await self._request(method, path, data, content_type)
        body = await _read_body(response, MAX_BODY)
        return self._decode(response, path, body)

    def _decode(self, response, path: str, body: bytes):
        try:
            decoded = json.loads(body) if body else None
        except ValueError:
            if response.code == 404:
                raise errors.NotFound(f"{self.addr} has no {path}")
            raise errors.EdgeError(f"{self.addr} answered {response.code} with a non-JSON body")
        if response.code >= 400:
            err = decoded.get("error") if isinstance(decoded, dict) else None
            if isinstance(err, dict):
                raise errors.error_from_code(str(err.get("code")), str(err.get("message")))
            raise errors.EdgeError(f"{self.addr} answered {response.code}")
        return decoded

    async def _stream(self, path, on_line, max_line, seconds: float, on_reader=None):
        waiting = self._request("GET", path, None, None)
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            waiting.cancel()

        timer = self._clock.callLater(seconds, expire)
        try:
            response = await waiting
        except Exception:
            if expired:
                raise errors.EdgeError(f"{self.addr} did not answer within {seconds:g}s")
            raise
        finally:
            if timer.active():
                timer.cancel()
        if response.code >= 400:
            self._decode(response, path, await _read_body(response, MAX_BODY))
            raise errors.EdgeError(f"{self.addr} answered {response.code}")
        reader = _LineReader(on_line, max_line)
        response.deliverBody(reader)
        if on_reader is not None:
            on_reader(reader)
        await reader.done

    def _translate(self, failure: Failure, timed_out: str | None = None):
        """Network and TLS failures as one-line :mod:`edgeaccess.errors`."""
        if timed_out is not None:
            raise errors.EdgeError(f"{self.addr} {timed_out}")
        if failure.check(errors.EdgeError):
            return failure
        if _find_reason(failure, defer.CancelledError) is not None or failure.check(
                ConnectingCancelledError):
            if self._closed:
                raise errors.EdgeError(f"the call to {self.addr} was cancelled (client closed)")
            return failure
        refused = _find_reason(failure, errors.CertificateInvalid)
        if refused is not None:
            raise refused
        reason = _describe(failure)
        raise errors.EdgeError(f"cannot reach {self.addr}: {reason}")


_END = object()


class LineStream:
    """The lines of a streamed answer, as an async iterator (see
    :meth:`ClusterClient.lines`). Ends when the server ends the answer;
    raises what the stream failed with; ``close()`` stops it."""

    def __init__(self, max_queued: int) -> None:
        self._max_queued = max(1, max_queued)
        self._lines: collections.deque[bytes] = collections.deque()
        self._waiting: defer.Deferred | None = None
        self._ending: defer.Deferred | None = None
        self._outcome: Failure | object | None = None
        self._reader = None
        self._paused = False

    def _begin(self, ending: defer.Deferred) -> None:
        self._ending = ending
        ending.addBoth(self._end)

    def _attach(self, reader) -> None:
        self._reader = reader
        self._flow()

    def _put(self, line: bytes) -> None:
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.callback(line)
            return
        self._lines.append(line)
        self._flow()

    def _flow(self) -> None:
        transport = getattr(self._reader, "transport", None)
        if transport is None:
            return
        if not self._paused and len(self._lines) >= self._max_queued:
            self._paused = True
            transport.pauseProducing()
        elif self._paused and len(self._lines) <= self._max_queued // 2:
            self._paused = False
            transport.resumeProducing()

    def _end(self, result) -> None:
        self._outcome = result if isinstance(result, Failure) else _END
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.callback(_END)

    def __aiter__(self) -> "LineStream":
        return self

    async def __anext__(self) -> bytes:
        if self._lines:
            line = self._lines.popleft()
            self._flow()
            return line
        if self._outcome is None:
            self._waiting = defer.Deferred()
            got = await self._waiting
            if got is not _END:
                return got
        if isinstance(self._outcome, Failure):
            failure, self._outcome = self._outcome, _END
            failure.raiseException()
        raise StopAsyncIteration

    def close(self) -> None:
        """Stop reading and close the connection."""
        if self._ending is not None and not self._ending.called:
            self._ending.cancel()


class _LineReader(Protocol):
    """Splits a response body into lines for :meth:`ClusterClient.stream_lines`."""

    def __init__(self, on_line, max_line: int) -> None:
        self._on_line = on_line
        self._max_line = max_line
        self._buffer = b""
        self.done: defer.Deferred = defer.Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        if self.done.called:
            return
        self._buffer += data
        try:
            while True:
                line, newline, rest = self._buffer.partition(b"\n")
                if not newline:
                    break
                self._buffer = rest
                self._on_line(line.rstrip(b"\r"))
            if len(self._buffer) > self._max_line:
                raise errors.BadRequest(f"a streamed line is longer than {self._max_line} bytes")
        except BaseException:
            self._abort()
            self.done.errback(Failure())

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 (Twisted API)
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            if self._buffer:
                try:
                    self._on_line(self._buffer.rstrip(b"\r"))
                except BaseException:
                    self.done.errback(Failure())
                    return
            self.done.callback(None)
        else:
            self.done.errback(reason)


class _BodyReader(Protocol):
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self.done: defer.Deferred = defer.Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._abort()
            self.done.errback(errors.EdgeError(f"an answer larger than {self._limit} bytes"))
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 (Twisted API)
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(reason)


def _read_body(response, limit: int) -> defer.Deferred:
    if response.length == 0:
        return defer.succeed(b"")
    reader = _BodyReader(limit)
    response.deliverBody(reader)
    return reader.done


def _find_reason(failure: Failure, kind):
    """The first ``kind`` exception in ``failure`` or the reasons it wraps
    (``ResponseFailed``/``ResponseNeverReceived`` carry a list of them)."""
    seen = [failure]
    while seen:
        current = seen.pop()
        if current.check(kind):
            return current.value
        inner = getattr(current.value, "reasons", None)
        if isinstance(inner, list):
            seen.extend(r for r in inner if isinstance(r, Failure))
    return None


def _describe(failure: Failure) -> str:
    value = failure.value
    if isinstance(value, ResponseFailed) or hasattr(value, "reasons"):
        reasons = [r for r in getattr(value, "reasons", []) if isinstance(r, Failure)]
        if reasons:
            return _describe(reasons[0])
    text = str(value).strip() or type(value).__name__
    return text.splitlines()[0][:200]


# --- construction -----------------------------------------------------------


def connect(reactor, addr: str, *, ca_certs=None, cluster: str | None = None,
            credentials=None, default_port: int = 3025, timeout: float = DEFAULT_TIMEOUT,
            max_per_host: int = 4) -> ClusterClient:
    """A :class:`ClusterClient` over real HTTPS (persistent pool).

    :param ca_certs: the cluster CA certificates the server must chain to;
        None only to fetch the CA itself (any server accepted: check what it
        sends against a pin, see :func:`fetch_pinned_ca`).
    :param cluster: the cluster whose proxy the server must be (required
        with ``ca_certs``).
    :param credentials: ``() -> (key, certificate)`` of our client
        certificate, or None.
    """
    import treq.client

    from edgeaccess import tls

    if ca_certs is None:
        policy = tls.UnverifiedPolicy()
    else:
        if not cluster:
            raise ValueError("a verified cluster client needs the expected cluster")
        policy = tls.ClusterPolicy(ca_certs, cluster=cluster, credentials=credentials)
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    # Twisted retries only idempotent requests without a body on a pooled
    # connection the server had closed: a POST is never sent twice.
    agent = Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=timeout)
    return ClusterClient(addr, treq.client.HTTPClient(agent), reactor,
                         default_port=default_port, timeout=timeout, pool=pool)


async def fetch_pinned_ca(open_client: Callable[..., ClusterClient], addr: str, pin: str, *,
                          default_port: int = 3080) -> str:
    """Fetch the cluster CA from ``addr`` and check it against ``pin``
    (see :func:`edgeaccess.httpclient.fetch_pinned_ca`); returns its PEM.

    :param open_client: ``(addr, default_port=..., ca_certs=None) ->
        ClusterClient``, e.g. ``functools.partial(connect, reactor)``.
    """
    client = open_client(addr, default_port=default_port, ca_certs=None)
    try:
        answer = await client.get_json("/v1/cluster/ca")
    finally:
        await client.close()
    return pinned_ca_from_answer(answer, pin, addr)
