"""asciicast v2 writing and the auth side's file store."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults

from auditkit import clock
from edgeaccess import errors
from edgeaccess.audit.recording import AsciicastWriter, FileRecordingStore, parse_cast


def test_writer_produces_asciicast_v2_with_timings_and_resizes():
    fake = clock()
    lines = []
    writer = AsciicastWriter(lines.append, fake, 80, 24, env={"TERM": "xterm"}, title="t")
    fake.advance(0.5)
    writer.output(b"hello ")
    fake.advance(1.25)
    writer.resize(100, 30)
    writer.output("wörld\r\n".encode())
    header = json.loads(lines[0])
    assert header == {"version": 2, "width": 80, "height": 24, "timestamp": 1700000000,
                      "env": {"TERM": "xterm"}, "title": "t"}
    assert [json.loads(line) for line in lines[1:]] == [
        [0.5, "o", "hello "], [1.75, "r", "100x30"], [1.75, "o", "wörld\r\n"]]
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)


def test_writer_keeps_a_utf8_character_split_across_reads_whole():
    lines = []
    writer = AsciicastWriter(lines.append, clock(), 80, 24)
    data = "é€".encode()
    writer.output(data[:1])
    writer.output(data[1:4])
    writer.output(data[4:])
    writer.close()
    _, frames = parse_cast(b"".join(lines))
    assert "".join(f[2] for f in frames) == "é€"


def test_parse_cast_refuses_what_is_not_asciicast_v2():
    with pytest.raises(errors.BadRequest):
        parse_cast(b'{"version": 1}\n')


@pytest_twisted.ensureDeferred
async def test_store_appends_by_offset_and_ignores_resent_chunks(tmp_path, writer):
    store = FileRecordingStore(tmp_path, clock(), writer)
    meta = {"user": "alice", "node": "n1", "junk": 1}
    assert await store.append("s1", 0, b"", meta) == 0          # where do you stand?
    assert await store.append("s1", 0, b"abc\n", meta) == 4
    assert await store.append("s1", 0, b"abc\n", meta) == 4    # the same chunk again
    assert await store.append("s1", 2, b"c\ndef\n", meta) == 8  # overlapping
    assert await store.append("s1", 20, b"zzz\n", meta) == 8   # ahead: resend from 8
    assert await store.read("s1") == b"abc\ndef\n"
    assert await store.read("s1", 4, 2) == b"de"
    assert await store.complete("s1", 7) == 8 and not (await store.info("s1"))["complete"]
    assert await store.complete("s1", 8) == 8
    info = await store.info("s1")
    assert info["complete"] and info["user"] == "alice" and "junk" not in info
    assert await store.append("s1", 8, b"late\n", meta) == 8    # nothing after the end
    reopened = FileRecordingStore(tmp_path, clock(), writer)   # what is on disk
    assert await reopened.read("s1") == b"abc\ndef\n"
    assert (await reopened.info("s1"))["complete"]


@pytest_twisted.ensureDeferred
async def test_store_forgets_bytes_written_past_the_acknowledged_length(tmp_path, writer):
    await FileRecordingStore(tmp_path, clock(), writer).append("s1", 0, b"abc\n", {})
    with open(tmp_path / "s1.cast", "ab") as f:
        f.write(b"torn")  # data written, meta not updated: a crash
    store = FileRecordingStore(tmp_path, clock(), writer)  # the restarted proxy
    assert await store.append("s1", 4, b"def\n", {}) == 8
    assert await store.read("s1") == b"abc\ndef\n"


@pytest_twisted.ensureDeferred
async def test_concurrent_chunks_of_many_sessions_share_fsyncs(tmp_path, writer):
    store = FileRecordingStore(tmp_path, clock(), writer)
    before_fsyncs, before_jobs = writer.fsyncs, writer.jobs
    lengths = await gatherResults([store.append(f"s{n}", 0, b"x" * 1000 + b"\n", {})
                                   for n in range(50)])
    assert lengths == [1001] * 50
    # Per chunk alone: data, meta and directory (3 fsyncs); grouped, the
    # directory's are shared by every chunk of a batch.
    assert writer.fsyncs - before_fsyncs < 3 * (writer.jobs - before_jobs)
    for n in range(50):
        assert await store.read(f"s{n}") == b"x" * 1000 + b"\n"


@pytest.mark.parametrize("bad", ["../etc/passwd", "", "a/b", "x" * 70])
def test_store_refuses_session_ids_that_are_not_file_names(tmp_path, bad):
    with pytest.raises(errors.BadRequest):
        FileRecordingStore(tmp_path, clock(), writer=object()).append(bad, 0, b"x", {})
