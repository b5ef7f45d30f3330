"""The proxy's side of the push: the node state, and every link that wants it.

:class:`ControlPublisher` turns the cache's changes (``/resources/role/*``,
``/locks/*``, ``/trusted_state/*``) into the node-facing messages of
:mod:`edgeaccess.controlplane.state`, encodes each once, and hands the same
bytes to every sink: each reverse tunnel (AMP ``ControlUpdate``), each LAN
node's stream (``GET /v1/watch``), each leaf cluster's tunnel. A new sink
gets the init message first. A leaf proxy also holds what its roots pushed
to it (:meth:`set_root_locks`) and relays their user locks to its nodes.

Lock listeners (:meth:`subscribe_locks`) hear of every lock that comes
into force, so that the proxy ends its own sessions too.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.logger import Logger

from edgeaccess import errors
from edgeaccess.identity import locks as lockdocs

from edgeaccess.controlplane import state as cstate

_log = Logger()

ROLE_PREFIX = "/resources/role/"
LOCK_PREFIX = "/locks/"
TRUSTED_PREFIX = "/trusted_state/"

Sink = Callable[[bytes], None]


def _loads(item) -> Any:
    return json.loads(item.value)


def trusted_projection(state: dict[str, Any]) -> dict[str, Any] | None:
    """What nodes need of a leaf's trust in one root (None when disabled)."""
    if not state.get("enabled"):
        return None
    return {"name": state["name"], "ssh_user_ca": list(state.get("ssh_user_ca", [])),
            "role_map": list(state.get("role_map", []))}


class ControlPublisher:
    """Pushes the node state to every sink within one commit of a change.

    :param cache: a started :class:`~edgeaccess.controlplane.cache.ControlCache`.
    :param user_cas: callable returning this cluster's user CA lines.
    :param clock: ``IReactorTime``.
    """

    def __init__(self, cache, user_cas: Callable[[], list[str]], clock) -> None:
        self.cache = cache
        self.user_cas = user_cas
        self.clock = clock
        self._sinks: dict[Any, Sink] = {}
        self._lock_listeners: list[Callable[[dict], None]] = []
        #: root cluster name -> {lock id: lock}: locks a leaf relays.
        self._root_locks: dict[str, dict[str, dict]] = {}
        #: The encoded init, kept until the next change (10,000 tunnels
        #: coming back after a restart get the same bytes).
        self._init: bytes | None = None
        cache.subscribe(self._changed)
        #: How many messages were sent (for tests and the benchmark).
        self.sent = 0

    # -- the state ----------------------------------------------------------

    def locks(self) -> list[dict]:
        """Every lock in force here: this cluster's and those relayed from roots."""
        found = []
        for item in self.cache.get_range(LOCK_PREFIX):
            try:
                found.append(lockdocs.parse_lock(_loads(item)))
            except (ValueError, errors.EdgeError):
                _log.warn("stored lock {key} is malformed; not pushed", key=item.key)
        for locks in self._root_locks.values():
            found.extend(locks.values())
        return found

    def state(self) -> dict[str, Any]:
        """The whole node state, as an init message carries it."""
        roles = {}
        for item in self.cache.get_range(ROLE_PREFIX):
            doc = _loads(item)
            roles[doc["metadata"]["name"]] = doc
        trusted = {}
        for item in self.cache.get_range(TRUSTED_PREFIX):
            projected = trusted_projection(_loads(item))
            if projected is not None:
                trusted[projected["name"]] = projected
        return {"roles": roles, "ssh_user_ca": list(self.user_cas()),
                "trusted_clusters": trusted,
                "locks": {lock["id"]: lock for lock in self.locks()}}

    def init_bytes(self) -> bytes:
        if self._init is None:
            self._init = cstate.encode(cstate.init_message(self.state()))
        return self._init

    # -- sinks --------------------------------------------------------------

    def add_sink(self, key: Any, sink: Sink) -> None:
        """Send the init message to ``sink``, then every update.

        Before the cache's first read there is nothing true to send (an
        empty init would wipe a node's state): the sink waits for it.
        """
        if not self.cache.ready:
            self._sinks[key] = None  # type: ignore[assignment]
            self.cache.when_ready().addCallback(lambda _: self._late_sink(key, sink))
            return
        self._sinks[key] = sink
        self._send(sink, self.init_bytes())

    def _late_sink(self, key: Any, sink: Sink) -> None:
        if key in self._sinks:
            self._sinks[key] = sink
            self._send(sink, self.init_bytes())

    def remove_sink(self, key: Any) -> None:
        self._sinks.pop(key, None)

    def sink_count(self) -> int:
        return sum(1 for sink in self._sinks.values() if sink is not None)

    def _send(self, sink: Sink, data: bytes) -> None:
        try:
            sink(data)
            self.sent += 1
        except Exception:
            _log.failure("a control sink failed")

    def broadcast(self, changes: list[dict[str, Any]]) -> None:
        if not changes:
            return
        self._init = None
        data = cstate.encode(cstate.update_message(changes))
        for sink in list(self._sinks.values()):
            if sink is not None:
                self._send(sink, data)
        for change in changes:
            if change["kind"] == "lock" and change["value"] is not None:
                for listener in list(self._lock_listeners):
                    try:
                        listener(change["value"])
                    except Exception:
                        _log.failure("a lock listener failed")

    def subscribe_locks(self, listener: Callable[[dict], None]) -> None:
        """Call ``listener(lock)`` for each lock that comes into force."""
        self._lock_listeners.append(listener)

    # -- changes --------------------------------------------------------------

    def _changed(self, key: str, item) -> None:
        change = self._change_for(key, item)
        if change is None:
            return  # not node state (a node's heartbeat record...)
        self.broadcast([change])

    def _change_for(self, key: str, item) -> dict[str, Any] | None:
        try:
            if key.startswith(ROLE_PREFIX):
                name = key[len(ROLE_PREFIX):]
                return {"kind": "role", "name": name,
                        "value": _loads(item) if item is not None else None}
            if key.startswith(LOCK_PREFIX):
                name = key[len(LOCK_PREFIX):]
                value = lockdocs.parse_lock(_loads(item)) if item is not None else None
                return {"kind": "lock", "name": name, "value": value}
            if key.startswith(TRUSTED_PREFIX):
                name = key[len(TRUSTED_PREFIX):]
                value = trusted_projection(_loads(item)) if item is not None else None
                return {"kind": "trusted_cluster", "name": name, "value": value}
        except (ValueError, KeyError, errors.EdgeError):
            _log.warn("stored {key} is malformed; not pushed", key=key)
        return None

    # -- relayed from roots (on a leaf) ---------------------------------------

    def set_root_locks(self, root: str, locks: list[dict]) -> None:
        """The user locks root cluster ``root`` has in force now (a leaf relays
        them to its nodes, marked with the root's name)."""
        relayed = {}
        for lock in locks:
            if "user" not in lock["target"] or lock.get("cluster") not in (None, root):
                continue
            relayed_id = f"{root}.{lock['id']}"
            relayed[relayed_id] = {**lock, "id": relayed_id, "cluster": root}
        old = self._root_locks.get(root, {})
        if relayed:
            self._root_locks[root] = relayed
        else:
            self._root_locks.pop(root, None)
        changes = [{"kind": "lock", "name": lock_id, "value": None}
                   for lock_id in old if lock_id not in relayed]
        changes += [{"kind": "lock", "name": lock_id, "value": lock}
                    for lock_id, lock in relayed.items() if old.get(lock_id) != lock]
        self.broadcast(changes)
