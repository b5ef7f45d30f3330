"""The node's on-disk spool: audit events and recordings kept until acknowledged.

Layout under the spool directory::

    events.jsonl          one event per line, appended
    sessions/ID.json      sessions running now (to end them after a crash)
    recordings/ID.cast    the session's asciicast, appended as output comes
    recordings/ID.json    {"meta", "complete", "truncated"}

**No disk I/O on the reactor thread.** Every read and write goes through
the node's one :class:`~edgeaccess.audit.diskwriter.DiskWriter` thread;
what the shipper and the session guard ask (pending events, sizes, which
recordings have bytes to send) is answered from memory.

**Durability.** :meth:`Spool.append_event` fires only once the event is on
disk (fsync'd); events appended together share one fsync (group commit).
A line torn by a crash (no newline, or not JSON) is ignored and cut off
when the spool is opened. Acknowledged events are forgotten in memory at
once; on disk the file is emptied when nothing is left, or compacted (the
rest written to a temporary file, renamed over it) once acknowledged lines
outweigh the rest. An acknowledgement lost by a crash only means re-sending
events the auth service already has, which it stores once (by id).

Recording output is written as it comes, without an fsync each time: a
recording is fsync'd when the shipper is about to send it and when it ends,
and only bytes known durable are ever sent. The cast file always ends on a
complete asciicast line (the writer hands over whole lines); on opening, a
tail torn by a crash is cut back to its last complete line, which is never
below what was sent. Where a recording's upload stands is kept in memory
only: after a restart the shipper asks the auth service (it answers with
its stored length).

**Policy when full.** The spool is bounded by ``max_bytes`` (events plus
recordings not yet acknowledged; on disk, events.jsonl may also hold as many
acknowledged bytes again, at least 256 KiB, before it is compacted). Events are never dropped: an event is written even when the
spool is over its bound. Instead, while the spool is over ``max_bytes``
the node refuses new SSH sessions (:meth:`Spool.accepting_sessions` is
false and the node's authorizer says why), so nothing runs unaudited;
sessions already running go on and keep their events. Their recordings
keep growing up to ``2 * max_bytes``; past that, recording output is
dropped and the recording is marked ``truncated`` (its events are still
kept). Once the auth service acknowledges what is spooled, new sessions
are accepted again.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from edgeaccess.audit.diskwriter import (Commit, DiskWriter, remove_stale_temporaries,
                                         replace_file, write_all)
from edgeaccess.audit.events import canonical_json
from edgeaccess.audit.recording import check_session_id

_log = Logger()

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: Acknowledged bytes left in events.jsonl before it is compacted (when they
#: also outweigh the unacknowledged rest).
COMPACT_AFTER_BYTES = 256 * 1024


@attrs.define
class RecordingState:
    """Where one spooled recording stands (reactor thread only).

    :ivar length: bytes handed to the writer (whole asciicast lines).
    :ivar durable: bytes known to be on disk (what may be sent).
    :ivar uploaded: bytes the auth service said it holds; ``None`` when
        unknown (after a restart: the shipper asks).
    :ivar complete: the session ended and the end is durable.
    """

    session_id: str
    meta: dict
    length: int = 0
    durable: int = 0
    uploaded: int | None = 0
    complete: bool = False
    truncated: bool = False

    def as_pending(self) -> dict:
        return {"session_id": self.session_id, "meta": self.meta,
                "uploaded": self.uploaded, "length": self.durable,
                "written": self.length, "complete": self.complete,
                "truncated": self.truncated}


class _Files:
    """The spool's open files and on-disk index (writer thread only)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.events_path = directory / "events.jsonl"
        self.events = None  # the append handle of events.jsonl
        self.lines: OrderedDict[str, int] = OrderedDict()  # id -> line length
        self.live_bytes = 0
        self.dead_bytes = 0
        self.casts: dict[str, object] = {}  # session id -> append handle
        self.cast_lengths: dict[str, int] = {}

    def cast_path(self, session_id: str) -> Path:
        return self.directory / "recordings" / f"{session_id}.cast"

    def meta_path(self, session_id: str) -> Path:
        return self.directory / "recordings" / f"{session_id}.json"


