"""Run a fuzz target for N hypothesis inputs; report inputs, time and crashes.

A crash is any of: an exception out of the target's ``check`` (which lets
only the documented validation errors pass), an error logged with a
traceback while the input ran, or an input that used more CPU time than its
deadline (a hang). The first crash stops the run; hypothesis then shrinks it to a
minimal input, which the report carries.
"""

from __future__ import annotations

import random
import signal
import time
from contextlib import contextmanager
from typing import Any, Iterator

import attrs
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis import seed as hypothesis_seed

from tests.fuzz.targets import TARGETS, Misbehaved
from tests.logwatch import LoudLog

#: CPU seconds one input may take before it counts as a hang.
DEFAULT_DEADLINE = 5.0


class Hang(Misbehaved):
    """One input ran past its deadline."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread once the block has used
    ``seconds`` of CPU time.

    CPU time, not wall time: on a loaded machine an input may wait long for
    a core, and that is no hang. ``SIGPROF`` interrupts Python code (a loop);
    a single long C call is caught when it returns (the check after it).
    """

    def expired(signum: int, frame: Any) -> None:
        raise Hang(f"input still running after {seconds} s of CPU")

    previous = signal.signal(signal.SIGPROF, expired)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    started = time.process_time()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)
    used = time.process_time() - started
    if used > seconds:
        raise Hang(f"input used {used:.1f} s of CPU")


@attrs.define
class Report:
    target: str
    #: hypothesis examples, and inputs checked (each example and its mutants)
    examples: int = 0
    inputs: int = 0
    seconds: float = 0.0
    crashes: int = 0
    #: CPU seconds of the costliest input
    slowest_input_s: float = 0.0
    crash: str | None = None

    def to_dict(self) -> dict:
        return attrs.asdict(self)


def run_target(name: str, *, inputs: int, seed: int = 0, mutants: int = 0,
               per_input_deadline: float = DEFAULT_DEADLINE, shrink: bool = True) -> Report:
    """Feed target ``name`` about ``inputs`` inputs (reproducible from ``seed``):
    hypothesis examples, each followed by ``mutants`` byte-level variants of it."""
    target = TARGETS[name]
    check = target.make()
    report = Report(target=name)

    phases = [Phase.generate, Phase.shrink] if shrink else [Phase.generate]

    def one_input(value: Any) -> None:
        report.inputs += 1
        started = time.process_time()
        with LoudLog() as loud, deadline(per_input_deadline):
            check(value)
        report.slowest_input_s = max(report.slowest_input_s, time.process_time() - started)
        if loud.events:
            raise Misbehaved(loud.describe())

    @hypothesis_seed(seed)
    @settings(max_examples=max(1, -(-inputs // (mutants + 1))), database=None, deadline=None,
              phases=phases, suppress_health_check=list(HealthCheck),
              report_multiple_bugs=False, derandomize=False, print_blob=False)
    @given(target.strategy(), st.integers(0, 2**32 - 1))
    def one(value: Any, mutation_seed: int) -> None:
        report.examples += 1
        one_input(value)
        rng = random.Random(mutation_seed)
        for _ in range(mutants):
            one_input(target.mutate(value, rng))

    started = time.perf_counter()
    try:
        one()
    except Exception as error:  # the (shrunk) crash: reported, not raised
        report.crashes = 1
        notes = "\n".join(getattr(error, "__notes__", ()))  # hypothesis: the falsifying input
        report.crash = f"{type(error).__name__}: {error}\n{notes}"[:4000]
    report.seconds = round(time.perf_counter() - started, 2)
    report.slowest_input_s = round(report.slowest_input_s, 4)
    return report
