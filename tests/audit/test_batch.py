"""Group commit of a busy emitter (edgeaccess.audit.batch): few appends, nothing reordered."""

from __future__ import annotations

import json

import pytest
from twisted.internet.defer import Deferred
from zope.interface import implementer_only

from auditkit import Counter, clock, run
from edgeaccess.audit.batch import BatchingEmitter
from edgeaccess.audit.log import HEAD_KEY, AuditLog, event_key
from edgeaccess.backend.interfaces import IBackend
from edgeaccess.backend.memory import MemoryBackend


class GatedBackend(MemoryBackend):
    """A memory backend (one transaction per append: ``IAtomicUpdate``) that
    counts head writes and can hold writes until released."""

    def __init__(self, clock) -> None:
        super().__init__(clock)
        self.head_writes = 0
        self.gate: Deferred | None = None

    def _held(self, result):
        if self.gate is None:
            return result
        held = Deferred()
        self.gate.addCallback(lambda _: held.callback(None))
        return held.addCallback(lambda _: run(result))

    def create(self, key, value, expires=None):
        if key == HEAD_KEY:
            self.head_writes += 1
        return self._held(super().create(key, value, expires))

    def compare_and_swap(self, key, expected, value, expires=None):
        if key == HEAD_KEY:
            self.head_writes += 1
        return super().compare_and_swap(key, expected, value, expires)

    def atomic_update(self, compute):
        def counted(reader):
            writes, result = compute(reader)
            self.head_writes += sum(1 for key, _ in writes if key == HEAD_KEY)
            return writes, result

        return self._held(super().atomic_update(counted))


@implementer_only(IBackend)
class GatedPlainBackend(GatedBackend):
    """The same without transactions (as SQLite): the create()-and-retry path."""

    atomic_update = None


@pytest.fixture(params=["transactions", "create-and-retry"])
def world(request):
    fake_clock = clock()
    backend = (GatedBackend if request.param == "transactions" else GatedPlainBackend)(
        fake_clock)
    log = AuditLog(backend, "example", fake_clock, new_id=Counter())
    return fake_clock, backend, log, BatchingEmitter(log, fake_clock)


def _users(backend, count):
    return [json.loads(run(backend.get(event_key(n))).value)["event"]["user"]
            for n in range(1, count + 1)]


def test_events_of_one_reactor_iteration_are_appended_as_one_batch(world):
    fake_clock, backend, log, emitter = world
    for i in range(5):
        emitter.emit("kube.request", user=f"u{i}", response_code=200)
    assert emitter.pending == 5 and emitter.batches == 0  # nothing written yet
    fake_clock.advance(0)
    assert emitter.batches == 1 and emitter.pending == 0
    assert backend.head_writes == 1
    assert _users(backend, 5) == [f"u{i}" for i in range(5)]
    result = run(log.verify())
    assert result.ok and result.events == 5


def test_events_emitted_during_an_append_wait_for_it_and_go_together(world):
    fake_clock, backend, log, emitter = world
    backend.gate = Deferred()
    emitter.emit("kube.request", user="first", response_code=200)
    fake_clock.advance(0)
    assert emitter.batches == 1
    for i in range(3):
        emitter.emit("kube.request", user=f"later{i}", response_code=200)
    fake_clock.advance(0)
    assert emitter.batches == 1 and emitter.pending == 3  # behind the append under way
    gate, backend.gate = backend.gate, None
    gate.callback(None)
    assert emitter.batches == 2 and emitter.pending == 0
    assert _users(backend, 4) == ["first", "later0", "later1", "later2"]
    assert run(log.verify()).ok
    assert run(emitter.flush()) is None


def test_an_emitter_that_cannot_keep_up_drops_beyond_its_bound_and_says_so(world):
    fake_clock, backend, log, _ = world
    emitter = BatchingEmitter(log, fake_clock, max_pending=3)
    for i in range(5):
        emitter.emit("kube.request", user=f"u{i}", response_code=200)
    assert emitter.pending == 3 and emitter.dropped == 2
    fake_clock.advance(0)
    assert _users(backend, 3) == ["u0", "u1", "u2"]


def test_flush_waits_for_every_queued_event(world):
    fake_clock, backend, log, emitter = world
    backend.gate = Deferred()
    emitter.emit("kube.request", user="a", response_code=200)
    fake_clock.advance(0)
    emitter.emit("kube.request", user="b", response_code=200)
    done = emitter.flush()
    assert not done.called
    gate, backend.gate = backend.gate, None
    gate.callback(None)
    assert done.called
    assert _users(backend, 2) == ["a", "b"]