class SpooledRecording:
    """One session's recording being written into the spool."""

    def __init__(self, spool: "Spool", state: RecordingState) -> None:
        self.session_id = state.session_id
        self._spool = spool
        self._state = state
        self.closed = False
        self._closing: Deferred | None = None

    @property
    def truncated(self) -> bool:
        return self._state.truncated

    def write(self, data: bytes) -> None:
        """Append asciicast bytes (dropped past the hard bound, see the policy)."""
        if self.closed or not data:
            return
        spool = self._spool
        if spool.size() + len(data) > spool.hard_limit:
            if not self._state.truncated:
                self._state.truncated = True
                _log.error("audit spool is over its hard bound: output of session "
                           "{session} is no longer recorded", session=self.session_id)
                spool._write_meta(self._state)
            return
        self._state.length += len(data)
        spool._recording_bytes += len(data)
        session_id = self.session_id

        def append(commit: Commit) -> None:
            files = spool._files
            handle = files.casts.get(session_id)
            if handle is None:
                return  # its start failed (logged) or it was delivered
            write_all(handle, data)
            files.cast_lengths[session_id] += len(data)

        spool._writer.post(append, f"recording of session {session_id}")
        spool._notify(recording=True)

    def sync(self) -> Deferred:
        """Make what was written durable; fires with the durable length."""
        return self._spool.sync_recording(self.session_id)

    def close(self) -> Deferred:
        """The session ended: sync, close, and mark the recording complete
        (fires once that is durable)."""
        if self._closing is None:
            self.closed = True
            self._closing = self._spool._complete(self._state)
        return self._closing


