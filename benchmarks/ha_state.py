"""``python -m benchmarks ha-state``: shared state with 1, 2 and 3 proxies on one PostgreSQL.

- **Audit events/s**: N worker processes (one per proxy), each an
  :class:`~edgeaccess.audit.log.AuditLog` on its own
  :class:`~edgeaccess.backend.postgres.PostgresBackend`, append at once
  for a few seconds: ``emit`` from many concurrent callers (sessions,
  logins) and node batches through ``ingest``. Baseline in the same run:
  the same with the create()-and-retry append (the path without
  transactions). The chain is verified at the end.
- **Logins/s**: N real ``twistd edgeproxy`` processes sharing the database
  and the CA key; clients post ``/v1/login`` round-robin over them (a
  bcrypt check and two certificates per login).

A durable throw-away server (``edgeaccess.devpostgres``, synchronous
commit), so that the numbers include the commit's flush. One JSON object
per result. :func:`measure` is what ``benchmarks/ha.py`` calls.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

WORKER = [sys.executable, "-m", "benchmarks.ha_state", "--worker"]


# --- audit: one worker process per proxy --------------------------------------


def _worker(argv: list[str]) -> int:
    """A proxy's audit log appending for ``seconds`` once told to go (stdin)."""
    url, mode, seconds, emitters, batch = argv[0], argv[1], float(argv[2]), int(argv[3]), int(argv[4])
    from twisted.internet import defer, task

    async def run(reactor) -> None:
        from zope.interface import implementer_only

        from edgeaccess.audit.log import AuditLog
        from edgeaccess.backend.interfaces import IBackend
        from edgeaccess.backend.postgres import PostgresBackend

        backend = await PostgresBackend(url, reactor, reactor, max_threads=4).start()
        target = backend
        if mode == "create-and-retry":
            @implementer_only(IBackend)
            class Plain:
                """The backend without IAtomicUpdate: the path without transactions."""

                def __getattr__(self, name):
                    return getattr(backend, name)

            target = Plain()
        log = AuditLog(target, "bench", reactor)
        print("ready", flush=True)
        await defer.Deferred.fromCoroutine(_read_go())
        deadline = time.monotonic() + seconds
        counts = {"emitted": 0, "ingested": 0}

        async def emitter() -> None:
            while time.monotonic() < deadline:
                stored = await log.emit("user.login", user="alice", success=True)
                if stored is not None:
                    counts["emitted"] += 1

        async def shipper(index: int) -> None:
            sent = 0
            while time.monotonic() < deadline:
                events = [{"id": str(uuid.uuid4()), "event": "exec", "cluster": "bench",
                           "time": "2026-12-02T12:00:00Z", "user": "alice", "login": "root",
                           "command": "true", "success": True} for _ in range(batch)]
                await log.ingest(events, node_name=f"node{index}")
                sent += len(events)
            counts["ingested"] += sent

        started = time.monotonic()
        work = [defer.Deferred.fromCoroutine(emitter()) for _ in range(emitters)]
        work += [defer.Deferred.fromCoroutine(shipper(i)) for i in range(2)]
        await defer.gatherResults(work)
        elapsed = time.monotonic() - started
        print(json.dumps({**counts, "seconds": elapsed}), flush=True)
        await backend.close()

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    return 0


async def _read_go() -> None:
    from twisted.internet import threads

    await threads.deferToThread(sys.stdin.readline)


