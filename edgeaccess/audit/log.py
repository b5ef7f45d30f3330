"""The cluster's audit log: a hash chain of events in the backend.

Storage layout (JSON values)::

    /audit/events/SEQ     {"seq", "prev_hash", "hash", "event"} (SEQ: 20 digits)
    /audit/ids/ID         {"seq"}: which event holds id ID (idempotent ingestion)
    /audit/head           {"seq", "hash"} of the last event

On a backend with transactions shared by several proxies
(``IAtomicUpdate``: PostgreSQL), an append is one transaction, serialized
with every writer of every proxy: read the head, chain the events after
it, index their ids, move the head. Events waiting while one transaction
runs go together in the next one (group commit), so several proxies
appending at once never retry and many events share one commit. Events
emitted here that the backend refuses (an outage longer than its own
retries) stay queued and are tried again with backoff; a node's batch
fails at once instead (the node keeps it and sends it again).

Elsewhere (SQLite, whose writers are one process) appending is atomic
without a transaction: the event's key is taken with ``create()`` (which
fails if another writer took that sequence number first: then the tail is
re-read and the append retried), and only then is the head moved with
``compare_and_swap``. The event keys are the truth; the head is where a
reader starts looking, and an event written by a writer that died before
moving the head is found (and its id indexed) by the next writer. Appends
of one process run one at a time under a lock.

``verify`` walks the chain and names the first broken link: an altered
event (its content no longer matches its hash), a removed one (a gap in
the sequence numbers, or a link to an event that is not there), an
inserted one (a later event links past it) or reordered ones (an event
links to an event that comes after it).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

import attrs
from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger

from edgeaccess import errors
from edgeaccess.audit import events as ev
from edgeaccess.backend.interfaces import CompareFailed, IAtomicUpdate

_log = Logger()

EVENTS_PREFIX = "/audit/events/"
IDS_PREFIX = "/audit/ids/"
HEAD_KEY = "/audit/head"
#: Most events one search returns (the newest ones that match).
DEFAULT_SEARCH_LIMIT = 1000
MAX_SEARCH_LIMIT = 10000
#: Most events one ingestion call takes.
MAX_BATCH = 1000
#: Most events one transaction appends (IAtomicUpdate): more wait for the next.
MAX_TRANSACTION = 250
#: Events emitted here kept in memory while the backend refuses them (an
#: outage longer than the backend's own retries); the oldest go beyond it.
MAX_HELD_EMITS = 100_000
#: Seconds between attempts to store held events (doubling up to the last).
HOLD_RETRY = (0.5, 10.0)


def event_key(seq: int) -> str:
    """The backend key of event number ``seq``."""
    return f"{EVENTS_PREFIX}{seq:020d}"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


@attrs.frozen
class Problem:
    """One broken link of the chain.

    :ivar seq: the sequence number where the chain breaks.
    :ivar kind: ``altered``, ``removed``, ``inserted``, ``reordered`` or
        ``unreadable``.
    :ivar message: what was found, for people.
    """

    seq: int
    kind: str
    message: str
    event_id: str | None = None

    def to_dict(self) -> dict:
        return {"seq": self.seq, "kind": self.kind, "message": self.message,
                "event_id": self.event_id}


@attrs.frozen
class VerifyResult:
    """The outcome of :meth:`AuditLog.verify`."""

    events: int
    head_seq: int
    problems: tuple[Problem, ...] = ()
    head_hash: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, "events": self.events, "head_seq": self.head_seq,
                "head_hash": self.head_hash,
                "first_problem": self.problems[0].to_dict() if self.problems else None,
                "problems": [p.to_dict() for p in self.problems]}


class AuditLog:
    """Append, search and verify the hash-chained audit log of one cluster.

    :param backend: an ``IBackend``.
    :param cluster_name: put in every event emitted here; node events must
        name it.
    :param clock: ``IReactorTime`` for event times.
    :param new_id: makes event ids (random UUIDs by default).
    :param recordings: the ``IRecordingStore`` of session recordings, kept
        here so the APIs find it beside the log.
    """

    def __init__(self, backend, cluster_name: str, clock, *,
                 new_id: Callable[[], str] | None = None, recordings=None) -> None:
        self.backend = backend
        self.cluster_name = cluster_name
        self.clock = clock
        self.recordings = recordings
        self._new_id = new_id or (lambda: str(uuid.uuid4()))
        self._lock = DeferredLock()
        self._tail: tuple[int, str] | None = None
        self._head_bytes: bytes | None = None
        #: Group commit (IAtomicUpdate): (events, waiter) not yet written.
        self._atomic = IAtomicUpdate.providedBy(backend)
        self._queued: list[tuple[list[dict], Deferred, bool]] = []
        self._writing = False
        self._hold_delay = HOLD_RETRY[0]
        self._held_since: float | None = None

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), timezone.utc)

    # --- writing ---------------------------------------------------------

    def emit(self, event_type: str, **fields: Any) -> Deferred:
        """Record an event that happened here (auth, proxy); never raises.

        Fires with the stored event, or ``None`` after logging a failure
        (an audit write must not fail the action it records).
        """
        try:
            event = ev.make_event(event_type, cluster=self.cluster_name, when=self.now(),
                                  new_id=self._new_id, **fields)
        except errors.EdgeError as e:
            _log.error("audit event {type} not recorded: {reason}", type=event_type, reason=e)
            return Deferred.fromCoroutine(_none())
        if self._atomic:
            # Held and retried through an outage: nobody can resend it.
            d = self._queue([event], hold=True)
        else:
            d = self._locked(lambda: self._append_batch([event], check_duplicates=False))
        d.addCallback(lambda _: event)

        def failed(failure):
            _log.failure("audit event {type} ({id}) could not be stored", failure,
                         type=event_type, id=event["id"])

        d.addErrback(failed)
        return d

    def make(self, event_type: str, fields: dict[str, Any]) -> dict | None:
        """The event :meth:`emit` would store, made now; None (logged) if invalid."""
        try:
            return ev.make_event(event_type, cluster=self.cluster_name, when=self.now(),
                                 new_id=self._new_id, **fields)
        except errors.EdgeError as e:
            _log.error("audit event {type} not recorded: {reason}", type=event_type, reason=e)
            return None

    def append_made(self, events: list[dict]) -> Deferred:
        """Append events of :meth:`make` as one batch (one lock and one head
        write; one transaction on an ``IAtomicUpdate`` backend).

        Fires with None once they are stored, or after logging a failure:
        never with an error (see ``edgeaccess.audit.batch``).
        """
        if self._atomic:
            # Held and retried through an outage, as emit's: nobody can resend them.
            d = self._queue(list(events), hold=True)
        else:
            d = self._locked(lambda: self._append_batch(events, check_duplicates=False))

        def failed(failure):
            _log.failure("{count} audit events ({first}...) could not be stored", failure,
                         count=len(events), first=events[0]["id"] if events else "")

        d.addCallbacks(lambda _: None, failed)
        return d

    async def ingest(self, batch: Iterable[Any], *, node_name: str | None = None,
                     node_id: str | None = None) -> list[str]:
        """Store events received from elsewhere, once each (by event id).

        With ``node_name``, the events come from that node: only node event
        types are taken, and ``node``/``node_id`` are set from the caller's
        certificate, never from the event. Returns the acknowledged ids
        (stored now or earlier).

        :raises errors.BadRequest: a malformed event (nothing is stored).
        """
        batch = list(batch)
        if len(batch) > MAX_BATCH:
            raise errors.BadRequest(f"at most {MAX_BATCH} events per call")
        checked = []
        for raw in batch:
            event = dict(ev.validate_event(raw))
            if event.get("cluster", self.cluster_name) != self.cluster_name:
                raise errors.BadRequest(f"audit event {event['id']} names another cluster")
            event["cluster"] = self.cluster_name
            if node_name is not None:
                if event["event"] not in ev.NODE_EVENT_TYPES:
                    raise errors.BadRequest(
                        f"audit event {event['id']}: a node may not report {event['event']!r}")
                event["node"] = node_name
                if node_id:
                    event["node_id"] = node_id
            checked.append(event)
        if self._atomic:
            return await self._queue(checked)
        return await self._locked(lambda: self._append_batch(checked, check_duplicates=True))

    # --- one transaction per append (IAtomicUpdate) ----------------------------

    def _queue(self, events: list[dict], hold: bool = False) -> Deferred:
        """Append ``events`` in the next transaction; fires with their ids.

        With ``hold`` (events emitted here), a failed transaction keeps them
        queued and tries again later; without (a node's batch), the failure
        is the caller's (the node keeps its spool and sends it again).
        """
        waiter: Deferred = Deferred()
        self._queued.append((events, waiter, hold))
        if not self._writing:
            self._write_queued()
        return waiter

    def _write_queued(self) -> None:
        batch, count = [], 0
        while self._queued and (not batch or count + len(self._queued[0][0]) <= MAX_TRANSACTION):
            entry = self._queued.pop(0)
            batch.append(entry)
            count += len(entry[0])
        if not batch:
            self._writing = False
            return
        self._writing = True
        events = [event for part, _, _ in batch for event in part]
        written = self.backend.atomic_update(lambda reader: chain_events(reader, events))

        def done(result):
            acknowledged, _tail = result
            if self._held_since is not None:
                _log.info("audit: storing events again after {seconds:.0f} s",
                          seconds=self.clock.seconds() - self._held_since)
                self._held_since = None
            self._hold_delay = HOLD_RETRY[0]
            at = 0
            for part, waiter, _ in batch:
                waiter.callback(acknowledged[at:at + len(part)])
                at += len(part)
            self._write_queued()

        def failed(failure):
            # A closed backend (shutting down) or a refused value will not
            # get better: only the other failures (an outage) are held.
            lasting = failure.check(errors.BadRequest) or "backend is closed" in str(failure.value)
            held = [] if lasting else [entry for entry in batch if entry[2]]
            if lasting:
                for part, waiter, hold in batch:
                    if hold:
                        waiter.errback(failure)
            for part, waiter, hold in batch:
                if not hold:
                    waiter.errback(failure)
            if not held:
                self._write_queued()
                return
            self._queued[:0] = held  # first again, in their order
            self._drop_beyond_limit()
            if self._held_since is None:
                self._held_since = self.clock.seconds()
                _log.warn("audit: cannot store events ({error}); keeping them in memory "
                          "and trying again", error=failure.value)
            delay, self._hold_delay = self._hold_delay, min(self._hold_delay * 2,
                                                            HOLD_RETRY[1])
            self.clock.callLater(delay, self._write_queued)

        written.addCallbacks(done, failed)

    def _drop_beyond_limit(self) -> None:
        held = sum(len(part) for part, _, hold in self._queued if hold)
        while held > MAX_HELD_EMITS:
            index = next(i for i, entry in enumerate(self._queued) if entry[2])
            part, waiter, _ = self._queued.pop(index)
            held -= len(part)
            waiter.errback(errors.EdgeError(
                f"audit: more than {MAX_HELD_EMITS} events waiting for the backend"))

    def _locked(self, action) -> Deferred:
        return self._lock.run(lambda: Deferred.fromCoroutine(action()))

    async def _append_batch(self, batch: list[dict], *, check_duplicates: bool) -> list[str]:
        acknowledged: list[str] = []
        if self._tail is None:
            await self._load_tail()
        for event in batch:
            if check_duplicates and await self._known(event["id"]):
                acknowledged.append(event["id"])
                continue
            stored = await self._append_one(event, check_duplicates)
            if stored:
                try:
                    await self.backend.create(IDS_PREFIX + event["id"],
                                              _dumps({"seq": self._tail[0]}))
                except errors.AlreadyExists:
                    pass
            acknowledged.append(event["id"])
        await self._store_head()
        return acknowledged

    async def _append_one(self, event: dict, check_duplicates: bool) -> bool:
        """Chain ``event`` after the tail; ``False`` if another writer stored it."""
        while True:
            seq, prev_hash = self._tail
            record = {"seq": seq + 1, "prev_hash": prev_hash,
                      "hash": ev.chain_hash(prev_hash, event), "event": event}
            try:
                await self.backend.create(event_key(seq + 1), _dumps(record))
            except errors.AlreadyExists:
                # Another writer (another proxy on this backend) took it.
                await self._load_tail()
                if check_duplicates and await self._known(event["id"]):
                    return False
                continue
            self._tail = (seq + 1, record["hash"])
            return True

    async def _known(self, event_id: str) -> bool:
        try:
            await self.backend.get(IDS_PREFIX + event_id)
            return True
        except errors.NotFound:
            return False

    async def _load_tail(self) -> None:
        """Find the last event: from the head, then past it (an append that
        died before moving the head), indexing the ids of those events."""
        try:
            item = await self.backend.get(HEAD_KEY)
            self._head_bytes = item.value
            head = json.loads(item.value)
            tail = (int(head["seq"]), str(head["hash"]))
        except errors.NotFound:
            self._head_bytes = None
            tail = (0, ev.GENESIS_HASH)
        while True:
            try:
                item = await self.backend.get(event_key(tail[0] + 1))
            except errors.NotFound:
                break
            record = json.loads(item.value)
            tail = (tail[0] + 1, record["hash"])
            try:
                await self.backend.create(IDS_PREFIX + record["event"]["id"],
                                          _dumps({"seq": tail[0]}))
            except errors.AlreadyExists:
                pass
        self._tail = tail

    async def _store_head(self) -> None:
        seq, digest = self._tail
        value = _dumps({"seq": seq, "hash": digest})
        for _ in range(20):
            try:
                if self._head_bytes is None:
                    await self.backend.create(HEAD_KEY, value)
                else:
                    if json.loads(self._head_bytes)["seq"] >= seq:
                        return  # another writer already moved it further
                    await self.backend.compare_and_swap(HEAD_KEY, self._head_bytes, value)
                self._head_bytes = value
                return
            except (errors.AlreadyExists, errors.NotFound, CompareFailed):
                try:
                    self._head_bytes = (await self.backend.get(HEAD_KEY)).value
                except errors.NotFound:
                    self._head_bytes = None
        _log.warn("audit head not moved to {seq} after 20 attempts", seq=seq)

    # --- reading -----------------------------------------------------------

    async def records(self) -> list[dict]:
        """Every stored record (``seq``, ``prev_hash``, ``hash``, ``event``), in order."""
        items = await self.backend.get_range(EVENTS_PREFIX)
        out = []
        for item in items:
            try:
                out.append(json.loads(item.value))
            except ValueError:
                continue
        return out

    async def search(self, *, since: datetime | None = None, until: datetime | None = None,
                     types: Iterable[str] = (), user: str | None = None,
                     node: str | None = None, session_id: str | None = None,
                     limit: int | None = None) -> list[dict]:
        """Events that match every filter given, oldest first.

        ``types`` matches the event type exactly or as a prefix ending in
        ``.`` (``session.`` finds ``session.start`` and ``session.end``);
        ``node`` matches the node's name or id. At most ``limit`` (the
        newest) are returned.
        """
        limit = DEFAULT_SEARCH_LIMIT if limit is None else max(0, min(limit, MAX_SEARCH_LIMIT))
        types = [t for t in types if t]
        found = []
        for record in await self.records():
            event = record.get("event")
            if not isinstance(event, dict):
                continue
            if types and not any(event.get("event") == t or
                                 (t.endswith(".") and str(event.get("event", "")).startswith(t))
                                 for t in types):
                continue
            if user is not None and event.get("user") != user:
                continue
            if node is not None and node not in (event.get("node"), event.get("node_id")):
                continue
            if session_id is not None and event.get("session_id") != session_id:
                continue
            if since is not None or until is not None:
                try:
                    when = ev.parse_time(event.get("time"))
                except errors.BadRequest:
                    continue
                if since is not None and when < since:
                    continue
                if until is not None and when > until:
                    continue
            found.append(event)
        return found[-limit:] if limit else []

    async def verify(self) -> VerifyResult:
        """Walk the whole chain; every broken link found, the first first."""
        items = await self.backend.get_range(EVENTS_PREFIX)
        return verify_records([(item.key, item.value) for item in items],
                              await self._read_head())

    async def _read_head(self) -> dict | None:
        try:
            return json.loads((await self.backend.get(HEAD_KEY)).value)
        except (errors.NotFound, ValueError):
            return None


async def _none() -> None:
    return None


def chain_events(reader, events: list[dict]) -> tuple[list[tuple[str, bytes]], tuple]:
    """Chain ``events`` after the head, inside one transaction (pure: it may
    run on a database thread, and again if the transaction is retried).

    Events whose id is already indexed (a retried delivery, or a commit
    whose answer was lost and was retried) are acknowledged, not stored
    again. Returns the writes and ``(acknowledged ids, (seq, hash))``.
    """
    found = reader.get_many([HEAD_KEY] + [IDS_PREFIX + event["id"] for event in events])
    writes: list[tuple[str, bytes]] = []
    if HEAD_KEY in found:
        head = json.loads(found[HEAD_KEY])
        seq, prev_hash = int(head["seq"]), str(head["hash"])
    else:
        seq, prev_hash = 0, ev.GENESIS_HASH
    # Events past the head: a writer without transactions that died before
    # moving it (the create()-and-retry path): chain after them, indexed.
    while True:
        following = reader.get_many([event_key(seq + 1)]).get(event_key(seq + 1))
        if following is None:
            break
        record = json.loads(following)
        seq, prev_hash = seq + 1, str(record["hash"])
        found[IDS_PREFIX + record["event"]["id"]] = b""
        writes.append((IDS_PREFIX + record["event"]["id"], _dumps({"seq": seq})))
    acknowledged, taken = [], set()
    for event in events:
        id_key = IDS_PREFIX + event["id"]
        acknowledged.append(event["id"])
        if id_key in found or id_key in taken:
            continue
        taken.add(id_key)
        digest = ev.chain_hash(prev_hash, event)
        seq += 1
        writes.append((event_key(seq), _dumps({"seq": seq, "prev_hash": prev_hash,
                                                "hash": digest, "event": event})))
        writes.append((id_key, _dumps({"seq": seq})))
        prev_hash = digest
    if writes:
        writes.append((HEAD_KEY, _dumps({"seq": seq, "hash": prev_hash})))
    return writes, (acknowledged, (seq, prev_hash))


def verify_records(items: list[tuple[str, bytes]], head: dict | None) -> VerifyResult:
    """Check a chain given as ``(key, value)`` pairs sorted by key (pure)."""
    parsed: list[tuple[int, dict | None]] = []
    problems: list[Problem] = []
    for key, value in items:
        try:
            key_seq = int(key[len(EVENTS_PREFIX):])
        except ValueError:
            problems.append(Problem(0, "inserted", f"a record with an invalid key {key!r} "
                                    f"was inserted"))
            continue
        try:
            record = json.loads(value)
            if not isinstance(record, dict) or not isinstance(record.get("event"), dict):
                raise ValueError("not a record")
            recomputed = ev.chain_hash(str(record["prev_hash"]), record["event"])
            record["_ok"] = recomputed == record["hash"]
        except (ValueError, KeyError, TypeError, UnicodeError):
            record = None
        parsed.append((key_seq, record))

    by_hash = {r["hash"]: i for i, (_, r) in enumerate(parsed) if r is not None and r["_ok"]}
    prev_hash, prev_seq = ev.GENESIS_HASH, 0
    for index, (seq, record) in enumerate(parsed):
        if seq != prev_seq + 1:
            missing = f"{prev_seq + 1}" if seq == prev_seq + 2 else f"{prev_seq + 1}-{seq - 1}"
            problems.append(Problem(prev_seq + 1, "removed",
                                    f"event {missing} was removed (sequence jumps from "
                                    f"{prev_seq} to {seq})"))
        elif record is None:
            problems.append(Problem(seq, "unreadable", f"event {seq} was altered: it is "
                                    f"not a readable audit record"))
        else:
            event_id = record["event"].get("id")
            if record.get("seq") != seq:
                problems.append(Problem(seq, "reordered", f"event {seq} (id {event_id}) "
                                        f"claims to be event {record.get('seq')}: events "
                                        f"were moved or reordered", event_id))
            elif not record["_ok"]:
                problems.append(Problem(seq, "altered", f"event {seq} (id {event_id}) was "
                                        f"altered: its content does not match its hash",
                                        event_id))
            elif record["prev_hash"] != prev_hash:
                problems.append(_broken_link(seq, event_id, record, index, prev_seq,
                                             by_hash, parsed))
        if record is not None:
            prev_hash = record.get("hash", "")
        prev_seq = seq
    head_seq = int(head["seq"]) if isinstance(head, dict) and "seq" in head else 0
    if head_seq > prev_seq:
        problems.append(Problem(prev_seq + 1, "removed",
                                f"events {prev_seq + 1}-{head_seq} were removed from the end "
                                f"(the head says {head_seq} events, {prev_seq} remain)"))
    elif head_seq == prev_seq and head_seq and head.get("hash") != prev_hash:
        problems.append(Problem(prev_seq, "altered", f"event {prev_seq} was replaced: it "
                                f"does not match the head's hash"))
    problems.sort(key=lambda p: p.seq)
    return VerifyResult(events=len(parsed), head_seq=head_seq, problems=tuple(problems),
                        head_hash=head.get("hash") if isinstance(head, dict) else None)


def _broken_link(seq, event_id, record, index, prev_seq, by_hash, parsed) -> Problem:
    target = by_hash.get(record["prev_hash"])
    if target is None:
        return Problem(seq, "removed",
                       f"event {seq} (id {event_id}) does not chain to event {prev_seq}: an "
                       f"event before it was removed, or event {prev_seq} was replaced",
                       event_id)
    if target < index - 1:
        first, last = parsed[target + 1][0], parsed[index - 1][0]
        span = f"{first}" if first == last else f"{first}-{last}"
        return Problem(first, "inserted",
                       f"event {span} was inserted: event {seq} (id {event_id}) chains to "
                       f"event {parsed[target][0]}", event_id)
    return Problem(seq, "reordered",
                   f"event {seq} (id {event_id}) chains to event {parsed[target][0]}, which "
                   f"comes after it: events were reordered", event_id)
