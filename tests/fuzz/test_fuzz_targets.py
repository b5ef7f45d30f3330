"""A short seeded run of every fuzz target (the long runs: ``python -m benchmarks fuzz``).

Fixed seeds, a few hundred inputs each: fast, reproducible, and able to
fail (a crash is reported with the shrunk input that caused it).
"""

from __future__ import annotations

import pytest

from tests.fuzz.runner import run_target
from tests.fuzz.targets import TARGETS

#: Inputs per target in the test suite (each target takes a few seconds).
INPUTS = 200


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeded_fuzz_run_finds_no_crash(name: str) -> None:
    report = run_target(name, inputs=INPUTS, seed=20261202)
    assert report.crashes == 0, report.crash
    assert report.inputs >= INPUTS


def test_the_runner_reports_a_crash_with_its_input(monkeypatch) -> None:
    # The harness itself can fail: a parser that raises something other
    # than its documented error is a crash, shrunk to a small input.
    from edgeaccess.identity import resources

    def broken(text):
        if b"kind" in text:
            raise KeyError("kind")
        raise resources.BadResource("refused")

    monkeypatch.setattr(resources, "parse_resources", broken)
    report = run_target("yaml", inputs=200, seed=1)
    assert report.crashes == 1
    assert "KeyError" in report.crash and "value=b" in report.crash  # the shrunk input


def test_the_runner_counts_a_logged_traceback_as_a_crash(monkeypatch) -> None:
    from edgeaccess.tunnel import connection

    def swallowed(self, length):
        try:
            raise RuntimeError("a bug the connection swallows")
        except RuntimeError:
            connection._log.failure("swallowed")
        self.violation("key too long")

    monkeypatch.setattr(connection.TunnelConnection, "lengthLimitExceeded", swallowed)
    report = run_target("amp", inputs=200, seed=1, shrink=False)
    assert report.crashes == 1
    assert "swallowed" in report.crash


def test_the_runner_counts_a_slow_input_as_a_hang(monkeypatch) -> None:
    from edgeaccess.pki import keys

    def slow(line):
        while True:
            pass

    monkeypatch.setattr(keys, "load_public_key_openssh", slow)
    report = run_target("ssh-key", inputs=5, seed=1, per_input_deadline=0.2, shrink=False)
    assert report.crashes == 1
    assert "Hang" in report.crash
