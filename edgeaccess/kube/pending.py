"""A client's request bytes held while the connection they go on is being made.

Both hops of a Kubernetes request have it: the proxy's kubectl connection
waiting for its channel to the agent, and the agent's channel waiting for
a connection to the API. What the client sends meanwhile is kept in order
and written at once when the far side is attached; past a high-water mark
the client is paused (its bytes would otherwise pile up without bound
while the far side is unreachable), and resumed on attach.
"""

from __future__ import annotations

from typing import Any

from edgeaccess.proxy.splice import ProducerShim

#: Held bytes past which the client is paused.
HIGH_WATER = 1024 * 1024


class PendingRequestBytes:
    """The bytes a client sent before its far side was connected.

    :param high_water: held bytes past which the client is paused.
    """

    def __init__(self, high_water: int = HIGH_WATER) -> None:
        self._high_water = high_water
        self._chunks: list[bytes] = []
        self._size = 0
        self._paused = False

    def hold(self, data: bytes, client: Any) -> None:
        """Keep ``data``; pause ``client`` (a transport) once too much is held."""
        self._chunks.append(data)
        self._size += len(data)
        if self._size > self._high_water and not self._paused:
            self._paused = True
            client.pauseProducing()

    def attach(self, client: Any, far: Any) -> None:
        """The far side is connected: backpressure both ways between the
        transports ``client`` and ``far`` (as a splice does; through shims, so
        that the end of one side does not stop the other, a pooled
        connection), the held bytes written to ``far``, and ``client``
        resumed if it was paused."""
        far.registerProducer(ProducerShim(client), True)
        client.registerProducer(ProducerShim(far), True)
        chunks, self._chunks, self._size = self._chunks, [], 0
        if chunks:
            far.write(b"".join(chunks))
        if self._paused:
            self._paused = False
            client.resumeProducing()

    def discard(self) -> None:
        """The far side cannot be reached: forget what was held."""
        self._chunks, self._size = [], 0
