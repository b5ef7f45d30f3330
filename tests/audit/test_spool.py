"""The node's on-disk spool: durability, group commit, crash repair,
acknowledgement, the full policy. Every file operation runs in the disk
writer's thread (the conftest fails a test that fsyncs on the reactor's)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import gatherResults

from edgeaccess.audit.diskwriter import DiskWriter
from edgeaccess.audit.spool import Spool


def event(n: int) -> dict:
    return {"id": f"e{n}", "event": "exec", "time": "2024-01-01T00:00:00Z", "command": "x"}


def ids(spool: Spool) -> list[str]:
    return [e["id"] for e in spool.pending_events(limit=100000)]


class CountingFsync:
    """An injected fsync: counts, can be held (``gate``) or made to fail."""

    def __init__(self) -> None:
        self.calls = 0
        self.threads: set[str] = set()
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.error: OSError | None = None

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        if self.error is not None:
            raise self.error
        os.fsync(fd)


@pytest_twisted.async_yield_fixture
async def counted():
    fsync = CountingFsync()
    disk = DiskWriter(reactor, fsync=fsync, name="counted-writer")
    disk.start()
    yield disk, fsync
    if fsync.gate is not None:
        fsync.gate.set()
    await disk.stop()


@pytest_twisted.ensureDeferred
async def test_events_survive_reopening_and_acknowledged_ones_are_removed(tmp_path, writer):
    spool = await Spool.open(tmp_path, writer)
    for n in range(4):
        await spool.append_event(event(n))
    await spool.acknowledge_events(["e0", "e2", "unknown"])
    assert ids(spool) == ["e1", "e3"]
    # Acknowledgements are not fsync'd one by one: after a restart a few
    # acknowledged events may be offered again (the auth service stores each
    # id once), never fewer.
    assert ids(await Spool.open(tmp_path, writer)) == ["e0", "e1", "e2", "e3"]
    await spool.acknowledge_events(["e1", "e3"])
    assert (tmp_path / "events.jsonl").read_bytes() == b""  # all delivered: emptied
    assert ids(await Spool.open(tmp_path, writer)) == []


@pytest_twisted.ensureDeferred
async def test_acknowledged_lines_are_compacted_away_once_they_outweigh_the_rest(
        tmp_path, writer, monkeypatch):
    monkeypatch.setattr("edgeaccess.audit.spool.COMPACT_AFTER_BYTES", 0)
    spool = await Spool.open(tmp_path, writer)
    await gatherResults([spool.append_event(event(n)) for n in range(10)])
    await spool.acknowledge_events([f"e{n}" for n in range(7)])
    lines = (tmp_path / "events.jsonl").read_bytes().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["e7", "e8", "e9"]
    await spool.append_event(event(10))  # appends go to the compacted file
    assert ids(await Spool.open(tmp_path, writer)) == ["e7", "e8", "e9", "e10"]


@pytest_twisted.ensureDeferred
async def test_a_torn_last_line_is_ignored_and_cut_off(tmp_path, writer):
    spool = await Spool.open(tmp_path, writer)
    await spool.append_event(event(1))
    with open(tmp_path / "events.jsonl", "ab") as f:
        f.write(b'{"id": "e2", "event": "ex')  # the crash came mid-write
    reopened = await Spool.open(tmp_path, writer)
    assert ids(reopened) == ["e1"]
    await reopened.append_event(event(3))
    assert ids(await Spool.open(tmp_path, writer)) == ["e1", "e3"]


@pytest_twisted.ensureDeferred
async def test_concurrent_appends_share_fsyncs(tmp_path, counted):
    """Group commit: 200 events appended at once are durable after far fewer
    than 200 fsyncs, all of them in the writer's thread."""
    disk, fsync = counted
    spool = await Spool.open(tmp_path, disk)
    fsync.calls = 0
    fsync.gate = threading.Event()  # hold the first commit so the rest queue up
    first = spool.append_event(event(0))
    await threads.deferToThread(fsync.entered.wait, 30)
    rest = [spool.append_event(event(n)) for n in range(1, 200)]
    fsync.gate.set()
    await gatherResults([first, *rest])
    assert ids(spool) == [f"e{n}" for n in range(200)]
    assert fsync.calls <= 3, fsync.calls  # the first event's, then one for the 199
    assert fsync.threads == {"counted-writer"}
    assert disk.batches < disk.jobs


