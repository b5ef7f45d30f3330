"""The node's audit hook: SSH events become audit events in the spool.

:class:`AuditingObserver` is the node's :class:`ISessionObserver`. Each SSH
event is turned into a typed audit event and handed to the spool, whose
writer thread puts it on disk (fsync'd, shared with whatever else arrived at
the same time). ``session_started`` and ``exec_started`` return a Deferred
that fires once the event is durable: the session's program starts only
then, and not at all if the event cannot be written (nothing runs
unaudited). The shipper wakes by itself when an event is durable. Interactive
sessions with a PTY get a recording (:meth:`AuditingObserver.open_recording`,
called by the session when the roles ask for recording).

After a crash, :meth:`AuditingObserver.recover` ends the sessions the spool
still lists as running with ``session.end`` (reason ``node restarted``) and
closes their recordings, so they are delivered whole.

:class:`SpoolGuardAuthorizer` refuses new SSH connections while the spool
is over its bound (see :mod:`edgeaccess.audit.spool`, policy when full).
"""

from __future__ import annotations

import posixpath
import shlex
import uuid
from datetime import datetime, timezone
from typing import Callable

from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.logger import Logger
from zope.interface import implementer

from edgeaccess import errors
from edgeaccess.audit import events as ev
from edgeaccess.audit.recording import AsciicastWriter
from edgeaccess.ssh.interfaces import IAuthorizer, ISessionObserver, SessionInfo

_log = Logger()


class SessionRecorder:
    """What a session tees its PTY output and resizes into."""

    def __init__(self, writer: AsciicastWriter, spooled) -> None:
        self._writer = writer
        self._spooled = spooled

    def output(self, data: bytes) -> None:
        self._writer.output(data)

    def resize(self, width: int, height: int) -> None:
        self._writer.resize(width, height)

    def close(self) -> None:
        if not self._spooled.closed:
            self._writer.close()
            self._spooled.close().addErrback(
                lambda f: _log.failure("cannot close the recording of {session}", f,
                                       session=self._spooled.session_id))


