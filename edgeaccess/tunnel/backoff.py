"""Reconnect delays: capped exponential backoff with full jitter.

Full jitter (a uniform draw between 0 and the capped exponential) spreads
10,000 agents whose proxy restarted over the whole window instead of
bringing them back in waves (AWS Architecture Blog, "Exponential Backoff And
Jitter", 2015).
"""

from __future__ import annotations

from typing import Protocol


class UniformRandom(Protocol):
    """The one method of :class:`random.Random` the backoff needs."""

    def uniform(self, a: float, b: float) -> float: ...


def backoff_ceiling(attempt: int, base: float = 1.0, cap: float = 60.0) -> float:
    """The largest delay for ``attempt`` (0-based): ``min(cap, base * 2**attempt)``."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    # 2**attempt overflows floats around 1024; the cap is reached long before.
    return min(cap, base * 2.0 ** min(attempt, 64))


def backoff_delay(
    attempt: int, rng: UniformRandom, base: float = 1.0, cap: float = 60.0
) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): uniform in [0, ceiling].

    :param attempt: failed attempts in a row before this wait, minus one.
    :param rng: source of randomness (a :class:`random.Random`), injected.
    """
    return rng.uniform(0.0, backoff_ceiling(attempt, base, cap))
