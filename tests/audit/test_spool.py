"""The node's on-disk spool: durability, crash repair, acknowledgement, the full policy."""

from __future__ import annotations

import json

from edgeaccess.audit.spool import Spool


def event(n: int) -> dict:
    return {"id": f"e{n}", "event": "exec", "time": "2024-01-01T00:00:00Z", "command": "x"}


def test_events_survive_reopening_and_acknowledged_ones_are_removed(tmp_path):
    spool = Spool.open(tmp_path)
    for n in range(4):
        spool.append_event(event(n))
    spool.acknowledge_events(["e0", "e2", "unknown"])
    reopened = Spool.open(tmp_path)
    assert [e["id"] for e in reopened.pending_events()] == ["e1", "e3"]
    assert reopened.size() == spool.size() > 0
    lines = (tmp_path / "events.jsonl").read_bytes().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["e1", "e3"]


def test_a_torn_last_line_is_ignored_and_cut_off(tmp_path):
    spool = Spool.open(tmp_path)
    spool.append_event(event(1))
    with open(tmp_path / "events.jsonl", "ab") as f:
        f.write(b'{"id": "e2", "event": "ex')  # the crash came mid-write
    reopened = Spool.open(tmp_path)
    assert [e["id"] for e in reopened.pending_events()] == ["e1"]
    reopened.append_event(event(3))
    assert [e["id"] for e in Spool.open(tmp_path).pending_events()] == ["e1", "e3"]


def test_pending_events_come_oldest_first_in_batches(tmp_path):
    spool = Spool.open(tmp_path)
    for n in range(5):
        spool.append_event(event(n))
    assert [e["id"] for e in spool.pending_events(limit=2)] == ["e0", "e1"]


def test_a_full_spool_refuses_sessions_but_keeps_every_event(tmp_path):
    spool = Spool.open(tmp_path, max_bytes=300)
    assert spool.accepting_sessions()
    for n in range(10):
        spool.append_event(event(n))  # over the bound: still written
    assert not spool.accepting_sessions()
    assert len(Spool.open(tmp_path, max_bytes=300).pending_events()) == 10
    spool.acknowledge_events([f"e{n}" for n in range(10)])
    assert spool.accepting_sessions()


def test_recording_output_past_the_hard_bound_is_dropped_and_marked(tmp_path):
    spool = Spool.open(tmp_path, max_bytes=100)
    recording = spool.start_recording("s1", {"user": "alice"})
    recording.write(b"x" * 150 + b"\n")
    recording.write(b"y" * 100 + b"\n")  # past 2 * max_bytes
    recording.close()
    [pending] = spool.pending_recordings()
    assert pending["length"] == 151 and pending["truncated"] and pending["complete"]


def test_a_recording_is_cut_back_to_its_last_complete_line(tmp_path):
    spool = Spool.open(tmp_path)
    recording = spool.start_recording("s1", {"user": "alice"})
    recording.write(b'{"version": 2}\n[0.1, "o", "a"]\n[0.2, "o", "b')
    recording.sync()
    reopened = Spool.open(tmp_path)
    [pending] = reopened.pending_recordings()
    assert pending["length"] == len(b'{"version": 2}\n[0.1, "o", "a"]\n')
    assert not pending["complete"]
    assert (tmp_path / "recordings" / "s1.cast").read_bytes().endswith(b'"a"]\n')


def test_acknowledged_recordings_resume_and_delivered_ones_are_removed(tmp_path):
    spool = Spool.open(tmp_path)
    recording = spool.start_recording("s1", {"user": "alice"})
    recording.write(b"line1\nline2\n")
    spool.recording_acknowledged("s1", 6)
    recording.close()
    [pending] = Spool.open(tmp_path).pending_recordings()
    assert (pending["uploaded"], pending["length"], pending["complete"]) == (6, 12, True)
    assert spool.read_recording("s1", 6, 6) == b"line2\n"
    spool.recording_delivered("s1")
    assert spool.pending_recordings() == [] and spool.size() == 0


def test_running_sessions_are_remembered_until_closed(tmp_path):
    spool = Spool.open(tmp_path)
    spool.session_opened("s1", {"session_id": "s1", "user": "alice"})
    spool.session_opened("s2", {"session_id": "s2", "user": "bob"})
    spool.session_closed("s1")
    assert Spool.open(tmp_path).open_sessions() == [{"session_id": "s2", "user": "bob"}]