@pytest_twisted.ensureDeferred
async def test_nothing_is_acknowledged_before_its_fsync_returns(tmp_path, counted):
    disk, fsync = counted
    spool = await Spool.open(tmp_path, disk)
    fsync.gate = threading.Event()
    fsync.entered.clear()
    appended = spool.append_event(event(1))
    await threads.deferToThread(fsync.entered.wait, 30)
    assert not appended.called  # the fsync is under way: not durable, not acknowledged
    assert ids(spool) == []  # nor offered to the shipper
    fsync.gate.set()
    await appended
    assert ids(spool) == ["e1"]


@pytest_twisted.ensureDeferred
async def test_a_failing_fsync_fails_the_append_and_nothing_is_acknowledged(tmp_path, counted):
    disk, fsync = counted
    spool = await Spool.open(tmp_path, disk)
    fsync.error = OSError(5, "Input/output error")
    with pytest.raises(OSError, match="Input/output"):
        await spool.append_event(event(1))
    assert ids(spool) == []
    fsync.error = None
    await spool.append_event(event(2))  # the disk is back: the spool goes on
    assert ids(spool) == ["e2"]


@pytest_twisted.ensureDeferred
async def test_pending_events_come_oldest_first_in_batches(tmp_path, writer):
    spool = await Spool.open(tmp_path, writer)
    for n in range(5):
        await spool.append_event(event(n))
    assert [e["id"] for e in spool.pending_events(limit=2)] == ["e0", "e1"]


@pytest_twisted.ensureDeferred
async def test_a_full_spool_refuses_sessions_but_keeps_every_event(tmp_path, writer):
    spool = await Spool.open(tmp_path, writer, max_bytes=300)
    assert spool.accepting_sessions()
    await gatherResults([spool.append_event(event(n)) for n in range(10)])
    assert not spool.accepting_sessions()  # over the bound: still written
    assert len((await Spool.open(tmp_path, writer, max_bytes=300)).pending_events()) == 10
    await spool.acknowledge_events([f"e{n}" for n in range(10)])
    assert spool.accepting_sessions()


@pytest_twisted.ensureDeferred
async def test_recording_output_past_the_hard_bound_is_dropped_and_marked(tmp_path, writer):
    spool = await Spool.open(tmp_path, writer, max_bytes=100)
    recording = spool.start_recording("s1", {"user": "alice"})
    recording.write(b"x" * 150 + b"\n")
    recording.write(b"y" * 100 + b"\n")  # past 2 * max_bytes
    await recording.close()
    [pending] = spool.pending_recordings()
    assert pending["length"] == 151 and pending["truncated"] and pending["complete"]
    [reopened] = (await Spool.open(tmp_path, writer)).pending_recordings()
    assert reopened["truncated"] and reopened["complete"] and reopened["length"] == 151


@pytest_twisted.ensureDeferred
async def test_a_recording_is_cut_back_to_its_last_complete_line(tmp_path, writer):
    spool = await Spool.open(tmp_path, writer)
    recording = spool.start_recording("s1", {"user": "alice"})
    recording.write(b'{"version": 2}\n[0.1, "o", "a"]\n')
    assert await recording.sync() == 31
    with open(tmp_path / "recordings" / "s1.cast", "ab") as f:
        f.write(b'[0.2, "o", "b')  # torn by a crash
    reopened = await Spool.open(tmp_path, writer)
    [pending] = reopened.pending_recordings()
    assert pending["length"] == len(b'{"version": 2}\n[0.1, "o", "a"]\n')
    assert not pending["complete"] and pending["uploaded"] is None  # unknown: ask
    assert (tmp_path / "recordings" / "s1.cast").read_bytes().endswith(b'"a"]\n')


@pytest_twisted.ensureDeferred
async def test_only_durable_recording_bytes_are_offered_and_read_chunk_by_chunk(
        tmp_path, writer):
    spool = await Spool.open(tmp_path, writer)
    recording = spool.start_recording("s1", {"user": "alice"})
    recording.write(b"line1\nline2\n")
    [pending] = spool.pending_recordings()
    assert (pending["length"], pending["written"]) == (0, 12)  # not synced yet
    assert await spool.sync_recording("s1") == 12
    assert await spool.read_recording("s1", 6, 6) == b"line2\n"
    spool.recording_acknowledged("s1", 6)
    await recording.close()
    [pending] = spool.pending_recordings()
    assert (pending["uploaded"], pending["length"], pending["complete"]) == (6, 12, True)
    spool.recording_delivered("s1")
    assert spool.pending_recordings() == [] and spool.size() == 0
    await spool.close()
    assert not (tmp_path / "recordings" / "s1.cast").exists()


