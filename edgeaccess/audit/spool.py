"""The node's on-disk spool: audit events and recordings kept until acknowledged.

Layout under the spool directory::

    events.jsonl          one event per line, appended and fsync'd per event
    sessions/ID.json      sessions running now (to end them after a crash)
    recordings/ID.cast    the session's asciicast, appended as output comes
    recordings/ID.json    {"meta", "uploaded", "complete", "truncated"}

Crash safety: an event is on disk (fsync'd) before ``append_event``
returns. A line torn by a crash (no newline, or not JSON) is ignored and
cut off when the spool is opened. Acknowledged events are removed by
writing the rest to a temporary file and renaming it over the old one.
Recordings are fsync'd at every shipping round and when they end; on
opening, a cast is cut back to its last complete line (never below what
was already delivered, since only complete lines are sent).

**Policy when full.** The spool is bounded by ``max_bytes`` (events plus
recordings). Events are never dropped: an event is written even when the
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

from twisted.logger import Logger

from edgeaccess.audit.events import canonical_json
from edgeaccess.audit.recording import check_session_id

_log = Logger()

DEFAULT_MAX_BYTES = 64 * 1024 * 1024


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class SpooledRecording:
    """One session's recording being written into the spool."""

    def __init__(self, spool: "Spool", session_id: str, path: Path) -> None:
        self.session_id = session_id
        self._spool = spool
        self._file = open(path, "ab")
        self.truncated = False
        self.closed = False

    def write(self, data: bytes) -> None:
        """Append asciicast bytes (dropped past the hard bound, see the policy)."""
        if self.closed:
            return
        if self._spool.size() + len(data) > self._spool.hard_limit:
            if not self.truncated:
                self.truncated = True
                _log.error("audit spool is over its hard bound: output of session "
                           "{session} is no longer recorded", session=self.session_id)
                self._spool._update_recording(self.session_id, truncated=True)
            return
        self._file.write(data)
        self._file.flush()
        self._spool._recording_bytes += len(data)

    def sync(self) -> None:
        """Make what was written durable."""
        if not self.closed:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        """The session ended: sync, close, and mark the recording complete."""
        if self.closed:
            return
        self.sync()
        self._file.close()
        self.closed = True
        self._spool._update_recording(self.session_id, complete=True)


