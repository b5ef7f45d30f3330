"""``python -m benchmarks links-resume``: memory a resumable channel holds while its link is down.

In memory (a real agent and proxy factory over iosim pumps, both ends in this
process), ``--channels`` channels are opened; each user side writes
``--inflight`` bytes that the cut then loses (nothing of it arrives), and the
tunnel is cut. tracemalloc measures what the detached session holds beyond
what the open channels held before (the retained, unacknowledged bytes and
their bookkeeping), and separately the whole cost of an idle detached channel
(both ends: two Channel objects and their protocols). Results: docs/performance.md
("Resumable channels").
"""

from __future__ import annotations

import argparse
import gc
import sys
import tracemalloc
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def _world():
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))
    from tests.tunnel.test_resume import World, payload

    return World, payload


def held_while_detached(channels: int, inflight: int) -> tuple[float, float]:
    """Bytes per channel the detached session holds beyond the open channels,
    and how many of them are retained payload."""
    World, payload = _world()
    world = World()
    sides = [world.open() for _ in range(channels)]
    data = payload(inflight, 1) if inflight else b""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for user, _node in sides:
        if data:
            user.transport.write(data)
    world.step(1)
    world.cut(0.0, 0.0)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    retained = sum(user.transport.retained for user, _ in sides)
    return grown / channels, retained / channels


def idle_channel_cost(channels: int) -> float:
    """Bytes per idle channel, both ends, opened and then detached."""
    World, _ = _world()
    world = World()
    world.open()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    kept = [world.open() for _ in range(channels)]
    world.cut()
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    del kept
    return sum(s.size_diff for s in after.compare_to(before, "filename")) / channels


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks links-resume")
    parser.add_argument("--channels", type=int, default=50)
    args = parser.parse_args(argv)
    print(f"idle detached channel, both ends: {idle_channel_cost(args.channels) / 1024:.1f} KiB")
    for inflight in (0, 64 * 1024, 1024 * 1024):
        grown, retained = held_while_detached(min(args.channels, 20), inflight)
        print(f"{inflight // 1024:5d} KiB unacknowledged: the session holds {grown / 1024:.1f} KiB "
              f"more per channel while detached ({retained / 1024:.0f} KiB retained bytes)")
    return 0