@pytest_twisted.ensureDeferred
async def test_running_sessions_are_remembered_until_closed(tmp_path, writer):
    spool = await Spool.open(tmp_path, writer)
    await spool.session_opened("s1", {"session_id": "s1", "user": "alice"})
    await spool.session_opened("s2", {"session_id": "s2", "user": "bob"})
    spool.session_closed("s1")
    assert (await Spool.open(tmp_path, writer)).open_sessions() == [
        {"session_id": "s2", "user": "bob"}]


# --- a real crash ----------------------------------------------------------------

_PRODUCER = r"""
import sys
from pathlib import Path
from twisted.internet import defer, reactor, task
from edgeaccess.audit.diskwriter import DiskWriter
from edgeaccess.audit.spool import Spool

async def main(reactor):
    writer = DiskWriter(reactor)
    writer.start()
    spool = await Spool.open(Path(sys.argv[1]), writer)
    recording = spool.start_recording("s1", {"user": "alice"})
    n = 0
    while True:
        batch = []
        for _ in range(20):
            n += 1
            event_id = f"e{n}"
            d = spool.append_event({"id": event_id, "event": "exec", "command": "x" * 300})
            d.addCallback(lambda _, i=event_id: print("ACK", i, flush=True))
            batch.append(d)
            recording.write(b'[0.1, "o", "' + b"y" * 200 + b'"]\n')
        await defer.gatherResults(batch)

task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""


def test_a_crash_mid_write_loses_nothing_acknowledged(tmp_path):
    """kill -9 a process appending as fast as it can: every event it had
    acknowledged is in the spool when reopened, and torn tails are cut."""
    proc = subprocess.Popen([sys.executable, "-c", _PRODUCER, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    acknowledged = []
    deadline = time.monotonic() + 60
    try:
        while len(acknowledged) < 2000 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith(b"ACK "):
                acknowledged.append(line.split()[1].decode())
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert len(acknowledged) >= 2000, proc.stderr.read().decode()[-2000:]
    check = subprocess.run([sys.executable, "-c", r"""
import json, sys
from pathlib import Path
from twisted.internet import defer, task
from edgeaccess.audit.diskwriter import DiskWriter
from edgeaccess.audit.spool import Spool

async def main(reactor):
    writer = DiskWriter(reactor)
    writer.start()
    spool = await Spool.open(Path(sys.argv[1]), writer)
    [rec] = spool.pending_recordings()
    print(json.dumps({"ids": [e["id"] for e in spool.pending_events(10**9)],
                      "length": rec["length"]}))
    await writer.stop()

task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
""", str(tmp_path)], capture_output=True, timeout=60)
    assert check.returncode == 0, check.stderr.decode()[-2000:]
    found = json.loads(check.stdout)
    assert set(acknowledged) <= set(found["ids"])
    cast = (tmp_path / "recordings" / "s1.cast").read_bytes()
    assert len(cast) == found["length"] and cast.endswith(b'"]\n')
    assert all(json.loads(line) for line in cast.splitlines())


@pytest_twisted.ensureDeferred
async def test_pending_events_are_capped_by_bytes_so_a_batch_fits_a_request(tmp_path, writer):
    from edgeaccess.audit.uploader import EVENT_BATCH, EVENT_BATCH_BYTES

    spool = await Spool.open(tmp_path, writer)
    big = "x" * 12_000  # 200 of these would be ~2.4 MB, over the API's body limit
    for n in range(EVENT_BATCH):
        await spool.append_event({**event(n), "command": big})
    batch = spool.pending_events(EVENT_BATCH, max_bytes=EVENT_BATCH_BYTES)
    assert 1 <= len(batch) < EVENT_BATCH
    assert len(json.dumps(batch)) <= EVENT_BATCH_BYTES + 16_000
    assert [e["id"] for e in batch] == [f"e{n}" for n in range(len(batch))]  # oldest first
    # One event larger than the cap still goes (alone), never stuck.
    assert len(spool.pending_events(EVENT_BATCH, max_bytes=10)) == 1
