"""Allocator settings of the streaming daemons (``edgeaccess.allocator``)."""

from __future__ import annotations

import platform

import pytest

from edgeaccess import allocator


def test_both_thresholds_are_set_to_fixed_values() -> None:
    calls: list[tuple[int, int]] = []

    def mallopt(parameter: int, value: int) -> int:
        calls.append((parameter, value))
        return 1

    assert allocator.tune_for_streaming(mallopt) is True
    assert calls == [(allocator.M_MMAP_THRESHOLD, 1024 * 1024),
                     (allocator.M_TRIM_THRESHOLD, 4 * 1024 * 1024)]


def test_a_refusal_is_reported_not_raised() -> None:
    assert allocator.tune_for_streaming(lambda parameter, value: 0) is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_them() -> None:
    assert allocator.tune_for_streaming() is True