class Spool:
    """Events and recordings of one node, kept on disk until acknowledged.

    Use :meth:`open`. Methods that touch the disk return Deferreds (the
    work is done by ``writer``'s thread); questions are answered from memory.

    :param writer: the process's started :class:`DiskWriter`.
    """

    def __init__(self, directory: Path, max_bytes: int, writer: DiskWriter) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.hard_limit = 2 * max_bytes
        self._writer = writer
        self._files = _Files(self.directory)
        self._events: OrderedDict[str, tuple[bytes, dict]] = OrderedDict()
        self._event_bytes = 0
        self._recording_bytes = 0
        self._recordings: dict[str, RecordingState] = {}
        self._open: dict[str, SpooledRecording] = {}
        self._sessions: list[dict] = []
        self._listeners: list[Callable[..., None]] = []

    @classmethod
    def open(cls, directory: Path, writer: DiskWriter,
             max_bytes: int = DEFAULT_MAX_BYTES) -> Deferred:
        """Open (or create) the spool in ``directory``, repairing torn writes;
        fires with the :class:`Spool`."""
        spool = cls(directory, max_bytes, writer)
        d = writer.submit(spool._load)
        d.addCallback(spool._loaded)
        return d

    def subscribe(self, listener: Callable[..., None]) -> None:
        """Call ``listener()`` when an event became durable, and
        ``listener(recording=True)`` when recording output was written."""
        self._listeners.append(listener)

    def _notify(self, **what) -> None:
        for listener in list(self._listeners):
            try:
                listener(**what)
            except Exception:
                _log.failure("audit spool listener failed")

    # --- bounds ------------------------------------------------------------

    def size(self) -> int:
        """Bytes held (events plus recordings)."""
        return self._event_bytes + self._recording_bytes

    def accepting_sessions(self) -> bool:
        """Whether a new session may start (the spool is under ``max_bytes``)."""
        return self.size() < self.max_bytes

    def pending_event_count(self) -> int:
        return len(self._events)

    # --- opening (writer thread, then reactor thread) -------------------------

    def _load(self, commit: Commit) -> dict:
        files = self._files
        for sub in ("", "sessions", "recordings"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
            remove_stale_temporaries(self.directory / sub)
        events = self._load_events(commit)
        sessions = []
        for path in sorted((self.directory / "sessions").glob("*.json")):
            try:
                sessions.append(json.loads(path.read_text()))
            except ValueError:
                path.unlink()  # torn by a crash before the session was acknowledged
        recordings = []
        for meta_path in sorted((self.directory / "recordings").glob("*.json")):
            session_id = meta_path.stem
            try:
                check_session_id(session_id)
            except Exception:
                continue
            try:
                state = json.loads(meta_path.read_text())
                if not isinstance(state, dict):
                    raise ValueError("not an object")
            except ValueError:
                state = {"meta": {}, "complete": False}
            cast_path = files.cast_path(session_id)
            try:
                data = cast_path.read_bytes()
            except FileNotFoundError:
                data = b""
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                with open(cast_path, "r+b") as f:
                    f.truncate(keep)
                    commit.fsync_now(f)
            recordings.append(RecordingState(
                session_id, state.get("meta") if isinstance(state.get("meta"), dict) else {},
                length=keep, durable=keep, uploaded=None,
                complete=bool(state.get("complete")), truncated=bool(state.get("truncated"))))
        return {"events": events, "sessions": sessions, "recordings": recordings}

    def _load_events(self, commit: Commit) -> list[tuple[str, bytes, dict]]:
        files = self._files
        try:
            data = files.events_path.read_bytes()
        except FileNotFoundError:
            data = b""
        torn = False
        found: OrderedDict[str, tuple[bytes, dict]] = OrderedDict()
        lines = data.split(b"\n")
        if lines[-1]:
            torn = True  # a last line without its newline: the write was cut
        for line in lines[:-1]:
            try:
                event = json.loads(line)
                event_id = event["id"]
                if not isinstance(event_id, str):
                    raise TypeError("id")
            except (ValueError, KeyError, TypeError):
                torn = True
                continue
            found[event_id] = (line + b"\n", event)
        if torn:
            _log.warn("audit spool: ignored a torn or unreadable line in {path}",
                      path=files.events_path)
            tmp = files.events_path.with_name("events.jsonl.rewrite")
            with open(tmp, "wb") as f:
                f.write(b"".join(line for line, _ in found.values()))
                commit.fsync_now(f)
            os.replace(tmp, files.events_path)
            commit.sync_dir(self.directory)
        files.events = open(files.events_path, "ab", buffering=0)
        for event_id, (line, _) in found.items():
            files.lines[event_id] = len(line)
            files.live_bytes += len(line)
        return [(event_id, line, event) for event_id, (line, event) in found.items()]

    def _loaded(self, loaded: dict) -> "Spool":
        for event_id, line, event in loaded["events"]:
            self._events[event_id] = (line, event)
            self._event_bytes += len(line)
        self._sessions = loaded["sessions"]
        for state in loaded["recordings"]:
            self._recordings[state.session_id] = state
            self._recording_bytes += state.length
        return self

    def close(self) -> Deferred:
        """Sync open recordings and close the spool's files (the writer stays up)."""
        for recording in list(self._open.values()):
            self.sync_recording(recording.session_id)

        def close_files(commit: Commit) -> None:
            files = self._files
            for handle in [files.events, *files.casts.values()]:
                if handle is not None and not handle.closed:
                    commit.fsync_now(handle)
                    handle.close()
            files.casts.clear()

        return self._writer.submit(close_files)

    # --- events ------------------------------------------------------------

    def append_event(self, event: dict) -> Deferred:
        """Write ``event`` durably (never refused, see the policy); fires once
        it is on disk, fsync'd."""
        line = canonical_json(event) + b"\n"
        event_id = event["id"]

        def append(commit: Commit) -> None:
            files = self._files
            write_all(files.events, line)
            if event_id in files.lines:
                files.dead_bytes += files.lines[event_id]
                files.live_bytes -= files.lines[event_id]
            files.lines[event_id] = len(line)
            files.live_bytes += len(line)
            commit.sync(files.events)

        def durable(_) -> None:
            if event_id not in self._events:
                self._events[event_id] = (line, event)
                self._event_bytes += len(line)
            self._notify()

        return self._writer.submit(append).addCallback(durable)

    def pending_events(self, limit: int = 500, max_bytes: int | None = None) -> list[dict]:
        """The oldest ``limit`` durable events not yet acknowledged, and no
        more of them than fit in ``max_bytes`` of spooled JSON (always at
        least one: a single event is bounded by the spool itself)."""
        found = []
        size = 0
        for line, event in self._events.values():
            if len(found) >= limit:
                break
            size += len(line)
            if max_bytes is not None and found and size > max_bytes:
                break
            found.append(event)
        return found

    def acknowledge_events(self, ids) -> Deferred:
        """Forget events the auth service has stored (at once in memory; the
        file is emptied or compacted by the writer, see the module doc)."""
        ids = [event_id for event_id in ids if event_id in self._events]
        for event_id in ids:
            line, _ = self._events.pop(event_id)
            self._event_bytes -= len(line)

        def forget(commit: Commit) -> None:
            files = self._files
            for event_id in ids:
                length = files.lines.pop(event_id, None)
                if length is not None:
                    files.live_bytes -= length
                    files.dead_bytes += length
            if not files.lines:
                if files.dead_bytes:
                    files.events.truncate(0)
                    files.events.seek(0)
                    files.dead_bytes = files.live_bytes = 0
                    commit.sync(files.events)
            elif files.dead_bytes > max(COMPACT_AFTER_BYTES, files.live_bytes):
                self._compact(commit)

        return self._writer.submit(forget)

    def _compact(self, commit: Commit) -> None:
        """Rewrite events.jsonl with the unacknowledged lines (writer thread).

        Inline fsyncs: jobs later in this batch append to the new file, so it
        must be in place, durable, before they run."""
        files = self._files
        keep = files.lines
        tmp = files.events_path.with_name("events.jsonl.compact")
        with open(files.events_path, "rb") as old, open(tmp, "wb") as new:
            for raw in old:
                if not raw.endswith(b"\n"):
                    continue
                try:
                    event_id = json.loads(raw)["id"]
                except (ValueError, KeyError, TypeError):
                    continue
                if keep.get(event_id) == len(raw):
                    new.write(raw)
            new.flush()
            commit.fsync_now(new)
        os.replace(tmp, files.events_path)
        commit.fsync_dir_now(self.directory)
        files.events.close()
        files.events = open(files.events_path, "ab", buffering=0)
        files.dead_bytes = 0

    # --- running sessions ----------------------------------------------------

    def session_opened(self, session_id: str, info: dict) -> Deferred:
        """Remember a running session (so a crash still gets it ended); fires
        once that is durable."""
        path = self.directory / "sessions" / f"{check_session_id(session_id)}.json"
        data = json.dumps(info, sort_keys=True).encode()

        def remember(commit: Commit) -> None:
            # Written in place: a file torn by a crash belongs to a session
            # that was never acknowledged, and is dropped when reopening.
            with open(path, "wb") as f:
                f.write(data)
            commit.sync(path)
            commit.sync_dir(path.parent)

        return self._writer.submit(remember)

    def session_closed(self, session_id: str) -> None:
        path = self.directory / "sessions" / f"{check_session_id(session_id)}.json"

        def forget(commit: Commit) -> None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass

        self._writer.post(forget, f"closing session {session_id} in the spool")

    def open_sessions(self) -> list[dict]:
        """Sessions remembered as running when the spool was opened (after a
        restart: cut by a crash)."""
        return list(self._sessions)

    # --- recordings ----------------------------------------------------------

    @staticmethod
    def _meta_bytes(state: RecordingState, complete: bool | None = None) -> bytes:
        return json.dumps({"meta": state.meta,
                           "complete": state.complete if complete is None else complete,
                           "truncated": state.truncated}, sort_keys=True).encode()

    def _write_meta(self, state: RecordingState) -> None:
        data = self._meta_bytes(state)
        meta_path = self._files.meta_path(state.session_id)
        self._writer.post(lambda commit: replace_file(commit, meta_path, data),
                          f"marking the recording of {state.session_id}")

    def start_recording(self, session_id: str, meta: dict) -> SpooledRecording:
        """A new recording for ``session_id``; ``meta`` travels with it."""
        check_session_id(session_id)
        state = RecordingState(session_id, dict(meta))
        self._recordings[session_id] = state
        recording = SpooledRecording(self, state)
        self._open[session_id] = recording
        files = self._files
        data = self._meta_bytes(state)

        def start(commit: Commit) -> None:
            meta_path = files.meta_path(session_id)
            with open(meta_path, "wb") as f:
                f.write(data)
            commit.sync(meta_path)
            files.casts[session_id] = open(files.cast_path(session_id), "ab", buffering=0)
            files.cast_lengths[session_id] = files.casts[session_id].tell()
            commit.sync_dir(meta_path.parent)

        self._writer.post(start, f"starting the recording of session {session_id}")
        return recording

    def recording(self, session_id: str) -> SpooledRecording | None:
        """The open recording of ``session_id``, if any."""
        return self._open.get(session_id)

    def sync_recording(self, session_id: str) -> Deferred:
        """fsync what was written of the recording; fires with its durable length."""
        state = self._recordings.get(session_id)
        if state is None:
            return succeed(0)
        if state.durable >= state.length:
            return succeed(state.durable)
        files = self._files

        def sync(commit: Commit) -> int | None:
            handle = files.casts.get(session_id)
            if handle is None:
                return None  # closed: its close made everything durable
            commit.sync(handle)
            return files.cast_lengths[session_id]

        def durable(length: int | None) -> int:
            state.durable = max(state.durable, state.length if length is None else length)
            return state.durable

        return self._writer.submit(sync).addCallback(durable)

    def _complete(self, state: RecordingState) -> Deferred:
        files = self._files
        session_id = state.session_id
        length = state.length
        data = self._meta_bytes(state, complete=True)

        def complete(commit: Commit) -> None:
            handle = files.casts.pop(session_id, None)
            if handle is not None:
                commit.fsync_now(handle)  # the data before the mark that it is whole
                handle.close()
            files.cast_lengths.pop(session_id, None)
            replace_file(commit, files.meta_path(session_id), data)

        def durable(_) -> None:
            state.durable = max(state.durable, length)
            state.complete = True
            self._open.pop(session_id, None)
            self._notify()

        return self._writer.submit(complete).addCallback(durable)

    def finish_recording(self, session_id: str) -> Deferred:
        """Mark a recording complete (its session ended, or was cut by a crash)."""
        open_one = self._open.get(session_id)
        if open_one is not None:
            return open_one.close()
        state = self._recordings.get(session_id)
        if state is None or state.complete:
            return succeed(None)
        return self._complete(state)

    def pending_recordings(self) -> list[dict]:
        """``{"session_id", "meta", "uploaded", "length", "written", "complete",
        "truncated"}`` of each recording not yet delivered; ``length`` is what
        is durable (and may be sent), ``written`` what was handed over."""
        return [state.as_pending() for state in self._recordings.values()]

    def read_recording(self, session_id: str, offset: int, length: int) -> Deferred:
        """Fires with ``length`` bytes of the cast from ``offset``."""
        path = self._files.cast_path(check_session_id(session_id))

        def read(commit: Commit) -> bytes:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read(length)

        return self._writer.submit(read)

    def recording_acknowledged(self, session_id: str, uploaded: int) -> None:
        """The auth service holds the first ``uploaded`` bytes."""
        state = self._recordings.get(session_id)
        if state is not None:
            state.uploaded = uploaded

    def recording_delivered(self, session_id: str) -> None:
        """The whole recording is stored at the auth service: forget it."""
        state = self._recordings.pop(session_id, None)
        self._open.pop(session_id, None)
        if state is not None:
            self._recording_bytes -= state.length
        files = self._files

        def forget(commit: Commit) -> None:
            handle = files.casts.pop(session_id, None)
            if handle is not None:
                handle.close()
            files.cast_lengths.pop(session_id, None)
            for path in (files.meta_path(session_id), files.cast_path(session_id)):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass

        self._writer.post(forget, f"removing the delivered recording of {session_id}")
