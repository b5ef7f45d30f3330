"""One thread for the audit's file I/O, with group commit.

The node's spool and the proxy's recording store never touch the disk from
the reactor thread: they hand *jobs* (plain functions) to a
:class:`DiskWriter`, which runs them one after the other in its own thread
and fires a Deferred with each job's result on the reactor thread.

**Group commit.** The writer takes every job queued when it wakes up as one
batch. A job writes (``write``, ``rename``...) but does not fsync itself:
it names what must be durable with :meth:`Commit.sync` (a file) and
:meth:`Commit.sync_dir` (a directory whose entries changed). Once every job
of the batch has run, each file and directory named is fsync'd **once**,
however many jobs named it, and only then are the batch's Deferreds fired.
So a result is never delivered before what its job wrote is on disk, and
many events arriving together share one fsync (the more load, the larger
the batches: throughput grows with concurrency instead of being one fsync
per event).

Writes that must be ordered against durability (write a temporary file,
make it durable, *then* rename it over the old one) use
:meth:`Commit.then`: the function runs after this round's fsyncs, and what it
names is fsync'd in a further round of the same batch. A failed fsync (a
disk error, a full disk) fails exactly the jobs that named that file or
directory, and their later steps are not run.

The fsync function is injected (``fsync=``), so tests can count calls, make
them slow or make them fail, and check which thread makes them.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger()

#: Most jobs one batch takes (a bound on the latency one batch adds).
MAX_BATCH = 4096


class Commit:
    """What one job asks of its batch's group commit (used in the writer thread)."""

    def __init__(self, fsync: Callable[[int], None]) -> None:
        self._fsync = fsync
        self._files: dict[Any, Any] = {}
        self._dirs: set[str] = set()
        self._then: list[Callable[["Commit"], Any]] = []

    def sync(self, file) -> None:
        """Make ``file`` durable before the job's result is delivered: an open
        file object (one closed meanwhile, replaced and synced by a later job
        of the batch, is skipped) or a path (opened read-only for the fsync,
        which flushes the file whatever descriptor wrote it)."""
        if isinstance(file, (str, os.PathLike)):
            self._files[os.fspath(file)] = os.fspath(file)
        else:
            self._files[id(file)] = file

    def fsync_now(self, file) -> None:
        """fsync ``file`` (an open file object) at once, inside the job: for
        the rare write whose order against later writes matters more than
        sharing an fsync (compacting a file that later jobs append to)."""
        self._fsync(file.fileno())

    def fsync_dir_now(self, path) -> None:
        """fsync directory ``path`` at once (a rename later jobs rely on)."""
        fd = os.open(os.fspath(path), os.O_RDONLY)
        try:
            self._fsync(fd)
        finally:
            os.close(fd)

    def sync_dir(self, path) -> None:
        """Make the entries of directory ``path`` durable (a created,
        renamed or removed file in it)."""
        self._dirs.add(os.fspath(path))

    def then(self, step: Callable[["Commit"], Any]) -> None:
        """Run ``step(commit)`` once what was named so far is durable; its
        return value becomes the job's result when it is not ``None``."""
        self._then.append(step)

    def _take(self):
        files, dirs, steps = self._files, self._dirs, self._then
        self._files, self._dirs, self._then = {}, set(), []
        return files, dirs, steps


class _Entry:
    __slots__ = ("job", "deferred", "what", "commit", "result", "failure")

    def __init__(self, job, deferred, what: str = "") -> None:
        self.job = job
        self.deferred = deferred
        self.what = what
        self.commit: Commit | None = None
        self.result = None
        self.failure: Failure | None = None


