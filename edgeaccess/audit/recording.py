"""Session recordings as asciicast v2, and where the auth service keeps them.

asciicast v2 (https://docs.asciinema.org/manual/asciicast/v2/) is one JSON
header line, then one JSON array per event: ``[time, "o", text]`` for
terminal output and ``[time, "r", "COLSxROWS"]`` for a resize, with
``time`` in seconds since the start. :class:`AsciicastWriter` produces
those lines from raw PTY output (decoding UTF-8 across chunk boundaries)
and hands them to a sink; the node's sink is its spool.

:class:`FileRecordingStore` is the auth side: ``SESSION.cast`` plus
``SESSION.json`` (meta: node, user, length, complete) under a directory,
written by the process's disk-writer thread. Chunks (raw bytes) are
appended by offset, so a chunk sent twice (after a lost acknowledgement)
is stored once, and a sender ahead of the store is told the stored length
to resend from.
"""

from __future__ import annotations

import codecs
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from twisted.logger import Logger
from zope.interface import implementer

from edgeaccess import errors
from edgeaccess.audit.diskwriter import MAX_BATCH, replace_file, write_all
from edgeaccess.audit.events import rfc3339
from edgeaccess.audit.interfaces import IRecordingStore

_log = Logger()

_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
#: Fields of the meta a sender may set.
_META_FIELDS = ("user", "login", "node", "node_id", "cluster", "started")
#: Largest recording kept (a chunk that would grow it past this is refused).
MAX_RECORDING_BYTES = 1024 * 1024 * 1024
#: Recording metas the store keeps in memory (the most recently used). More
#: than one batch of the disk writer holds: a meta renamed into place at the
#: end of a batch is never read back from disk by a later job of that batch.
_CACHED_METAS = 2 * MAX_BATCH


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

    Every file operation runs in ``writer``'s thread (never on the reactor
    thread). A chunk is acknowledged (its Deferred fires) only once its bytes
    and the meta that counts them are durable: the data and a new meta are
    written and fsync'd, then the meta is renamed into place; chunks of
    several nodes arriving together share those fsyncs (group commit). The
    meta's ``length`` is the truth: bytes past it (a crash between data and
    meta) are cut off and sent again by the node.

    :param writer: the process's :class:`~edgeaccess.audit.diskwriter.DiskWriter`
        (one is made if none is given: ``clock`` is then the reactor).
    """

    def __init__(self, directory: Path, clock, writer=None) -> None:
        self.directory = Path(directory)
        self.clock = clock
        if writer is None:
            from edgeaccess.audit.diskwriter import DiskWriter

            # (its thread starts with the first job)
            writer = DiskWriter(clock, name="edge-recordings-writer")
        self._writer = writer
        self._metas: dict[str, dict] = {}  # writer thread only
        self._casts: dict[str, object] = {}  # open append handles (writer thread)

    def _paths(self, session_id: str) -> tuple[Path, Path]:
        check_session_id(session_id)
        return self.directory / f"{session_id}.cast", self.directory / f"{session_id}.json"

    # --- writer thread -----------------------------------------------------------

    def _meta(self, session_id: str) -> dict | None:
        if session_id in self._metas:
            return self._metas[session_id]
        _, meta_path = self._paths(session_id)
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            return None
        self._remember(session_id, meta)
        return meta

    def _remember(self, session_id: str, meta: dict) -> None:
        self._metas.pop(session_id, None)
        self._metas[session_id] = meta
        while len(self._metas) > _CACHED_METAS:  # the oldest is read again if needed
            self._metas.pop(next(iter(self._metas)))

    def _cast(self, session_id: str, length: int):
        """The append handle of the cast, cut back to ``length`` if longer."""
        handle = self._casts.get(session_id)
        if handle is None:
            cast_path, _ = self._paths(session_id)
            handle = open(cast_path, "ab", buffering=0)
            if len(self._casts) > 256:  # bound the open files: close the oldest
                oldest = next(iter(self._casts))
                self._casts.pop(oldest).close()
            self._casts[session_id] = handle
        if handle.tell() != length:
            # A crash between writing data and meta: the meta's length is what
            # was acknowledged; bytes past it are written again by the sender.
            handle.truncate(length)
            handle.seek(length)
        return handle

    def _append(self, commit, session_id: str, offset: int, data: bytes, meta: dict) -> int:
        stored = self._meta(session_id)
        if stored is None:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            stored = {k: meta[k] for k in _META_FIELDS
                      if isinstance(meta.get(k), str) and len(meta[k]) <= 256}
            stored.update(session_id=session_id, length=0, complete=False,
                          received=rfc3339(datetime.fromtimestamp(self.clock.seconds(),
                                                                  timezone.utc)))
        length = stored["length"]
        if stored.get("complete"):
            return length
        if offset > length or offset + len(data) <= length:
            return length  # ahead of us (resend from length) or already held
        new = data[length - offset:]
        if length + len(new) > MAX_RECORDING_BYTES:
            raise errors.BadRequest("the recording is larger than the store allows")
        handle = self._cast(session_id, length)
        write_all(handle, new)
        commit.sync(handle)
        updated = dict(stored, length=length + len(new))
        self._put_meta(commit, session_id, updated)
        return updated["length"]

    def _put_meta(self, commit, session_id: str, meta: dict) -> None:
        _, meta_path = self._paths(session_id)
        replace_file(commit, meta_path, json.dumps(meta, sort_keys=True).encode())
        # What later jobs see at once (the answer waits for durability); a
        # failed commit drops it again (see _forget).
        self._remember(session_id, meta)

    def _forget(self, session_id: str) -> None:
        """After a failed write: drop what is cached and read the disk again."""
        def forget(commit) -> None:
            self._metas.pop(session_id, None)
            handle = self._casts.pop(session_id, None)
            if handle is not None:
                handle.close()

        self._writer.post(forget, f"resetting recording {session_id}")

    def _submit(self, session_id: str, job):
        def failed(failure):
            self._forget(session_id)
            return failure

        return self._writer.submit(job).addErrback(failed)

    def _complete(self, commit, session_id: str, length: int) -> int:
        stored = self._meta(session_id)
        if stored is None:
            if length == 0:
                return 0
            raise errors.NotFound(f"no recording of session {session_id}")
        if stored["length"] == length and not stored.get("complete"):
            handle = self._casts.pop(session_id, None)
            if handle is not None:
                handle.close()
            self._put_meta(commit, session_id, dict(stored, complete=True))
        return stored["length"]

    def _info(self, session_id: str) -> dict:
        stored = self._meta(session_id)
        if stored is None:
            raise errors.NotFound(f"no recording of session {session_id}")
        return dict(stored)

    def _read(self, session_id: str, offset: int, size: int | None) -> bytes:
        cast_path, _ = self._paths(session_id)
        stored = self._info(session_id)
        end = stored["length"] if size is None else min(stored["length"], offset + size)
        with open(cast_path, "rb") as f:
            f.seek(offset)
            return f.read(max(0, end - offset))

    # --- IRecordingStore (reactor thread) -------------------------------------------

    def append(self, session_id: str, offset: int, data: bytes, meta: dict):
        """See :meth:`IRecordingStore.append`."""
        check_session_id(session_id)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise errors.BadRequest("offset must be a non-negative integer")
        data = bytes(data)
        return self._submit(session_id, lambda commit: self._append(commit, session_id,
                                                                    offset, data, meta))

    def complete(self, session_id: str, length: int):
        """See :meth:`IRecordingStore.complete`."""
        check_session_id(session_id)
        return self._submit(session_id,
                            lambda commit: self._complete(commit, session_id, length))

    def info(self, session_id: str):
        """See :meth:`IRecordingStore.info`."""
        check_session_id(session_id)
        return self._writer.submit(lambda commit: self._info(session_id))

    def read(self, session_id: str, offset: int = 0, size: int | None = None):
        """See :meth:`IRecordingStore.read`."""
        check_session_id(session_id)
        return self._writer.submit(lambda commit: self._read(session_id, offset, size))
