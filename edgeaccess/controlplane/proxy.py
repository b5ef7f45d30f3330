"""The control plane of one proxy, composed: cache, publisher, sinks, locks.

:class:`ProxyControlPlane` is built by ``edgeproxy``'s ``makeService`` with
finished parts. It

- runs the :class:`~edgeaccess.controlplane.cache.ControlCache` the auth
  service reads from;
- pushes the node state to every tunnel that asked for it (capability
  ``control/1``: nodes and leaf proxies) and to LAN nodes' ``/v1/watch``
  streams;
- on a leaf, takes the control messages of each root (over the leaf's
  tunnel to it) and relays the root's user locks to its own nodes;
- enforces locks at the proxy: refuses locked users and locked nodes and
  ends the proxy's own sessions of a newly locked user.
"""

from __future__ import annotations

from typing import Callable

from twisted.application.service import MultiService
from twisted.logger import Logger

from edgeaccess import errors
from edgeaccess.controlplane import state as cstate
from edgeaccess.controlplane.cache import ControlCache
from edgeaccess.controlplane.publisher import ControlPublisher
from edgeaccess.controlplane.sessions import LiveSessions
from edgeaccess.controlplane.stream import WatchStreams
from edgeaccess.identity import locks as lockdocs

_log = Logger()

#: The proxy ends its own hop of a locked user's session this long after the
#: push, so that the node (which got the same push) writes the lock's
#: message into the user's terminal first.
PROXY_GRACE = 0.75


class ProxyControlPlane(MultiService):
    """See the module docstring.

    :param auth: the :class:`~edgeaccess.auth.service.AuthServer` (its
        ``cache`` and ``watch_streams`` are set here).
    :param registry: the tunnel registry (``subscribe``).
    :param user_cas: callable returning this cluster's user CA lines.
    """

    def __init__(self, auth, backend, reactor, registry, user_cas: Callable[[], list[str]],
                 *, resync_interval: float = 600.0) -> None:
        super().__init__()
        self.auth = auth
        self.clock = reactor
        self.cluster = auth.cluster_name
        self.cache = ControlCache(backend, reactor, resync_interval=resync_interval)
        self.cache.setServiceParent(self)
        self.sessions = LiveSessions(self.cluster)
        self.publisher = ControlPublisher(self.cache, user_cas, reactor)
        self.publisher.subscribe_locks(self._lock_changed)
        self.streams = WatchStreams(self.publisher, reactor)
        self._roots: dict[str, cstate.ControlState] = {}
        auth.cache = self.cache
        auth.watch_streams = self.streams
        registry.subscribe(self._tunnel_up, self._tunnel_down)

    def stopService(self):
        self.streams.stop()
        return super().stopService()

    # -- sinks ----------------------------------------------------------------

    def _tunnel_up(self, tunnel) -> None:
        if getattr(tunnel, "takes_control", False):
            self.publisher.add_sink(tunnel, tunnel.send_control)

    def _tunnel_down(self, tunnel) -> None:
        self.publisher.remove_sink(tunnel)

    # -- a leaf's roots -------------------------------------------------------

    def root_control(self, root: str, data: bytes) -> None:
        """A control message from root cluster ``root`` (over our tunnel to it)."""
        state = self._roots.setdefault(root, cstate.ControlState())
        try:
            state.apply(cstate.decode(data))
        except errors.EdgeError as error:
            _log.warn("ignoring a control message from root cluster {root}: {error}",
                      root=root, error=error)
            return
        self.publisher.set_root_locks(root, [l for l in state.locks if "cluster" not in l])

    def root_gone(self, root: str) -> None:
        """The trust in ``root`` ended: its locks no longer apply here."""
        self._roots.pop(root, None)
        self.publisher.set_root_locks(root, [])

    # -- enforcement at the proxy ---------------------------------------------

    def _lock_changed(self, lock: dict) -> None:
        self.clock.callLater(PROXY_GRACE, self._enforce, lock)

    def _enforce(self, lock: dict) -> None:
        # The lock as it is in force now: removed (or replaced) during the
        # grace, it ends nothing (a session started after a removal must not
        # be cut by the lock's earlier arrival).
        current = [l for l in self.publisher.locks() if l.get("id") == lock.get("id")]
        if current:
            self.sessions.enforce(current, self.clock.seconds())

    def check_user(self, identity) -> None:
        """Refuse a locked user (``AccessDenied`` with the lock's message)."""
        lock = lockdocs.matching_lock(
            self.publisher.locks(), self.clock.seconds(), user=identity.username,
            user_cluster=identity.cluster, local_cluster=self.cluster)
        if lock is not None:
            self._refused(identity.username, None, lock)
            raise lockdocs.refusal(lock)

    def check_target(self, host: str, user: str | None = None) -> None:
        """Refuse a route to a locked node of this cluster."""
        suffix = "." + self.cluster
        if host.endswith(suffix):
            name = host[: -len(suffix)]
        elif "." not in host:
            name = host
        else:
            return  # a leaf's node: the leaf's locks decide there
        lock = lockdocs.matching_lock(self.publisher.locks(), self.clock.seconds(),
                                      node_names=(name,))
        if lock is not None:
            self._refused(user, name, lock)
            raise lockdocs.refusal(lock)

    def _refused(self, user: str | None, node: str | None, lock: dict) -> None:
        _log.warn("refused {user} to {node}: lock {id}", user=user or "-", node=node or "-",
                  id=lock["id"])
        self.auth._emit("auth", user=user, node=node, success=False, lock_id=lock["id"],
                        error=str(lockdocs.refusal(lock)))