class DiskWriter:
    """Runs file jobs in one thread and commits them in groups.

    :param reactor: where results are delivered (``callFromThread``).
    :param fsync: ``fsync(fd)``; ``os.fsync`` (looked up at each call) by default.
    :param name: the thread's name.
    """

    def __init__(self, reactor, *, fsync: Callable[[int], None] | None = None,
                 name: str = "edge-disk-writer") -> None:
        self._reactor = reactor
        self._fsync = fsync
        self._name = name
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped: Deferred | None = None
        #: Counters (read from any thread; for tests and benchmarks).
        self.batches = 0
        self.jobs = 0
        self.fsyncs = 0

    @property
    def thread(self) -> threading.Thread | None:
        """The writer thread (``None`` before :meth:`start`)."""
        return self._thread

    def start(self) -> None:
        """Start the thread (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> Deferred:
        """Finish every queued job, then end the thread; fires when it has ended."""
        if self._stopped is None:
            self._stopped = Deferred()
            if self._thread is None:
                self._stopping = True
                self._stopped.callback(None)
            else:
                with self._wake:
                    self._stopping = True
                    self._wake.notify()
        d = Deferred()
        self._stopped.addBoth(lambda result: (d.callback(None), result)[1])
        return d

    def finish(self, timeout: float = 10.0) -> None:
        """At reactor shutdown (its ``after`` phase, when nothing else runs):
        finish the queued jobs and wait for the thread, at most ``timeout``
        seconds. The only blocking call here: afterwards the process exits,
        and a daemon thread would be cut mid-write."""
        if self._thread is None:
            return
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    def submit(self, job: Callable[[Commit], Any]) -> Deferred:
        """Run ``job(commit)`` in the writer thread; the Deferred fires (on the
        reactor thread) with its result once everything it named is durable,
        or fails with its exception or the fsync's."""
        d: Deferred = Deferred()
        self._enqueue(_Entry(job, d))
        return d

    def post(self, job: Callable[[Commit], Any], what: str = "audit write") -> None:
        """Like :meth:`submit` for a job nobody waits for (a failure is logged)."""
        self._enqueue(_Entry(job, None, what))

    def _enqueue(self, entry: _Entry) -> None:
        if self._thread is None and not self._stopping:
            # Started by the first job, not at construction: twistd may fork
            # (daemonize) after building the services, and a thread does not
            # survive a fork.
            self.start()
        with self._wake:  # (the thread decides to end under this lock too)
            if not self._stopping and self._thread is not None:
                self._queue.append(entry)
                if len(self._queue) == 1:
                    self._wake.notify()
                return
        failure = Failure(RuntimeError(f"the disk writer {self._name} is not running"))
        if entry.deferred is not None:
            entry.deferred.errback(failure)
        else:
            _log.failure("{what} dropped", failure, what=entry.what)

    # --- the writer thread ---------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._stopping:
                    self._wake.wait()
                if not self._queue:
                    break
                batch = [self._queue.popleft()
                         for _ in range(min(len(self._queue), MAX_BATCH))]
            self.commit(batch)
            self._reactor.callFromThread(self._deliver, batch)
        if self._stopped is not None:
            self._reactor.callFromThread(self._stopped.callback, None)

    def _do_fsync(self, fd: int) -> None:
        self.fsyncs += 1
        (self._fsync or os.fsync)(fd)

    def _fsync_path(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self._do_fsync(fd)
        finally:
            os.close(fd)

    def commit(self, batch: list[_Entry]) -> None:
        """Run ``batch`` and its group commit (in the writer thread)."""
        self.batches += 1
        self.jobs += len(batch)
        for entry in batch:
            entry.commit = Commit(self._do_fsync)
            try:
                entry.result = entry.job(entry.commit)
            except BaseException:
                entry.failure = Failure()
        live = [entry for entry in batch if entry.failure is None]
        while live:
            files: dict[int, tuple[Any, list[_Entry]]] = {}
            dirs: dict[str, list[_Entry]] = {}
            steps: list[tuple[_Entry, Callable]] = []
            for entry in live:
                named, named_dirs, then = entry.commit._take()
                for key, file in named.items():
                    files.setdefault(key, (file, []))[1].append(entry)
                for path in named_dirs:
                    dirs.setdefault(path, []).append(entry)
                steps.extend((entry, step) for step in then)
            for file, entries in files.values():
                try:
                    if isinstance(file, str):
                        self._fsync_path(file)
                    elif not file.closed:
                        self._do_fsync(file.fileno())
                except BaseException:
                    self._fail(entries, Failure())
            for path, entries in dirs.items():
                try:
                    self._fsync_path(path)
                except BaseException:
                    self._fail(entries, Failure())
            live = []
            for entry, step in steps:
                if entry.failure is not None:
                    continue
                try:
                    result = step(entry.commit)
                except BaseException:
                    self._fail([entry], Failure())
                    continue
                if result is not None:
                    entry.result = result
                if entry not in live:
                    live.append(entry)

    @staticmethod
    def _fail(entries: list[_Entry], failure: Failure) -> None:
        for entry in entries:
            if entry.failure is None:
                entry.failure = failure

    # --- back on the reactor thread ------------------------------------------

    @staticmethod
    def _deliver(batch: list[_Entry]) -> None:
        for entry in batch:
            if entry.deferred is None:
                if entry.failure is not None:
                    _log.failure("{what} failed", entry.failure, what=entry.what)
            elif entry.failure is not None:
                entry.deferred.errback(entry.failure)
            else:
                entry.deferred.callback(entry.result)


class InlineDiskWriter(DiskWriter):
    """The in-memory twin of :class:`DiskWriter`: each job and its commit run
    at once in the caller's thread, and its Deferred fires before ``submit``
    returns. For code driven by a memory reactor or a fake clock (tests, the
    fuzzer), which has no thread to deliver from; never for a daemon (it
    does the I/O on the caller's thread)."""

    def start(self) -> None:
        pass

    def _enqueue(self, entry: _Entry) -> None:
        self.commit([entry])
        self._deliver([entry])


# --- helpers for jobs ---------------------------------------------------------

_tmp_names = itertools.count()


def write_all(file, data: bytes) -> None:
    """Write every byte of ``data`` to an unbuffered file; if that fails
    (a full disk), cut the file back so no partial record stays behind."""
    start = file.tell()
    view = memoryview(data)
    try:
        while view:
            written = file.write(view)
            view = view[written:]
    except BaseException:
        try:
            file.truncate(start)
            file.seek(start)
        except OSError:
            pass
        raise


def replace_file(commit: Commit, path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably: a temporary
    file, fsync'd (shared with the batch), then renamed over ``path`` and
    the directory fsync'd. A crash leaves the old content or the new one."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}-{next(_tmp_names)}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    commit.sync(tmp)

    def rename(commit: Commit) -> None:
        os.replace(tmp, path)
        commit.sync_dir(os.path.dirname(path) or ".")

    commit.then(rename)


def remove_stale_temporaries(directory) -> None:
    """Remove what :func:`replace_file` left behind when a crash cut it."""
    for name in os.listdir(directory):
        if name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass
