"""asciicast v2 writing and the auth side's file store."""

from __future__ import annotations

import json

import pytest

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


def test_store_appends_by_offset_and_ignores_resent_chunks(tmp_path):
    store = FileRecordingStore(tmp_path, clock())
    meta = {"user": "alice", "node": "n1", "junk": 1}
    assert store.append("s1", 0, b"abc\n", meta) == 4
    assert store.append("s1", 0, b"abc\n", meta) == 4      # the same chunk again
    assert store.append("s1", 2, b"c\ndef\n", meta) == 8   # overlapping
    assert store.append("s1", 20, b"zzz\n", meta) == 8     # ahead: resend from 8
    assert store.read("s1") == b"abc\ndef\n"
    assert store.complete("s1", 7) == 8 and not store.info("s1")["complete"]
    assert store.complete("s1", 8) == 8
    info = store.info("s1")
    assert info["complete"] and info["user"] == "alice" and "junk" not in info
    assert store.append("s1", 8, b"late\n", meta) == 8      # nothing after the end


def test_store_forgets_bytes_written_past_the_acknowledged_length(tmp_path):
    store = FileRecordingStore(tmp_path, clock())
    store.append("s1", 0, b"abc\n", {})
    with open(tmp_path / "s1.cast", "ab") as f:
        f.write(b"torn")  # data written, meta not updated: a crash
    assert store.append("s1", 4, b"def\n", {}) == 8
    assert store.read("s1") == b"abc\ndef\n"


@pytest.mark.parametrize("bad", ["../etc/passwd", "", "a/b", "x" * 70])
def test_store_refuses_session_ids_that_are_not_file_names(tmp_path, bad):
    with pytest.raises(errors.BadRequest):
        FileRecordingStore(tmp_path, clock()).append(bad, 0, b"x", {})
