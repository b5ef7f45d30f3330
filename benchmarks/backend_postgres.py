"""``python -m benchmarks backend-postgres``: backend writes/s and watch latency.

Baseline in the same run: the SQLite backend (one file in a temp dir). Then
PostgreSQL (a throw-away durable server from ``edgeaccess.devpostgres``):
puts/s with ``--concurrency`` writers, without and with a watcher open
(a watcher adds one change-log read per write), and the latency of a put
made through one backend until a second backend's watcher delivers it
(LISTEN/NOTIFY path, as between two proxies).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, task

from edgeaccess.backend.postgres import PostgresBackend
from edgeaccess.backend.sqlite import SQLiteBackend
from edgeaccess.devpostgres import PostgresServer


async def _puts(backend, total: int, concurrency: int) -> float:
    value = b'{"kind": "node", "spec": {"addr": "10.0.0.1:3022"}}'
    counter = iter(range(total))

    async def writer() -> None:
        for index in counter:
            await backend.put(f"/nodes/n{index % 500}", value)

    started = time.perf_counter()
    await defer.gatherResults([defer.Deferred.fromCoroutine(writer()) for _ in range(concurrency)])
    return total / (time.perf_counter() - started)


async def _watched_puts(backend, total: int, concurrency: int) -> float:
    watcher = backend.watch(["/nodes/"], backlog=total + 10)
    await watcher.next()
    rate = await _puts(backend, total, concurrency)
    watcher.close()
    return rate


async def _latency(first, second, samples: int) -> list[float]:
    watcher = second.watch(["/lat/"])
    await watcher.next()
    found = []
    for index in range(samples):
        started = time.perf_counter()
        await first.put("/lat/x", str(index).encode())
        await watcher.next()
        found.append((time.perf_counter() - started) * 1000)
    watcher.close()
    return found


async def _run(reactor, options) -> None:
    from twisted.internet import reactor as clock

    with tempfile.TemporaryDirectory() as directory:
        sqlite = await SQLiteBackend(Path(directory) / "b.sqlite3", clock, reactor).start()
        rate = await _puts(sqlite, options.writes, options.concurrency)
        print(f"sqlite      puts/s {rate:8.0f}  (baseline, synchronous=FULL)")
        await sqlite.close()
    server = PostgresServer(durable=True)
    try:
        url = server.create_database()
        first = await PostgresBackend(url, clock, reactor).start()
        second = await PostgresBackend(url, clock, reactor).start()
        print(f"postgresql  puts/s {await _puts(first, options.writes, options.concurrency):8.0f}"
              f"  ({options.concurrency} writers, no watcher)")
        print(f"postgresql  puts/s {await _watched_puts(first, options.writes, options.concurrency):8.0f}"
              f"  ({options.concurrency} writers, one watcher)")
        latencies = await _latency(first, second, options.samples)
        print(f"put on A -> event on B: median {statistics.median(latencies):.1f} ms,"
              f" p95 {sorted(latencies)[int(len(latencies) * 0.95) - 1]:.1f} ms")
        await first.close()
        await second.close()
    finally:
        server.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks backend-postgres")
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--samples", type=int, default=200)
    options = parser.parse_args(argv)
    task.react(lambda reactor: defer.Deferred.fromCoroutine(_run(reactor, options)))
    return 0
