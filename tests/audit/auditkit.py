"""Helpers for the audit tests: drive in-memory Deferreds synchronously."""

from __future__ import annotations

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

START = 1_700_000_000.0


def clock() -> Clock:
    """A fake clock at a realistic time."""
    c = Clock()
    c.advance(START)
    return c


def run(awaitable):
    """The result of a coroutine or Deferred that completes without the reactor."""
    d = ensureDeferred(awaitable) if not isinstance(awaitable, Deferred) else awaitable
    results = []
    d.addBoth(results.append)
    assert results, "the operation did not complete synchronously"
    result = results[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


async def settle(writer, rounds: int = 20) -> None:
    """Let chains of writer jobs (a shipper round: send, acknowledge, send...)
    run out: ``rounds`` barriers through the writer's queue."""
    for _ in range(rounds):
        await writer.submit(lambda commit: None)


class Counter:
    """Deterministic ids: ``ev-1``, ``ev-2``..."""

    def __init__(self, prefix: str = "ev") -> None:
        self.prefix = prefix
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"{self.prefix}-{self.n}"
