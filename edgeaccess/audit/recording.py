"""Session recordings as asciicast v2, and where the auth service keeps them.

asciicast v2 (https://docs.asciinema.org/manual/asciicast/v2/) is one JSON
header line, then one JSON array per event: ``[time, "o", text]`` for
terminal output and ``[time, "r", "COLSxROWS"]`` for a resize, with
``time`` in seconds since the start. :class:`AsciicastWriter` produces
those lines from raw PTY output (decoding UTF-8 across chunk boundaries)
and hands them to a sink; the node's sink is its spool.

:class:`FileRecordingStore` is the auth side: ``SESSION.cast`` plus
``SESSION.json`` (meta: node, user, length, complete) under a directory.
Chunks are appended by offset, so a chunk sent twice (after a lost
acknowledgement) is stored once, and a sender ahead of the store is told
the stored length to resend from.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from twisted.logger import Logger
from zope.interface import implementer

from edgeaccess import errors
from edgeaccess.audit.events import rfc3339
from edgeaccess.audit.interfaces import IRecordingStore

_log = Logger()

_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
#: Fields of the meta a sender may set.
_META_FIELDS = ("user", "login", "node", "node_id", "cluster", "started")
#: Largest recording kept (a chunk that would grow it past this is refused).
MAX_RECORDING_BYTES = 1024 * 1024 * 1024


def check_session_id(session_id: str) -> str:
    """A session id safe as a file name; :class:`errors.BadRequest` otherwise."""
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise errors.BadRequest("invalid session id")
    return session_id


class AsciicastWriter:
    """Turns PTY output and resizes into asciicast v2 lines.

    :param sink: called with each complete line (bytes ending in ``\\n``).
    :param clock: ``IReactorTime``; times are relative to construction.
    :param width, height: the terminal size at the start.
    :param env: e.g. ``{"TERM": "xterm", "SHELL": "/bin/bash"}``.
    :param title: shown by players.
    """

    def __init__(self, sink: Callable[[bytes], None], clock, width: int, height: int, *,
                 env: dict | None = None, title: str | None = None) -> None:
        self._sink = sink
        self._clock = clock
        self._start = clock.seconds()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        header = {"version": 2, "width": max(1, int(width)), "height": max(1, int(height)),
                  "timestamp": int(self._start)}
        if env:
            header["env"] = {k: str(v) for k, v in env.items()}
        if title:
            header["title"] = title
        self.header = header
        self._line(header)

    def _elapsed(self) -> float:
        return round(max(0.0, self._clock.seconds() - self._start), 6)

    def _line(self, value) -> None:
        self._sink(json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
                   .encode("utf-8") + b"\n")

    def output(self, data: bytes) -> None:
        """Terminal output (raw bytes from the PTY)."""
        text = self._decoder.decode(data)
        if text:
            self._line([self._elapsed(), "o", text])

    def resize(self, width: int, height: int) -> None:
        """The terminal was resized to ``width`` columns and ``height`` rows."""
        self._line([self._elapsed(), "r", f"{int(width)}x{int(height)}"])

    def close(self) -> None:
        """Flush a trailing partial UTF-8 sequence."""
        text = self._decoder.decode(b"", final=True)
        if text:
            self._line([self._elapsed(), "o", text])


def parse_cast(data: bytes) -> tuple[dict, list[list]]:
    """The header and the events of an asciicast v2 recording.

    :raises errors.BadRequest: not asciicast v2.
    """
    lines = data.decode("utf-8", "replace").splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("version") != 2:
        raise errors.BadRequest("not an asciicast v2 recording")
    found = []
    for line in lines[1:]:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a torn last line
        if isinstance(event, list) and len(event) == 3:
            found.append(event)
    return header, found


@implementer(IRecordingStore)
class FileRecordingStore:
    """Recordings as files under ``directory`` (``SESSION.cast`` + ``SESSION.json``).

    Calls are quick local file operations made from the reactor thread;
    every write of the meta is atomic (temp file, fsync, rename).
    """

    def __init__(self, directory: Path, clock) -> None:
        self.directory = Path(directory)
        self.clock = clock

    def _paths(self, session_id: str) -> tuple[Path, Path]:
        check_session_id(session_id)
        return self.directory / f"{session_id}.cast", self.directory / f"{session_id}.json"

    def _meta(self, session_id: str) -> dict | None:
        _, meta_path = self._paths(session_id)
        try:
            return json.loads(meta_path.read_text())
        except FileNotFoundError:
            return None

    def _write_meta(self, session_id: str, meta: dict) -> None:
        _, meta_path = self._paths(session_id)
        tmp = meta_path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, meta_path)

    def append(self, session_id: str, offset: int, data: bytes, meta: dict) -> int:
        """See :meth:`IRecordingStore.append`."""
        cast_path, _ = self._paths(session_id)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise errors.BadRequest("offset must be a non-negative integer")
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        stored = self._meta(session_id)
        if stored is None:
            stored = {k: meta[k] for k in _META_FIELDS
                      if isinstance(meta.get(k), str) and len(meta[k]) <= 256}
            stored.update(session_id=session_id, length=0, complete=False,
                          received=rfc3339(datetime.fromtimestamp(self.clock.seconds(), timezone.utc)))
        length = _file_length(cast_path)
        if length != stored["length"]:
            # A crash between writing data and meta: the meta's length is what
            # was acknowledged; bytes past it are written again by the sender.
            with open(cast_path, "r+b" if cast_path.exists() else "wb") as f:
                f.truncate(stored["length"])
            length = stored["length"]
        if stored.get("complete"):
            return length
        if offset > length or offset + len(data) <= length:
            return length  # ahead of us (resend from length) or already held
        new = data[length - offset:]
        if length + len(new) > MAX_RECORDING_BYTES:
            raise errors.BadRequest("the recording is larger than the store allows")
        with open(cast_path, "ab") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        stored["length"] = length + len(new)
        self._write_meta(session_id, stored)
        return stored["length"]

    def complete(self, session_id: str, length: int) -> int:
        """See :meth:`IRecordingStore.complete`."""
        stored = self._meta(session_id)
        if stored is None:
            if length == 0:
                return 0
            raise errors.NotFound(f"no recording of session {session_id}")
        if stored["length"] == length and not stored.get("complete"):
            stored["complete"] = True
            self._write_meta(session_id, stored)
        return stored["length"]

    def info(self, session_id: str) -> dict:
        """See :meth:`IRecordingStore.info`."""
        stored = self._meta(session_id)
        if stored is None:
            raise errors.NotFound(f"no recording of session {session_id}")
        return stored

    def read(self, session_id: str) -> bytes:
        """See :meth:`IRecordingStore.read`."""
        cast_path, _ = self._paths(session_id)
        stored = self.info(session_id)
        with open(cast_path, "rb") as f:
            return f.read(stored["length"])


def _file_length(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