def _audit_round(url: str, proxies: int, mode: str, seconds: float, emitters: int,
                 batch: int) -> dict:
    workers = [subprocess.Popen(WORKER + [url, mode, str(seconds), str(emitters), str(batch)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parent.parent)
               for _ in range(proxies)]
    try:
        for worker in workers:
            assert worker.stdout.readline().strip() == "ready"
        for worker in workers:
            worker.stdin.write("go\n")
            worker.stdin.flush()
        results = [json.loads(worker.stdout.readline()) for worker in workers]
    finally:
        for worker in workers:
            worker.wait(60)
    events = sum(r["emitted"] + r["ingested"] for r in results)
    elapsed = max(r["seconds"] for r in results)
    return {"benchmark": "ha_state_audit", "proxies": proxies, "append": mode,
            "events": events, "seconds": round(elapsed, 2),
            "events_per_s": round(events / elapsed, 1),
            "emitted_per_s": round(sum(r["emitted"] for r in results) / elapsed, 1),
            "ingested_per_s": round(sum(r["ingested"] for r in results) / elapsed, 1),
            "emitters_per_proxy": emitters, "node_batch": batch}


def _verify(url: str) -> dict:
    """``verify`` of the whole chain, in a process of its own."""
    code = subprocess.run([sys.executable, "-c", "import sys; from benchmarks.ha_state import "
                           "_verify_main; sys.exit(_verify_main(sys.argv[1]))", url],
                          capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    if code.returncode == 0 and code.stdout.strip():
        return json.loads(code.stdout.strip().splitlines()[-1])
    return {"benchmark": "ha_state_verify", "ok": False, "error": code.stderr[-500:]}


def _verify_main(url: str) -> int:
    from twisted.internet import defer, task

    async def run(reactor) -> None:
        from edgeaccess.audit.log import AuditLog
        from edgeaccess.backend.postgres import PostgresBackend

        backend = await PostgresBackend(url, reactor, reactor).start()
        started = time.perf_counter()
        result = await AuditLog(backend, "bench", reactor).verify()
        print(json.dumps({"benchmark": "ha_state_verify", "ok": result.ok,
                          "events": result.events,
                          "verify_s": round(time.perf_counter() - started, 2)}))
        await backend.close()

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    return 0


# --- logins: real proxies ------------------------------------------------------------


def _login_round(server, proxies: int, seconds: float, clients: int, base: Path) -> dict:
    import http.client
    import ssl

    from edgeaccess.devcluster import ProxyProcess
    from edgeaccess.pki import keys

    url = server.create_database()
    key_file = base / f"ca-{proxies}.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    started = []
    try:
        for index in range(proxies):
            process = ProxyProcess(base / f"l{proxies}-{index}", base / f"l{proxies}-{index}.log",
                                   cluster="bench",
                                   extra_args=["--backend", url, "--ca-key-file", str(key_file)])
            started.append(process)
            process.start(timeout=60)
        started[0].add_user("alice", "correct horse battery", logins=("alice",))
        context = ssl.create_default_context(cafile=str(started[0].data_dir / "ca" / "tls_ca.crt"))
        context.check_hostname = False
        public = keys.public_key_openssh(keys.generate_private_key()).decode()
        body = json.dumps({"user": "alice", "password": "correct horse battery",
                           "ssh_public_key": public}).encode()
        addresses = [p.addr("web").rsplit(":", 1) for p in started]
        deadline = time.monotonic() + seconds
        done = [0] * clients
        failures = [0] * clients

        def client(index: int) -> None:
            host, port = addresses[index % len(addresses)]
            conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
            while time.monotonic() < deadline:
                conn.request("POST", "/v1/login", body, {"Content-Type": "application/json"})
                answer = conn.getresponse()
                answer.read()
                if answer.status == 200:
                    done[index] += 1
                else:
                    failures[index] += 1
            conn.close()

        began = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - began
        return {"benchmark": "ha_state_logins", "proxies": proxies, "clients": clients,
                "logins": sum(done), "failures": sum(failures), "seconds": round(elapsed, 2),
                "logins_per_s": round(sum(done) / elapsed, 1)}
    finally:
        for process in started:
            process.stop()


def measure(proxies=(1, 2, 3), seconds: float = 5.0, emitters: int = 32, batch: int = 50,
            clients: int = 6, logins: bool = True, baseline: bool = True) -> list[dict]:
    """Audit events/s (and the create-and-retry baseline) and logins/s with
    each number of proxies; one dict per result."""
    from edgeaccess.devpostgres import PostgresServer

    results = []
    server = PostgresServer(durable=True)
    try:
        for count in proxies:
            modes = ["transaction"] + (["create-and-retry"] if baseline else [])
            for mode in modes:
                url = server.create_database()
                result = _audit_round(url, count, mode, seconds, emitters, batch)
                result["verify"] = _verify(url)
                results.append(result)
                print(json.dumps(result), flush=True)
        if logins:
            with tempfile.TemporaryDirectory() as directory:
                for count in proxies:
                    result = _login_round(server, count, seconds, clients, Path(directory))
                    results.append(result)
                    print(json.dumps(result), flush=True)
    finally:
        server.stop()
    return results


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--worker":
        return _worker(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks ha-state")
    parser.add_argument("--proxies", default="1,2,3", help="comma-separated proxy counts")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--emitters", type=int, default=32, help="concurrent emit() per proxy")
    parser.add_argument("--batch", type=int, default=50, help="events per node batch")
    parser.add_argument("--clients", type=int, default=6, help="concurrent login clients")
    parser.add_argument("--no-logins", action="store_true")
    parser.add_argument("--no-baseline", action="store_true")
    options = parser.parse_args(argv)
    measure(tuple(int(n) for n in options.proxies.split(",")), options.seconds,
            options.emitters, options.batch, options.clients, not options.no_logins,
            not options.no_baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