class Spool:
    """Events and recordings of one node, kept on disk until acknowledged.

    Use :meth:`open`; every method does blocking file I/O of a few small
    writes (fsync included), which the node does from the reactor thread.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.hard_limit = 2 * max_bytes
        self._events: OrderedDict[str, bytes] = OrderedDict()
        self._event_bytes = 0
        self._recording_bytes = 0
        self._open: dict[str, SpooledRecording] = {}

    @classmethod
    def open(cls, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> "Spool":
        """Open (or create) the spool in ``directory``, repairing torn writes."""
        spool = cls(directory, max_bytes)
        for sub in ("", "sessions", "recordings"):
            (spool.directory / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        spool._load_events()
        spool._load_recordings()
        return spool

    # --- bounds ------------------------------------------------------------

    def size(self) -> int:
        """Bytes held (events plus recordings)."""
        return self._event_bytes + self._recording_bytes

    def accepting_sessions(self) -> bool:
        """Whether a new session may start (the spool is under ``max_bytes``)."""
        return self.size() < self.max_bytes

    # --- events ------------------------------------------------------------

    @property
    def _events_path(self) -> Path:
        return self.directory / "events.jsonl"

    def _load_events(self) -> None:
        try:
            data = self._events_path.read_bytes()
        except FileNotFoundError:
            return
        torn = False
        lines = data.split(b"\n")
        if lines[-1]:
            torn = True  # a last line without its newline: the write was cut
        for line in lines[:-1]:
            try:
                event = json.loads(line)
                event_id = event["id"]
            except (ValueError, KeyError, TypeError):
                torn = True
                continue
            self._events[event_id] = line + b"\n"
            self._event_bytes += len(line) + 1
        if torn:
            _log.warn("audit spool: ignored a torn or unreadable line in {path}",
                      path=self._events_path)
            self._rewrite_events()

    def _rewrite_events(self) -> None:
        _write_atomic(self._events_path, b"".join(self._events.values()))

    def append_event(self, event: dict) -> None:
        """Write ``event`` durably (never refused, see the policy)."""
        line = canonical_json(event) + b"\n"
        with open(self._events_path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._events[event["id"]] = line
        self._event_bytes += len(line)

    def pending_events(self, limit: int = 500) -> list[dict]:
        """The oldest ``limit`` events not yet acknowledged."""
        found = []
        for line in self._events.values():
            if len(found) >= limit:
                break
            found.append(json.loads(line))
        return found

    def acknowledge_events(self, ids) -> None:
        """Forget events the auth service has stored."""
        removed = False
        for event_id in ids:
            line = self._events.pop(event_id, None)
            if line is not None:
                self._event_bytes -= len(line)
                removed = True
        if removed:
            self._rewrite_events()

    # --- running sessions ----------------------------------------------------

    def session_opened(self, session_id: str, info: dict) -> None:
        """Remember a running session (so a crash still gets it ended)."""
        _write_atomic(self.directory / "sessions" / f"{check_session_id(session_id)}.json",
                      json.dumps(info, sort_keys=True).encode())

    def session_closed(self, session_id: str) -> None:
        try:
            (self.directory / "sessions" / f"{check_session_id(session_id)}.json").unlink()
        except FileNotFoundError:
            pass

    def open_sessions(self) -> list[dict]:
        """Sessions remembered as running (after a restart: cut by a crash)."""
        found = []
        for path in sorted((self.directory / "sessions").glob("*.json")):
            try:
                found.append(json.loads(path.read_text()))
            except ValueError:
                path.unlink()
        return found

    # --- recordings ----------------------------------------------------------

    def _rec_paths(self, session_id: str) -> tuple[Path, Path]:
        check_session_id(session_id)
        base = self.directory / "recordings"
        return base / f"{session_id}.cast", base / f"{session_id}.json"

    def _load_recordings(self) -> None:
        for meta_path in sorted((self.directory / "recordings").glob("*.json")):
            session_id = meta_path.stem
            cast_path, _ = self._rec_paths(session_id)
            try:
                state = json.loads(meta_path.read_text())
            except ValueError:
                state = {"meta": {}, "uploaded": 0, "complete": False}
            try:
                data = cast_path.read_bytes()
            except FileNotFoundError:
                data = b""
            keep = data.rfind(b"\n") + 1
            keep = max(keep, min(state.get("uploaded", 0), len(data)))
            if keep != len(data):
                with open(cast_path, "r+b") as f:
                    f.truncate(keep)
                    os.fsync(f.fileno())
            self._recording_bytes += keep

    def start_recording(self, session_id: str, meta: dict) -> SpooledRecording:
        """A new recording for ``session_id``; ``meta`` travels with it."""
        cast_path, meta_path = self._rec_paths(session_id)
        _write_atomic(meta_path, json.dumps(
            {"meta": meta, "uploaded": 0, "complete": False, "truncated": False},
            sort_keys=True).encode())
        recording = SpooledRecording(self, session_id, cast_path)
        self._open[session_id] = recording
        return recording

    def recording(self, session_id: str) -> SpooledRecording | None:
        """The open recording of ``session_id``, if any."""
        return self._open.get(session_id)

    def _update_recording(self, session_id: str, **changes) -> None:
        _, meta_path = self._rec_paths(session_id)
        try:
            state = json.loads(meta_path.read_text())
        except (FileNotFoundError, ValueError):
            return
        state.update(changes)
        _write_atomic(meta_path, json.dumps(state, sort_keys=True).encode())
        if changes.get("complete"):
            self._open.pop(session_id, None)

    def finish_recording(self, session_id: str) -> None:
        """Mark a recording complete that no open writer holds (after a crash)."""
        open_one = self._open.get(session_id)
        if open_one is not None:
            open_one.close()
        else:
            self._update_recording(session_id, complete=True)

    def sync_recordings(self) -> None:
        """fsync every open recording."""
        for recording in list(self._open.values()):
            recording.sync()

    def pending_recordings(self) -> list[dict]:
        """``{"session_id", "meta", "uploaded", "length", "complete"}`` of each
        recording not yet delivered; ``length`` counts complete lines only."""
        found = []
        for meta_path in sorted((self.directory / "recordings").glob("*.json")):
            session_id = meta_path.stem
            cast_path, _ = self._rec_paths(session_id)
            try:
                state = json.loads(meta_path.read_text())
            except (FileNotFoundError, ValueError):
                continue
            size = cast_path.stat().st_size if cast_path.exists() else 0
            length = size
            if size > state.get("uploaded", 0):
                with open(cast_path, "rb") as f:
                    f.seek(state.get("uploaded", 0))
                    tail = f.read()
                length = state.get("uploaded", 0) + tail.rfind(b"\n") + 1
            found.append({"session_id": session_id, "meta": state.get("meta", {}),
                          "uploaded": state.get("uploaded", 0), "length": length,
                          "complete": bool(state.get("complete")) and length == size,
                          "truncated": bool(state.get("truncated"))})
        return found

    def read_recording(self, session_id: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the cast from ``offset``."""
        cast_path, _ = self._rec_paths(session_id)
        with open(cast_path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def recording_acknowledged(self, session_id: str, uploaded: int) -> None:
        """The auth service holds the first ``uploaded`` bytes."""
        self._update_recording(session_id, uploaded=uploaded)

    def recording_delivered(self, session_id: str) -> None:
        """The whole recording is stored at the auth service: forget it."""
        cast_path, meta_path = self._rec_paths(session_id)
        size = cast_path.stat().st_size if cast_path.exists() else 0
        for path in (meta_path, cast_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        self._recording_bytes -= size
        self._open.pop(session_id, None)
