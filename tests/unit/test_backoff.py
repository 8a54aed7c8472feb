"""Restart delays as a pure function: doubling, capped, jittered into the upper half."""

import pytest

from stoqd.backoff import delay, doubled, retry_at


@pytest.mark.parametrize(("failures", "nominal"), [(1, 0.25), (2, 0.5), (3, 1.0), (5, 4.0)])
def test_delay_doubles_per_failure(failures: int, nominal: float) -> None:
    assert delay(failures, 0.25, 30, rand=lambda: 1.0) == nominal
    assert delay(failures, 0.25, 30, rand=lambda: 0.0) == nominal / 2


def test_delay_is_capped() -> None:
    assert delay(40, 0.25, 30, rand=lambda: 1.0) == 30
    assert delay(10_000, 0.25, 30, rand=lambda: 1.0) == 30  # no overflow


def test_no_failure_no_delay() -> None:
    assert delay(0, 0.25, 30) == 0.0


def test_retry_at_is_relative_to_the_given_clock() -> None:
    assert retry_at(100.0, 2, 1.0, 30, rand=lambda: 1.0) == 102.0


def test_jitter_spreads_within_bounds() -> None:
    values = {delay(4, 1.0, 30) for _ in range(200)}
    assert len(values) > 100
    assert all(4.0 <= v <= 8.0 for v in values)


def test_doubled_is_the_nominal_delay_without_jitter() -> None:
    assert [doubled(n, 0.5, 8.0) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 8, 8]
