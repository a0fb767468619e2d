"""The retry backoff, with a seeded random source (no I/O, no clock)."""

from __future__ import annotations

import random
import statistics

import pytest

from tokend.config import RetryConfig
from tokend.policy import backoff

DEFAULTS = RetryConfig()


def test_defaults_are_5_s_doubling_to_5_min() -> None:
    assert (DEFAULTS.initial_s, DEFAULTS.max_s) == (5.0, 300.0)


def test_full_jitter_draws_once_between_zero_and_the_ceiling() -> None:
    for failures, ceiling in [(1, 5), (2, 10), (3, 20), (6, 160), (7, 300), (9, 300)]:
        seeded = random.Random(failures)
        expected = random.Random(failures).uniform(0.0, ceiling)
        assert backoff(failures, DEFAULTS, seeded) == expected


@pytest.mark.parametrize("failures", [1, 3, 7, 20])
def test_full_jitter_spans_the_whole_range(failures: int) -> None:
    rng = random.Random(42)
    ceiling = min(300.0, 5.0 * 2 ** (failures - 1))
    delays = [backoff(failures, DEFAULTS, rng) for _ in range(4000)]
    assert all(0.0 <= d <= ceiling for d in delays)
    # Uniform: the extremes are reached and the mean sits in the middle.
    assert min(delays) < ceiling * 0.01
    assert max(delays) > ceiling * 0.99
    assert statistics.fmean(delays) == pytest.approx(ceiling / 2, rel=0.05)


def test_zero_failures_is_treated_as_the_first() -> None:
    assert backoff(0, DEFAULTS, random.Random(1)) <= DEFAULTS.initial_s


def test_thousands_of_failures_stay_at_the_cap() -> None:
    # Days of outage: the exponent must not overflow a float.
    rng = random.Random(3)
    for failures in (1024, 1025, 5000, 10**9):
        assert 0.0 <= backoff(failures, DEFAULTS, rng) <= DEFAULTS.max_s


def test_retry_after_is_a_floor() -> None:
    rng = random.Random(5)
    assert backoff(1, DEFAULTS, rng, retry_after_s=120.0) == 120.0
    # A short Retry-After does not shorten the backoff.
    policy = RetryConfig(initial_s=100.0, max_s=100.0)
    seeded = random.Random(9)
    jitter = random.Random(9).uniform(0.0, 100.0)
    assert backoff(1, policy, seeded, retry_after_s=1.0) == max(jitter, 1.0)


def test_retry_after_is_honoured_up_to_its_cap() -> None:
    rng = random.Random(6)
    assert backoff(1, DEFAULTS, rng, retry_after_s=86400.0) == 900.0
    capped = RetryConfig(retry_after_cap_s=60.0)
    assert backoff(1, capped, rng, retry_after_s=86400.0) == 60.0
    assert backoff(1, capped, rng, retry_after_s=0.0) <= 5.0
