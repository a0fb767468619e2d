"""The refresh policy: when to refresh, and how long to back off."""

from __future__ import annotations

import random

from tokend.config import RetryConfig, SchedulerConfig


def deadline(
    expires_at: float, now: float, policy: SchedulerConfig, rng: random.Random
) -> float:
    """`expires_at - buffer`, never sooner than `now + min_delay`, then spread.

    The spread only moves deadlines earlier, and never before `now`, so
    integrations connected together do not all refresh together.
    """
    due = max(expires_at - policy.buffer_s, now + policy.min_delay_s)
    spread = rng.uniform(0.0, policy.spread_s) if policy.spread_s else 0.0
    return max(now, due - spread)


def backoff(
    failures: int,
    policy: RetryConfig,
    rng: random.Random,
    retry_after_s: float | None = None,
) -> float:
    """Seconds to wait after `failures` consecutive transient failures.

    Exponential with full jitter: uniform between 0 and `initial * 2^(n-1)`,
    that ceiling capped at `max_s`. A server's Retry-After is a floor, itself
    capped at `retry_after_cap_s`.
    """
    # The exponent is bounded: an outage of days means thousands of failures,
    # and 2.0 ** 1024 overflows a float.
    doublings = min(max(failures - 1, 0), 60)
    ceiling = min(policy.max_s, policy.initial_s * 2.0**doublings)
    delay = rng.uniform(0.0, ceiling)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, policy.retry_after_cap_s))
    return delay