@implementer(ISessionObserver)
class AuditingObserver:
    """Writes the node's audit events (and recordings) into a spool.

    :param spool: a :class:`~edgeaccess.audit.spool.Spool`.
    :param cluster: the node's cluster name.
    :param node_name, node_id: this node.
    :param clock: ``IReactorTime`` for event times and recording timings.
    :param on_spooled: called after anything was spooled (kicks the shipper).
    :param new_id: makes event ids.
    """

    def __init__(self, spool, *, cluster: str, node_name: str, node_id: str, clock,
                 on_spooled: Callable[[], None] = lambda: None,
                 new_id: Callable[[], str] | None = None) -> None:
        self.spool = spool
        self.cluster = cluster
        self.node_name = node_name
        self.node_id = node_id
        self.clock = clock
        self.on_spooled = on_spooled
        self._new_id = new_id or (lambda: str(uuid.uuid4()))
        self._recorders: dict[str, SessionRecorder] = {}

    def _emit(self, event_type: str, **fields) -> Deferred:
        """Spool an event; fires once it is durable, fails if it cannot be
        (after saying so loudly: a spool that cannot write is a disk failure).
        Never raises into the SSH server."""
        try:
            event = ev.make_event(
                event_type, cluster=self.cluster,
                when=datetime.fromtimestamp(self.clock.seconds(), timezone.utc),
                new_id=self._new_id, node=self.node_name, node_id=self.node_id, **fields)
            d = self.spool.append_event(event)
        except Exception as e:
            _log.failure("audit event {type} could not be spooled", type=event_type)
            return fail(errors.EdgeError(f"the audit event could not be spooled: {e}"))

        def spooled(_) -> None:
            self.on_spooled()

        return d.addCallbacks(spooled, self._unwritable, errbackArgs=(f"event {event_type}",))

    @staticmethod
    def _unwritable(failure, what: str):
        _log.failure("audit {what} could not be spooled", failure, what=what)
        return fail(errors.EdgeError("this node cannot write its audit spool"))

    @staticmethod
    def _quiet(d: Deferred) -> None:
        """Nobody waits for this event (the failure was logged by ``_emit``)."""
        d.addErrback(lambda _: None)

    @staticmethod
    def _session_fields(session: SessionInfo) -> dict:
        return {"session_id": session.session_id, "user": session.username,
                "login": session.login, "remote_addr": session.peer_address}

    # --- ISessionObserver ----------------------------------------------------

    def auth_refused(self, username, login, peer_address, reason) -> None:
        self._quiet(self._emit(ev.AUTH, user=username, login=login, remote_addr=peer_address,
                               success=False, error=str(reason)[:512]))

    def session_started(self, session: SessionInfo, kind: str) -> Deferred:
        """Fires once ``session.start`` (and the record that the session runs,
        to end it after a crash) are durable."""
        fields = self._session_fields(session)
        waits = []
        try:
            waits.append(self.spool.session_opened(session.session_id, {
                **fields, "started": ev.rfc3339(
                    datetime.fromtimestamp(self.clock.seconds(), timezone.utc))}
            ).addErrback(self._unwritable, f"session {session.session_id}"))
        except Exception as e:
            _log.failure("cannot remember session {session} in the spool",
                         session=session.session_id)
            waits.append(fail(errors.EdgeError(f"cannot remember the session: {e}")))
        waits.append(self._emit(ev.SESSION_START, kind=kind, roles=list(session.roles),
                                **fields))
        if kind == "sftp":
            waits.append(self._emit(ev.SFTP, success=True, **fields))
        return _all(waits)

    def exec_started(self, session: SessionInfo, command: str) -> Deferred:
        """Fires once the ``exec`` (and ``scp``) events are durable."""
        fields = self._session_fields(session)
        waits = [self._emit(ev.EXEC, command=command[:4096], **fields)]
        scp = _scp_request(command)
        if scp is not None:
            direction, path = scp
            waits.append(self._emit(ev.SCP, command=command[:4096], action=direction,
                                    path=path[:1024] if path is not None else None,
                                    **fields))
        return _all(waits)

    def session_ended(self, session: SessionInfo, exit_status, exit_signal,
                      reason: str | None = None) -> None:
        recorder = self._recorders.pop(session.session_id, None)
        if recorder is not None:
            try:
                recorder.close()
            except Exception:
                _log.failure("cannot close the recording of {session}",
                             session=session.session_id)
        ended = self._emit(
            ev.SESSION_END, exit_status=exit_status, exit_signal=exit_signal,
            reason=reason[:256] if reason else (
                "exited" if exit_status is not None or exit_signal else "closed"),
            recorded=recorder is not None, **self._session_fields(session))

        def forget(_) -> None:
            # Only once session.end is durable: a crash before still ends it.
            self.spool.session_closed(session.session_id)

        self._quiet(ended.addCallback(forget))

    def port_forward(self, session: SessionInfo, host: str, port: int, allowed: bool) -> None:
        self._quiet(self._emit(ev.PORT, addr=f"{host}:{port}", success=bool(allowed),
                               **self._session_fields(session)))

    # --- recordings -----------------------------------------------------------

    def open_recording(self, session: SessionInfo, width: int, height: int,
                       term: str = "xterm") -> SessionRecorder | None:
        """A recorder for an interactive session, or ``None`` if one cannot
        be made (logged; the session goes on, its events still recorded)."""
        try:
            spooled = self.spool.start_recording(session.session_id, {
                "user": session.username, "login": session.login,
                "node": self.node_name, "node_id": self.node_id,
                "cluster": self.cluster})
            writer = AsciicastWriter(
                spooled.write, self.clock,
                width or 80, height or 24, env={"TERM": term or "xterm"},
                title=f"{session.username} as {session.login} on {self.node_name}")
        except Exception:
            _log.failure("cannot record session {session}", session=session.session_id)
            return None
        recorder = SessionRecorder(writer, spooled)
        self._recorders[session.session_id] = recorder
        return recorder

    # --- after a crash ----------------------------------------------------------

    async def recover(self) -> int:
        """End the sessions a crash left open; returns how many."""
        orphans = self.spool.open_sessions()
        for info in orphans:
            session_id = info.get("session_id")
            if not isinstance(session_id, str):
                continue
            try:
                await self.spool.finish_recording(session_id)
            except errors.EdgeError:
                pass
            await self._emit(ev.SESSION_END, session_id=session_id, user=info.get("user"),
                             login=info.get("login"), remote_addr=info.get("remote_addr"),
                             reason="node restarted", exit_status=None)
            self.spool.session_closed(session_id)
            _log.warn("session {session} of {user} was cut by a node restart; ended it "
                      "in the audit log", session=session_id, user=info.get("user"))
        # Recordings whose session was never remembered (crash in between).
        for pending in self.spool.pending_recordings():
            if not pending["complete"] and self.spool.recording(pending["session_id"]) is None:
                await self.spool.finish_recording(pending["session_id"])
        return len(orphans)


def _all(waits: list[Deferred]) -> Deferred:
    """Fires when every one of ``waits`` has; fails with the first failure."""
    d = gatherResults(waits, consumeErrors=True)

    def first(failure):
        return failure.value.subFailure

    return d.addCallbacks(lambda _: None, first)


def _scp_request(command: str) -> tuple[str | None, str | None] | None:
    """``(direction, path)`` if ``command`` is the remote end of classic scp
    (``scp -t PATH`` receives an upload, ``scp -f PATH`` sends a download),
    else ``None``. The path is the last word, shell quoting removed."""
    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: the shell will refuse it anyway
        words = command.split()
    if not words or posixpath.basename(words[0]) != "scp":
        return None
    letters, operands = "", []
    for i, word in enumerate(words[1:], 1):
        if word == "--":
            operands += words[i + 1:]
            break
        if word.startswith("-") and len(word) > 1:
            letters += word[1:]
        else:
            operands.append(word)
    direction = "upload" if "t" in letters else "download" if "f" in letters else None
    return direction, operands[-1] if operands else None


@implementer(IAuthorizer)
class SpoolGuardAuthorizer:
    """Refuses new connections while the audit spool is full, else asks ``inner``."""

    def __init__(self, inner, spool) -> None:
        self._inner = inner
        self._spool = spool

    def authorize(self, identity, login: str, peer_address: str):
        if not self._spool.accepting_sessions():
            _log.error("refused {user} as {login}: the audit spool is full ({size} bytes)",
                       user=identity.username, login=login, size=self._spool.size())
            return fail(errors.AccessDenied(
                "this node's audit spool is full: new sessions are refused until the "
                "auth service is reachable again"))
        return self._inner.authorize(identity, login, peer_address)
