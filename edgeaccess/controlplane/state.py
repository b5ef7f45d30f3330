"""What a node (or a leaf's node) needs to decide access, and how it changes.

The proxy pushes one *init* message (the whole state) when a node's link
comes up, then *update* messages (per-item changes) as administrators make
them. Both directions of the contract are here: :func:`init_message` /
:func:`update_message` build them, :class:`ControlState` applies them after
checking everything (they come from the network). Messages are JSON::

    {"type": "init", "state": {"roles": {NAME: doc}, "ssh_user_ca": [line],
                               "trusted_clusters": {ROOT: {...}}, "locks": {ID: lock}}}
    {"type": "update", "changes": [{"kind": "role"|"trusted_cluster"|"lock"|
                                    "ssh_user_ca", "name": NAME, "value": V | null}]}
    {"type": "ping"}                      (the LAN stream's keep-alive)

The node keeps the last state it got on disk (``control.json``), so a node
cut off from its cluster keeps enforcing the last locks and roles it knew,
and the next init replaces them all (locks made meanwhile included).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.logger import Logger

from edgeaccess import errors
from edgeaccess.identity import locks as lockdocs
from edgeaccess.pki import keys

_log = Logger()

KINDS = ("role", "trusted_cluster", "lock", "ssh_user_ca")
#: Upper bound of one decoded message (the node refuses bigger ones).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_ITEMS = 100_000
STATE_FILE = "control.json"

Listener = Callable[["ControlState", list[tuple[str, str]]], None]


def empty_state() -> dict[str, Any]:
    return {"roles": {}, "ssh_user_ca": [], "trusted_clusters": {}, "locks": {}}


def encode(message: dict[str, Any]) -> bytes:
    """One message as compact JSON (encoded once, sent to every node)."""
    return json.dumps(message, sort_keys=True, separators=(",", ":")).encode("utf-8")


def init_message(state: dict[str, Any]) -> dict[str, Any]:
    return {"type": "init", "state": state}


def update_message(changes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "update", "changes": changes}


def decode(data: bytes) -> dict[str, Any]:
    """Parse a received message; BadRequest for anything malformed."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise errors.BadRequest("control message too large")
    try:
        message = json.loads(data)
    except ValueError:
        raise errors.BadRequest("control message is not JSON") from None
    if not isinstance(message, dict) or message.get("type") not in ("init", "update", "ping"):
        raise errors.BadRequest("unknown control message")
    return message


def _check_role(name: Any, doc: Any) -> dict[str, Any]:
    if not isinstance(name, str) or not isinstance(doc, dict):
        raise errors.BadRequest("malformed role in control message")
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or meta.get("name") != name:
        raise errors.BadRequest("role name and document differ")
    return doc


def _check_trusted(name: Any, value: Any) -> dict[str, Any]:
    if not isinstance(name, str) or not isinstance(value, dict) or value.get("name") != name:
        raise errors.BadRequest("malformed trusted cluster in control message")
    cas = value.get("ssh_user_ca")
    role_map = value.get("role_map")
    if not isinstance(cas, list) or not all(isinstance(l, str) for l in cas):
        raise errors.BadRequest("malformed trusted cluster CA")
    if not isinstance(role_map, list) or not all(isinstance(m, dict) for m in role_map):
        raise errors.BadRequest("malformed trusted cluster role map")
    return {"name": name, "ssh_user_ca": list(cas), "role_map": list(role_map)}


def _check_lock(name: Any, value: Any) -> dict[str, Any]:
    lock = lockdocs.parse_lock(value)
    if lock["id"] != name:
        raise errors.BadRequest("lock id and document differ")
    return lock


