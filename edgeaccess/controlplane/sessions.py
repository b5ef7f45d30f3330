"""The one seam through which a lock ends live sessions, whatever carries them.

Anything that holds a user's session open (the node's SSH connections, the
proxy's SSH entry, and later web terminals, Kubernetes streams and app
sessions) registers it here with who it is for and a ``terminate(message)``
callback. When a lock comes into force, :meth:`LiveSessions.enforce` calls
``terminate`` on every session the lock targets; the callback shows the
message to the user where it can (a terminal line, a WebSocket close
reason, an HTTP error) and closes the session::

    handle = sessions.register(user="alice", cluster="root", node="web-1",
                               node_id=uuid, kind="ssh", terminate=close_with)
    ...
    handle.unregister()          # when the session ends by itself
"""

from __future__ import annotations

from typing import Callable, Iterable

import attrs
from twisted.logger import Logger

from edgeaccess.identity import locks as lockdocs

_log = Logger()


@attrs.define(eq=False)
class LiveSession:
    """One registered session; :meth:`unregister` when it ends."""

    registry: LiveSessions
    user: str | None
    cluster: str | None
    nodes: tuple[str, ...]
    kind: str
    terminate: Callable[[str], None]

    def unregister(self) -> None:
        self.registry._sessions.pop(self, None)


class LiveSessions:
    """Live sessions by user and node, for locks to end them.

    :param local_cluster: the cluster deciding (see
        :func:`edgeaccess.identity.locks.matching_lock`).
    """

    def __init__(self, local_cluster: str | None = None) -> None:
        self.local_cluster = local_cluster
        self._sessions: dict[LiveSession, None] = {}

    def register(self, *, terminate: Callable[[str], None], user: str | None = None,
                 cluster: str | None = None, node: str | None = None,
                 node_id: str | None = None, kind: str = "ssh") -> LiveSession:
        """Record a live session of ``user`` (of ``cluster``) on ``node``."""
        nodes = tuple(n for n in (node, node_id) if n)
        session = LiveSession(self, user, cluster, nodes, kind, terminate)
        self._sessions[session] = None
        return session

    def __len__(self) -> int:
        return len(self._sessions)

    def enforce(self, locks: Iterable[dict], now: float) -> int:
        """End every session that a lock in force targets; returns how many."""
        locks = list(locks)
        if not locks:
            return 0
        ended = 0
        for session in list(self._sessions):
            lock = lockdocs.matching_lock(
                locks, now, user=session.user, user_cluster=session.cluster,
                local_cluster=self.local_cluster, node_names=session.nodes)
            if lock is None:
                continue
            session.unregister()
            ended += 1
            message = str(lockdocs.refusal(lock))
            _log.info("ending {kind} session of {user} on {nodes}: {message}",
                      kind=session.kind, user=session.user or "-",
                      nodes="/".join(session.nodes) or "-", message=message)
            try:
                session.terminate(message)
            except Exception:
                _log.failure("terminating a {kind} session failed", kind=session.kind)
        return ended
