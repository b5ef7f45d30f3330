"""Contracts of the audit package.

``IAuditUploader`` is how a node delivers what its spool holds to the
auth service: over HTTPS to the auth API, or to the proxy's web port for a
node behind a tunnel (:class:`~edgeaccess.audit.uploader.HTTPSAuditUploader`;
recordings streamed as raw bytes by offset). Every call is idempotent, so a
batch may be re-sent after any failure.

``IRecordingStore`` keeps session recordings at the auth service: files
under the data dir now (:class:`~edgeaccess.audit.recording.FileRecordingStore`),
object storage later.
"""

from __future__ import annotations

from zope.interface import Interface


class IAuditUploader(Interface):
    """Delivers spooled events and recording chunks; every call is idempotent."""

    def send_events(events: list):  # -> Deferred[list[str]]
        """Deliver ``events`` (dicts); fires with the ids the auth service
        acknowledged (stored now or earlier)."""

    def send_recording_chunk(session_id: str, offset: int, data: bytes, meta: dict):
        """Deliver ``data`` found at ``offset`` of the session's cast; fires
        with the length the auth service now holds (the next offset to send,
        which may be lower than ``offset`` if it lost a tail)."""

    def complete_recording(session_id: str, length: int, meta: dict):
        """Say the cast is ``length`` bytes long and ended; fires with the
        stored length (equal to ``length`` when the recording is whole)."""


class IRecordingStore(Interface):
    """Session recordings (asciicast v2 bytes) by session id.

    Every method returns a Deferred (the store's I/O is never done on the
    reactor thread); writes fire only once what they stored is durable.
    """

    def append(session_id: str, offset: int, data: bytes, meta: dict):  # -> Deferred[int]
        """Store ``data`` at ``offset`` if it extends the recording; bytes
        already held are not written again. Fires with the stored length
        (an empty ``data`` asks for it)."""

    def complete(session_id: str, length: int):  # -> Deferred[int]
        """Mark the recording ended when ``length`` bytes are held; fires
        with the stored length."""

    def info(session_id: str):  # -> Deferred[dict]
        """``{"session_id", "length", "complete", ...meta}``; fails with
        :class:`~edgeaccess.errors.NotFound`."""

    def read(session_id: str, offset: int = 0, size: int | None = None):  # -> Deferred[bytes]
        """The recording's bytes (all of them by default); fails with
        :class:`~edgeaccess.errors.NotFound`."""
