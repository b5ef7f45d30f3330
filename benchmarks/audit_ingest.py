"""Audit ingestion rate: events per second appended to the hash chain.

``python -m benchmarks audit [--events N] [--batch B]`` ingests ``N`` node
events in batches of ``B`` (as nodes deliver their spool) into an
:class:`~edgeaccess.audit.log.AuditLog` over the SQLite backend (the
embedded default) and over the in-memory backend (the chain's own CPU cost,
the baseline), then checks the chain with ``verify``. Prints one JSON
object per backend.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path

from twisted.internet import defer, task


def _events(n: int) -> list[dict]:
    return [{"id": str(uuid.uuid4()), "event": "exec", "time": "2024-05-01T12:00:00Z",
             "cluster": "bench", "user": "alice", "login": "root",
             "session_id": str(uuid.uuid4()), "remote_addr": "127.0.0.1",
             "command": f"echo {i}"} for i in range(n)]


async def _measure(name: str, backend, reactor, events: list[dict], batch: int) -> dict:
    from edgeaccess.audit.log import AuditLog

    log = AuditLog(backend, "bench", reactor)
    started = time.perf_counter()
    for i in range(0, len(events), batch):
        await log.ingest(events[i:i + batch], node_name="bench-node", node_id="n-1")
    elapsed = time.perf_counter() - started
    again = time.perf_counter()
    await log.ingest(events[:batch], node_name="bench-node")  # a re-send: no new events
    resend = time.perf_counter() - again
    checked = time.perf_counter()
    result = await log.verify()
    verify_s = time.perf_counter() - checked
    assert result.ok and result.events == len(events), result
    await backend.close()
    return {"benchmark": "audit_ingest", "backend": name, "events": len(events),
            "batch": batch, "seconds": round(elapsed, 3),
            "events_per_s": round(len(events) / elapsed, 1),
            "resend_batch_ms": round(resend * 1000, 1),
            "verify_events_per_s": round(len(events) / verify_s, 1)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks audit")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args(argv)

    async def run(reactor) -> None:
        from edgeaccess.backend.memory import MemoryBackend
        from edgeaccess.backend.sqlite import SQLiteBackend

        events = _events(args.events)
        print(json.dumps(await _measure("memory", MemoryBackend(reactor), reactor, events,
                                        args.batch)), flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            backend = SQLiteBackend(Path(tmp) / "backend.sqlite3", reactor, reactor)
            print(json.dumps(await _measure("sqlite", backend, reactor, events,
                                            args.batch)), flush=True)

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