def _check_user_cas(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(
            isinstance(l, str) and l.startswith(("ssh-", "ecdsa-")) and len(l) < 4096
            for l in value):
        raise errors.BadRequest("malformed user CA list")
    return list(value)


def check_state(state: Any) -> dict[str, Any]:
    """A whole state received in an init message, checked item by item."""
    if not isinstance(state, dict):
        raise errors.BadRequest("control state is not an object")
    roles = state.get("roles", {})
    trusted = state.get("trusted_clusters", {})
    locks = state.get("locks", {})
    if not all(isinstance(part, dict) for part in (roles, trusted, locks)):
        raise errors.BadRequest("malformed control state")
    if len(roles) + len(trusted) + len(locks) > MAX_ITEMS:
        raise errors.BadRequest("control state too large")
    return {
        "roles": {name: _check_role(name, doc) for name, doc in roles.items()},
        "ssh_user_ca": _check_user_cas(state.get("ssh_user_ca", [])),
        "trusted_clusters": {n: _check_trusted(n, v) for n, v in trusted.items()},
        "locks": {n: _check_lock(n, v) for n, v in locks.items()},
    }


class ControlState:
    """The node's current roles, user CAs, trusted roots and locks.

    :param on_change: listeners called with ``(state, changed)`` after each
        applied message; ``changed`` lists ``(kind, name)`` (``("*", "*")``
        for an init).
    """

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.state = state if state is not None else empty_state()
        self._listeners: list[Listener] = []
        #: Whether a message from the cluster was applied since start.
        self.synced = False

    # -- reads -------------------------------------------------------------

    @property
    def roles(self) -> dict[str, dict]:
        return self.state["roles"]

    @property
    def user_cas(self) -> list[str]:
        return self.state["ssh_user_ca"]

    @property
    def trusted(self) -> list[dict]:
        return list(self.state["trusted_clusters"].values())

    @property
    def locks(self) -> list[dict]:
        return list(self.state["locks"].values())

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # -- changes -----------------------------------------------------------

    def apply(self, message: dict[str, Any]) -> list[tuple[str, str]]:
        """Apply one decoded message; BadRequest (and nothing changed) if malformed."""
        kind = message.get("type")
        if kind == "ping":
            return []
        if kind == "init":
            self.state = check_state(message.get("state"))
            changed = [("*", "*")]
        elif kind == "update":
            changes = message.get("changes")
            if not isinstance(changes, list) or len(changes) > MAX_ITEMS:
                raise errors.BadRequest("malformed control update")
            checked = [self._check_change(change) for change in changes]
            for what, name, value in checked:
                self._set(what, name, value)
            changed = [(what, name) for what, name, _ in checked]
        else:
            raise errors.BadRequest("unknown control message")
        self.synced = True
        for listener in list(self._listeners):
            try:
                listener(self, changed)
            except Exception:
                _log.failure("control state listener failed")
        return changed

    @staticmethod
    def _check_change(change: Any) -> tuple[str, str, Any]:
        if not isinstance(change, dict) or change.get("kind") not in KINDS:
            raise errors.BadRequest("malformed control change")
        what, name, value = change["kind"], change.get("name"), change.get("value")
        if not isinstance(name, str) or len(name) > 512:
            raise errors.BadRequest("malformed control change name")
        if value is not None:
            check = {"role": _check_role, "trusted_cluster": _check_trusted,
                     "lock": _check_lock}.get(what)
            value = check(name, value) if check else _check_user_cas(value)
        return what, name, value

    def _set(self, what: str, name: str, value: Any) -> None:
        if what == "ssh_user_ca":
            self.state["ssh_user_ca"] = value or []
            return
        table = self.state[{"role": "roles", "trusted_cluster": "trusted_clusters",
                            "lock": "locks"}[what]]
        if value is None:
            table.pop(name, None)
        else:
            table[name] = value


class PersistedControlState(ControlState):
    """A :class:`ControlState` kept in ``DIR/control.json`` (written in a
    thread, latest state wins, never half a file)."""

    def __init__(self, data_dir: Path, reactor) -> None:
        self.path = Path(data_dir) / STATE_FILE
        self._reactor = reactor
        self._writing = False
        self._dirty = False
        super().__init__(self._load())

    def _load(self) -> dict[str, Any]:
        try:
            return check_state(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return empty_state()
        except (ValueError, errors.EdgeError) as error:
            _log.warn("ignoring unreadable {path}: {error}", path=self.path, error=error)
            return empty_state()

    def apply(self, message: dict[str, Any]) -> list[tuple[str, str]]:
        changed = super().apply(message)
        if changed:
            self._save()
        return changed

    def _save(self) -> None:
        if self._writing:
            self._dirty = True
            return
        self._writing = True
        data = json.dumps(self.state, sort_keys=True).encode("utf-8")
        pool = getattr(self._reactor, "getThreadPool", None)
        if pool is None:  # a reactor without threads (tests): write here
            d = defer.maybeDeferred(keys.write_public, self.path, data)
        else:  # the write fsyncs: off the reactor thread
            d = threads.deferToThreadPool(self._reactor, pool(), keys.write_public,
                                          self.path, data)
        d.addErrback(lambda f: _log.failure("cannot save {path}", f, path=self.path))
        d.addBoth(self._saved)

    def _saved(self, _: object) -> None:
        self._writing = False
        if self._dirty:
            self._dirty = False
            self._save()

    def seed(self, roles: dict, trusted: list, user_cas: list) -> None:
        """Start from the files of an older node (``roles.json`` ...) when
        there is no ``control.json`` yet."""
        if self.path.exists():
            return
        self.state["roles"] = dict(roles)
        self.state["trusted_clusters"] = {t["name"]: t for t in trusted
                                          if isinstance(t, dict) and "name" in t}
        self.state["ssh_user_ca"] = list(user_cas)
