"""How many audit events per second the node's spool makes durable.

``python -m benchmarks audit-spool [--events 2000] [--producers 1,8,64]``
opens a :class:`~edgeaccess.audit.spool.Spool` in a temporary directory on
the normal disk (``disk``) and on ``/dev/shm`` (``tmpfs``: fsync is free,
what is left is the spool's CPU; ``--fsync-ms N`` adds N ms to every fsync, as a slower
disk than this VM's ~0.2 ms one would) and has ``P`` producers append events at
once, each waiting for its event to be durable before appending the next
(as an SSH session waits for its ``session.start``). The baseline in the same
run is the floor of the one-fsync-per-event design on the same disk:
``write`` + ``fsync`` of one line, ``--events`` times, in a plain loop.

Per case it prints one JSON object: events/s, the latency of one append
until durable (p50/p99), fsyncs per event (counted by wrapping ``os.fsync``)
and the longest stall of the reactor thread while the spool worked (a
1 ms ``LoopingCall`` measures it: with fsync on the reactor thread every
append stalls it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from twisted.internet import defer, task

from edgeaccess.audit import events as ev


def _event(i: int) -> dict:
    return ev.make_event(ev.EXEC, cluster="bench", when=datetime.now(timezone.utc),
                         new_id=lambda: str(uuid.uuid4()),
                         node="bench-node", node_id="bench-node-id", session_id=f"s-{i}",
                         user="alice", login="root", command="true")


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[int(fraction * (len(ordered) - 1))]


class _CountingFsync:
    """Wraps ``os.fsync`` to count calls (from any thread)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay
        self._real = os.fsync

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self._real(fd)
        if self.delay:
            time.sleep(self.delay)  # --fsync-ms: a slower disk than this VM's

    def __enter__(self) -> "_CountingFsync":
        os.fsync = self
        return self

    def __exit__(self, *exc) -> None:
        os.fsync = self._real


def baseline(directory: Path, events: int, fsync_delay: float) -> dict:
    """One write + fsync per event in a loop (the old design's floor)."""
    path = directory / "baseline.jsonl"
    latencies = []
    with open(path, "ab") as f, _CountingFsync(fsync_delay):
        started = time.perf_counter()
        for i in range(events):
            t = time.perf_counter()
            f.write(ev.canonical_json(_event(i)) + b"\n")
            f.flush()
            os.fsync(f.fileno())  # the wrapper above, looked up now
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - started
    return {"events_per_s": round(events / elapsed), "p50_ms": round(
        _percentile(latencies, 0.5) * 1000, 3), "p99_ms": round(
        _percentile(latencies, 0.99) * 1000, 3), "fsyncs_per_event": 1.0}


async def _measure(reactor, directory: Path, events: int, producers: int,
                   fsync_delay: float) -> dict:
    from edgeaccess.audit.spool import Spool

    try:
        from edgeaccess.audit.diskwriter import DiskWriter
    except ImportError:  # the tree before the disk writer (for BEFORE figures)
        writer, spool = None, Spool.open(directory)
    else:
        writer = DiskWriter(reactor)
        writer.start()
        spool = await Spool.open(directory, writer)
    latencies: list[float] = []
    stall = {"max": 0.0, "last": time.perf_counter()}

    def tick() -> None:
        now = time.perf_counter()
        stall["max"] = max(stall["max"], now - stall["last"])
        stall["last"] = now

    ticker = task.LoopingCall(tick)
    ticker.clock = reactor
    ticker.start(0.001)
    per_producer = events // producers

    async def produce(p: int) -> None:
        for i in range(per_producer):
            t = time.perf_counter()
            result = spool.append_event(_event(p * per_producer + i))
            if isinstance(result, defer.Deferred):
                await result
            latencies.append(time.perf_counter() - t)
            if not isinstance(result, defer.Deferred):
                # The old synchronous spool: let the reactor (and the other
                # producers) run between appends, as a node's would.
                await task.deferLater(reactor, 0, lambda: None)

    with _CountingFsync(fsync_delay) as fsyncs:
        started = time.perf_counter()
        await defer.gatherResults([defer.Deferred.fromCoroutine(produce(p))
                                   for p in range(producers)], consumeErrors=True)
        elapsed = time.perf_counter() - started
    ticker.stop()
    if writer is not None:
        await spool.close()
        await writer.stop()
    total = per_producer * producers
    return {"events_per_s": round(total / elapsed),
            "p50_ms": round(_percentile(latencies, 0.5) * 1000, 3),
            "p99_ms": round(_percentile(latencies, 0.99) * 1000, 3),
            "mean_ms": round(statistics.fmean(latencies) * 1000, 3),
            "fsyncs_per_event": round(fsyncs.calls / total, 3),
            "reactor_max_stall_ms": round(stall["max"] * 1000, 2)}


def main(argv: list[str]) -> int:
    """``python -m benchmarks audit-spool``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks audit-spool")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--producers", default="1,8,64")
    parser.add_argument("--fsync-ms", type=float, default=0.0,
                        help="add this many ms to every fsync (emulates a slower disk)")
    args = parser.parse_args(argv)
    producer_counts = [int(p) for p in args.producers.split(",") if p]

    async def run(reactor) -> None:
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(prefix="edge-spool-bench-") as disk, \
                tempfile.TemporaryDirectory(prefix="edge-spool-bench-", dir=shm) as tmpfs:
            result = baseline(Path(disk), args.events, args.fsync_ms / 1000)
            print(json.dumps({"benchmark": "audit_spool", "case": "baseline-fsync-loop",
                              "where": "disk", "fsync_added_ms": args.fsync_ms,
                              "events": args.events, **result}), flush=True)
            for where, base in (("disk", disk), ("tmpfs", tmpfs)):
                for producers in producer_counts:
                    directory = Path(base) / f"spool-{producers}"
                    result = await _measure(reactor, directory, args.events, producers,
                                            args.fsync_ms / 1000)
                    print(json.dumps({"benchmark": "audit_spool", "case": "spool",
                                      "where": where, "producers": producers,
                                      "fsync_added_ms": args.fsync_ms,
                                      "events": args.events, **result}), flush=True)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
